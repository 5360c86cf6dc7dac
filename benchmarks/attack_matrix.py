"""Attack matrix: every registered aggregation rule against eight attacks, 2 and 4 attackers of 20, 3 seeds.

Setting: configs/mnist_defense.toml (real MNIST from ../shared/data, 20 clients, Dirichlet(0.5), every
client in every round, aggregation.f = the number of attackers), scaled to the compute budget: 2,000
train / 500 test images and 8 rounds. The attackers attack in rounds 1-6 and stop, so every run
gives the ASR when the attack stops (round 6) and its durability 2 rounds later (round 8). All pixel
backdoors use a 4x4 checkerboard (so that DBA can split it into 2 or 4 row bands).

    .venv/bin/python benchmarks/attack_matrix.py [--data-dir ../shared/data] [--jobs 2] [--threads 2]
    .venv/bin/python benchmarks/attack_matrix.py --smoke      # 1 seed, 2 rounds, 600/200 images: checks it all runs

benchmarks/results/attack_matrix.md was made with 900 / 300 images, 6 rounds (attack in 1-4), batch 10 (the
setting's 32 gives under 2 local steps per client per epoch at this size), one thread:

    .venv/bin/python benchmarks/attack_matrix.py --train-size 900 --test-size 300 --rounds 6 --attack-rounds 4 \
        --jobs 1 --threads 1 --set training.batch_size=10 --set 'runtime.memory_format="channels_last"'

Resumable per cell: every (rule, attack, attackers, seed) is a run directory of an ``flsec sweep`` under
--work (default runs/attack_matrix); finished runs are kept and skipped on a re-run. Writes
benchmarks/results/attack_matrix.md, .json and the heatmaps attack_matrix_asr*.png.
"""

from __future__ import annotations

