"""Effect of reduced-precision local training (bf16 autocast) on MA and ASR, next to fp32.

    flock /work/bench.lock .venv/bin/python benchmarks/precision.py --data-dir /work/shared/data [--seeds 0 1 2]

configs/mnist_defense.toml (real MNIST, 8,000 train / 2,000 test, 20 clients, Dirichlet 0.5, 2 backdoor
attackers, 20 rounds): the boosted backdoor aggregated with FedAvg (the attack succeeds) and with the
coordinate-wise median (it does not), and the plain (not boosted) backdoor with FedAvg, each trained
at fp32, at bf16, at fp32 with channels-last convolutions (a change of float rounding only: how far
rounding alone moves the result) and at bf16 with channels-last, for each seed. MA and ASR are always
measured in fp32. Target: MA within 0.3 points of fp32 and the ASR verdict (attack succeeds or not)
unchanged. Runs already in the results file are kept (a case already there is not run again, so seeds
can be added later); writes benchmarks/results/precision.md and .json.
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
from flsec.fl.engines import train
from flsec.io import write_json, write_text

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ARITHMETIC = (("fp32", "contiguous"), ("bf16", "contiguous"), ("fp32", "channels_last"), ("bf16", "channels_last"))
CASES = [(rule, boost, precision, fmt) for rule, boost in (("fedavg", True), ("median", True), ("fedavg", False))
         for precision, fmt in ARITHMETIC]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=RESULTS / "precision.json")
    args = ap.parse_args()
    old = json.loads(args.out.read_text()) if args.out.exists() else {}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    runs: list[dict[str, Any]] = list(old.get("runs", []))
    done = {(r["seed"], *case_of(r)) for r in runs}
    load = [os.getloadavg()[0]]
    for seed, (rule, boost, precision, fmt) in ((sd, c) for sd in args.seeds for c in CASES):
        if (seed, rule, boost, precision, fmt) in done:
            continue
        cfg = load_config(ROOT / "configs" / "mnist_defense.toml", [f"seed={seed}",
            f'data.data_dir="{args.data_dir}"', f"training.rounds={args.rounds}", f"attack.boost={str(boost).lower()}",
            f'aggregation.name="{rule}"', f'runtime.precision="{precision}"', f'runtime.memory_format="{fmt}"',
            f"runtime.threads={args.threads}", 'runtime.device="cpu"'])
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = train(cfg, Path(tmp) / "r", progress=False)
        hist = ckpt.history
        runs.append({"seed": seed, "rule": rule, "boost": boost, "precision": precision, "memory_format": fmt,
                     "commit": commit,
                     "seconds": time.perf_counter() - t0,
                     "ma": [h["ma"] for h in hist], "asr": [h["asr"] for h in hist]})
        print(json.dumps({k: v for k, v in runs[-1].items() if k not in ("ma", "asr")}
                         | {"ma": hist[-1]["ma"], "asr": hist[-1]["asr"]}), flush=True)
    load.append(os.getloadavg()[0])
    key = " ".join(map(str, args.seeds))
    commands = {**old.get("commands", {}), key: " ".join(["python", "benchmarks/precision.py", *sys.argv[1:]])}
    result = {"commands": commands, "torch": torch.__version__, "threads": args.threads,
              "rounds": args.rounds, "load_average": {**old.get("load_average", {}), key: load},
              "runs": sorted(runs, key=lambda r: (CASES.index(case_of(r)), r["seed"]))}
    write_json(args.out, result)
    text = render(result)
    write_text(args.out.with_suffix(".md"), text)
    print(text)


def case_of(run: dict[str, Any]) -> tuple[str, bool, str, str]:
    return run["rule"], run.get("boost", True), run["precision"], run["memory_format"]


def _setting(run: dict[str, Any]) -> str:
    return run["rule"] + (", boosted" if run.get("boost", True) else ", not boosted")


def render(res: dict[str, Any]) -> str:
    cmds = "; ".join(f"`flock /work/bench.lock .venv/bin/{c}` (seeds {k})" for k, c in res["commands"].items())
    loads = ", ".join(f"{a:.1f} / {b:.1f}" for a, b in res["load_average"].values())
    lines = ["# Precision: bf16 autocast vs fp32 local training", "",
             f"Commands: {cmds}; git {', '.join(sorted({r['commit'] for r in res['runs']}))} (each run's commit is in "
             f"precision.json), torch {res['torch']}, {res['threads']} thread(s) (CPU with "
             "AVX512-BF16). Setting: configs/mnist_defense.toml (real MNIST 8,000 train / 2,000 test, 20 clients, "
             "Dirichlet 0.5, 2 attackers, batch 32, lr 0.05, momentum 0.9) with the backdoor boosted (model "
             "replacement) or not, "
             f"{res['rounds']} rounds. Precision applies to local training (forward passes under autocast; weights, "
             "gradients and SGD in fp32); MA and ASR are measured in fp32. The channels-last fp32 run changes only "
             "float rounding: its distance to fp32 is the noise floor that any change of arithmetic meets in "
             f"this setting. Speed is measured by benchmarks/throughput.py, not here (run times are in precision.json). "
             f"Load average at start / end: {loads}.", "",
             "| seed | aggregation | training | MA (last round) | ASR (last round) | mean MA, last 5 rounds | "
             "MA vs fp32 | ASR vs fp32 |", "|---|---|---|---|---|---|---|---|"]
    ref = {(r["seed"], _setting(r)): r for r in res["runs"]
           if r["precision"] == "fp32" and r["memory_format"] == "contiguous"}
    for r in res["runs"]:
        base = ref[(r["seed"], _setting(r))]
        name = r["precision"] + (", channels-last" if r["memory_format"] == "channels_last" else "")
        ma5 = sum(r["ma"][-5:]) / len(r["ma"][-5:])
        lines.append(f"| {r['seed']} | {_setting(r)} | {name} | {100 * r['ma'][-1]:.2f}% | {100 * r['asr'][-1]:.2f}% | "
                     f"{100 * ma5:.2f}% | {100 * (r['ma'][-1] - base['ma'][-1]):+.2f} pt | "
                     f"{100 * (r['asr'][-1] - base['asr'][-1]):+.2f} pt |")
    lines += ["", "Over the seeds (last round; difference to fp32 of the same seed and rule):", "",
              "| aggregation | training | mean MA | mean MA vs fp32 | largest MA difference | mean ASR | runs |",
              "|---|---|---|---|---|---|---|"]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in res["runs"]:
        name = r["precision"] + (", channels-last" if r["memory_format"] == "channels_last" else "")
        groups.setdefault((_setting(r), name), []).append(r)
    for (setting, name), rs in groups.items():
        diffs = [r["ma"][-1] - ref[(r["seed"], setting)]["ma"][-1] for r in rs]
        lines.append(f"| {setting} | {name} | {100 * sum(r['ma'][-1] for r in rs) / len(rs):.2f}% | "
                     f"{100 * sum(diffs) / len(diffs):+.2f} pt | {100 * max(diffs, key=abs):+.2f} pt | "
                     f"{100 * sum(r['asr'][-1] for r in rs) / len(rs):.2f}% | {len(rs)} |")
    lines += ["", "Target: MA within 0.3 points of fp32, ASR direction (high under FedAvg, low under the median) "
              "unchanged. Per-round MA/ASR are in precision.json."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
