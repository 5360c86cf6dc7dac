"""Batched inversion: images/s of `flsec invert --all` one by one vs ``--batch-captures N``.

20 batch-1 FedSGD gradients on real MNIST with the McMahan et al. CNN: 10 clients x rounds 1 and 2
of a small backdoored FedAvg run (so the batch mixes two different global models), inverted with
``geiping`` end to end by :func:`flsec.inversion.attack.run_inversion` (labels, optimisation,
scoring, outputs), once one by one (the reference) and once for each N in ``--batch``.

A timing run: under the exclusive lock, 2 threads.

    flock -x /work/bench.lock .venv/bin/python benchmarks/inversion_batched.py --threads 2 --iterations 500

``--cpu-time`` measures ``time.process_time()`` instead of wall time (for a shared machine, with 1
thread). Writes benchmarks/results/inversion_batched.md and .json.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from flsec.config import load_config
from flsec.fl.engines import train
from flsec.inversion.attack import run_inversion
from flsec.inversion.methods import InversionSettings
from flsec.io import write_json, write_text

ROOT = Path(__file__).resolve().parents[1]


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown") if Path("/proc/cpuinfo").exists() else "unknown"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=ROOT).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "commit": commit + ("+dirty" if dirty else "")}


def captures(args: argparse.Namespace) -> Path:
    """The run holding the 20 captures (trained once, reused)."""
    run = Path(args.work)
    cfg = load_config(ROOT / "configs" / "mnist_defense.toml", [
        f"data.data_dir=\"{args.data_dir}\"", "data.train_size=2000", "data.test_size=500", "data.partition=\"iid\"",
        f"training.num_clients={args.clients}", "training.rounds=2", "capture.rounds=\"all\"", "capture.clients=\"all\"",
        "capture.updates=false", "capture.gradient_batch_sizes=[1]", "runtime.device=\"cpu\""])
    if not (run / "meta.json").exists():
        train(cfg, run, progress=False)
    return run


def measure(run: Path, settings: InversionSettings, batch: int, cpu_time: bool, device: torch.device) -> dict[str, Any]:
    clock = time.process_time if cpu_time else time.perf_counter
    with tempfile.TemporaryDirectory() as tmp:
        t0 = clock()
        report = run_inversion(run, Path(tmp) / "inv", every=True, settings=settings, batch_captures=batch,
                               device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = clock() - t0
    s = report["summary"]
    psnr = {f"r{t['round']}_c{t['client']}": t["mean_psnr"] for t in report["targets"] if t["status"] == "ok"}
    return {"batch_captures": batch, "seconds": seconds, "images": s["images"], "images_per_second": s["images"] / seconds,
            "mean_psnr": s["mean_psnr"], "label_accuracy": s["label_accuracy"], "batching": s["batching"],
            "psnr_per_capture": psnr}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--iterations", type=int, default=500)
    ap.add_argument("--tv", type=float, default=1e-3)
    ap.add_argument("--clients", type=int, default=10, help="clients per round (all captured, rounds 1 and 2)")
    ap.add_argument("--batch", nargs="*", type=int, default=[5, 10, 20])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cpu-time", action="store_true", help="time.process_time() instead of wall time")
    ap.add_argument("--device", default="cpu", help="where the inversions run (the captures are trained on the CPU)")
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench_inversion_batched"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "inversion_batched"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    run = captures(args)
    settings = InversionSettings(iterations=args.iterations, tv_weight=args.tv, progress=False)
    # Warm-up (first-call costs of oneDNN and torch.func land on neither side).
    for b in (1, 2):
        measure(run, InversionSettings(iterations=3, tv_weight=args.tv, progress=False), b, args.cpu_time, device)
    load0 = os.getloadavg()
    rows = [measure(run, settings, 1, args.cpu_time, device)]
    print(f"one by one: {rows[0]['images_per_second']:.3f} images/s, PSNR {rows[0]['mean_psnr']:.2f} dB", flush=True)
    for b in args.batch:
        rows.append(measure(run, settings, b, args.cpu_time, device))
        print(f"batch {b}: {rows[-1]['images_per_second']:.3f} images/s, PSNR {rows[-1]['mean_psnr']:.2f} dB", flush=True)
    load1 = os.getloadavg()
    ref = rows[0]
    for r in rows:
        r["speedup"] = r["images_per_second"] / ref["images_per_second"]
        r["psnr_delta"] = r["mean_psnr"] - ref["mean_psnr"]
        r["max_capture_psnr_delta"] = max(abs(r["psnr_per_capture"][k] - ref["psnr_per_capture"][k])
                                          for k in ref["psnr_per_capture"])
    command = "python " + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0]).relative_to(ROOT)
                                                                   if Path(sys.argv[0]).is_absolute() else sys.argv[0]),
                                                               *sys.argv[1:]])
    info = {**machine(), "device": str(device), "threads": torch.get_num_threads(),
            "iterations": args.iterations, "tv": args.tv,
            "captures": ref["images"], "clock": "process_time (CPU seconds)" if args.cpu_time else "wall (perf_counter)",
            "load_average_before_after": [load0[0], load1[0]], "command": command}
    lines = ["| mode | images | seconds | images/s | speedup | mean PSNR (dB) | PSNR vs one-by-one | worst capture "
             "PSNR change |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mode = "one by one" if r["batch_captures"] == 1 else f"batched, N = {r['batch_captures']}"
        lines.append(f"| {mode} | {r['images']} | {r['seconds']:.1f} | {r['images_per_second']:.3f} | "
                     f"{r['speedup']:.2f}x | {r['mean_psnr']:.2f} | {r['psnr_delta']:+.2f} | "
                     f"{r['max_capture_psnr_delta']:.2f} |")
    note = (f"\n\n`flsec invert --all` end to end (label inference, optimisation, scoring, outputs) on {ref['images']} "
            f"batch-1 gradient captures of real MNIST (McMahan et al. CNN, `configs/mnist_defense.toml` with 2,000 train "
            f"images, iid, {args.clients} clients, all captured in rounds 1 and 2: each batch mixes two global models), "
            f"inverted on {device}. "
            f"`geiping`, {args.iterations} signed-Adam steps, 1 restart, TV {args.tv:g}, seed 0 (every capture starts "
            f"from the same seeded image in both modes). {info['threads']} torch thread(s); clock: {info['clock']}; "
            f"load average {load0[0]:.2f} before, {load1[0]:.2f} after. Target (issue 13): >= 1.8x images/s at equal "
            f"PSNR (within 0.5 dB). Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, git "
            f"{info['commit']}."
            + (" **CPU time**, not wall time: `time.process_time()` of this one-thread process, measured on a shared "
               "machine where other processes kept running; images/s is images per CPU second." if args.cpu_time else "")
            + f"\n\nCommand: `{command}`\n")
    write_text(Path(args.out).with_suffix(".md"), "\n".join(lines) + note)
    write_json(Path(args.out).with_suffix(".json"), {"machine": info, "rows": rows})
    print("\n".join(lines) + note)


if __name__ == "__main__":
    main()