import argparse
import os
import platform
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
from provenance import default_data_dir, git_commit

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
    # 30% of the training 7s as the tail: at 300 test images the default 10% leaves no test 7 in the tail.
    "edge case": {"kind": "edge_case", "boost": False, "edge_case": {"tail_fraction": 0.3}},
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
NOTES: dict[str, str] = {
    "fedavg": "Found: constrain-and-scale replaces the model in one round and the backdoor outlives the attack "
              "(ASR at the end = at stop). Boosting also reaches 100% in some round of every run (peak) but the "
              "next honest round washes it out. Sybil flipping with 4 sybils takes the model down (final MA "
              "13%): each sybil trains on every training 7 (~90 images against an honest client's ~45), so "
              "sample-weighted FedAvg gives the four of them 35% of the aggregate. PGD with its default radius "
              "(the attacker's own honest update norm) is weak at this scale even here: that bounds what PGD can "
              "show against any rule below.",
    "krum": "Disagrees (PGD does not break Krum here); investigated. Krum's MA stays at 24-33%: it keeps one "
            "client's update per round and at 45 images per client, non-IID, that model does not learn (the "
            "defense table, 400 images per client and 20 rounds, gives 87%). The per-round history shows Krum "
            "picking the same small-norm honest client (PGD, 4 attackers, seed 0: client 6 in 5 of 6 rounds, "
            "update norm 0.18-0.48) and no attacker in any attacked round (share 0): PGD's ball (the "
            "attacker's own honest norm, 0.26-2.26 in rounds 1-4) is larger than the winner's norm. "
            "With the radius shrunk as Wang et "
            "al. do against Krum (`attack.pgd.eps_factor = 0.25`, one seed, a separate follow-up run), Krum "
            "takes an attacker's update as the global model in 2 (2 attackers) and 3 (4 attackers) of the 4 "
            "attacked rounds, but an update that small "
            "carries no backdoor (ASR 0% in round 4 with an attacker selected; the 100% of round 1 is a "
            "near-random model, MA 9%, classifying everything as 0; that follow-up ran at commit f75b44a). "
            "The 34-51% 'peaks' above are the same artefact: rounds 1-2 of seeds 1 and 2 (MA 9-34%), the same "
            "under every attack because Krum picked the same honest client. At this scale Krum's ASR says "
            "nothing either way; the literature's result needs a model Krum can train (the defense-table scale).",
    "multi_krum": "Partly agrees. Multi-Krum admits PGD, the plain backdoor and DBA with their full headcount "
                  "(share 22% for 4 of 20; boosted and constrain-and-scale updates are filtered out, share 0-3%), "
                  "so the norm-bounded attacker passes the filter as the literature says; but the ASR it reaches "
                  "is FedAvg's for the same attack (PGD is weak at this scale, see FedAvg), so it does not break "
                  "it here.",
    "foolsgold": "Agrees. FoolsGold gives identical sybils no weight (sybil flip: share 0%, ASR ~1%), but "
                 "backdoor attackers that each keep their own shard are 'diverse' to it and keep their full "
                 "weight (share 11% / 19% for 2 / 4, as FedAvg). It bounds no magnitude, so boosting, "
                 "constrain-and-scale and Neurotoxin break it exactly as they break FedAvg; with 2 attackers "
                 "constrain-and-scale and boosting also cost MA (final MA 43% / 38%).",
    "norm_clip": "Agrees, with a caveat. Clipping to M = 1.0 (about the honest median norm) neutralises the "
                 "magnitude attacks: boosted and constrain-and-scale fall to the level of the plain backdoor "
                 "(4 attackers, ASR at stop: boosted 28% against FedAvg's 74%, constrain-and-scale 18% against "
                 "100%). PGD updates are within the bound and pass unclipped "
                 "(share 20% = headcount for 4): clipping slows PGD (4 attackers: 18% at stop against FedAvg's "
                 "29%; with 2 both are at the floor) but does not remove it; "
                 "PGD at this scale does not reach 50% even under FedAvg, so 'does not stop' is shown "
                 "only as 'passes unchanged'. Sybil flipping with 4 sybils is stronger here than the backdoors: "
                 "clipping removes FedAvg's sample weighting but not the sybils' common direction.",
    "flame": "Disagrees with the paper's 0% ASR against PGD and DBA; investigated. FLAME rejects every "
             "scaled or masked update (boosted, constrain-and-scale, Neurotoxin, sybil: share 0%), but admits "
             "the unscaled backdoors (plain, PGD, DBA) with more than their headcount: 24% of the aggregate "
             "on average (28-32% in seed 0) for 4 of 20 attackers, and a peak ASR of 73-84%. "
             "The per-round history shows why: HDBSCAN on cosine distances keeps a "
             "majority cluster of at least n/2 + 1 models and, with Dirichlet(0.5) shards of ~45 images, the "
             "most dissimilar honest clients are the ones left out, while the attackers (similar to each other) "
             "stay in (PGD, 4 attackers, seed 0: 11-12 of 20 updates kept per round, 7-9 honest ones rejected, "
             "all 4 attackers kept in rounds 1 and 3, 3 in round 2, 2 in round 4). "
             "The default noise (lambda = 0.001) is too small to erase what they add.",
    "fltrust": "Holds against every trigger attack here (no mean ASR at stop above 14%, no peak above 25%); the "
               "trigger-free edge-case attack dents it (22% / 36% at stop, 2-7 rare test 7s per seed). Its root "
               "set (100 clean images) gives a direction the attackers' updates disagree with: their share stays "
               "at about half their headcount, and magnitudes are normalised to the root update, so boosting "
               "gains nothing.",
    "bulyan": "Rejects all scaled or masked updates (share 0%) and admits the plain backdoor, PGD and DBA at "
              "about their headcount; with 4 attackers these reach a high peak ASR in single rounds. Bulyan "
              "needs n >= 4f + 3 and keeps only n - 4f values per coordinate (4 of 20 at f = 4), which costs MA "
              "(65-68% against FedAvg's 74-81% under the plain backdoor, PGD and DBA).",
    "median": "Coordinate-wise rules are dented, not broken: the plain backdoor, boosting and DBA with 4 "
              "attackers reach high peaks in single rounds; 2 rounds after the attack the ASR is back at the floor.",
    "trimmed_mean": "As the median: dents with 4 attackers, and sybil flipping with 4 sybils (all pushing every "
                    "coordinate the same way) reaches 100% in some round.",
    "fl_defender": "Breaks under constrain-and-scale (durable) although it gives those attackers a small "
                   "share (5-8%): constrain-and-scale is scaled by n / eta and survives a small weight. Neurotoxin "
                   "with 4 attackers is not singled out (share 25%, above their headcount): its updates write where "
                   "honest updates do not, and the output-layer similarities FL-Defender scores do not separate them.",
}


