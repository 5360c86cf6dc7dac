"""Everything an experiment's rounds share: data, partition, model spec, trigger, attackers."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from functools import partial

import numpy as np
import torch
from torch import nn

from flsec.aggregation import uses_root_data
from flsec.attacks.backdoor import Trigger, make_trigger, poison_batch
from flsec.attacks.label_flip import flip_labels
from flsec.config import ExperimentConfig
from flsec.data import ImageDataset, load_dataset, make_partition
from flsec.errors import ConfigError
from flsec.fl.client import BatchTransform, LocalSpec, TrainingHooks
from flsec.fl.evaluate import TestSets, backdoor_attack_set, evaluate
from flsec.fl.params import derive_seed
from flsec.models import InputSpec, build_model, check_fits
from flsec.runtime import Runtime, Stopwatch

#: Purpose key of the root-data draw (distinct from the per-round purposes of flsec.fl.rounds).
ROOT_DATA = 5


def take_root_data(data: ImageDataset, size: int, seed: int) -> tuple[ImageDataset, tuple[torch.Tensor, torch.Tensor]]:
    """A seeded uniform draw of ``size`` training samples for the server (FLTrust's root dataset),
    removed from the training split the clients are partitioned from."""
    n = len(data.y_train)
    if size >= n:
        raise ConfigError(f"aggregation.root_size: {size} leaves no training data (the split has {n} samples)")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, ROOT_DATA)))
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
    runtime: Runtime = dataclasses.field(default_factory=Runtime)
    stopwatch: Stopwatch = dataclasses.field(default_factory=Stopwatch, repr=False, compare=False)
    _test_sets: dict[torch.device, TestSets] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_config(cls, config: ExperimentConfig) -> Federation:
        data = load_dataset(config.data.name, config.data.data_dir, config.data.download)
        data = data.subset(config.data.train_size, config.data.test_size, config.seed)
        root = None
        if uses_root_data(config.aggregation.name):
            data, root = take_root_data(data, config.aggregation.root_size, config.seed)
        for field, label in (("target_label", config.attack.target_label), ("source_label", config.attack.source_label)):
            if label >= data.num_classes:
                raise ConfigError(f"attack.{field}: {label} is not a class of {data.name} (0..{data.num_classes - 1})")
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
        return self.runtime.place(build_model(self.config.model.name, self.spec, self.config.seed))

    @property
    def local_spec(self) -> LocalSpec:
        t = self.config.training
        return LocalSpec(t.local_epochs, t.batch_size, t.lr, t.momentum, t.weight_decay)

    def client_data(self, client: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.from_numpy(self.shards[client])
        x, y = self.data.x_train[idx], self.data.y_train[idx]
        if self.config.attack.kind == "label_flip" and client in self.malicious:
            y = flip_labels(y, self.config.attack.source_label, self.config.attack.target_label)
        return x, y

    def attacking(self, client: int, round_: int) -> bool:
        rounds = self.config.attack.rounds
        return client in self.malicious and (rounds is None or round_ in rounds)

    def client_trigger(self, client: int) -> Trigger:
        parts = self.config.attack.trigger.dba_parts
        order = sorted(self.malicious)
        return self.trigger.part(order.index(client), parts) if client in order else self.trigger

    def transform(self, client: int, round_: int) -> BatchTransform | None:
        """The batch poisoning a client applies this round (None for honest behaviour)."""
        a = self.config.attack
        if a.kind != "backdoor" or not self.attacking(client, round_):
            return None

        def poison(x: torch.Tensor, y: torch.Tensor, g: torch.Generator, trig: Trigger) -> tuple[torch.Tensor, torch.Tensor]:
            with self.stopwatch.time("attack"):
                xp, yp, _ = poison_batch(x, y, trig, a.target_label, a.poison_fraction, g)
            return xp, yp

        return partial(poison, trig=self.client_trigger(client))

    def training_hooks(self, client: int, round_: int) -> TrainingHooks | None:
        """How the client's attack changes its local optimisation this round (None: plain SGD)."""
        del client, round_
        return None

    def test_sets(self, device: torch.device) -> TestSets:
        """The clean and attack test sets on ``device``, built once per device."""
        if device not in self._test_sets:
            a = self.config.attack
            x, y = self.data.x_test, self.data.y_test
            attack = x[y == a.source_label] if a.kind == "label_flip" else backdoor_attack_set(x, y, self.trigger,
                                                                                             a.target_label)
            self._test_sets[device] = TestSets(x, y, attack, a.target_label).to(device)
        return self._test_sets[device]

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """MA and ASR (DESIGN.md) of ``model``, in fp32 whatever the training precision."""
        return evaluate(model, self.test_sets(next(model.parameters()).device))
