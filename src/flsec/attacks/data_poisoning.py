"""The naive attackers: they poison their data and otherwise train like everyone else.

* ``backdoor``: pixel-pattern backdoor (Gu et al. 2017; Bagdasaryan et al. 2020): a ``poison_fraction``
  of each local batch is stamped with the trigger and relabelled ``target_label``. With
  ``attack.trigger.dba_parts > 1`` every attacker stamps only its own part (DBA, Xie et al. 2020).
* ``label_flip``: every ``source_label`` image of the attacker's data is relabelled ``target_label``
  (the targeted attack FL-Defender studies, Jebreel et al. 2023).

Every attack composes with boosting (``attack.boost``, model replacement).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from flsec.attacks.backdoor import Trigger, poison_batch
from flsec.attacks.base import Attack, AttackSetting, part_asrs
from flsec.attacks.label_flip import flip_labels
from flsec.attacks.registry import ATTACKS
from flsec.errors import ConfigError
from flsec.fl.evaluate import label_flip_asr, main_accuracy


@ATTACKS.register("backdoor")
class BackdoorAttack(Attack):
    """Pixel-pattern backdoor by batch poisoning; the base of every model-poisoning backdoor here."""

    name = "backdoor"
    poisons_batches = True

    def __init__(self, setting: AttackSetting) -> None:
        super().__init__(setting)
        self.parts = self.num_parts()
        self.local_triggers = [setting.trigger.part(i, self.parts) for i in range(self.parts)]
        empty = [i for i, t in enumerate(self.local_triggers) if not bool(t.mask.any())]
        if empty:
            size = self.config.attack.trigger.size
            raise ConfigError(f"attack.trigger.dba_parts: {self.parts} parts do not fit a trigger of {size} rows "
                              f"(part {empty[0]} would be empty); raise attack.trigger.size or use fewer parts")

    def num_parts(self) -> int:
        return self.config.attack.trigger.dba_parts

    def client_trigger(self, client: int) -> Trigger:
        """An attacker's trigger: its part of the global trigger (the whole trigger when not split)."""
        if client not in self.malicious or self.parts == 1:
            return self.setting.trigger
        return self.local_triggers[self.malicious.index(client) % self.parts]

    def poison(self, x: torch.Tensor, y: torch.Tensor, client: int,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a = self.config.attack
        return poison_batch(x, y, self.client_trigger(client), a.target_label, a.poison_fraction, generator)

    def evaluate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        """MA, ASR with the global trigger and, for a split trigger, the ASR of each local part."""
        metrics = super().evaluate(model, x, y)
        if self.parts > 1:
            metrics["asr_parts"] = part_asrs(model, x, y, self.local_triggers, self.config.attack.target_label)
        return metrics


@ATTACKS.register("label_flip")
class LabelFlipAttack(Attack):
    """Every source-class image of an attacking client is relabelled to the target class."""

    name = "label_flip"

    def client_data(self, client: int, attacking: bool) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.shard(client)
        if attacking:
            a = self.config.attack
            y = flip_labels(y, a.source_label, a.target_label)
        return x, y

    def evaluate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        """ASR: share of source-class test images classified as the target class."""
        a = self.config.attack
        return {"ma": main_accuracy(model, x, y), "asr": label_flip_asr(model, x, y, a.source_label, a.target_label)}
