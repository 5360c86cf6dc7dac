"""Where the time of `flsec train` goes, and how fast local training runs.

    flock /work/bench.lock .venv/bin/python benchmarks/throughput.py --data-dir /work/shared/data \
        [--parts local round defender scale] [--device cpu]

Parts (each can be run alone; results merge into benchmarks/results/throughput.json and the whole of
benchmarks/results/throughput.md is re-rendered from it):

* ``local``: local-training images/s of the sequential and the vectorised client engine at local
  batch 10 / 32 / 64, for 20 and 100 clients (vectorised over all of them at once), at 1 and 2 threads
  (MNIST CNN, 160 MNIST images per client, 1 epoch, SGD with momentum).
* ``round``: one `flsec train` round of configs/mnist_defense.toml split into local training / attack /
  aggregation / evaluation / capture and save (the server's own timings), at 1 and 2 threads.
* ``defender``: seconds per round against an FL-Defender-style loop (benchmarks/fl_defender_style_loop.py):
  same MNIST CNN, full MNIST, 20 IID peers, 3 local epochs, batch 64, lr 0.05, momentum 0.9, 1 thread.
* ``scale``: 1,000 clients on full MNIST (IID, 60 images each) with 5 / 10 / 20% sampled per round:
  peak resident memory and local-training time per round, each case in a fresh process; then 10,000
  clients (6 images each), 10% sampled, one round.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flsec.config import ExperimentConfig, build_config, load_config
from flsec.data import load_dataset
from flsec.fl.engines import CLIENT_ENGINES
from flsec.fl.federation import Federation
from flsec.fl.server import Server
from flsec.io import write_json, write_text

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def machine() -> dict[str, Any]:
    cpu = "unknown"
    info = Path("/proc/cpuinfo")
    if info.exists():
        for line in info.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=ROOT).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "commit": commit + ("+dirty" if dirty else ""), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available()
            else None}


def peak_rss_mb() -> float:
    """This process's peak resident set size. VmHWM belongs to the process's own address space;
    getrusage's ru_maxrss would also count the parent's RSS at fork time (Linux keeps it across exec)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- local training ----------------------------------------------------------------------------


def local_config(data_dir: str, clients: int, per_client: int, batch: int, engine: str, device: str,
                 precision: str = "fp32", memory_format: str = "contiguous") -> ExperimentConfig:
    return build_config({
        "seed": 0,
        "data": {"name": "mnist", "data_dir": data_dir, "train_size": clients * per_client, "test_size": 100,
                 "partition": "iid", "download": False},
        "model": {"name": "mnist_cnn"},
        "training": {"num_clients": clients, "rounds": 1, "local_epochs": 1, "batch_size": batch, "lr": 0.05,
                     "momentum": 0.9},
        "runtime": {"client_engine": engine, "client_chunk": clients, "device": device, "precision": precision,
                    "memory_format": memory_format},
    })


