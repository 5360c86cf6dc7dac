"""Any registered flsec aggregator as a Flower strategy (the Message API of ``flwr.serverapp``).

:class:`RobustStrategy` is Flower's :class:`~flwr.serverapp.strategy.FedAvg` (sampling, messages,
metric aggregation, ``start``) with the model aggregation replaced: the replies' ArrayRecords become
updates ``U_i = w_i - w_global`` (one flattened row per client, floating-point arrays in the record's key
order), the flsec rule maps ``(U, n, ids)`` to one update ``u``, and the new global model is
``w_global + server_lr * u``, exactly flsec's server step. Client ids are Flower node ids, which stay
fixed across rounds, so history-based rules (FoolsGold, FL-Defender) keep their per-client state.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import validate_message_reply_consistency

from flsec.aggregation import AGGREGATORS, Aggregator, AggregatorParams, build_aggregator
from flsec.errors import ConfigError


def float_keys(record: ArrayRecord) -> list[str]:
    """Keys of the floating-point arrays (the ones aggregated), in the record's order."""
    return [k for k, a in record.items() if np.issubdtype(np.dtype(a.dtype), np.floating)]


def flatten(record: ArrayRecord, keys: Sequence[str]) -> torch.Tensor:
    return torch.cat([torch.from_numpy(np.asarray(record[k].numpy(), dtype=np.float32).reshape(-1)) for k in keys])


def unflatten(flat: torch.Tensor, like: ArrayRecord, keys: Sequence[str]) -> ArrayRecord:
    """An ArrayRecord shaped like ``like`` holding ``flat`` in ``keys`` (other arrays copied from ``like``)."""
    out: dict[str, Array] = {}
    offset, wanted = 0, set(keys)
    for k, a in like.items():
        if k in wanted:
            ref = a.numpy()
            n = int(np.prod(ref.shape))
            out[k] = Array(flat[offset:offset + n].numpy().reshape(ref.shape).astype(ref.dtype))
            offset += n
        else:
            out[k] = Array(a.numpy())
    return ArrayRecord(out)


def layer_slice(record: ArrayRecord, keys: Sequence[str], output_layer: Sequence[str] | None) -> slice:
    """Where ``output_layer`` (default: the last two floating arrays, the final layer's weight and bias)
    lies in the flattened vector; FL-Defender reads only that part."""
    names = list(output_layer) if output_layer is not None else list(keys[-2:])
    sizes = {k: int(np.prod(record[k].numpy().shape)) for k in keys}
    unknown = [n for n in names if n not in sizes]
    if unknown:
        raise ConfigError(f"output_layer: {unknown} are not floating arrays of the model; allowed: {', '.join(keys)}")
    idx = sorted(keys.index(n) for n in names)
    if idx != list(range(idx[0], idx[0] + len(idx))):
        raise ConfigError("output_layer: the arrays must be adjacent in the model's ArrayRecord")
    start = sum(sizes[k] for k in keys[: idx[0]])
    return slice(start, start + sum(sizes[n] for n in names))


class RobustStrategy(FedAvg):
    """Flower FedAvg whose aggregation is an flsec rule (``"krum"``, ``"foolsgold"``, ``"fl_defender"``...).

    ``aggregator`` is a registered name (built with ``f``, ``multi_krum_m``, ``trim_beta``,
    ``foolsgold_kappa``, ``fl_defender_components`` as in ``[aggregation]``) or an
    :class:`~flsec.aggregation.Aggregator` instance. ``server_lr`` is flsec's server learning rate
    (1.0: the aggregate replaces the model, as Flower's FedAvg). The remaining keyword arguments go to
    :class:`~flwr.serverapp.strategy.FedAvg` (``fraction_train``, ``min_train_nodes``, ``weighted_by_key``,
    ...). Each training message's config also carries ``num-selected`` and ``server-lr`` so that a
    boosting attacker (:func:`flsec.flower.attacker`) can size model replacement.

    After a round, :attr:`last_weights` maps each node id to its share of the aggregate (0 for rejected).
    """

    def __init__(self, aggregator: str | Aggregator = "fedavg", *, f: int = 0, multi_krum_m: int | None = None,
                 trim_beta: int | None = None, foolsgold_kappa: float = 1.0, fl_defender_components: int = 2,
                 output_layer: Sequence[str] | None = None, server_lr: float = 1.0, **fedavg_kwargs: Any) -> None:
        super().__init__(**fedavg_kwargs)
        if server_lr <= 0:
            raise ConfigError(f"server_lr: must be > 0, got {server_lr}")
        if isinstance(aggregator, str) and aggregator not in AGGREGATORS:
            raise ConfigError(f"aggregator: unknown '{aggregator}'; allowed: {', '.join(AGGREGATORS.names())}")
        self.aggregator_spec = aggregator
        self.params = dict(f=f, multi_krum_m=multi_krum_m, trim_beta=trim_beta, foolsgold_kappa=foolsgold_kappa,
                           fl_defender_components=fl_defender_components)
        self.output_layer = output_layer
        self.server_lr = server_lr
        self.aggregator: Aggregator | None = aggregator if isinstance(aggregator, Aggregator) else None
        self.last_weights: dict[int, float] = {}
        self._sent: tuple[int, ArrayRecord] | None = None

    def summary(self) -> None:
        super().summary()
        name = self.aggregator_spec if isinstance(self.aggregator_spec, str) else type(self.aggregator_spec).__name__
        logging.getLogger("flwr").info("\t└──> flsec aggregation: %s %s, server_lr %s", name, self.params, self.server_lr)

    def _build(self, record: ArrayRecord, keys: list[str]) -> Aggregator:
        if self.aggregator is None:
            assert isinstance(self.aggregator_spec, str)
            params = AggregatorParams(output_layer=layer_slice(record, keys, self.output_layer), **self.params)
            self.aggregator = build_aggregator(self.aggregator_spec, params)
        return self.aggregator

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._sent = (server_round, arrays)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        for msg in messages:
            cfg = msg.content[self.configrecord_key]
            cfg["num-selected"] = len(messages)
            cfg["server-lr"] = float(self.server_lr)
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid = sorted((m for m in replies if not m.has_error()), key=lambda m: m.metadata.src_node_id)
        if not valid:
            return None, None
        if self._sent is None or self._sent[0] != server_round:
            raise RuntimeError(f"aggregate_train({server_round}) without configure_train({server_round})")
        contents = [m.content for m in valid]
        validate_message_reply_consistency(contents, self.weighted_by_key, check_arrayrecord=True)
        sent = self._sent[1]
        keys = float_keys(sent)
        start = flatten(sent, keys)
        rows = []
        for c in contents:
            record = next(iter(c.array_records.values()))
            if list(record.keys()) != list(sent.keys()):
                raise ValueError(f"round {server_round}: a reply's arrays {list(record.keys())} do not match the "
                                 f"model's {list(sent.keys())}")
            rows.append(flatten(record, keys) - start)
        metrics_key = next(iter(contents[0].metric_records))
        n = torch.tensor([float(c[metrics_key][self.weighted_by_key]) for c in contents])
        ids = [int(m.metadata.src_node_id) for m in valid]
        result = self._build(sent, keys)(torch.stack(rows), n, ids)
        self.last_weights = dict(zip(ids, result.weights.tolist(), strict=True))
        arrays = unflatten(start + self.server_lr * result.update, sent, keys)
        return arrays, self.train_metrics_aggr_fn(contents, self.weighted_by_key)
