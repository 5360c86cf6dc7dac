"""Ground truth behind a capture, for scoring reconstructions only (never read by the attack).

For a FedSGD gradient, ``evaluation_only/`` holds the exact batch. For a FedAvg update it holds
the client's images and labels *before* poisoning; an attacker's update was computed on batches
where a random share of images was stamped and relabelled. The batches of the client's first
epoch are regenerated here exactly as the client drew them (same generator seed, same order of
draws as :func:`flsec.fl.client.client_batches` with the client's augmentation and the backdoor
transform), so each of the N images is scored in the form the update saw it first, with its poisoned flag.
"""

from __future__ import annotations

from typing import Any

import torch

from flsec.attacks.backdoor import make_trigger, poison_batch
from flsec.fl.checkpoint import Checkpoint
from flsec.fl.client import LocalSpec, client_batches


def client_trigger(ckpt: Checkpoint, client: int, height: int, width: int):  # type: ignore[no-untyped-def]
    trigger = make_trigger(ckpt.config.attack.trigger, height, width)
    malicious = sorted(ckpt.meta.get("malicious_ids", []))
    if client in malicious:
        trigger = trigger.part(malicious.index(client), ckpt.config.attack.trigger.dba_parts)
    return trigger


def capture_truth(ckpt: Checkpoint, round_: int, client: int, kind: str,
                  meta: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images, labels, poisoned) of a capture, as the client used them."""
    truth = ckpt.truth(round_, client)
    prefix = f"{kind}/"
    x, y = truth[prefix + "images"], truth[prefix + "labels"]
    if kind != "update":
        poisoned = truth.get(prefix + "poisoned")
        return x, y, (torch.zeros(len(y), dtype=torch.bool) if poisoned is None else poisoned.bool())
    a = ckpt.config.attack
    if a.kind != "backdoor" or not meta.get("attacking", False) or "local_seed" not in meta:
        return x, y, torch.zeros(len(y), dtype=torch.bool)
    trigger = client_trigger(ckpt, client, x.shape[-2], x.shape[-1])
    flags: list[torch.Tensor] = []

    def poison(xb: torch.Tensor, yb: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        xp, yp, mask = poison_batch(xb, yb, trigger, a.target_label, a.poison_fraction, g)
        flags.append(mask)
        return xp, yp

    spec = LocalSpec(1, int(meta["batch_size"]), float(meta["lr"]), augment_crop=int(meta.get("augment_crop", 0)),
                     augment_flip=bool(meta.get("augment_flip", False)))
    batches = list(client_batches(x, y, spec, torch.Generator().manual_seed(int(meta["local_seed"])), poison))
    return (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]), torch.cat(flags))
