"""Defense table: MA and ASR of every aggregation rule under no attack, backdoor, boosted backdoor.

Setting (configs/mnist_defense.toml): real MNIST from ../shared/data, 8,000 train / 2,000 test,
20 clients, Dirichlet(0.5), 2 malicious clients, all clients every round, 20 rounds; f = 2 for the
robust rules; norm clipping bounds updates at ``--clip-norm`` (default 2.5, the median honest
update norm of this setting's first two rounds under FedAvg); FLTrust's server keeps 100 of the
8,000 training images as its root dataset.

    .venv/bin/python benchmarks/defense_table.py [--data-dir ../shared/data] [--rounds 20] [--threads 1]
    .venv/bin/python benchmarks/defense_table.py --rerun foolsgold fl_defender   # recompute those rules

Writes benchmarks/results/defense_table.md and .json. The .json is rewritten after every cell and
finished (rule, scenario) cells are skipped on a re-run, so an interrupted table resumes; each cell
records the git commit and thread count it was computed with.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from flsec.config import load_config
from flsec.fl.engines import train
from flsec.io import write_json, write_text
from provenance import default_data_dir, git_commit

ROOT = Path(__file__).resolve().parents[1]
RULES = ["fedavg", "krum", "multi_krum", "trimmed_mean", "median", "bulyan", "foolsgold", "fl_defender",
         "norm_clip", "flame", "fltrust"]
SCENARIOS = {
    "no attack": ["attack.kind=\"none\"", "attack.num_malicious=0"],
    "backdoor": ["attack.kind=\"backdoor\"", "attack.boost=false"],
    "backdoor + boosting": ["attack.kind=\"backdoor\"", "attack.boost=true"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(default_data_dir()))
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--rules", nargs="*", default=RULES)
    ap.add_argument("--rerun", nargs="*", default=[], help="rules whose saved cells are recomputed")
    ap.add_argument("--clip-norm", type=float, default=2.5, help="norm_clip's bound M")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "defense_table"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    out = Path(args.out)
    results: dict[str, dict[str, dict[str, float]]] = {}
    if out.with_suffix(".json").exists():
        saved = json.loads(out.with_suffix(".json").read_text())
        if saved.get("rounds") == args.rounds:
            results = saved["results"]
    for rule in args.rerun:
        results.pop(rule, None)
    commit = git_commit()
    for rule in args.rules:
        for scenario, sets in SCENARIOS.items():
            if scenario in results.get(rule, {}):
                continue
            overrides = [f"data.data_dir={json.dumps(args.data_dir)}", f"training.rounds={args.rounds}",
                         f"aggregation.name=\"{rule}\"", "aggregation.f=2", f"aggregation.clip_norm={args.clip_norm}",
                         *sets]
            cfg = load_config(ROOT / "configs" / "mnist_defense.toml", overrides)
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = train(cfg, Path(tmp) / "run", progress=False)
            last = ckpt.history[-1]
            honest = [n for h in ckpt.history[:3] for c, n in zip(h["selected"], h["update_norms"], strict=True)
                      if c not in h["attackers"]]
            results.setdefault(rule, {})[scenario] = {
                "ma": last["ma"], "asr": last["asr"], "seconds": round(time.perf_counter() - t0, 1),
                "commit": commit, "threads": torch.get_num_threads(),
                "honest_update_norm_rounds_1_3": round(float(np.median(honest)), 4),
                "notes": sorted({n for h in ckpt.history for n in h.get("notes", [])})}
            print(f"{rule:13s} {scenario:20s} MA {last['ma']:.4f} ASR {last['asr']:.4f} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
            write_json(out.with_suffix(".json"), {"rounds": args.rounds, "results": results})

    cfg0 = load_config(ROOT / "configs" / "mnist_defense.toml", [f"data.data_dir={json.dumps(args.data_dir)}"])
    header = ["# Defense table: MA and ASR per aggregation rule", "",
              f"Command: `python benchmarks/defense_table.py --rounds {args.rounds} --threads 1` (resumable: each cell "
              "records the commit and threads it ran with, listed below; `--rules` / `--rerun` recompute cells).  ",
              f"Setting (configs/mnist_defense.toml): {cfg0.data.name}, {cfg0.data.train_size} train / "
              f"{cfg0.data.test_size} test images, {cfg0.training.num_clients} clients, Dirichlet({cfg0.data.alpha}), "
              f"{cfg0.attack.num_malicious} backdoor attackers (poison fraction {cfg0.attack.poison_fraction}, target "
              f"{cfg0.attack.target_label}), {args.rounds} rounds, seed {cfg0.seed}; "
              f"machine: {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores, torch {torch.__version__}.", ""]
    lines = ["| rule | no attack MA | no attack ASR | backdoor MA | backdoor ASR | boosted MA | boosted ASR | holds? |",
             "|---|---|---|---|---|---|---|---|"]
    reference = results.get("fedavg", {}).get("no attack", {}).get("ma")
    provenance = []
    for rule in [r for r in RULES if r in results] + [r for r in results if r not in RULES]:
        row = results[rule]
        if len(row) < len(SCENARIOS):
            continue
        clean_ma = reference if reference is not None else row["no attack"]["ma"]
        holds = all(row[s]["asr"] <= 0.10 and clean_ma - row[s]["ma"] <= 0.02 for s in list(SCENARIOS)[1:])
        cells = [f"{100 * row[s][m]:.1f}" for s in SCENARIOS for m in ("ma", "asr")]
        lines.append(f"| {rule} | " + " | ".join(cells) + f" | {'yes' if holds else 'no'} |")
        runs = {(row[s].get("commit", "12374d7"), row[s].get("threads", 1)) for s in SCENARIOS}
        provenance.append(f"{rule}: " + ", ".join(f"commit {c}, {t} thread(s)" for c, t in sorted(runs)))
    note = ("\n\nMA/ASR in % after the last round. 'holds' = under both attacks, ASR <= 10% and MA within 2 points "
            f"of FedAvg's no-attack MA (the federation's clean baseline). {args.rounds} rounds; f = 2; norm_clip "
            f"M = {args.clip_norm}; FLTrust root dataset 100 images.\n\nCells computed at: " + "; ".join(provenance)
            + ".\n")
    write_text(out.with_suffix(".md"), "\n".join(header + lines) + note)
    write_json(out.with_suffix(".json"), {"rounds": args.rounds, "results": results})
    print("\n".join(lines))


if __name__ == "__main__":
    main()
