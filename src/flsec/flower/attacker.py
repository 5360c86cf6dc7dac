"""flsec's attackers for Flower clients: data poisoning and boosting around a ``NumPyClient``.

``attacker(client_fn, attack=...)`` returns a ``client_fn`` whose clients behave like flsec's malicious
clients on the SuperNodes named in ``attack`` (by ``node_config["partition-id"]``) and are left untouched
elsewhere:

* **backdoor** (BadNets / Bagdasaryan et al. 2020): while ``fit`` runs, every batch the client draws
  from its training loader (attribute ``data_attr``, default ``trainloader``) has ``poison_fraction`` of
  its images stamped with the trigger and relabelled ``target_label`` (:func:`flsec.attacks.poison_batch`,
  the same draws as flsec's clients: one generator per (seed, round, partition));
* **label_flip** (FL-Defender's attack): ``source_label`` relabelled ``target_label`` in every batch;
* **boost** (model replacement, Bagdasaryan et al. 2020 eq. 3): the update ``w_local - w_global`` is sent
  scaled by ``gamma`` (``boost_factor``, or ``num-selected / server-lr`` when the strategy sends them, as
  :class:`~flsec.flower.RobustStrategy` does).

``attack`` is flsec's ``[attack]`` section (an :class:`~flsec.config.AttackConfig` or a dict of it).
Batches are ``(x, y, ...)`` tuples/lists or dicts (``image_key``, ``label_key``) with ``x`` an
``N x C x H x W`` tensor in the pixel range the trigger's ``value`` is written in.

:func:`client_train` turns such a ``client_fn`` into a handler for a Message-API ``ClientApp``
(``app.train()(client_train(client_fn))``), talking to :class:`~flwr.serverapp.strategy.FedAvg`-style
strategies such as :class:`~flsec.flower.RobustStrategy`. The wrapped ``client_fn`` returns the same kind
of object as the original (a ``NumPyClient``, or a ``Client`` made by its ``to_client()``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.client import Client, NumPyClient
from pydantic import ValidationError

from flsec.attacks.backdoor import Trigger, make_trigger, poison_batch
from flsec.attacks.label_flip import flip_labels
from flsec.config import AttackConfig
from flsec.errors import ConfigError
from flsec.fl.params import generator
from flsec.fl.rounds import LOCAL

ClientFn = Callable[[Context], Any]


@dataclass(frozen=True)
class FlowerAttack:
    """An :class:`AttackConfig` plus what a wrapper needs to find the client's data."""

    config: AttackConfig
    seed: int = 0
    data_attr: str = "trainloader"
    image_key: str = "img"
    label_key: str = "label"

    @property
    def malicious(self) -> list[int]:
        c = self.config
        if c.kind == "none" and not c.boost:
            return []
        return sorted(c.malicious_ids) if c.malicious_ids is not None else list(range(c.num_malicious))

    def attacking(self, partition: int, round_: int | None) -> bool:
        rounds = self.config.rounds
        return partition in self.malicious and (rounds is None or (round_ is not None and round_ in rounds))


def _attack_config(attack: AttackConfig | dict[str, Any]) -> AttackConfig:
    if isinstance(attack, AttackConfig):
        return attack
    try:
        return AttackConfig.model_validate(attack)
    except ValidationError as exc:
        from flsec.config import format_validation_error

        raise ConfigError("attack." + format_validation_error(exc)) from None


