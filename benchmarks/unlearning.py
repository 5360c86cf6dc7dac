"""Unlearning benchmark on real MNIST (configs/mnist_unlearning.toml): the whole pipeline, then a
table of MA/ASR before and after unlearning from reconstructions, next to the baselines.

    .venv/bin/python benchmarks/unlearning.py [--data-dir ../shared/data] [--out runs/mnist_unlearning]

The same on Fashion-MNIST:

    .venv/bin/python benchmarks/unlearning.py --set 'data.name="fashion_mnist"' \
        --out runs/fmnist_unlearning --results benchmarks/results/unlearning_fashion_mnist

Re-running resumes finished phases. Writes benchmarks/results/unlearning.md and .json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from flsec.config import load_config
from flsec.io import write_json, write_text
from flsec.pipeline import run_pipeline

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--out", default=str(ROOT / "runs" / "mnist_unlearning"))
    ap.add_argument("--set", nargs="*", default=[], help="extra config overrides")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "unlearning"),
                    help="where the .md and .json tables go (without suffix)")
    args = ap.parse_args()
    cfg = load_config(ROOT / "configs" / "mnist_unlearning.toml", [f"data.data_dir=\"{args.data_dir}\"", *args.set])
    t0 = time.perf_counter()
    report = run_pipeline(cfg, Path(args.out), progress=False)
    seconds = time.perf_counter() - t0
    run = Path(args.out)
    u = json.loads((run / "unlearn" / "metrics.json").read_text())
    inv = json.loads((run / "invert" / "metrics.json").read_text())["summary"]
    rows = [("before (global model)", u["before"]), ("after unlearning (reconstructions only)", u["after"]),
            (f"plain fine-tuning on {u['baseline_finetune']['clean_images']} clean images", u["baseline_finetune"]),
            (f"retraining without the attackers ({u['baseline_retrain']['rounds']} rounds)", u["baseline_retrain"])]
    v = u["verification"]
    lines = ["| model | MA | ASR |", "|---|---|---|"]
    lines += [f"| {n} | {100 * m['ma']:.2f}% | {100 * m['asr']:.2f}% |" for n, m in rows]
    lines += ["", f"Inversion: {inv['images']} images, mean PSNR {inv['mean_psnr']:.2f} dB, label accuracy "
              f"{100 * inv['label_accuracy']:.0f}%, trigger correlation "
              f"{inv['mean_trigger_correlation']:.2f} (mean over poisoned samples). "
              f"Verification: backdoor {'found' if v.get('backdoor_found') else 'not found'}, suspected target "
              f"{v.get('suspected_target')}, {v.get('suspects')} suspects, mask IoU "
              f"{v.get('mask_iou_with_true_trigger', float('nan')):.2f}. "
              f"Wall time {seconds:.0f} s (resumed phases excluded).",
              f"Report: {report}"]
    results = Path(args.results)
    write_text(results.with_suffix(".md"), "\n".join(lines) + "\n")
    write_json(results.with_suffix(".json"), {"config": cfg.model_dump(mode="json"), "rows": rows, "inversion": inv,
                                              "verification": v})
    print("\n".join(lines))


if __name__ == "__main__":
    main()
