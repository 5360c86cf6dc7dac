"""The vectorised client engine against the sequential one on one device: the same round's replies
(largest difference of any update coordinate, relative to the update's norm) and local-training images/s.

    .venv/bin/python benchmarks/engines_agree.py --config configs/cifar10_resnet18.toml --device cuda \
        [--set key=value ...] [--repeats 2]

Prints one JSON line per engine and one with the comparison; writes nothing (benchmarks/gpu_check.sh
collects the output).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from flsec.config import load_config
from flsec.fl.engines import CLIENT_ENGINES
from flsec.fl.federation import Federation
from flsec.fl.server import Server

ROOT = Path(__file__).resolve().parents[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "cifar10_resnet18.toml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats after one warm-up (best is kept)")
    args = ap.parse_args()
    cfg = load_config(args.config, [*args.overrides, f'runtime.device="{args.device}"', "training.rounds=1",
                                    'attack.kind="none"', "attack.num_malicious=0"])
    fed = Federation.from_config(cfg)
    replies, rates = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(cfg, Path(tmp) / "r", federation=fed)
        tasks = server.begin_round(1)
        images = sum(len(fed.shards[t.client]) for t in tasks) * cfg.training.local_epochs
        for name in ("sequential", "vectorised"):
            engine = CLIENT_ENGINES.get(name)(fed)
            replies[name] = engine.run(tasks)  # warm-up, and the replies compared below
            best = float("inf")
            for _ in range(args.repeats):
                _sync(fed.runtime.device)
                t0 = time.perf_counter()
                engine.run(tasks)
                _sync(fed.runtime.device)
                best = min(best, time.perf_counter() - t0)
            rates[name] = images / best
            print(json.dumps({"engine": name, "device": str(fed.runtime.device), "clients": len(tasks),
                              "images": images, "seconds": best, "images_per_second": rates[name]}), flush=True)
    worst = max(float((a.update - b.update).abs().max() / a.update.norm().clamp_min(1e-12))
                for a, b in zip(replies["sequential"], replies["vectorised"], strict=True))
    loss = max(abs(a.loss - b.loss) for a, b in zip(replies["sequential"], replies["vectorised"], strict=True))
    print(json.dumps({"comparison": "vectorised vs sequential", "max_abs_update_diff_over_norm": worst,
                      "max_loss_diff": loss, "speedup": rates["vectorised"] / rates["sequential"]}), flush=True)


if __name__ == "__main__":
    main()
