"""Defense table: MA and ASR of every aggregation rule under no attack, backdoor, boosted backdoor.

Setting (configs/mnist_defense.toml): real MNIST from ../shared/data, 8,000 train / 2,000 test,
20 clients, Dirichlet(0.5), 2 malicious clients, all clients every round, 20 rounds.

    .venv/bin/python benchmarks/defense_table.py [--data-dir ../shared/data] [--rounds 20]

Writes benchmarks/results/defense_table.md and .json. The .json is rewritten after every run and
finished (rule, scenario) cells are skipped on a re-run, so an interrupted table resumes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from flsec.config import load_config
from flsec.fl.server import train
from flsec.io import write_json, write_text

ROOT = Path(__file__).resolve().parents[1]
RULES = ["fedavg", "krum", "multi_krum", "trimmed_mean", "median", "foolsgold", "fl_defender"]
SCENARIOS = {
    "no attack": ["attack.kind=\"none\"", "attack.num_malicious=0"],
    "backdoor": ["attack.kind=\"backdoor\"", "attack.boost=false"],
    "backdoor + boosting": ["attack.kind=\"backdoor\"", "attack.boost=true"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--rules", nargs="*", default=RULES)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "defense_table"))
    args = ap.parse_args()

    out = Path(args.out)
    results: dict[str, dict[str, dict[str, float]]] = {}
    if out.with_suffix(".json").exists():
        saved = json.loads(out.with_suffix(".json").read_text())
        if saved.get("rounds") == args.rounds:
            results = saved["results"]
    for rule in args.rules:
        for scenario, sets in SCENARIOS.items():
            if scenario in results.get(rule, {}):
                continue
            overrides = [f"data.data_dir=\"{args.data_dir}\"", f"training.rounds={args.rounds}",
                         f"aggregation.name=\"{rule}\"", "aggregation.f=2", *sets]
            cfg = load_config(ROOT / "configs" / "mnist_defense.toml", overrides)
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = train(cfg, Path(tmp) / "run", progress=False)
            last = ckpt.history[-1]
            results.setdefault(rule, {})[scenario] = {
                "ma": last["ma"], "asr": last["asr"], "seconds": round(time.perf_counter() - t0, 1)}
            print(f"{rule:13s} {scenario:20s} MA {last['ma']:.4f} ASR {last['asr']:.4f} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
            write_json(out.with_suffix(".json"), {"rounds": args.rounds, "results": results})

    lines = ["| rule | no attack MA | no attack ASR | backdoor MA | backdoor ASR | boosted MA | boosted ASR | holds? |",
             "|---|---|---|---|---|---|---|---|"]
    reference = results.get("fedavg", {}).get("no attack", {}).get("ma")
    for rule in [r for r in RULES if r in results] + [r for r in results if r not in RULES]:
        row = results[rule]
        if len(row) < len(SCENARIOS):
            continue
        clean_ma = reference if reference is not None else row["no attack"]["ma"]
        holds = all(row[s]["asr"] <= 0.10 and clean_ma - row[s]["ma"] <= 0.02 for s in list(SCENARIOS)[1:])
        cells = [f"{100 * row[s][m]:.1f}" for s in SCENARIOS for m in ("ma", "asr")]
        lines.append(f"| {rule} | " + " | ".join(cells) + f" | {'yes' if holds else 'no'} |")
    note = ("\n\nMA/ASR in % after the last round. 'holds' = under both attacks, ASR <= 10% and MA within 2 points "
            f"of FedAvg's no-attack MA (the federation's clean baseline). {torch.get_num_threads()} CPU thread(s).\n")
    write_text(out.with_suffix(".md"), "\n".join(lines) + note)
    write_json(out.with_suffix(".json"), {"rounds": args.rounds, "results": results})
    print("\n".join(lines))


if __name__ == "__main__":
    main()
