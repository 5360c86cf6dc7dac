"""Sybil label flipping: FoolsGold's threat model (Fung et al. 2020, "The Limitations of Federated
Learning in Sybil Settings", Sec. 3 and the label-flipping attacks of Sec. 5).

One adversary controls many clients (sybils) that share a single poisoning objective: every sybil
trains on the same poisoned data set, every ``source_label`` image of the training set relabelled
``target_label`` (as the authors' code builds its ``<data>_bad_<from>_<to>`` sets), so their updates
point the same way. That similarity is what FoolsGold detects; it is also what makes sybils effective
against averaging. The honest clients keep their own shards. ASR is the share of ``source_label`` test
images classified as ``target_label``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from flsec.attacks.base import Attack, AttackSetting
from flsec.attacks.registry import ATTACKS
from flsec.errors import ConfigError
from flsec.fl.evaluate import label_flip_asr, main_accuracy


def shared_poison_indices(labels: np.ndarray, source: int) -> np.ndarray:
    """Training indices of the sybils' common data: every ``source`` image of the training set."""
    return np.flatnonzero(labels == source)


@ATTACKS.register("sybil_label_flip")
class SybilLabelFlip(Attack):
    name = "sybil_label_flip"

    def __init__(self, setting: AttackSetting) -> None:
        super().__init__(setting)
        a = self.config.attack
        self.poison_idx = shared_poison_indices(setting.data.y_train.numpy(), a.source_label)
        if len(self.poison_idx) == 0:
            raise ConfigError(f"attack.source_label: the training data holds no image of class {a.source_label}")

    def client_data(self, client: int, attacking: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if not attacking:
            return self.shard(client)
        idx = torch.from_numpy(self.poison_idx)
        x = self.setting.data.x_train[idx]
        return x, torch.full((len(idx),), self.config.attack.target_label, dtype=torch.long)

    def evaluate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        a = self.config.attack
        return {"ma": main_accuracy(model, x, y), "asr": label_flip_asr(model, x, y, a.source_label, a.target_label)}