class PoisonedBatches:
    """An iterable of batches with flsec's poisoning applied to each (everything else is the loader's)."""

    def __init__(self, loader: Any, attack: FlowerAttack, partition: int, g: torch.Generator) -> None:
        self.loader, self.attack, self.partition, self.g = loader, attack, partition, g
        self._trigger: Trigger | None = None

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def trigger(self, height: int, width: int) -> Trigger:
        if self._trigger is None:
            t = make_trigger(self.attack.config.trigger, height, width)
            parts, order = self.attack.config.trigger.dba_parts, self.attack.malicious
            self._trigger = t.part(order.index(self.partition), parts) if parts > 1 else t
        return self._trigger

    def poison(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.attack.config
        if c.kind == "label_flip":
            return x, flip_labels(y, c.source_label, c.target_label)
        if c.kind != "backdoor":
            return x, y
        if x.ndim != 4:
            raise ValueError(f"attacker: expected image batches of shape N x C x H x W, got {tuple(x.shape)}")
        xp, yp, _ = poison_batch(x, y, self.trigger(x.shape[-2], x.shape[-1]), c.target_label, c.poison_fraction,
                                 self.g)
        return xp, yp

    def __iter__(self) -> Iterator[Any]:
        a = self.attack
        for batch in self.loader:
            if isinstance(batch, dict):
                x, y = self.poison(batch[a.image_key], batch[a.label_key])
                yield {**batch, a.image_key: x, a.label_key: y}
            elif isinstance(batch, (tuple, list)):
                x, y = self.poison(batch[0], batch[1])
                yield type(batch)([x, y, *batch[2:]]) if isinstance(batch, list) else (x, y, *batch[2:])
            else:
                raise TypeError(f"attacker: batches must be (x, y) tuples or dicts, got {type(batch).__name__}")


def boost_factor(attack: FlowerAttack, config: dict[str, Any]) -> float:
    """gamma of model replacement: ``boost_factor``, else ``num-selected / server-lr`` from the round config."""
    c = attack.config
    if not c.boost:
        return 1.0
    if c.boost_factor is not None:
        return float(c.boost_factor)
    if "num-selected" not in config:
        raise ConfigError("attack.boost_factor: required unless the strategy sends 'num-selected' "
                          "(flsec.flower.RobustStrategy does)")
    return float(config["num-selected"]) / float(config.get("server-lr", 1.0))


class AttackingClient(NumPyClient):
    """A malicious :class:`NumPyClient`: ``fit`` on poisoned batches, the update boosted; all else delegated."""

    def __init__(self, inner: NumPyClient, attack: FlowerAttack, partition: int) -> None:
        self.inner, self.attack, self.partition = inner, attack, partition
        self.attacked, self.gamma = False, 1.0  # what the last fit did (its metrics stay the inner client's)

    def get_properties(self, config: dict[str, Any]) -> dict[str, Any]:
        return self.inner.get_properties(config)

    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        return self.inner.get_parameters(config)

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]) -> Any:
        return self.inner.evaluate(parameters, config)

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        round_ = int(config["server-round"]) if "server-round" in config else None
        self.attacked, self.gamma = False, 1.0
        if not self.attack.attacking(self.partition, round_):
            return self.inner.fit(parameters, config)
        a = self.attack
        poisons_data = a.config.kind in ("backdoor", "label_flip")
        loader = getattr(self.inner, a.data_attr, None) if poisons_data else None
        if poisons_data and loader is None:
            raise ConfigError(f"attacker: the client has no '{a.data_attr}' attribute to poison; pass data_attr=")
        if poisons_data:
            g = generator(a.seed, round_ or 0, self.partition, LOCAL)
            setattr(self.inner, a.data_attr, PoisonedBatches(loader, a, self.partition, g))
        try:
            new, num_examples, metrics = self.inner.fit(parameters, config)
        finally:
            if poisons_data:
                setattr(self.inner, a.data_attr, loader)
        gamma = boost_factor(a, config)
        if gamma != 1.0:
            new = [(p + gamma * (q - p)).astype(q.dtype) if np.issubdtype(q.dtype, np.floating) else q
                   for p, q in zip(parameters, new, strict=True)]
        self.attacked, self.gamma = True, gamma
        return new, num_examples, metrics


def attacker(client_fn: ClientFn, attack: AttackConfig | dict[str, Any], *, seed: int = 0,
             data_attr: str = "trainloader", image_key: str = "img", label_key: str = "label") -> ClientFn:
    """Wrap ``client_fn(context) -> NumPyClient | Client``: the SuperNodes whose ``partition-id`` is in
    the attack's malicious ids (default ``0..num_malicious-1``) get an :class:`AttackingClient`."""
    spec = FlowerAttack(_attack_config(attack), seed, data_attr, image_key, label_key)

    def wrapped(context: Context) -> Any:
        client = client_fn(context)
        partition = int(context.node_config.get("partition-id", -1))
        if partition not in spec.malicious:
            return client
        if isinstance(client, NumPyClient):
            return AttackingClient(client, spec, partition)
        inner = getattr(client, "numpy_client", None)
        if isinstance(client, Client) and isinstance(inner, NumPyClient):
            return AttackingClient(inner, spec, partition).to_client()
        raise TypeError(f"attacker: client_fn must return a NumPyClient (or its .to_client()), got {type(client).__name__}")

    return wrapped


def client_train(client_fn: ClientFn) -> Callable[[Message, Context], Message]:
    """A Message-API train handler running ``client_fn(context).fit``: the message's ArrayRecord in (as
    NumPy arrays), the fitted arrays back under the same keys with ``num-examples`` in the metrics."""

    def train(msg: Message, context: Context) -> Message:
        client = client_fn(context)
        client = getattr(client, "numpy_client", client)
        records = msg.content.array_records
        if len(records) != 1:
            raise ValueError(f"client_train: expected one ArrayRecord in the message, got {len(records)}")
        key, record = next(iter(records.items()))
        config = dict(next(iter(msg.content.config_records.values()), {}))
        names = list(record.keys())
        new, num_examples, metrics = client.fit([record[k].numpy() for k in names], config)
        arrays = ArrayRecord({k: Array(np.asarray(a)) for k, a in zip(names, new, strict=True)})
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        content = RecordDict({key: arrays, "metrics": MetricRecord({**scalars, "num-examples": int(num_examples)})})
        return Message(content, reply_to=msg)

    return train