def time_engine(cfg: ExperimentConfig, repeats: int) -> tuple[float, float]:
    """Images per wall-clock second and per CPU second of the process, of one round of local training
    (best of ``repeats`` after a warm-up)."""
    fed = Federation.from_config(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(cfg, Path(tmp) / "r", federation=fed)
        tasks = server.begin_round(1)
        engine = CLIENT_ENGINES.get(cfg.runtime.client_engine)(fed)
        engine.run(tasks[:2])  # warm-up: kernel selection, allocator
        images = sum(len(fed.shards[t.client]) for t in tasks) * cfg.training.local_epochs
        best, best_cpu = float("inf"), float("inf")
        for _ in range(repeats):
            _sync(fed.runtime.device)
            t0, c0 = time.perf_counter(), time.process_time()
            engine.run(tasks)
            _sync(fed.runtime.device)
            best, best_cpu = min(best, time.perf_counter() - t0), min(best_cpu, time.process_time() - c0)
    return images / best, images / best_cpu


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


ENGINES = [("sequential", "sequential", "contiguous"), ("sequential_cl", "sequential", "channels_last"),
           ("vectorised", "vectorised", "contiguous")]


def part_local(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for clients in (20, 100):
            for batch in (10, 32, 64):
                row: dict[str, Any] = {"threads": threads, "clients": clients, "batch": batch}
                for key, engine, fmt in ENGINES:
                    row[key], row[f"{key}_cpu"] = time_engine(
                        local_config(args.data_dir, clients, args.per_client, batch, engine, args.device,
                                     memory_format=fmt), args.repeats)
                row["ratio"] = row["vectorised"] / row["sequential"]
                row["ratio_cpu"] = row["vectorised_cpu"] / row["sequential_cpu"]
                print(json.dumps(row), flush=True)
                rows.append(row)
    if args.bf16_rows:
        torch.set_num_threads(1)
        for batch in (10, 32, 64):
            row = {"threads": 1, "clients": 20, "batch": batch, "precision": "bf16"}
            for key, engine, fmt in ENGINES:
                row[key], row[f"{key}_cpu"] = time_engine(
                    local_config(args.data_dir, 20, args.per_client, batch, engine, args.device, "bf16", fmt),
                    args.repeats)
            print(json.dumps(row), flush=True)
            rows.append(row)
    return {"device": args.device, "per_client": args.per_client, "repeats": args.repeats, "rows": rows}


# --- one training round, split -----------------------------------------------------------------


def run_rounds(cfg: ExperimentConfig, out: Path) -> list[dict[str, float]]:
    """The server's per-round timings (wall clock), plus ``cpu``: the process's CPU seconds in the round."""
    server = Server(cfg, out)
    engine = CLIENT_ENGINES.get(cfg.runtime.client_engine)(server.fed)
    cpu = []
    for r in server.rounds:
        c0 = time.process_time()
        server.finish_round(r, engine.run(server.begin_round(r)))
        cpu.append(time.process_time() - c0)
    return [{**t, "cpu": c} for t, c in zip(server.timings, cpu, strict=True)]


def wall(t: dict[str, float]) -> float:
    return sum(v for k, v in t.items() if k != "cpu")


def part_round(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for threads in args.threads:
        for engine, fmt in (("sequential", "contiguous"), ("sequential", "channels_last")):
            overrides = [f'data.data_dir="{args.data_dir}"', f"training.rounds={args.rounds}",
                         f"runtime.threads={threads}", f'runtime.client_engine="{engine}"',
                         f'runtime.device="{args.device}"', f'runtime.memory_format="{fmt}"']
            cfg = load_config(ROOT / "configs" / "mnist_defense.toml", overrides)
            with tempfile.TemporaryDirectory() as tmp:
                timings = run_rounds(cfg, Path(tmp) / "r")
            parts = [k for k in timings[0] if k != "cpu"]
            mean = {p: statistics.fmean(t[p] for t in timings) for p in parts}
            total = sum(mean.values())
            row = {"threads": threads, "engine": engine, "memory_format": fmt, "rounds": len(timings), "mean": mean,
                   "total": total,
                   "non_local_share": 1 - mean["local_training"] / total, "cpu": statistics.fmean(t["cpu"] for t in timings),
                   "last_round": timings[-1], "per_round_total": [wall(t) for t in timings]}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return {"config": "configs/mnist_defense.toml", "rows": rows}


# --- against an FL-Defender-style loop ---------------------------------------------------------


DEFENDER_CASES = [("fp32", "contiguous"), ("fp32", "channels_last"), ("bf16", "channels_last")]


def part_defender(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import fl_defender_style_loop as ref

    torch.set_num_threads(1)
    data = load_dataset("mnist", Path(args.data_dir), False).subset(args.defender_train_size, None, 0)
    peers_n = 20
    rows: dict[str, Any] = {}
    for precision, fmt in DEFENDER_CASES:
        cfg = build_config({
            "seed": 0,
            "data": {"name": "mnist", "data_dir": args.data_dir, "partition": "iid", "download": False,
                     "train_size": args.defender_train_size},
            "model": {"name": "mnist_cnn"},
            "training": {"num_clients": peers_n, "rounds": args.defender_rounds, "local_epochs": 3, "batch_size": 64,
                         "lr": 0.05, "momentum": 0.9},
            "runtime": {"threads": 1, "precision": precision, "device": "cpu", "memory_format": fmt},
        })
        with tempfile.TemporaryDirectory() as tmp:
            timings = run_rounds(cfg, Path(tmp) / "r")
        key = f"flsec_{precision}_{fmt}"
        rows[key] = {"precision": precision, "memory_format": fmt, "per_round": [wall(t) for t in timings],
                     "cpu": [t["cpu"] for t in timings], "local_training": [t["local_training"] for t in timings]}
        print(json.dumps({key: rows[key]}), flush=True)

    x_train = (data.x_train.squeeze(1).numpy() * 255).round().astype(np.uint8)
    x_test = (data.x_test.squeeze(1).numpy() * 255).round().astype(np.uint8)
    mean, std = float(data.mean[0]), float(data.std[0])
    order = np.random.default_rng(0).permutation(len(x_train))
    peers = [ref.PerImageDataset(x_train[idx], data.y_train.numpy()[idx], mean, std)
             for idx in np.array_split(order, peers_n)]
    test = ref.PerImageDataset(x_test, data.y_test.numpy(), mean, std)
    model = ref.make_model(28, 28, 10, seed=0)
    setting = ref.LoopSetting(epochs=3, batch_size=64, lr=0.05, momentum=0.9)
    ref_rounds, ref_cpu = [], []
    for r in range(1, args.defender_rounds + 1):
        c0 = time.process_time()
        ref_rounds.append(ref.run_round(model, peers, test, setting, r))
        ref_cpu.append(time.process_time() - c0)
    rows["loop"] = {"per_round": [s for s, _ in ref_rounds], "cpu": ref_cpu, "accuracy": [a for _, a in ref_rounds]}
    print(json.dumps({"loop": rows["loop"]}), flush=True)
    return {"peers": peers_n, "epochs": 3, "batch": 64, "threads": 1, "train_images": len(x_train),
            "test_images": len(x_test), "rows": rows}


# --- scale in clients --------------------------------------------------------------------------


def scale_worker(args: argparse.Namespace) -> None:
    """One scale case in this (fresh) process; prints a JSON line."""
    cfg = build_config({
        "seed": 0,
        "data": {"name": "mnist", "data_dir": args.data_dir, "partition": "iid", "download": False},
        "model": {"name": "mnist_cnn"},
        "training": {"num_clients": args.clients, "rounds": args.rounds, "client_fraction": args.fraction,
                     "local_epochs": 1, "batch_size": 32, "lr": 0.05, "momentum": 0.9},
        "runtime": {"client_engine": args.engine, "device": args.device, "threads": args.scale_threads},
    })
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(cfg, Path(tmp) / "r")
        setup = time.perf_counter() - t0
        engine = CLIENT_ENGINES.get(cfg.runtime.client_engine)(server.fed)
        for r in server.rounds:
            server.finish_round(r, engine.run(server.begin_round(r)))
        timings = server.timings
        ma = server.history[-1]["ma"]
    print(json.dumps({"clients": args.clients, "fraction": args.fraction, "engine": args.engine,
                      "sampled": cfg.clients_per_round, "setup_s": setup,
                      "local_training": [t["local_training"] for t in timings],
                      "round": [sum(t.values()) for t in timings], "evaluation": [t["evaluation"] for t in timings],
                      "peak_rss_mb": peak_rss_mb(), "ma": ma}), flush=True)


def part_scale(args: argparse.Namespace) -> dict[str, Any]:
    cases = [(1000, 0.05, 3, "sequential"), (1000, 0.1, 3, "sequential"), (1000, 0.2, 3, "sequential"),
             (1000, 0.1, 3, "vectorised"), (10000, 0.1, 1, "sequential")]
    rows = []
    for clients, fraction, rounds, engine in cases:
        cmd = [sys.executable, __file__, "--worker", "scale", "--data-dir", args.data_dir, "--clients", str(clients),
               "--fraction", str(fraction), "--rounds", str(rounds), "--engine", engine, "--device", args.device,
               "--scale-threads", str(args.scale_threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            rows.append({"clients": clients, "fraction": fraction, "engine": engine,
                         "error": proc.stderr.strip().splitlines()[-1:]})
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    return {"threads": args.scale_threads, "rows": rows}


# --- rendering ---------------------------------------------------------------------------------


def _load(part: dict[str, Any]) -> str:
    la = part.get("load_average")
    text = f" Load average (1 min) at start / end of this part: {la[0]:.1f} / {la[1]:.1f}." if la else ""
    return text + (f" Measured at git {part['commit']}." if part.get("commit") else "")


def render(results: dict[str, Any]) -> str:
    m = results.get("machine", {})
    lines = ["# Throughput: local training, the parts of a round, an FL-Defender-style loop, scale in clients", "",
             f"Machine: {m.get('cpu')}, {m.get('cores')} cores (AVX512-BF16), no GPU, torch {m.get('torch')}, "
             f"Python {m.get('python')}. Seeds: run seed 0 everywhere. Data: real MNIST "
             "(`/work/shared/data`). The machine is shared: other processes were running during every part (load "
             "averages below; 2 cores). Wall-clock numbers are therefore lower than on an idle machine, and "
             "2-thread runs suffer most (OpenMP threads wait for a core); per-CPU-second numbers (the process's own "
             "CPU time) are less sensitive to that and are given next to them.", "",
             "Commands (each part under `flock /work/bench.lock .venv/bin/`):", ""]
    for part, cmd in results.get("commands", {}).items():
        lines.append(f"* `{part}`: `{cmd}`")
    lines.append("")
    local = results.get("local")
    if local:
        lines += ["## Local training, images/s", "",
                  f"MNIST CNN (McMahan et al.), {local['per_client']} MNIST images per client, 1 epoch, SGD momentum "
                  f"0.9, device {local['device']}, one timed round after a warm-up. The vectorised engine trains all "
                  "clients of the row at once (client_chunk = clients). Wall clock (per CPU second in brackets)."
                  + _load(local), "",
                  "| threads | clients | batch | sequential | sequential, channels-last | vectorised | "
                  "vectorised / sequential |", "|---|---|---|---|---|---|---|"]
        for r in local["rows"]:
            if r.get("precision", "fp32") != "fp32":
                continue
            lines.append(f"| {r['threads']} | {r['clients']} | {r['batch']} | {r['sequential']:,.0f} "
                         f"({r['sequential_cpu']:,.0f}) | {r['sequential_cl']:,.0f} ({r['sequential_cl_cpu']:,.0f}) | "
                         f"{r['vectorised']:,.0f} ({r['vectorised_cpu']:,.0f}) | {r['ratio']:.2f}x "
                         f"({r['ratio_cpu']:.2f}x) |")
        bf = [r for r in local["rows"] if r.get("precision") == "bf16"]
        if bf:
            lines += ["", "bf16 autocast, 1 thread, 20 clients, images/s per CPU second (x: ratio to the fp32 row):", "",
                      "| batch | sequential | sequential, channels-last | vectorised |", "|---|---|---|---|"]
            fp = {(r["threads"], r["clients"], r["batch"]): r for r in local["rows"] if r.get("precision", "fp32") == "fp32"}
            for r in bf:
                f = fp.get((1, 20, r["batch"]))
                cells = [f"{r[k + '_cpu']:,.0f} ({r[k + '_cpu'] / f[k + '_cpu']:.2f}x)" if f else f"{r[k + '_cpu']:,.0f}"
                         for k in ("sequential", "sequential_cl", "vectorised")]
                lines.append(f"| {r['batch']} | " + " | ".join(cells) + " |")
        lines.append("")
    rnd = results.get("round")
    if rnd:
        lines += ["## One `flsec train` round, split", "",
                  f"`{rnd['config']}` (8,000 train / 2,000 test MNIST images, 20 clients, batch 32, 2 backdoor attackers, "
                  "FedAvg, captures in the last round), sequential engine, fp32; mean wall-clock seconds over the "
                  "rounds run (the last one also writes the captures). Evaluation is MA on 2,000 test images and "
                  "ASR on the 1,800-odd triggered non-target ones, from test sets built once." + _load(rnd), "",
                  "| threads | memory format | local training | attack | aggregation | evaluation | capture + save | "
                  "s/round | not local training |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rnd["rows"]:
            mn = r["mean"]
            lines.append(f"| {r['threads']} | {r.get('memory_format', 'contiguous')} | {mn['local_training']:.3f} | "
                         f"{mn['attack']:.3f} | {mn['aggregation']:.3f} | {mn['evaluation']:.3f} | "
                         f"{mn['capture_and_save']:.3f} | {r['total']:.2f} | {100 * r['non_local_share']:.1f}% |")
        lines += ["", "Target: everything except local training <= 20% of the round.", ""]
    dfd = results.get("defender")
    if dfd:
        rows = dfd["rows"]
        loop, loop_cpu = statistics.fmean(rows["loop"]["per_round"]), statistics.fmean(rows["loop"]["cpu"])
        lines += ["## Against an FL-Defender-style loop", "",
                  f"Full MNIST ({dfd['train_images']:,} train / {dfd['test_images']:,} test), {dfd['peers']} IID peers, "
                  f"{dfd['epochs']} local epochs, batch {dfd['batch']}, lr 0.05, momentum 0.9, FedAvg, "
                  f"{dfd['threads']} thread, the same MNIST CNN. The loop is `benchmarks/fl_defender_style_loop.py` "
                  "(per peer: deep-copied model, DataLoader over a per-image-transform Dataset, optimiser; "
                  "state_dict averaging; test accuracy each round). flsec's round also evaluates ASR on the "
                  "triggered test set (9,020 more forward passes)." + _load(dfd), "",
                  "| | s/round | CPU s/round | loop / this (wall) | loop / this (CPU) |", "|---|---|---|---|---|",
                  f"| FL-Defender-style loop, fp32 | {loop:.1f} | {loop_cpu:.1f} | 1.00x | 1.00x |"]
        for key, r in rows.items():
            if key == "loop":
                continue
            w, c = statistics.fmean(r["per_round"]), statistics.fmean(r["cpu"])
            name = f"flsec, {r['precision']}" + (", channels-last" if r["memory_format"] == "channels_last" else "")
            lines.append(f"| {name} | {w:.1f} | {c:.1f} | {loop / w:.2f}x | {loop_cpu / c:.2f}x |")
        lines += ["", "Target: >= 1.6x at 1 thread.", ""]
    sc = results.get("scale")
    if sc:
        lines += ["## Scale in clients", "",
                  f"Full MNIST (60,000 images, IID), MNIST CNN, batch 32, 1 epoch, {sc['threads']} thread(s); each case "
                  "is a fresh process; peak RSS is the whole process's (torch, the 60,000 + 10,000 images and "
                  "everything else). Local training per round follows the clients sampled; evaluation "
                  "(10,000 test + 9,020 triggered images) is a fixed cost per round." + _load(sc), "",
                  "Seconds are means over the rounds after the first (round 1 also pays one-off kernel selection); "
                  "the 10,000-client case runs one round.", "",
                  "| clients | sampled / round | engine | rounds | local training s/round | per sampled client | "
                  "evaluation s/round | s/round | peak RSS |", "|---|---|---|---|---|---|---|---|---|"]
        for r in sc["rows"]:
            if "error" in r:
                lines.append(f"| {r['clients']} | {r['fraction']:.0%} | {r['engine']} | error: {r['error']} | | | | | |")
                continue
            skip = 1 if len(r["round"]) > 1 else 0
            lt = statistics.fmean(r["local_training"][skip:])
            lines.append(f"| {r['clients']:,} | {r['sampled']} | {r['engine']} | {len(r['round'])} | {lt:.2f} | "
                         f"{1000 * lt / r['sampled']:.1f} ms | {statistics.fmean(r['evaluation'][skip:]):.2f} | "
                         f"{statistics.fmean(r['round'][skip:]):.2f} | {r['peak_rss_mb']:,.0f} MB |")
        lines += ["", "Target: peak memory <= 2 GB at 1,000 clients; 10,000 clients run a round.", ""]
    lines += ["## GPU", ""]
    if results.get("gpu_local"):
        lines.append("The local-training table measured with `--device cuda` is in throughput.json (`gpu_local`).")
    else:
        lines.append("Not measured: this machine has no GPU. `--parts local --device cuda` produces the table on one.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--parts", nargs="+", default=["local", "round", "defender", "scale"],
                    choices=["local", "round", "defender", "scale"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--no-bf16-rows", dest="bf16_rows", action="store_false", help="local part: skip the bf16 rows")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5, help="rounds of the round part / scale cases")
    ap.add_argument("--defender-rounds", type=int, default=1)
    ap.add_argument("--defender-train-size", type=int, default=None, help="subset of MNIST train (default: all)")
    ap.add_argument("--per-client", type=int, default=128, help="local part: MNIST images per client")
    ap.add_argument("--scale-threads", type=int, default=1, help="scale part: torch threads per case")
    ap.add_argument("--out", type=Path, default=RESULTS / "throughput.json")
    ap.add_argument("--worker", choices=["scale"], help=argparse.SUPPRESS)
    ap.add_argument("--clients", type=int, default=1000, help=argparse.SUPPRESS)
    ap.add_argument("--fraction", type=float, default=0.1, help=argparse.SUPPRESS)
    ap.add_argument("--engine", default="sequential", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "scale":
        scale_worker(args)
        return
    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    results["machine"] = machine()
    results.setdefault("commands", {})
    runners = {"local": part_local, "round": part_round, "defender": part_defender, "scale": part_scale}
    for part in args.parts:
        t0 = time.perf_counter()
        key = "gpu_local" if part == "local" and args.device != "cpu" else part
        load = os.getloadavg()[0]
        results[key] = runners[part](args)
        results[key]["wall_s"] = time.perf_counter() - t0
        results[key]["load_average"] = [load, os.getloadavg()[0]]
        results[key]["commit"] = results["machine"]["commit"]
        results["commands"][key] = " ".join(["python", "benchmarks/throughput.py", *sys.argv[1:]])
        write_json(args.out, results)
    text = render(results)
    write_text(args.out.with_suffix(".md"), text)
    print(text)


if __name__ == "__main__":
    main()
