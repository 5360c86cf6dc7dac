"""One condition of benchmarks/inversion_realistic.py at a chosen iteration count: the convergence check.

    .venv/bin/python benchmarks/inversion_realistic_point.py ITERATIONS MODEL N T [TV] [TRIALS]

e.g. ``200 mnist_cnn 1 1`` (batch 1, one local step, untrained model: should reach a high PSNR) or
``1000 mnist_cnn 4 5`` (does a multi-image update improve with 5x the iterations?). Prints one line per
trial: iterations, model, N, T, TV, trial, PSNR distribution (Hungarian-matched), label accuracy, seconds.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import inversion_realistic as ir
from flsec.data import load_dataset
from flsec.inversion.methods import InversionSettings
from flsec.models import InputSpec


def main() -> None:
    torch.set_num_threads(1)
    it, model, n, steps = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    tv = float(sys.argv[5]) if len(sys.argv) > 5 else 1e-2
    trials = int(sys.argv[6]) if len(sys.argv) > 6 else 1
    data = load_dataset("mnist", ir.ROOT.parent / "shared" / "data" if not Path("/work/shared/data").is_dir()
                        else Path("/work/shared/data"))
    spec = InputSpec(1, 28, 28, 10, data.mean, data.std)
    s = InversionSettings(iterations=it, tv_weight=tv, max_images=16, progress=False)
    for trial in range(trials):
        t = time.time()
        r = ir.run_one({**ir.BASE, "model": model, "images": n, "steps": steps}, trial, data, spec, None, s)
        print(it, model, n, steps, tv, trial, r.get("psnr_stats"), r.get("label_accuracy"), f"{time.time() - t:.1f}s",
              flush=True)


if __name__ == "__main__":
    main()
