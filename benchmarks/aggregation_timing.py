"""Seconds per aggregation step of every rule on ResNet-18-sized updates (20 clients), next to the
per-round figures of FL-Defender's runtime comparison (Jebreel & Domingo-Ferrer 2023, runtime
figure, CIFAR10-ResNet18: FedAvg 0.1993 s, Median 1.6784, TMean 1.4432, MKrum 1.9461,
FoolsGold 0.2966, FL-Defender 0.3213; the authors' code aggregates on the CPU).

    .venv/bin/python benchmarks/aggregation_timing.py [--threads 1] [--clients 20] [--repeats 3]

The stack is k float32 updates of flsec's CIFAR ResNet-18 size (11.2M parameters; 16 honest
updates around a common direction, 4 attackers), FoolsGold / FL-Defender compare the output
layer's weights as configured by default, FLAME gets the global weights and FLTrust a server
update (its own root-data training is not part of the timed step). Each rule's time is the median
of ``--repeats`` calls. Writes benchmarks/results/aggregation_timing.{md,json}; finished rules are
kept in the .json and skipped on a re-run with the same settings.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from flsec.aggregation import AggregationContext, AggregatorParams, build_aggregator
from flsec.io import write_json, write_text
from flsec.models import InputSpec, build_model
from flsec.models.registry import output_layer_slices
from provenance import cpu_name, git_commit

ROOT = Path(__file__).resolve().parents[1]
RULES = ["fedavg", "median", "trimmed_mean", "krum", "multi_krum", "foolsgold", "fl_defender", "bulyan",
         "norm_clip", "flame", "fltrust"]
PAPER = {"fedavg": 0.1993, "median": 1.6784, "trimmed_mean": 1.4432, "multi_krum": 1.9461,
         "foolsgold": 0.2966, "fl_defender": 0.3213}


def resnet18_stack(k: int, attackers: int) -> tuple[torch.Tensor, slice, slice]:
    model = build_model("resnet18", InputSpec(3, 32, 32, 10, (0.5,) * 3, (0.25,) * 3), 0)
    d = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(d, generator=g) * 1e-3
    stack = torch.empty(k, d)
    for i in range(k):
        sign = -1.0 if i < attackers else 1.0
        stack[i] = sign * direction + 1e-3 * torch.randn(d, generator=g)
    layer, weights = output_layer_slices(model)
    return stack, layer, weights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--attackers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rules", nargs="*", default=RULES)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "aggregation_timing"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    stack, layer, weights = resnet18_stack(args.clients, args.attackers)
    settings = {"threads": args.threads, "clients": args.clients, "attackers": args.attackers,
                "parameters": stack.shape[1], "repeats": args.repeats}
    results: dict[str, dict[str, float]] = {}
    if out.with_suffix(".json").exists():
        saved = json.loads(out.with_suffix(".json").read_text())
        if saved.get("settings") == settings:
            results = saved["results"]
    run = {"command": " ".join(["python", "benchmarks/aggregation_timing.py", *sys.argv[1:]]), "commit": git_commit(),
           "machine": f"{cpu_name()}, {multiprocessing.cpu_count()} cores, torch {torch.__version__}",
           "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
    params = AggregatorParams(f=args.attackers, output_layer=layer, output_weights=weights,
                              num_clients=args.clients, clip_norm=float(stack[0].norm()))
    g0 = stack[args.attackers:].mean(0)
    global_weights = torch.randn(stack.shape[1], generator=torch.Generator().manual_seed(1)) * 0.05
    for rule in args.rules:
        if rule in results:
            continue
        times = []
        for r in range(args.repeats):
            agg = build_aggregator(rule, params)
            ctx = AggregationContext(r + 1, torch.Generator().manual_seed(r), global_weights, g0)
            t0 = time.perf_counter()
            res = agg(stack, torch.ones(args.clients), list(range(args.clients)), context=ctx)
            times.append(time.perf_counter() - t0)
            assert torch.isfinite(res.update).all()
        results[rule] = {"seconds": statistics.median(times), "all": [round(t, 3) for t in times],
                         "attackers_weight": float(res.weights[: args.attackers].sum()), **run}
        print(f"{rule:13s} {results[rule]['seconds']:.3f}s  (runs {results[rule]['all']})", flush=True)
        write_json(out.with_suffix(".json"), {"settings": settings, "results": results})

    cells = {(results[r].get("commit", "?"), results[r].get("machine", "?")) for r in results}
    lines = [f"# Aggregation step, {stack.shape[1]:,} parameters (CIFAR ResNet-18), {args.clients} clients", "",
             f"Command: `{run['command']}`  ",
             f"{args.threads} torch thread(s); median of {args.repeats} calls per rule; "
             + "; ".join(f"git commit {c}, {m}" for c, m in sorted(cells)) + ".", "",
             "| rule | s / round (ours, CPU) | s / round (paper) | ours / paper | attackers' weight |",
             "|---|---|---|---|---|"]
    for rule in [r for r in RULES if r in results]:
        s, p = results[rule]["seconds"], PAPER.get(rule)
        ratio = "—" if not p else f"{s / p:.2f}x ({'slower' if s > p else 'faster'})"
        lines.append(f"| {rule} | {s:.3f} | {p if p else '—'} | {ratio} | {results[rule]['attackers_weight']:.3f} |")
    lines.append("")
    lines.append("Paper: FL-Defender's runtime figure (figures/runtime.PNG of najeebjebreel/FL-Defender; "
                 "CIFAR10-ResNet18, 20 peers), measured with the authors' code on their machine; the authors' "
                 "code moves the local models to the CPU before aggregating. 'ours / paper' > 1 means slower.")
    write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    write_json(out.with_suffix(".json"), {"settings": settings, "results": results})
    print("\n".join(lines))


if __name__ == "__main__":
    main()
