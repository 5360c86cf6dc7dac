"""The loop on what a FedAvg server really sees, over seeds: suspects chosen by the server, their
real updates inverted, the backdoor's target and trigger estimated from the reconstructions, and the
backdoor unlearned on each kind of carrier, next to the baselines that show what the
reconstructions add.

    .venv/bin/python benchmarks/unlearning_realistic.py [--configs configs/mnist_realistic.toml configs/cifar10.toml]
        [--seeds 0 1 2] [--data-dir ../shared/data] [--out runs/unlearning_realistic] [--set key=value ...]

For each config and seed: ``flsec run`` (train, invert the server's most suspicious captures, unlearn
on the config's carriers with every baseline), then phase 3 again on the other carriers (no
baselines), each in its own folder; everything resumes. Writes
benchmarks/results/unlearning_realistic.md and .json (mean +/- std over seeds, per-seed rows, the
targets, the seeds that missed them, what the defender held, phase times). The file's ``## Reading`` section
is written by hand (why a target was missed) and kept when the script rewrites the file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from flsec.config import ExperimentConfig, load_config
from flsec.inversion.records import write_strict_json
from flsec.io import write_text
from flsec.pipeline import run_pipeline
from flsec.unlearning.run import run_unlearning, settings_from
from provenance import ROOT, cpu_name, default_data_dir, git_commit

#: Targets per config file name: (carriers, ASR after at most, MA loss at most in points).
TARGETS = {"mnist_realistic.toml": {"root": (0.02, 0.5), "root_distilled": (0.02, 0.5), "synthetic": (0.05, 1.5)}}
#: The carrier variants of phase 3: name -> (unlearning.carriers, unlearning.root_labels).
#: ``root`` uses the root set's labels (the default), ``root_distilled`` the model's outputs.
VARIANTS = {"reconstructions": ("reconstructions", None), "root": ("root", "true"),
            "root_distilled": ("root", "model"), "synthetic": ("synthetic", None)}


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def mean_std(values: list[float], scale: float = 100.0) -> str:
    if not values:
        return "-"
    m = statistics.fmean(values) * scale
    s = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{m:.2f} +/- {s:.2f}"


def run_seed(cfg: ExperimentConfig, out: Path) -> dict[str, Any]:
    """One seed: the pipeline, then phase 3 on the other carriers; the metrics and phase seconds."""
    t0 = time.perf_counter()
    run_pipeline(cfg, out, progress=False)
    seconds = {"pipeline": time.perf_counter() - t0}
    metrics = {cfg.carriers: json.loads((out / "unlearn" / "metrics.json").read_text())}
    for kind, (carriers, root_labels) in VARIANTS.items():
        if kind == cfg.carriers:
            continue
        folder = out / f"unlearn_{kind}"
        if not (folder / "metrics.json").is_file():
            t1 = time.perf_counter()
            run_unlearning(out / "train", out / "invert", folder, settings_from(cfg.unlearning, cfg.seed, False),
                           baselines=False, progress=False, carriers=carriers, root_labels=root_labels)
            seconds[f"unlearn_{kind}"] = time.perf_counter() - t1
        metrics[kind] = json.loads((folder / "metrics.json").read_text())
    history = [json.loads(line) for line in (out / "train" / "history.jsonl").read_text().splitlines() if line]
    inv = json.loads((out / "invert" / "metrics.json").read_text())
    meta = json.loads((out / "train" / "meta.json").read_text())
    return {"seed": cfg.seed, "metrics": metrics, "history": history, "inversion": inv["summary"],
            "inverted": [{k: t.get(k) for k in ("round", "client", "suspicion", "malicious_client", "num_samples",
                                                   "mean_psnr", "label_accuracy")} for t in inv["targets"]],
            "training_seconds": sum(meta.get("seconds_per_round", [])),
            "inversion_seconds": (inv["summary"].get("seconds_per_image") or 0.0) * (inv["summary"].get("images") or 0),
            "seconds": seconds}


def detection(history: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    """Precision and recall of the server's suspects over all rounds (against each round's attackers)."""
    flagged = sum(len(h.get("suspects", [])) for h in history)
    hits = sum(len(set(h.get("suspects", [])) & set(h.get("attackers", []))) for h in history)
    attacks = sum(len(h.get("attackers", [])) for h in history)
    return (hits / flagged if flagged else None, hits / attacks if attacks else None)


def missed_bounds(m: dict[str, Any], goal: tuple[float, float]) -> list[str]:
    """The bounds of ``goal`` = (ASR after at most, MA loss at most in points) that one run's metrics fail."""
    asr, loss = m["after"]["asr"], m["before"]["ma"] - m["after"]["ma"]
    return ([f"ASR after {100 * asr:.2f}% > {100 * goal[0]:g}%"] if asr > goal[0] else []) + (
        [f"MA loss {100 * loss:.2f} > {goal[1]:g} points"] if loss > goal[1] / 100 else [])