READING = (
    "At this scale the models are far from trained (final MA 60-80%, FedAvg's clean MA in the table below), "
    "and the ASR of such a model moves a lot from round to round; the std over seeds is often as large as the mean. "
    "The noise floor is visible where a rule rejects every attacker (attackers' share 0%): the ASR of that "
    "honest-only trajectory is 1-14% (Bulyan, FLAME, Multi-Krum under boosting). Read an ASR below ~20% as no "
    "effect. The attackers' share column says whether a rule let the attackers in at all; it separates 'the rule "
    "stopped it' (share near 0) from 'the attack is too weak here' (share at headcount, ASR still low: compare "
    "FedAvg under the same attack). Krum's column is meaningless for ASR (its model does not train; see Krum). "
    "The no-attack runs have f = 0, so Bulyan, Multi-Krum and Trimmed Mean are the plain mean there (equal "
    "rows). {seeds} "
    "Every number is from the command above, except the follow-up quoted under Krum: "
    "`python benchmarks/attack_matrix_followup.py --threads 1` (Krum, Multi-Krum, norm clipping against PGD with "
    "eps_factor 0.25, seed 0, the same setting; it writes runs/attack_matrix_followup/results.csv)."
)


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
        "git_commit": git_commit(mark_dirty=True), "rules": rules,
        "attacks": ATTACKS, "attackers": ATTACKERS, "seeds": seeds,
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
                              "asr_peak": mean_std([r["asr_max"] for r in sel]),
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


def seed_coverage(meta: dict[str, Any], cells: list[dict[str, Any]]) -> str:
    """Which cells have every seed (the 'seeds' column gives each cell's count)."""
    want = len(meta["seeds"])
    short = [f"{c['rule']} / {c['attack']} ({c['attackers']}): {c['runs']}" for c in cells if c["runs"] < want]
    if not short:
        return f"Every cell has all {want} seeds {meta['seeds']}."
    return (f"{len(short)} of {len(cells)} cells have fewer than {want} seeds (the run was stopped before they "
            f"finished; re-running the command resumes them): " + "; ".join(short) + ".")


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
        *([f"Overrides of configs/mnist_defense.toml for every run: {', '.join(f'`{kv}`' for kv in meta['overrides'])} "
           "(the defense table: batch 32, 20 rounds, 8,000 / 2,000 images).", ""] if meta.get("overrides") else []),
        f"Rules included (the aggregator registry at run time): {', '.join(rules)}.", "",
        "Resume / finish: run the same command again in the same checkout. Every (rule, attack, attackers, seed) is "
        "a run directory under `runs/attack_matrix` (`--work`); finished runs are skipped, an interrupted one "
        "continues from its last round, and this file is rewritten from all finished runs (`--report-only` "
        "rewrites it without training).", "",
        "Attacks (defaults of flsec unless stated): backdoor = 50% of each batch stamped and relabelled 0; boosted = "
        "the same, update scaled by n / (eta * attackers in the round); constrain+scale = Bagdasaryan et al.'s "
        "anomaly-evasion loss (alpha 0.9) and the same scaling, 5 local epochs; PGD = updates projected onto the L2 "
        "ball of the attacker's own honest update norm, 5 local epochs; Neurotoxin = gradients masked off the top 5% "
        "coordinates of the last global update, 5 local epochs; DBA = the trigger split into one row band per "
        "attacker; sybil flip = every attacker trains on the same set, every training 7 relabelled 0; edge case = "
        "Wang et al. 2020's tail backdoor: the rarest 30% of the training 7s (k-NN distance in a PCA embedding; "
        "flsec's default 10% leaves no test 7 in the tail at 300 test images) are held by the attackers only, "
        "relabelled 0 (no trigger). "
        "ASR: for backdoors the share of non-0 test images stamped with the global trigger classified 0; "
        "for sybil flip the share of test 7s classified 0; for edge case the share of the test 7s as rare as the "
        "training tail classified 0 (only 2-7 test images per seed at this test size: each is 14-50% of that "
        "ASR). aggregation.f = number of attackers. "
        "Mean ± sample std over seeds, in %.", "",
        f"![ASR at attack stop]({stem}_asr.png)", "",
        f"Durability, the same {meta['rounds'] - meta['attack_rounds']} rounds after the attack stopped:", "",
        f"![ASR at the end]({stem}_asr_final.png)", "",
        "## ASR when the attack stops / at the end, and final MA", "",
        "'ASR peak': the highest ASR of any round of the run (per run, then averaged). "
        "'Attackers' share': the attackers' total aggregation weight in the rounds they attack (what the rule "
        "gave them; plain averaging gives 10% to 2 and 20% to 4 of 20).", "",
        "| rule | attack | attackers | seeds | ASR at stop | ASR peak | ASR at end | MA at end | attackers' share |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        lines.append(f"| {c['rule']} | {c['attack']} | {c['attackers']} | {c['runs']} | {pct(c['asr_at_stop'])} | "
                     f"{pct(c['asr_peak'])} | "
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
    lines += ["", "## Reading this table", "", READING.format(seeds=seed_coverage(meta, cells)), "", "## Per defense", ""]
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
