"""Attack matrix: every registered aggregation rule against seven attacks, 2 and 4 attackers of 20, 3 seeds.

Setting: configs/mnist_defense.toml (real MNIST from ../shared/data, 20 clients, Dirichlet(0.5), every
client in every round, aggregation.f = the number of attackers), scaled to the compute budget: 2,000
train / 500 test images and 8 rounds. The attackers attack in rounds 1-6 and stop, so every run
gives the ASR when the attack stops (round 6) and its durability 2 rounds later (round 8). All pixel
backdoors use a 4x4 checkerboard (so that DBA can split it into 2 or 4 row bands).

    .venv/bin/python benchmarks/attack_matrix.py [--data-dir ../shared/data] [--jobs 2] [--threads 2]
    .venv/bin/python benchmarks/attack_matrix.py --smoke      # 1 seed, 2 rounds, 600/200 images: checks it all runs

Resumable per cell: every (rule, attack, attackers, seed) is a run directory of an ``flsec sweep`` under
--work (default runs/attack_matrix); finished runs are kept and skipped on a re-run. Writes
benchmarks/results/attack_matrix.md, .json and the heatmaps attack_matrix_asr*.png.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from flsec.aggregation import AGGREGATORS
from flsec.config import SweepGrid, apply_overrides, read_toml
from flsec.fl.checkpoint import load_checkpoint
from flsec.io import write_bytes, write_json, write_text
from flsec.sweep import run_sweep
from flsec.sweep.grid import Axis
from flsec.sweep.outputs import heatmap_png, mean_std, pct, run_row

ROOT = Path(__file__).resolve().parents[1]

# label -> the [attack] table of the cell (attack.num_malicious is its own axis)
ATTACKS: dict[str, dict[str, Any]] = {
    "backdoor": {"kind": "backdoor", "boost": False},
    "boosted": {"kind": "backdoor", "boost": True},
    "constrain+scale": {"kind": "constrain_scale", "local_epochs": 5},
    "PGD": {"kind": "pgd", "local_epochs": 5},
    "Neurotoxin": {"kind": "neurotoxin", "local_epochs": 5},
    "DBA": {"kind": "dba", "boost": False},
    "sybil flip": {"kind": "sybil_label_flip", "boost": False},
}
ATTACKERS = [2, 4]
BROKEN, DENTED = 0.5, 0.2  # mean ASR at attack stop: >= 50% breaks a rule, >= 20% dents it

LITERATURE = {
    "krum": "Krum and Multi-Krum fall to norm-bounded attacks (Wang et al. 2020, PGD on edge cases; "
            "Sun et al. 2019): an update kept inside a small ball looks central to distance scores.",
    "multi_krum": "Krum and Multi-Krum fall to norm-bounded attacks (Wang et al. 2020).",
    "foolsgold": "FoolsGold stops sybils with one shared objective but fails when attackers are few and "
                 "diverse (Fung et al. 2020, Sec. 6, and its own threat model).",
    "norm_clip": "Norm clipping slows but does not stop PGD attackers (Sun et al. 2019; Wang et al. 2020): "
                     "a norm-bounded update passes the clip unchanged.",
    "fedavg": "FedAvg has no defense: model replacement succeeds in one round (Bagdasaryan et al. 2020).",
}
# What the investigation of each disagreement with the literature found (filled in after the run).
NOTES: dict[str, str] = {}


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def default_data_dir() -> Path:
    """../shared/data next to the checkout (or next to its parent, for a worktree under wt/)."""
    for parent in (ROOT.parent, ROOT.parent.parent):
        if (parent / "shared" / "data").is_dir():
            return parent / "shared" / "data"
    return ROOT.parent / "shared" / "data"


def base_config(args: argparse.Namespace) -> dict[str, Any]:
    stop = args.attack_rounds
    return apply_overrides(read_toml(ROOT / "configs" / "mnist_defense.toml"), [
        'name="attack-matrix"', f'data.data_dir="{args.data_dir}"', f"data.train_size={args.train_size}",
        f"data.test_size={args.test_size}", f"training.rounds={args.rounds}",
        f"attack.rounds={list(range(1, stop + 1))}", "attack.trigger.size=4",
        'capture.rounds="last"', 'capture.clients=[]', "capture.updates=false", "capture.gradient_batch_sizes=[]",
        *args.set,
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(default_data_dir()))
    ap.add_argument("--train-size", type=int, default=2000)
    ap.add_argument("--test-size", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--attack-rounds", type=int, default=6, help="attackers attack in rounds 1..N")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads in all (default: every core)")
    ap.add_argument("--rules", nargs="*", default=None, help="default: every registered aggregator")
    ap.add_argument("--work", default=str(ROOT / "runs" / "attack_matrix"))
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "attack_matrix"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override applied to every run (repeatable), e.g. training.batch_size=10")
    ap.add_argument("--report-only", action="store_true",
                    help="train nothing: write the result files from the runs finished so far")
    ap.add_argument("--smoke", action="store_true", help="1 seed, 2 rounds (attack in round 1), 600/200 images")
    args = ap.parse_args()
    if args.smoke:
        args.seeds, args.rounds, args.attack_rounds, args.train_size, args.test_size = 1, 2, 1, 600, 200
        args.work, args.results = args.work + "_smoke", "/tmp/attack_matrix_smoke"
    rules = args.rules or AGGREGATORS.names()
    base = base_config(args)
    seeds = list(range(args.seeds))
    work = Path(args.work)

    t0 = time.perf_counter()
    clean_grid = SweepGrid(grid={"aggregation.name": rules})
    clean = run_sweep(apply_overrides(base, ['attack.kind="none"', "attack.num_malicious=0", "attack.rounds=[]"]),
                      clean_grid, seeds, work / "no_attack", jobs=args.jobs, threads=args.threads,
                      train=not args.report_only)
    grid = SweepGrid(grid={"aggregation.name": rules, "attack": list(ATTACKS.values()), "attack.num_malicious": ATTACKERS},
                     labels={"attack": list(ATTACKS)})
    attacked = run_sweep(base, grid, seeds, work / "attacks", jobs=args.jobs, threads=args.threads,
                         train=not args.report_only)
    wall = time.perf_counter() - t0
    failed = clean.failed + attacked.failed
    for run, msg in failed:
        print(f"failed: {run.cell.id} seed {run.seed}: {msg}")

    rows = [run_row(r, attacked.out, attacked.axes) for r in attacked.runs]
    clean_rows = [run_row(r, clean.out, clean.axes) for r in clean.runs]
    report = summarise(rows, clean_rows, rules, attacked.out)
    report["dba_parts"] = dba_parts(attacked.out, rows, rules)
    meta = {
        "command": "python benchmarks/attack_matrix.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
            if k not in ("smoke", "rules", "work", "results", "set", "report_only"))
        + "".join(f" --set '{kv}'" for kv in args.set),
        "overrides": args.set,
        "git_commit": git_commit(), "rules": rules, "attacks": ATTACKS, "attackers": ATTACKERS, "seeds": seeds,
        "train_size": args.train_size, "test_size": args.test_size, "rounds": args.rounds,
        "attack_rounds": args.attack_rounds, "jobs": args.jobs, "threads_total": args.threads or os.cpu_count(),
        "threads_per_run": max(1, (args.threads or os.cpu_count() or 1) // args.jobs),
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, {platform.system()}",
        "torch": torch.__version__, "wall_seconds_this_invocation": round(wall, 1),
        "runs": len(rows) + len(clean_rows),
        "runs_complete": sum(r["status"] == "complete" for r in rows + clean_rows),
        "train_seconds_sum": round(sum(float(r["seconds"] or 0) for r in rows + clean_rows
                                       if r["status"] == "complete"), 1),
        "failed": [f"{r.cell.id} seed {r.seed}: {m}" for r, m in failed],
    }
    out = Path(args.results)
    write_json(out.with_suffix(".json"), {"meta": meta, **report})
    axes = [Axis("rule", tuple(rules), tuple(rules)),
            Axis("attack", tuple(ATTACKS), tuple(ATTACKS)),
            Axis("attackers", tuple(ATTACKERS), tuple(str(m) for m in ATTACKERS))]
    for name, key, label in (("asr", "asr_at_stop", f"ASR % at attack stop (round {args.attack_rounds})"),
                             ("asr_final", "asr_final", f"ASR % in round {args.rounds}")):
        values = {(c["rule"], c["attack"], str(c["attackers"])): c[key][0] for c in report["cells"]
                  if c[key][0] == c[key][0]}
        write_bytes(out.parent / f"{out.name}_{name}.png", heatmap_png(axes, values, label))
    write_text(out.with_suffix(".md"), markdown(meta, report, out.name))
    print(f"{meta['runs']} runs, {len(failed)} failed, {wall:.0f} s -> {out.with_suffix('.md')}")


def attacker_share(out: Path, row: dict[str, Any]) -> float:
    """Mean share of the aggregate the attackers got in the rounds they attacked (aggregation weights of
    history.jsonl; a rule that rejects them gives 0, plain averaging m / n)."""
    hist = load_checkpoint(out / row["run_dir"]).history
    shares = [sum(w for c, w in zip(h["selected"], h["weights"], strict=True) if c in h["attackers"])
              for h in hist if h["attackers"]]
    return sum(shares) / len(shares) if shares else float("nan")


def summarise(rows: list[dict[str, Any]], clean_rows: list[dict[str, Any]], rules: list[str],
              out: Path) -> dict[str, Any]:
    done = [r for r in rows if r["status"] == "complete"]
    cells = []
    for rule in rules:
        for attack in ATTACKS:
            for m in ATTACKERS:
                sel = [r for r in done if r["aggregation.name"] == rule and r["attack"] == attack
                       and int(r["attack.num_malicious"]) == m]
                cells.append({"rule": rule, "attack": attack, "attackers": m, "runs": len(sel),
                              "asr_at_stop": mean_std([r["asr_at_stop"] for r in sel]),
                              "asr_final": mean_std([r["asr"] for r in sel]),
                              "ma_final": mean_std([r["ma"] for r in sel]),
                              "attacker_share": mean_std([attacker_share(out, r) for r in sel])})
    clean = {}
    for rule in rules:
        sel = [r for r in clean_rows if r["aggregation.name"] == rule and r["status"] == "complete"]
        clean[rule] = {"runs": len(sel), "ma": mean_std([r["ma"] for r in sel]), "asr": mean_std([r["asr"] for r in sel])}
    return {"cells": cells, "no_attack": clean}


def dba_parts(out: Path, rows: list[dict[str, Any]], rules: list[str]) -> list[dict[str, Any]]:
    """DBA cells: ASR of the global trigger and of each local part, when the attack stops and at the end."""
    cells = []
    for rule in rules:
        for m in ATTACKERS:
            sel = [r for r in rows if r["aggregation.name"] == rule and r["attack"] == "DBA"
                   and int(r["attack.num_malicious"]) == m and r["status"] == "complete"]
            stop, end = [], []
            for r in sel:
                hist = load_checkpoint(out / r["run_dir"]).history
                at_stop = next(h for h in hist if h["round"] == r["last_attack_round"])
                stop.append([at_stop["asr"], *at_stop["asr_parts"]])
                end.append([hist[-1]["asr"], *hist[-1]["asr_parts"]])
            if sel:
                cells.append({"rule": rule, "attackers": m, "runs": len(sel),
                              "at_stop": [mean_std(col) for col in zip(*stop, strict=True)],
                              "at_end": [mean_std(col) for col in zip(*end, strict=True)]})
    return cells


def verdict(rule: str, cells: list[dict[str, Any]], clean: dict[str, Any], after: int) -> str:
    mine = [c for c in cells if c["rule"] == rule and c["runs"]]
    broken = [f"{c['attack']} ({c['attackers']})" for c in mine if c["asr_at_stop"][0] >= BROKEN]
    dented = [f"{c['attack']} ({c['attackers']})" for c in mine if DENTED <= c["asr_at_stop"][0] < BROKEN]
    durable = [f"{c['attack']} ({c['attackers']})" for c in mine if c["asr_final"][0] >= BROKEN]
    ma = clean[rule]["ma"]
    text = f"Clean MA {pct(ma)}%. "
    text += ("Broken (mean ASR >= 50% when the attack stops) by: " + ", ".join(broken) + ". ") if broken else \
        "No attack reaches a mean ASR of 50%. "
    if dented:
        text += "Dented (20-50%) by: " + ", ".join(dented) + ". "
    if durable:
        text += f"Still >= 50% {after} rounds after the attack stopped: " + ", ".join(durable) + ". "
    return text


def markdown(meta: dict[str, Any], report: dict[str, Any], stem: str) -> str:
    rules, cells, clean = meta["rules"], report["cells"], report["no_attack"]
    lines = [
        "# Attack matrix: which attack breaks which defense", "",
        f"Command: `{meta['command']}` (git {meta['git_commit']}).",
        f"Data: real MNIST, {meta['train_size']:,} train / {meta['test_size']:,} test images (a seeded subset, "
        f"scaled down from the defense table's 8,000 / 2,000 for the compute budget), 20 clients, Dirichlet(0.5), "
        f"every client in every round, {meta['rounds']} rounds; attackers attack in rounds 1-{meta['attack_rounds']} "
        f"and stop. Seeds {meta['seeds']}; {meta['jobs']} runs in parallel with {meta['threads_per_run']} CPU thread(s) "
        f"each on {meta['machine']}; torch {meta['torch']}; {meta['runs']} runs "
        f"({meta['runs_complete']} complete; {meta['train_seconds_sum']:.0f} s of training in all, as each run timed "
        f"itself; finished runs are skipped on a re-run).",
        f"Rules included (the aggregator registry at run time): {', '.join(rules)}.", "",
        "Attacks (defaults of flsec unless stated): backdoor = 50% of each batch stamped and relabelled 0; boosted = "
        "the same, update scaled by n / (eta * attackers in the round); constrain+scale = Bagdasaryan et al.'s "
        "anomaly-evasion loss (alpha 0.9) and the same scaling, 5 local epochs; PGD = updates projected onto the L2 "
        "ball of the attacker's own honest update norm, 5 local epochs; Neurotoxin = gradients masked off the top 5% "
        "coordinates of the last global update, 5 local epochs; DBA = the trigger split into one row band per "
        "attacker; sybil flip = every attacker trains on the same set, every training 7 relabelled 0. "
        "ASR: for backdoors the share of non-0 test images stamped with the global trigger classified 0; "
        "for sybil flip the share of test 7s classified 0. aggregation.f = number of attackers. "
        "Mean ± sample std over seeds, in %.", "",
        f"![ASR at attack stop]({stem}_asr.png)", "",
        f"Durability, the same {meta['rounds'] - meta['attack_rounds']} rounds after the attack stopped:", "",
        f"![ASR at the end]({stem}_asr_final.png)", "",
        "## ASR when the attack stops / at the end, and final MA", "",
        "'Attackers' share': the attackers' total aggregation weight in the rounds they attack (what the rule "
        "gave them; plain averaging gives 10% to 2 and 20% to 4 of 20).", "",
        "| rule | attack | attackers | seeds | ASR at stop | ASR at end | MA at end | attackers' share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        lines.append(f"| {c['rule']} | {c['attack']} | {c['attackers']} | {c['runs']} | {pct(c['asr_at_stop'])} | "
                     f"{pct(c['asr_final'])} | {pct(c['ma_final'])} | {pct(c['attacker_share'])} |")
    lines += ["", "## DBA: global trigger and each local part", "",
              "ASR of the assembled global trigger and of each attacker's part alone (Xie et al. 2020 evaluate both), "
              "when the attack stops / at the end.", "",
              "| rule | attackers | global | parts |", "|---|---|---|---|"]
    for c in report["dba_parts"]:
        parts = ", ".join(f"{pct(a)} / {pct(b)}" for a, b in zip(c["at_stop"][1:], c["at_end"][1:], strict=True))
        lines.append(f"| {c['rule']} | {c['attackers']} | {pct(c['at_stop'][0])} / {pct(c['at_end'][0])} | {parts} |")
    lines += ["", "## No attack", "", "| rule | MA | ASR (trigger on a clean model) |", "|---|---|---|"]
    lines += [f"| {r} | {pct(clean[r]['ma'])} | {pct(clean[r]['asr'])} |" for r in rules]
    lines += ["", "## Per defense", ""]
    for rule in rules:
        lines.append(f"**{rule}.** " + verdict(rule, cells, clean, meta["rounds"] - meta["attack_rounds"]))
        if rule in LITERATURE:
            lines.append(f"Literature: {LITERATURE[rule]}")
        if rule in NOTES:
            lines.append(NOTES[rule])
        lines.append("")
    if meta["failed"]:
        lines += ["## Failed runs", "", *[f"- {f}" for f in meta["failed"]], ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