def misses(name: str, runs: list[dict[str, Any]]) -> list[str]:
    """One line per (carriers, seed) that missed its target: which bound failed, and the model it started from."""
    lines = []
    for kind, goal in TARGETS.get(name, {}).items():
        for r in runs:
            m = r["metrics"].get(kind)
            failed = missed_bounds(m, goal) if m is not None else []
            if failed:
                lines.append(f"- {kind}, seed {r['seed']}: {'; '.join(failed)} (from MA {100 * m['before']['ma']:.2f}% "
                             f"to {100 * m['after']['ma']:.2f}%)")
    return lines


def section(name: str, cfg: ExperimentConfig, runs: list[dict[str, Any]]) -> tuple[list[str], dict[str, Any]]:
    targets = TARGETS.get(name, {})
    lines = [f"## {name}: {cfg.data.name} {cfg.data.train_size or 'all'}/{cfg.data.test_size or 'all'} images, "
             f"{cfg.model.name}, {cfg.training.num_clients} clients, {cfg.attack.num_malicious} boosted backdoor "
             f"attacker(s), {cfg.aggregation.name}, {cfg.training.rounds} rounds; seeds "
             f"{', '.join(str(r['seed']) for r in runs)}", "",
             "| carriers | clean images held | ASR before (%) | ASR after (%) | MA before (%) | MA after (%) | "
             "MA loss (points) | target | met? |", "|---|---|---|---|---|---|---|---|---|"]
    checks: dict[str, Any] = {}
    for kind in VARIANTS:
        rows = [r["metrics"][kind] for r in runs if kind in r["metrics"]]
        if not rows:
            continue
        asr_after = [m["after"]["asr"] for m in rows]
        loss = [m["before"]["ma"] - m["after"]["ma"] for m in rows]
        goal = targets.get(kind)
        met, meeting = None, 0
        if goal:
            met = statistics.fmean(asr_after) <= goal[0] and statistics.fmean(loss) <= goal[1] / 100
            meeting = sum(not missed_bounds(m, goal) for m in rows)
            checks[kind] = {"asr_after_max": goal[0], "ma_loss_max_points": goal[1], "met_on_mean": met,
                            "seeds_meeting": meeting}
        lines.append(f"| {kind} | {rows[0]['defender_holdings']['clean_images']} | "
                     f"{mean_std([m['before']['asr'] for m in rows])} | {mean_std(asr_after)} | "
                     f"{mean_std([m['before']['ma'] for m in rows])} | {mean_std([m['after']['ma'] for m in rows])} | "
                     f"{mean_std(loss)} | "
                     + (f"ASR <= {100 * goal[0]:g}%, MA loss <= {goal[1]:g} | {'yes' if met else '**no**'} on the "
                        f"mean; {meeting}/{len(rows)} seeds |" if goal else "reported | - |"))
    missed = misses(name, runs)
    if missed:
        lines += ["", "Seeds that missed a target:", "", *missed]
    base = [r["metrics"][cfg.carriers] for r in runs]
    lines += ["", "Baselines (mean +/- std over seeds; the same unlearning steps):", "",
              "| baseline | what it needs | ASR (%) | MA (%) |", "|---|---|---|---|"]
    for key, what in (("baseline_neural_cleanse", "the model alone: Neural Cleanse over every class on the "
                       f"{base[0].get('baseline_neural_cleanse', {}).get('carriers')} carriers, no reconstructions"),
                      ("baseline_finetune", f"fine-tuning on {cfg.unlearning.root_size} clean root images"),
                      ("baseline_retrain_suspects", "retraining without the inverted suspects"),
                      ("baseline_retrain", "retraining without the true attackers (oracle)")):
        rows = [m[key] for m in base if key in m]
        if rows:
            lines.append(f"| {key.removeprefix('baseline_')} | {what} | {mean_std([m['asr'] for m in rows])} | "
                         f"{mean_std([m['ma'] for m in rows])} |")
    lines += ["", "Per seed:", "", "| seed | suspects precision / recall | inverted (round, client: suspicion) | "
              "PSNR (dB) | labels | target found (source) | mask IoU | " + " | ".join(
                  f"{k}: ASR / MA" for k in VARIANTS) + " | seconds: training / inversion |", "|---|---|---|---|---|---|---|"
              + "---|" * len(VARIANTS) + "---|"]
    for r in runs:
        p, rc = detection(r["history"])
        v = r["metrics"][cfg.carriers]["verification"]
        inverted = ", ".join(f"({t['round']}, {t['client']}: {t['suspicion']:.1f})" if isinstance(t["suspicion"], float)
                             else f"({t['round']}, {t['client']})" for t in r["inverted"])
        iou = v.get("mask_iou_with_true_trigger")
        cells = " | ".join(f"{pct(r['metrics'][k]['after']['asr'])} / {pct(r['metrics'][k]['after']['ma'])}"
                           if k in r["metrics"] else "-" for k in VARIANTS)
        s = r["inversion"]
        lines.append(f"| {r['seed']} | {pct(p)} / {pct(rc)} | {inverted} | {s.get('mean_psnr') or 0:.2f} | "
                     f"{pct(s.get('label_accuracy'))} | {v.get('suspected_target')} (true {v.get('true_target')}; "
                     f"{v.get('trigger_source')}) | {'-' if iou is None else f'{iou:.2f}'} | {cells} | "
                     f"{r['training_seconds']:.0f} / {r['inversion_seconds']:.0f} |")
    held = base[0]["defender_holdings"]
    lines += ["", f"What the defender held (seed {runs[0]['seed']}, {cfg.carriers} carriers): {held['summary']}.",
              f"How the captures were chosen: {held['captures_chosen']}."]
    return lines, checks


