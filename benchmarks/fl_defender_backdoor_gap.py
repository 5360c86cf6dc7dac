"""Why the scaled FL-Defender backdoor reproduction gives FedAvg a low ASR: per-round measurements.

Runs one cell of ``reproduce_fl_defender.py`` (the paper's backdoor, same attackers, same seeds) and,
every round, measures what the aggregate is made of:

* the global model's ASR (all stamped source-class test images) and MA (``--eval-images`` test images);
* the ASR / MA of each attacker's *local* model (global + its update) before aggregation, and the
  mean ASR of the honest local models;
* the ASR of the model the attackers alone would produce (global + mean of the attackers' updates);
* the share of stamped copies among all the samples the clients trained on this round, the number of
  local SGD steps of an attacker, and the attackers' update norms next to the honest ones.

    .venv/bin/python benchmarks/fl_defender_backdoor_gap.py --train-size 6000 --rounds 10 --threads 1
    .venv/bin/python benchmarks/fl_defender_backdoor_gap.py --train-size 60000 --rounds 5 --split flsec

Writes ``benchmarks/results/fl_defender_backdoor_gap_<train size>_<split>_<rule>.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reproduce_fl_defender as repro
from flsec.attacks.backdoor import stamp
from flsec.fl.engines import CLIENT_ENGINES
from flsec.fl.evaluate import predict
from flsec.fl.params import derive_seed, get_flat, set_flat
from flsec.fl.server import Server
from flsec.io import write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(repro.default_data_dir()))
    ap.add_argument("--train-size", type=int, default=6000)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--rule", default="fedavg")
    ap.add_argument("--eval-images", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], help="extra config override")
    ap.add_argument("--split", default="authors", choices=["authors", "flsec"],
                    help="the authors' seeded partition and attackers, or flsec's partition")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ns = argparse.Namespace(data_dir=args.data_dir, set=args.set, rounds=args.rounds, train_size=args.train_size)
    cfg = repro.cell_config("backdoor", args.rule, ns)
    torch.manual_seed(derive_seed(cfg.seed, list(repro.ATTACKS).index("backdoor"),
                                  [repro.BASELINE, *repro.RULES].index(args.rule)))
    cfg, fed = repro.with_paper_attackers(cfg, args.split)
    a = cfg.attack
    attackers = sorted(fed.malicious)
    y_train = fed.data.y_train
    holdings = {c: int((y_train[torch.from_numpy(fed.shards[c])] == a.source_label).sum()) for c in range(20)}
    xt, yt = fed.data.x_test, fed.data.y_test
    src = yt == a.source_label
    x_bd = stamp(xt[src], fed.trigger)
    x_ma, y_ma = xt[: args.eval_images], yt[: args.eval_images]

    def asr(model: torch.nn.Module) -> float:
        with torch.no_grad():
            return float((predict(model, x_bd) == a.target_label).float().mean())

    def ma(model: torch.nn.Module) -> float:
        with torch.no_grad():
            return float((predict(model, x_ma) == y_ma).float().mean())

    n_samples = sum(len(s) for s in fed.shards)
    copies_per_round = cfg.training.local_epochs * sum(holdings[c] for c in attackers)
    steps = {c: cfg.training.local_epochs * -(-len(fed.shards[c]) // cfg.training.batch_size) for c in attackers}
    summary: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/fl_defender_backdoor_gap.py", *sys.argv[1:]]),
        "commit": repro.git_commit(), "threads": args.threads, "machine": repro.cpu_name(),
        "train_size": n_samples + (cfg.aggregation.root_size if fed.root is not None else 0),
        "rule": args.rule, "rounds": args.rounds, "split": args.split, "seed": cfg.seed, "attackers": attackers,
        "source_samples_total": int((y_train == a.source_label).sum()),
        "source_samples_per_attacker": {c: holdings[c] for c in attackers},
        "client_sizes": [len(s) for s in fed.shards],
        "attacker_local_steps_per_round": steps,
        "stamped_copies_per_round": copies_per_round,
        "stamped_share_of_round_samples": copies_per_round / (cfg.training.local_epochs * n_samples + copies_per_round),
        "rounds_detail": [],
    }
    print({k: v for k, v in summary.items() if k != "rounds_detail"}, flush=True)
    probe = fed.new_model()
    out = Path(args.out) if args.out else (repro.ROOT / "benchmarks" / "results" /
                                          f"fl_defender_backdoor_gap_{summary['train_size']}_{args.split}_{args.rule}.json")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(cfg, Path(tmp) / "run", federation=fed)
        clients = CLIENT_ENGINES.get(cfg.runtime.client_engine)(fed)
        for r in server.rounds:
            g = get_flat(server.model).clone()
            replies = clients.run(server.begin_round(r))
            by = {rep.client: rep for rep in replies}
            local_asr, local_ma = {}, {}
            for c in attackers:
                set_flat(probe, g + by[c].update)
                local_asr[c], local_ma[c] = round(asr(probe), 4), round(ma(probe), 4)
            honest = [c for c in by if c not in fed.malicious]
            honest_asr = []
            for c in honest:
                set_flat(probe, g + by[c].update)
                honest_asr.append(asr(probe))
            set_flat(probe, g + torch.stack([by[c].update for c in attackers]).mean(0))
            attackers_only = asr(probe)
            record = server.finish_round(r, replies)
            row = {"round": r, "global_asr": round(asr(server.model), 4), "global_ma": round(ma(server.model), 4),
                   "attacker_local_asr": local_asr, "attacker_local_ma": local_ma,
                   "honest_local_asr_mean": round(float(np.mean(honest_asr)), 4),
                   "attackers_mean_update_asr": round(attackers_only, 4),
                   "attacker_update_norms": {c: round(float(by[c].update.norm()), 4) for c in attackers},
                   "honest_update_norm_median": round(float(np.median([float(by[c].update.norm()) for c in honest])), 4),
                   "attackers_weight": round(float(sum(w for c, w in zip(record["selected"], record["weights"],
                                                                        strict=True) if c in fed.malicious)), 4)
                   if "weights" in record else None,
                   "seconds": round(time.perf_counter() - t0, 1)}
            summary["rounds_detail"].append(row)
            print(row, flush=True)
            write_json(out, summary)
    write_json(out, summary)


if __name__ == "__main__":
    main()
