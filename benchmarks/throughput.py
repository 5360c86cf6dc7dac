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
    import os

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=ROOT).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "commit": commit + ("+dirty" if dirty else ""), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available()
            else None}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- local training ----------------------------------------------------------------------------


def local_config(data_dir: str, clients: int, per_client: int, batch: int, engine: str, device: str,
                 precision: str = "fp32") -> ExperimentConfig:
    return build_config({
        "seed": 0,
        "data": {"name": "mnist", "data_dir": data_dir, "train_size": clients * per_client, "test_size": 100,
                 "partition": "iid", "download": False},
        "model": {"name": "mnist_cnn"},
        "training": {"num_clients": clients, "rounds": 1, "local_epochs": 1, "batch_size": batch, "lr": 0.05,
                     "momentum": 0.9},
        "runtime": {"client_engine": engine, "client_chunk": clients, "device": device, "precision": precision},
    })


def time_engine(cfg: ExperimentConfig, repeats: int) -> float:
    """Images per second of one round of local training (best of ``repeats`` after a warm-up)."""
    fed = Federation.from_config(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(cfg, Path(tmp) / "r", federation=fed)
        tasks = server.begin_round(1)
        engine = CLIENT_ENGINES.get(cfg.runtime.client_engine)(fed)
        engine.run(tasks[:2])  # warm-up: kernel selection, allocator
        images = sum(len(fed.shards[t.client]) for t in tasks) * cfg.training.local_epochs
        best = float("inf")
        for _ in range(repeats):
            _sync(fed.runtime.device)
            t0 = time.perf_counter()
            engine.run(tasks)
            _sync(fed.runtime.device)
            best = min(best, time.perf_counter() - t0)
    return images / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def part_local(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for clients in (20, 100):
            for batch in (10, 32, 64):
                row: dict[str, Any] = {"threads": threads, "clients": clients, "batch": batch}
                for engine in ("sequential", "vectorised"):
                    row[engine] = time_engine(local_config(args.data_dir, clients, args.per_client, batch, engine,
                                                           args.device), args.repeats)
                row["ratio"] = row["vectorised"] / row["sequential"]
                print(json.dumps(row), flush=True)
                rows.append(row)
    if "bf16" in args.precisions:
        torch.set_num_threads(1)
        for batch in (10, 32, 64):
            row = {"threads": 1, "clients": 20, "batch": batch, "precision": "bf16"}
            for engine in ("sequential", "vectorised"):
                row[engine] = time_engine(local_config(args.data_dir, 20, args.per_client, batch, engine, args.device,
                                                       "bf16"), args.repeats)
            print(json.dumps(row), flush=True)
            rows.append(row)
    return {"device": args.device, "per_client": args.per_client, "repeats": args.repeats, "rows": rows}


# --- one training round, split -----------------------------------------------------------------


def run_rounds(cfg: ExperimentConfig, out: Path) -> list[dict[str, float]]:
    server = Server(cfg, out)
    engine = CLIENT_ENGINES.get(cfg.runtime.client_engine)(server.fed)
    for r in server.rounds:
        server.finish_round(r, engine.run(server.begin_round(r)))
    return server.timings


def part_round(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for threads in args.threads:
        for engine in ("sequential",):
            overrides = [f'data.data_dir="{args.data_dir}"', f"training.rounds={args.rounds}",
                         f"runtime.threads={threads}", f'runtime.client_engine="{engine}"',
                         f'runtime.device="{args.device}"']
            cfg = load_config(ROOT / "configs" / "mnist_defense.toml", overrides)
            with tempfile.TemporaryDirectory() as tmp:
                timings = run_rounds(cfg, Path(tmp) / "r")
            parts = list(timings[0])
            mean = {p: statistics.fmean(t[p] for t in timings) for p in parts}
            total = sum(mean.values())
            row = {"threads": threads, "engine": engine, "rounds": len(timings), "mean": mean, "total": total,
                   "non_local_share": 1 - mean["local_training"] / total,
                   "last_round": timings[-1], "per_round_total": [sum(t.values()) for t in timings]}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return {"config": "configs/mnist_defense.toml", "rows": rows}


# --- against an FL-Defender-style loop ---------------------------------------------------------


def part_defender(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import fl_defender_style_loop as ref

    torch.set_num_threads(1)
    data = load_dataset("mnist", Path(args.data_dir), False).subset(args.defender_train_size, None, 0)
    peers_n = 20
    rows: dict[str, Any] = {}
    for precision in args.precisions:
        cfg = build_config({
            "seed": 0,
            "data": {"name": "mnist", "data_dir": args.data_dir, "partition": "iid", "download": False,
                     "train_size": args.defender_train_size},
            "model": {"name": "mnist_cnn"},
            "training": {"num_clients": peers_n, "rounds": args.defender_rounds, "local_epochs": 3, "batch_size": 64,
                         "lr": 0.05, "momentum": 0.9},
            "runtime": {"threads": 1, "precision": precision, "device": "cpu"},
        })
        with tempfile.TemporaryDirectory() as tmp:
            timings = run_rounds(cfg, Path(tmp) / "r")
        per_round = [sum(t.values()) for t in timings]
        rows[f"flsec_{precision}"] = {"per_round": per_round, "local_training": [t["local_training"] for t in timings]}
        print(json.dumps({f"flsec_{precision}": rows[f"flsec_{precision}"]}), flush=True)

    x_train = (data.x_train.squeeze(1).numpy() * 255).round().astype(np.uint8)
    x_test = (data.x_test.squeeze(1).numpy() * 255).round().astype(np.uint8)
    mean, std = float(data.mean[0]), float(data.std[0])
    order = np.random.default_rng(0).permutation(len(x_train))
    peers = [ref.PerImageDataset(x_train[idx], data.y_train.numpy()[idx], mean, std)
             for idx in np.array_split(order, peers_n)]
    test = ref.PerImageDataset(x_test, data.y_test.numpy(), mean, std)
    model = ref.make_model(28, 28, 10, seed=0)
    setting = ref.LoopSetting(epochs=3, batch_size=64, lr=0.05, momentum=0.9)
    ref_rounds = [ref.run_round(model, peers, test, setting, r) for r in range(1, args.defender_rounds + 1)]
    rows["loop"] = {"per_round": [s for s, _ in ref_rounds], "accuracy": [a for _, a in ref_rounds]}
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
        "runtime": {"client_engine": args.engine, "device": args.device},
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
               "--fraction", str(fraction), "--rounds", str(rounds), "--engine", engine, "--device", args.device]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            rows.append({"clients": clients, "fraction": fraction, "engine": engine,
                         "error": proc.stderr.strip().splitlines()[-1:]})
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    return {"threads": torch.get_num_threads(), "rows": rows}


# --- rendering ---------------------------------------------------------------------------------


def render(results: dict[str, Any]) -> str:
    m = results.get("machine", {})
    lines = ["# Throughput: local training, the parts of a round, an FL-Defender-style loop, scale in clients", "",
             "Command: `flock /work/bench.lock .venv/bin/python benchmarks/throughput.py --data-dir /work/shared/data`",
             f"(parts run: {', '.join(results.get('commands', {}))}; exact commands below).", "",
             f"Machine: {m.get('cpu')}, {m.get('cores')} cores, torch {m.get('torch')}, Python {m.get('python')}; "
             f"git {m.get('commit')}. Seeds: run seed 0 everywhere. Data: real MNIST (`/work/shared/data`).", ""]
    for part, cmd in results.get("commands", {}).items():
        lines.append(f"* `{part}`: `{cmd}`")
    lines.append("")
    local = results.get("local")
    if local:
        lines += ["## Local training, images/s", "",
                  f"MNIST CNN, {local['per_client']} MNIST images per client, 1 epoch, SGD momentum 0.9, fp32, "
                  f"device {local['device']}; best of {local['repeats']} timed rounds after a warm-up. The vectorised "
                  "engine trains all clients of the row at once (client_chunk = clients).", "",
                  "| threads | clients | batch | sequential | vectorised | vectorised / sequential |",
                  "|---|---|---|---|---|---|"]
        for r in local["rows"]:
            if r.get("precision", "fp32") != "fp32":
                continue
            lines.append(f"| {r['threads']} | {r['clients']} | {r['batch']} | {r['sequential']:,.0f} | "
                         f"{r['vectorised']:,.0f} | {r['ratio']:.2f}x |")
        bf = [r for r in local["rows"] if r.get("precision") == "bf16"]
        if bf:
            fp = {(r["threads"], r["clients"], r["batch"]): r for r in local["rows"] if r.get("precision", "fp32") == "fp32"}
            lines += ["", "bf16 autocast, 1 thread, 20 clients (ratio to the fp32 row above):", "",
                      "| batch | sequential bf16 | vs fp32 | vectorised bf16 | vs fp32 |", "|---|---|---|---|---|"]
            for r in bf:
                f = fp.get((1, 20, r["batch"]))
                lines.append(f"| {r['batch']} | {r['sequential']:,.0f} | "
                             f"{r['sequential'] / f['sequential'] if f else float('nan'):.2f}x | {r['vectorised']:,.0f} | "
                             f"{r['vectorised'] / f['vectorised'] if f else float('nan'):.2f}x |")
        lines.append("")
    rnd = results.get("round")
    if rnd:
        lines += ["## One `flsec train` round, split", "",
                  f"`{rnd['config']}` (8,000 train / 2,000 test MNIST images, 20 clients, batch 32, 2 backdoor attackers, "
                  "FedAvg, captures in the last round), sequential engine, fp32, mean over the rounds run "
                  "(the last round also writes the captures).", "",
                  "| threads | rounds | local training | attack | aggregation | evaluation | capture + save | s/round | "
                  "not local training |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rnd["rows"]:
            mn = r["mean"]
            lines.append(f"| {r['threads']} | {r['rounds']} | {mn['local_training']:.3f} s | {mn['attack']:.3f} s | "
                         f"{mn['aggregation']:.3f} s | {mn['evaluation']:.3f} s | {mn['capture_and_save']:.3f} s | "
                         f"{r['total']:.2f} | {100 * r['non_local_share']:.1f}% |")
        lines += ["", "Target: everything except local training <= 20% of the round.", ""]
    dfd = results.get("defender")
    if dfd:
        rows = dfd["rows"]
        loop = statistics.fmean(rows["loop"]["per_round"])
        lines += ["## Against an FL-Defender-style loop", "",
                  f"Full MNIST ({dfd['train_images']:,} train / {dfd['test_images']:,} test), {dfd['peers']} IID peers, "
                  f"{dfd['epochs']} local epochs, batch {dfd['batch']}, lr 0.05, momentum 0.9, FedAvg, "
                  f"{dfd['threads']} thread; the same MNIST CNN. The loop is `benchmarks/fl_defender_style_loop.py` "
                  "(deep-copied model, DataLoader over a per-image-transform Dataset, optimiser and state_dict "
                  "averaging per peer; test accuracy each round). flsec's round also evaluates ASR on the "
                  "triggered test set.", "",
                  "| | s/round (each round) | mean | loop / this |", "|---|---|---|---|"]
        lines.append(f"| FL-Defender-style loop, fp32 | {', '.join(f'{s:.1f}' for s in rows['loop']['per_round'])} | "
                     f"{loop:.1f} | 1.00x |")
        for key in sorted(k for k in rows if k.startswith("flsec_")):
            mean = statistics.fmean(rows[key]["per_round"])
            lines.append(f"| flsec, {key[6:]} | {', '.join(f'{s:.1f}' for s in rows[key]['per_round'])} | {mean:.1f} | "
                         f"{loop / mean:.2f}x |")
        lines += ["", "Target: >= 1.6x at 1 thread.", ""]
    sc = results.get("scale")
    if sc:
        lines += ["## Scale in clients", "",
                  f"Full MNIST (60,000 images, IID), MNIST CNN, batch 32, 1 epoch, {sc['threads']} threads; each case "
                  "is a fresh process (peak resident set size of the whole process, data included). "
                  "Local training per round should grow with the clients sampled; evaluation "
                  "(10,000 test + 9,020 triggered images) is a fixed cost per round.", "",
                  "| clients | sampled / round | engine | rounds | local training s/round | evaluation s/round | "
                  "s/round | peak RSS | MA |", "|---|---|---|---|---|---|---|---|---|"]
        for r in sc["rows"]:
            if "error" in r:
                lines.append(f"| {r['clients']} | {r['fraction']:.0%} | {r['engine']} | error: {r['error']} | | | | | |")
                continue
            lines.append(f"| {r['clients']:,} | {r['sampled']} | {r['engine']} | {len(r['round'])} | "
                         f"{statistics.fmean(r['local_training']):.2f} | {statistics.fmean(r['evaluation']):.2f} | "
                         f"{statistics.fmean(r['round']):.2f} | {r['peak_rss_mb']:,.0f} MB | {r['ma']:.3f} |")
        lines += ["", "Target: peak memory <= 2 GB at 1,000 clients; 10,000 clients run a round.", ""]
    gpu = results.get("gpu_local")
    lines += ["## GPU", ""]
    if gpu:
        lines.append("See the local-training table measured with `--device cuda` in throughput.json (`gpu_local`).")
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
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5, help="rounds of the round part / scale cases")
    ap.add_argument("--defender-rounds", type=int, default=2)
    ap.add_argument("--defender-train-size", type=int, default=None, help="subset of MNIST train (default: all)")
    ap.add_argument("--per-client", type=int, default=160, help="local part: MNIST images per client")
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
        results[key] = runners[part](args)
        results[key]["wall_s"] = time.perf_counter() - t0
        results["commands"][key] = " ".join(["python", "benchmarks/throughput.py", *sys.argv[1:]])
        write_json(args.out, results)
    text = render(results)
    write_text(args.out.with_suffix(".md"), text)
    print(text)


if __name__ == "__main__":
    main()
