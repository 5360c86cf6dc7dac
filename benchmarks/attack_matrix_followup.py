"""Follow-up to the attack matrix: Krum, Multi-Krum and norm clipping against PGD with the radius shrunk to a
quarter of the attacker's honest update norm (``attack.pgd.eps_factor = 0.25``, as Wang et al. 2020 shrink it
against Krum), in the attack matrix's setting, seed 0, 2 and 4 attackers.

    .venv/bin/python benchmarks/attack_matrix_followup.py --data-dir ../shared/data --threads 1

Each run is an ordinary run directory under --work (default runs/attack_matrix_followup) with its
history.jsonl (weights, update norms, ASR per round) and results.csv.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from attack_matrix import ROOT, base_config, default_data_dir
from flsec.config import SweepGrid
from flsec.sweep import run_sweep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(default_data_dir()))
    ap.add_argument("--eps-factor", type=float, default=0.25)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default=str(ROOT / "runs" / "attack_matrix_followup"))
    args = ap.parse_args()
    setting = argparse.Namespace(data_dir=args.data_dir, train_size=900, test_size=300, rounds=6, attack_rounds=4,
                                 set=["training.batch_size=10", 'runtime.memory_format="channels_last"'])
    grid = SweepGrid(grid={"aggregation.name": ["krum", "multi_krum", "norm_clip"],
                           "attack": [{"kind": "pgd", "local_epochs": 5, "pgd": {"eps_factor": args.eps_factor}}],
                           "attack.num_malicious": [2, 4]},
                     labels={"attack": [f"PGD-{args.eps_factor:g}"]})
    run_sweep(base_config(setting), grid, [0], Path(args.work), jobs=1, threads=args.threads)


if __name__ == "__main__":
    main()
