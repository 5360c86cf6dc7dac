"""The attack interface: everything a registered attack may change in a federation.

An attack is built once per federation from the experiment configuration (a process that runs
clients elsewhere builds its own copy from the same configuration, so only the
:class:`~flsec.fl.rounds.ClientTask` travels). For the clients it controls, in the rounds in which
they attack, it may change

* the client's data (:meth:`Attack.client_data`: label flipping, the sybils' shared data, edge cases),
* each local batch (:meth:`Attack.poison`: pixel-pattern backdoors),
* the client's local optimisation (:meth:`Attack.hooks`: a loss term, gradient masking, a projection;
  the one place an attack touches local SGD, through :class:`~flsec.fl.client.TrainingHooks`),
* the update it sends (:meth:`Attack.finish_update`, then :meth:`Attack.scale_factor`; boosting by
  ``attack.boost`` composes with every attack),

and it defines how its success is measured (:meth:`Attack.evaluate`). Honest clients are left alone
(an attack may only reshape the scenario's data, as the edge-case attack removes its tail from honest
shards). Server-side knowledge an attack needs (:attr:`Attack.needs`) reaches the attacking clients
in ``ClientTask.knowledge``, so it works wherever the clients run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ValidationError
from torch import nn

from flsec.attacks.backdoor import Trigger, stamp
from flsec.config import ExperimentConfig
from flsec.data import ImageDataset
from flsec.errors import ConfigError
from flsec.fl.client import LocalSpec, TrainingHooks
from flsec.fl.evaluate import backdoor_asr, main_accuracy, predict  # fl.evaluate imports only attacks.backdoor

# Seed purpose of an attack's own random draws (rounds.py uses 1-4: select, local, capture, aggregate).
ATTACK_STREAM = 5

#: Server-side quantities an attack may ask for (``Attack.needs``), filled in by the server.
PREVIOUS_GLOBAL_UPDATE = "previous_global_update"
KNOWLEDGE = frozenset({PREVIOUS_GLOBAL_UPDATE})

Knowledge = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class AttackSetting:
    """What an attack is built from: the experiment, its data, the partition, the trigger, the attackers."""

    config: ExperimentConfig
    data: ImageDataset
    shards: list[np.ndarray]
    trigger: Trigger
    malicious: tuple[int, ...]


class AttackHooks(TrainingHooks):
    """Training hooks that can report what they chose (e.g. the radius of a projection) for the capture record."""

    def info(self) -> dict[str, Any]:
        return {}


class ComposedHooks(AttackHooks):
    """Several hooks applied in order (losses chained, steps called one after the other)."""

    def __init__(self, parts: list[TrainingHooks]) -> None:
        self.parts = parts

    def begin(self, model: nn.Module) -> None:
        for h in self.parts:
            h.begin(model)

    def loss(self, model: nn.Module, loss: torch.Tensor) -> torch.Tensor:
        for h in self.parts:
            loss = h.loss(model, loss)
        return loss

    def before_step(self, model: nn.Module) -> None:
        for h in self.parts:
            h.before_step(model)

    def after_step(self, model: nn.Module) -> None:
        for h in self.parts:
            h.after_step(model)

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for h in self.parts:
            if isinstance(h, AttackHooks):
                out.update(h.info())
        return out


class Attack:
    """Base class: no attack. Subclasses override what their attack changes.

    ``Options`` (a pydantic model) validates ``attack.options`` for plug-in attacks; the built-in
    attacks read their own ``[attack.<name>]`` sections instead.
    """

    name: ClassVar[str] = "none"
    #: server-side knowledge the attacking clients receive (names from :data:`KNOWLEDGE`)
    needs: ClassVar[frozenset[str]] = frozenset()
    #: the attack scales its update even without ``attack.boost`` (model replacement)
    scales: ClassVar[bool] = False
    #: the attack poisons local batches (:meth:`poison`)
    poisons_batches: ClassVar[bool] = False
    Options: ClassVar[type[BaseModel] | None] = None

    def __init__(self, setting: AttackSetting) -> None:
        self.setting = setting
        self.config = setting.config
        self.malicious = setting.malicious
        self.options = self._options()

    def _options(self) -> BaseModel | None:
        raw = self.config.attack.options
        if self.Options is None:
            if raw:
                raise ConfigError(f"attack.options: attack '{self.name}' takes no options (got {', '.join(sorted(raw))})")
            return None
        try:
            return self.Options.model_validate(raw)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise ConfigError(f"attack.options.{where}: {err['msg']}") from None

    # The scenario ---------------------------------------------------------------------------
    def shard(self, client: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The client's own clean training data."""
        idx = torch.from_numpy(self.setting.shards[client])
        return self.setting.data.x_train[idx], self.setting.data.y_train[idx]

    def client_data(self, client: int, attacking: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The data the client trains on (``attacking``: it is one of the attackers and attacks this round)."""
        del attacking
        return self.shard(client)

    def client_trigger(self, client: int) -> Trigger:
        return self.setting.trigger

    # What an attacking client does ---------------------------------------------------------
    def poison(self, x: torch.Tensor, y: torch.Tensor, client: int,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Poison one local batch: (x, y, poisoned mask), or None when the attack leaves batches alone."""
        del x, y, client, generator
        return None

    def local_spec(self, spec: LocalSpec) -> LocalSpec:
        """The attackers' local hyper-parameters (``attack.local_epochs`` / ``attack.lr`` where set)."""
        a = self.config.attack
        return replace(spec, epochs=a.local_epochs or spec.epochs, lr=a.lr or spec.lr)

    def hooks(self, client: int, round_: int, spec: LocalSpec, knowledge: Knowledge) -> AttackHooks | None:
        """How the attack changes the client's local optimisation (None: plain SGD)."""
        del client, round_, spec, knowledge
        return None

    def finish_update(self, update: torch.Tensor, client: int, round_: int) -> torch.Tensor:
        """The update after local training and before scaling."""
        del client, round_
        return update

    def scale_factor(self, gamma: float, update: torch.Tensor) -> float:
        """The factor the (finished) update is multiplied by, given the boost factor ``gamma``."""
        del update
        return gamma

    # Measuring it ----------------------------------------------------------------------------
    def evaluate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        """MA and ASR (DESIGN.md) on the test set; the pixel trigger's ASR unless the attack defines its own."""
        a = self.config.attack
        return {"ma": main_accuracy(model, x, y), "asr": backdoor_asr(model, x, y, self.setting.trigger, a.target_label)}


def targeted_rate(model: nn.Module, x: torch.Tensor, target: int) -> float:
    """Share of ``x`` classified as ``target`` (NaN for no images)."""
    if len(x) == 0:
        return float("nan")
    return float((predict(model, x) == target).float().mean())


def part_asrs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, parts: list[Trigger], target: int) -> list[float]:
    """ASR of each local trigger alone (DBA, Xie et al. 2020, Sec. 4: local-trigger evaluation)."""
    keep = y != target
    return [targeted_rate(model, stamp(x[keep], t), target) for t in parts]