def kept_reading(previous: Path, commit: str) -> list[str]:
    """The hand-written ``## Reading`` section of the previous results file, kept across rewrites with a line
    saying which numbers it was written for (the tables above it are regenerated; the reading is not)."""
    if not previous.exists():
        return []
    text = previous.read_text(encoding="utf-8")
    start = text.find("\n## Reading")
    if start < 0:
        return []
    end = text.find("\n## ", start + 1)
    body = text[start + 1:end if end >= 0 else len(text)].rstrip().splitlines()
    body = [line for line in body if not line.startswith("_(Kept from")]  # the previous rewrite's note
    note = f"_(Kept from the previous results file; the tables above are from commit {commit}: check the reading " \
           "against them.)_"
    return [*body, "", note, ""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=[str(ROOT / "configs" / "mnist_realistic.toml")],
                    help="config files, each optionally with its own seeds: configs/cifar10.toml:0,1")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--data-dir", default=str(default_data_dir()))
    ap.add_argument("--out", default=str(ROOT / "runs" / "unlearning_realistic"))
    ap.add_argument("--set", nargs="*", default=[], help="extra config overrides (key=value)")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "unlearning_realistic"))
    args = ap.parse_args()
    lines = ["# Closing the loop on what a FedAvg server sees (suspects, real updates, carriers)", ""]
    report: dict[str, Any] = {"commit": git_commit(mark_dirty=True), "configs": {}}
    for spec in args.configs:
        path, _, own = spec.partition(":")
        name = Path(path).name
        runs = []
        for seed in [int(x) for x in own.split(",")] if own else args.seeds:
            cfg = load_config(Path(path), [f'data.data_dir="{args.data_dir}"', f"seed={seed}", *args.set])
            out = Path(args.out) / Path(path).stem / f"seed{seed}"
            print(f"{name} seed {seed} -> {out}", flush=True)
            runs.append(run_seed(cfg, out))
        text, checks = section(name, cfg, runs)
        lines += [*text, ""]
        report["configs"][name] = {"config": cfg.model_dump(mode="json"), "runs": runs, "checks": checks}
    lines += ["## Provenance", "",
              f"Command: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/unlearning_realistic.py --configs "
              f"{' '.join(args.configs)} --seeds {' '.join(map(str, args.seeds))}"
              + (f" --set {' '.join(args.set)}" if args.set else "") + "`; commit "
              f"{report['commit']}; {cpu_name()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}, "
              "on a 2-core machine shared with other jobs (seconds are upper bounds)."]
    out = Path(args.results)
    at = lines.index("## Provenance")
    lines[at:at] = kept_reading(out.with_suffix(".md"), report["commit"])
    write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    write_strict_json(out.with_suffix(".json"), report)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
