"""Crash consistency under random kills: `flsec train` is killed with SIGKILL at random instants,
resumed, killed again, ..., and the finished run must be bit-identical to an uninterrupted one.

    .venv/bin/python benchmarks/crash_consistency.py [--trials 5] [--config configs/digits.toml] [--seed 0]

Each trial kills the run at instants drawn uniformly over the reference run's duration (so kills
land in data loading, local training, aggregation, evaluation and every write of the commit) until
it finishes, then compares every file the manifest lists (by sha256), history.jsonl and the
weights with the reference. Writes benchmarks/results/crash_consistency.md and .json.
(tests/test_crash.py kills at eight fixed points inside the commit on every CI run.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def command(config: str, out: Path, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "flsec.cli", "train", "--config", config, "--out", str(out), "-q"]
    return cmd + (["--resume"] if resume else [])


def snapshot(run: Path) -> dict[str, object]:
    meta = json.loads((run / "meta.json").read_text())
    return {"files": meta["files"], "history": (run / "history.jsonl").read_text(),
            "model": (run / "model.safetensors").read_bytes().hex()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--config", default=str(ROOT / "configs" / "digits.toml"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "crash_consistency"))
    args = ap.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        ref = Path(tmp) / "ref"
        t0 = time.perf_counter()
        subprocess.run(command(args.config, ref, False), check=True, capture_output=True)
        duration = time.perf_counter() - t0
        expected = snapshot(ref)
        trials = []
        for trial in range(args.trials):
            out = Path(tmp) / f"t{trial}"
            kills, resumed = [], False
            while True:
                proc = subprocess.Popen(command(args.config, out, resumed), stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE)
                at = rng.uniform(0.5, duration)
                try:
                    proc.wait(timeout=at)
                except subprocess.TimeoutExpired:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()
                    kills.append(round(at, 2))
                    resumed = True
                    continue
                if proc.returncode != 0:
                    raise SystemExit(f"trial {trial}: resume failed: {proc.stderr.read().decode()[-2000:]}")
                break
            same = snapshot(out) == expected
            trials.append({"trial": trial, "kills": len(kills), "kill_times_s": kills, "identical": same})
            print(f"trial {trial}: {len(kills)} kills, identical to the uninterrupted run: {same}", flush=True)
            shutil.rmtree(out)
    total = sum(t["kills"] for t in trials)
    ok = all(t["identical"] for t in trials)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    result = {"command": " ".join(["python", "benchmarks/crash_consistency.py", *sys.argv[1:]]), "commit": commit,
              "config": args.config, "reference_seconds": round(duration, 1), "trials": trials, "kills": total,
              "all_identical": ok, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Crash consistency under random SIGKILL", "",
        f"Command: `{result['command']}` (commit {commit}, {result['machine']}).",
        f"Config `{Path(args.config).name}`; the uninterrupted run takes {duration:.1f} s. Each trial kills "
        "`flsec train` at instants drawn uniformly over that duration and resumes it until it finishes.", "",
        "| trial | kills | bit-identical to the uninterrupted run |", "|---|---|---|",
        *[f"| {t['trial']} | {t['kills']} | {'yes' if t['identical'] else 'NO'} |" for t in trials], "",
        f"{total} kills in {len(trials)} trials; every finished run identical: {'yes' if ok else 'NO'}.", "",
    ]
    Path(args.out + ".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
