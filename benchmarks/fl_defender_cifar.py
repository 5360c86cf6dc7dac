"""FL-Defender's CIFAR-10 backdoor bars compared in direction, at subset scale, with the ResNet-18 CPU config.

The paper (Jebreel & Domingo-Ferrer 2023, "Robustness to backdoor attacks" figure; the authors'
``Experiments_CIFAR10_{IID,nonIID}_BA.ipynb``) trains ResNet-18 on all of CIFAR-10 with 20 peers, 100 rounds
of 3 local epochs (batch 32, lr 0.01, momentum 0.9), IID or Dirichlet(1) ("MILD_NON_IID"), with K' = 2 or 4
attackers that append stamped copies of their batches' source-class images (car, 1) relabelled to the target
(plane, 0); ASR = share of the stamped test cars classified as planes. Read off the figure: FedAvg ~83% (IID),
~60% (non-IID, K' = 2), ~88% (non-IID, K' = 4); FL-Defender ~6%, ~35%, ~55%.

Here: ``configs/cifar10_resnet18_cpu.toml``'s training (4,000 / 1,000 images, 10 clients, ResNet-18 at width 8,
4 local epochs, augmentation) with the paper's attack from ``reproduce_fl_defender.py`` (appended stamped copies, 3x3 white
square in the bottom-right corner, car -> plane, every round, no boosting, plain-mean FedAvg as the authors)
and 2 of the 10 clients attacking (20%, the paper's K' = 4 of 20), drawn as the authors draw them;
FedAvg and FL-Defender, IID and Dirichlet(1). Reported as the authors do: the average of the last 10 global
models (and the last round's model), ASR on all 1,000 test images' cars.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/fl_defender_cifar.py --rounds 20

Finished cells are kept in ``benchmarks/results/fl_defender_cifar.json`` and skipped on a re-run with the
same settings; writes ``benchmarks/results/fl_defender_cifar.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

import reproduce_fl_defender as repro
from flsec.config import ExperimentConfig, load_config
from flsec.fl.params import derive_seed
from flsec.io import write_json, write_text
from provenance import cpu_name, default_data_dir, git_commit

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "cifar10_resnet18_cpu.toml"
PARTITIONS = {"iid": ['data.partition="iid"'], "dirichlet(1)": ['data.partition="dirichlet"', "data.alpha=1.0"]}
RULES = ["fedavg", "fl_defender"]
# ASR % read off the paper's CIFAR-10 backdoor bars: (IID, non-IID K' = 2, non-IID K' = 4).
PAPER_ASR = {"fedavg": (83, 60, 88), "fl_defender": (6, 35, 55)}


def cell_config(rule: str, partition: str, args: argparse.Namespace) -> ExperimentConfig:
    rounds = args.rounds
    return load_config(CONFIG, [
        f"data.data_dir={json.dumps(args.data_dir)}", f"runtime.threads={args.threads}", f"training.rounds={rounds}",
        *PARTITIONS[partition], f'aggregation.name="{rule}"', "aggregation.sample_weighted=false",
        'attack.kind="backdoor"', f"attack.num_malicious={args.attackers}", f"attack.rounds={list(range(1, rounds + 1))}",
        "attack.boost=false", "attack.source_label=1", "attack.target_label=0",
        'attack.trigger.pattern="square"', "attack.trigger.size=3", "attack.trigger.offset=0",
        "attack.trigger.value=1.0", 'capture.clients=[]', 'capture.rounds="last"', *args.set])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(default_data_dir()))
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--attackers", type=int, default=2, help="of the config's 10 clients")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], help="extra config override")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fl_defender_cifar")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    settings = {"rounds": args.rounds, "attackers": args.attackers, "extra": args.set}
    saved: dict[str, Any] = {"settings": settings, "results": {}}
    if args.out.with_suffix(".json").exists():
        old = json.loads(args.out.with_suffix(".json").read_text())
        if {k: old["settings"].get(k) for k in settings} == settings:
            saved = old
    base = cell_config("fedavg", "iid", args)
    saved["settings"].update({**settings, "width": base.model.width, "local_epochs": base.training.local_epochs,
                              "batch_size": base.training.batch_size, "lr": base.training.lr,
                              "command": " ".join(["python", "benchmarks/fl_defender_cifar.py", *sys.argv[1:]]),
                              "machine": f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}",
                              "threads": args.threads})
    for partition in PARTITIONS:
        for rule in RULES:
            key = f"{rule}/{partition}"
            if key in saved["results"]:
                continue
            cfg = cell_config(rule, partition, args)
            seed = derive_seed(cfg.seed, RULES.index(rule), list(PARTITIONS).index(partition))
            cell = repro.run_cell(cfg, seed, None, args.threads, min(10, args.rounds), "flsec")
            cell.update(commit=git_commit(mark_dirty=True), load_average=os.getloadavg()[0])
            saved["results"][key] = cell
            print(f"{key:24s} MA {cell['ma']:.3f} ASR {cell['asr']:.3f} (last round {cell['last_round']['ma']:.3f} / "
                  f"{cell['last_round']['asr']:.3f}) {cell['seconds']:.0f}s", flush=True)
            write_json(args.out.with_suffix(".json"), saved)
            write_text(args.out.with_suffix(".md"), report(saved))
    write_json(args.out.with_suffix(".json"), saved)
    write_text(args.out.with_suffix(".md"), report(saved))


def report(saved: dict[str, Any]) -> str:
    s = saved["settings"]
    pct = repro.pct
    lines = ["# FL-Defender's CIFAR-10 backdoor, in direction, at subset scale (ResNet-18, CPU)", "",
             f"Command: `{s['command']}`; {s['machine']}, {s['threads']} thread(s).", "",
             f"Setting: configs/cifar10_resnet18_cpu.toml's training (4,000 / 1,000 CIFAR-10 images, 10 clients, "
             f"ResNet-18 width {s['width']}, {s['local_epochs']} local epochs, batch {s['batch_size']}, lr {s['lr']}, "
             f"augmentation) for {s['rounds']} rounds; the "
             f"paper's backdoor (stamped copies of each batch's cars appended, labelled plane; 3x3 white square) by "
             f"{s['attackers']} of 10 clients in every round, no boosting; plain-mean FedAvg as the authors. "
             f"MA / ASR of the average of the last {min(10, s['rounds'])} global models (the authors' report) and "
             "of the last round's model; ASR over the stamped test cars (about 100 of the 1,000 test images). "
             "Paper: ResNet-18, all 50,000 images, 20 peers, 100 rounds of 3 epochs, K' = 2 or 4 attackers.", "",
             "| rule | partition | MA % | ASR % | last round MA / ASR % | ASR % per round | paper ASR % | commit | "
             "seconds |", "|---|---|---|---|---|---|---|---|---|"]
    for key, cell in saved["results"].items():
        rule, partition = key.split("/")
        paper = PAPER_ASR[rule]
        paper_text = f"~{paper[0]} (IID)" if partition == "iid" else f"~{paper[1]} (K' = 2), ~{paper[2]} (K' = 4)"
        curve = ", ".join(f"{100 * a:.0f}" for a in cell["asr_per_round"])
        lines.append(f"| {rule} | {partition} | {pct(cell['ma'])} | {pct(cell['asr'])} | "
                     f"{pct(cell['last_round']['ma'])} / {pct(cell['last_round']['asr'])} | {curve} | {paper_text} | "
                     f"{cell['commit']} | {cell['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
