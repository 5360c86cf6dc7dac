"""Effect of reduced-precision local training (bf16 autocast) on MA and ASR, next to fp32.

    flock /work/bench.lock .venv/bin/python benchmarks/precision.py --data-dir /work/shared/data

configs/mnist_defense.toml (real MNIST, 8,000 train / 2,000 test, 20 clients, Dirichlet 0.5, 2 backdoor
attackers, 20 rounds) under the boosted backdoor, aggregated with FedAvg (the attack succeeds) and with
the coordinate-wise median (it does not), each trained at fp32 and at bf16, and once at fp32 with
channels-last convolutions (a change of kernels only). MA and ASR are always measured in fp32.
Target: MA within 0.3 points of fp32 and the ASR verdict (attack succeeds or not) unchanged.
Writes benchmarks/results/precision.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from flsec.config import load_config
from flsec.fl.server import train
from flsec.io import write_json, write_text

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CASES = [("fedavg", "fp32", "contiguous"), ("fedavg", "bf16", "contiguous"), ("fedavg", "fp32", "channels_last"),
         ("median", "fp32", "contiguous"), ("median", "bf16", "contiguous")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "precision.json")
    args = ap.parse_args()
    runs: list[dict[str, Any]] = []
    load = [os.getloadavg()[0]]
    for rule, precision, fmt in CASES:
        cfg = load_config(ROOT / "configs" / "mnist_defense.toml", [
            f'data.data_dir="{args.data_dir}"', f"training.rounds={args.rounds}", "attack.boost=true",
            f'aggregation.name="{rule}"', f'runtime.precision="{precision}"', f'runtime.memory_format="{fmt}"',
            f"runtime.threads={args.threads}", 'runtime.device="cpu"'])
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = train(cfg, Path(tmp) / "r", progress=False)
        hist = ckpt.history
        runs.append({"rule": rule, "precision": precision, "memory_format": fmt, "seconds": time.perf_counter() - t0,
                     "ma": [h["ma"] for h in hist], "asr": [h["asr"] for h in hist]})
        print(json.dumps({k: v for k, v in runs[-1].items() if k not in ("ma", "asr")}
                         | {"ma": hist[-1]["ma"], "asr": hist[-1]["asr"]}), flush=True)
    load.append(os.getloadavg()[0])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    result = {"command": " ".join(["python", "benchmarks/precision.py", *sys.argv[1:]]), "commit": commit,
              "torch": torch.__version__, "threads": args.threads, "rounds": args.rounds, "seed": 0,
              "load_average": load, "runs": runs}
    write_json(args.out, result)
    text = render(result)
    write_text(args.out.with_suffix(".md"), text)
    print(text)


def render(res: dict[str, Any]) -> str:
    lines = ["# Precision: bf16 autocast vs fp32 local training", "",
             f"Command: `flock /work/bench.lock .venv/bin/{res['command']}`; git {res['commit']}, torch {res['torch']}, "
             f"{res['threads']} threads (CPU, AVX512-BF16), seed {res['seed']}. Setting: configs/mnist_defense.toml "
             "(real MNIST 8,000 train / 2,000 test, 20 clients, Dirichlet 0.5, 2 attackers, batch 32, lr 0.05, "
             f"momentum 0.9) with `attack.boost = true`, {res['rounds']} rounds. Precision applies to local training "
             "(forward passes under autocast; weights, gradients and SGD in fp32); MA and ASR are measured in fp32. "
             f"Load average at start / end: {res['load_average'][0]:.1f} / {res['load_average'][1]:.1f}.", "",
             "| aggregation | training | MA (last round) | ASR (last round) | mean MA, last 5 rounds | "
             "MA vs fp32 | ASR vs fp32 | run time |", "|---|---|---|---|---|---|---|---|"]
    ref = {r["rule"]: r for r in res["runs"] if r["precision"] == "fp32" and r["memory_format"] == "contiguous"}
    for r in res["runs"]:
        base = ref[r["rule"]]
        name = r["precision"] + (", channels-last" if r["memory_format"] == "channels_last" else "")
        ma5 = sum(r["ma"][-5:]) / len(r["ma"][-5:])
        lines.append(f"| {r['rule']} | {name} | {100 * r['ma'][-1]:.2f}% | {100 * r['asr'][-1]:.2f}% | {100 * ma5:.2f}% | "
                     f"{100 * (r['ma'][-1] - base['ma'][-1]):+.2f} pt | {100 * (r['asr'][-1] - base['asr'][-1]):+.2f} pt | "
                     f"{r['seconds']:.0f} s |")
    lines += ["", "Target: MA within 0.3 points of fp32, ASR direction (high under FedAvg, low under the median) "
              "unchanged. Per-round MA/ASR are in precision.json."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
