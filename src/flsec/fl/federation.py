"""Everything an experiment's rounds share: data, partition, model spec, trigger, attackers, the attack."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

from flsec.aggregation import uses_root_data
from flsec.attacks.backdoor import Trigger, make_trigger
from flsec.attacks.base import Attack, AttackHooks, AttackSetting, Knowledge
from flsec.attacks.registry import build_attack
from flsec.config import ExperimentConfig
from flsec.data import ImageDataset, load_dataset, make_partition
from flsec.errors import ConfigError
from flsec.fl.client import BatchTransform, LocalSpec
from flsec.fl.params import derive_seed
from flsec.models import InputSpec, build_model, check_fits
from flsec.runtime import Runtime, Stopwatch

#: Purpose key of the root-data draw (distinct from the per-round purposes of flsec.fl.rounds).
ROOT_DATA = 5


def root_order(n: int, seed: int) -> torch.Tensor:
    """The seeded order in which the server draws its root samples from a training split of ``n``."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, ROOT_DATA)))


def root_indices(n: int, size: int, seed: int, field_name: str = "unlearning.root_size") -> torch.Tensor:
    """The server's ``size`` root samples (sorted indices): the first ``size`` of :func:`root_order`, so
    root sets of different sizes are nested and FLTrust's and phase 3's coincide at equal size."""
    if size >= n:
        raise ConfigError(f"{field_name}: {size} leaves no training data (the split has {n} samples)")
    return root_order(n, seed)[:size].sort().values


def take_root_data(data: ImageDataset, size: int, seed: int) -> tuple[ImageDataset, tuple[torch.Tensor, torch.Tensor]]:
    """A seeded uniform draw of ``size`` training samples for the server (FLTrust's root dataset),
    removed from the training split the clients are partitioned from."""
    n = len(data.y_train)
    if size >= n:
        raise ConfigError(f"aggregation.root_size: {size} leaves no training data (the split has {n} samples)")
    order = root_order(n, seed)
    root, rest = order[:size].sort().values, order[size:].sort().values
    return (replace(data, x_train=data.x_train[rest], y_train=data.y_train[rest]),
            (data.x_train[root], data.y_train[root]))


@dataclass
class Federation:
    config: ExperimentConfig
    data: ImageDataset
    spec: InputSpec
    shards: list[np.ndarray]
    trigger: Trigger
    malicious: frozenset[int]
    root: tuple[torch.Tensor, torch.Tensor] | None = None
    runtime: Runtime = field(default_factory=Runtime)
    stopwatch: Stopwatch = field(default_factory=Stopwatch, repr=False, compare=False)
    attack: Attack = field(init=False, repr=False)
    _test_sets: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        setting = AttackSetting(self.config, self.data, self.shards, self.trigger, tuple(sorted(self.malicious)))
        self.attack = build_attack(setting)

    @classmethod
    def from_config(cls, config: ExperimentConfig) -> Federation:
        data = load_dataset(config.data.name, config.data.data_dir, config.data.download)
        data = data.subset(config.data.train_size, config.data.test_size, config.seed)
        root = None
        if uses_root_data(config.aggregation.name):
            if config.training.lr_decay != 1:
                raise ConfigError(f"training.lr_decay: must be 1 with aggregation.name = '{config.aggregation.name}' "
                                  "(its server update on the root data trains with the undecayed training.lr)")
            data, root = take_root_data(data, config.aggregation.root_size, config.seed)
        for field_name, label in (("target_label", config.attack.target_label),
                                  ("source_label", config.attack.source_label)):
            if label >= data.num_classes:
                raise ConfigError(f"attack.{field_name}: {label} is not a class of {data.name} "
                                  f"(0..{data.num_classes - 1})")
        c, h, w = data.image_shape
        spec = InputSpec(c, h, w, data.num_classes, data.mean, data.std)
        check_fits(config.model.name, spec, data.name)
        shards = make_partition(
            config.data.partition, data.y_train.numpy(), config.training.num_clients, config.seed,
            config.data.alpha, config.data.min_client_size,
        )
        trigger = make_trigger(config.attack.trigger, h, w)
        return cls(config, data, spec, shards, trigger, frozenset(config.malicious_ids), root,
                   Runtime.from_config(config.runtime))

    def new_model(self) -> nn.Module:
        """The experiment's model at its seeded initial weights, on the run's device and memory format."""
        return self.runtime.place(build_model(self.config.model.name, self.spec, self.config.seed,
                                              self.config.model.width))

    @property
    def local_spec(self) -> LocalSpec:
        """The honest clients' local hyper-parameters in round 1."""
        return self.round_spec(1)

    def round_spec(self, round_: int) -> LocalSpec:
        """The honest clients' local hyper-parameters in ``round_`` (``training.lr_decay`` applied)."""
        return LocalSpec.from_training(self.config.training, round_)

    def client_spec(self, client: int, round_: int) -> LocalSpec:
        """The local hyper-parameters the client trains with in this round (an attacker may use its own)."""
        spec = self.round_spec(round_)
        return self.attack.local_spec(spec) if self.attacking(client, round_) else spec

    def client_data(self, client: int, round_: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The client's training data in ``round_`` (without a round: as in the rounds it attacks)."""
        attacking = client in self.malicious if round_ is None else self.attacking(client, round_)
        return self.attack.client_data(client, attacking)

    def attacking(self, client: int, round_: int) -> bool:
        rounds = self.config.attack.rounds
        return client in self.malicious and (rounds is None or round_ in rounds)

    def client_trigger(self, client: int) -> Trigger:
        return self.attack.client_trigger(client)

    def poison(self, client: int, round_: int, x: torch.Tensor, y: torch.Tensor,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """One batch as the client poisons it this round: (x, y, poisoned mask), None when it does not."""
        if not (self.attack.poisons_batches and self.attacking(client, round_)):
            return None
        return self.attack.poison(x, y, client, generator)

    def transform(self, client: int, round_: int) -> BatchTransform | None:
        """The batch poisoning a client applies this round (None for honest behaviour)."""
        if not (self.attack.poisons_batches and self.attacking(client, round_)):
            return None

        def poison(x: torch.Tensor, y: torch.Tensor, g: torch.Generator,
                   attack: Attack) -> tuple[torch.Tensor, torch.Tensor]:
            with self.stopwatch.time("attack"):
                out = attack.poison(x, y, client, g)
            assert out is not None
            return out[0], out[1]

        return partial(poison, attack=self.attack)

    def training_hooks(self, client: int, round_: int, knowledge: Knowledge | None = None) -> AttackHooks | None:
        """How the client's attack changes its local optimisation this round (None: plain SGD).

        ``knowledge`` is what the server told the attacking client (``ClientTask.knowledge``).
        """
        if not self.attacking(client, round_):
            return None
        return self.attack.hooks(client, round_, self.client_spec(client, round_), knowledge or {})

    def finish_update(self, client: int, round_: int, update: torch.Tensor) -> torch.Tensor:
        if not self.attacking(client, round_):
            return update
        with self.stopwatch.time("attack"):
            return self.attack.finish_update(update, client, round_)

    def test_set(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The held-out test images and labels on ``device``, moved there once."""
        if device not in self._test_sets:
            self._test_sets[device] = (self.data.x_test.to(device), self.data.y_test.to(device))
        return self._test_sets[device]

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """MA, ASR and whatever else the attack measures, on the held-out test set (on the model's
        device, in fp32 whatever the training precision)."""
        return self.attack.evaluate(model, *self.test_set(next(model.parameters()).device))
