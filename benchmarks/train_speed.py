"""Speed target: `flsec train` on the embedded default (digits) finishes within 60 s on 2 cores.

    .venv/bin/python benchmarks/train_speed.py [--repeats 3]

Times the whole command (interpreter start, imports, data, 15 rounds, checkpoint writes) and
writes benchmarks/results/train_speed.md.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flsec.io import write_text

ROOT = Path(__file__).resolve().parents[1]
TARGET_SECONDS = 60.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    times = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "flsec.cli", "train", "--config", str(ROOT / "configs" / "digits.toml"),
                            "--out", str(Path(tmp) / "run"), "--quiet"], check=True)
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    verdict = "meets" if med <= TARGET_SECONDS else "MISSES"
    text = (f"`flsec train --config configs/digits.toml`: median {med:.1f} s over {args.repeats} runs "
            f"({', '.join(f'{t:.1f}' for t in times)}); target <= {TARGET_SECONDS:.0f} s: {verdict}.\n")
    write_text(ROOT / "benchmarks" / "results" / "train_speed.md", text)
    print(text, end="")


if __name__ == "__main__":
    main()
