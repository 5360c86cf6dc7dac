"""One client's part of one round: the unit of work every engine runs.

The server sends a :class:`ClientTask` (the global weights, the round, what the simulation knows about
the round's attackers) and gets back a :class:`ClientReply` (the update the client sends, its sample
count and, when the run records this client, a :class:`CaptureRecord`). :func:`run_client` is the
single definition of what a client does: the sequential engine calls it in a loop, the Flower
ClientApp calls it in a worker, and the vectorised engine must reproduce its arithmetic exactly
(same batches from :func:`client_batches`, same optimiser maths).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from flsec.attacks.base import AttackHooks
from flsec.attacks.boosting import boost, default_boost_factor
from flsec.fl.client import LocalResult, LocalSpec, TrainingHooks, batch_gradient, client_batches, local_train_on
from flsec.fl.federation import Federation
from flsec.fl.params import derive_seed, generator, set_flat

# Purposes mixed into derived seeds so that random streams never overlap (5: an attack's own draws,
# flsec.attacks.base.ATTACK_STREAM).
SELECT, LOCAL, CAPTURE, AGGREGATE = 1, 2, 3, 4


@dataclass(frozen=True)
class ClientTask:
    """What the server sends one client in round ``round`` (1-based).

    ``num_selected`` and ``attackers_in_round`` are what colluding attackers are assumed to know
    (they size the boost factor of model replacement); an honest client ignores them. ``knowledge``
    holds the server-side quantities the attack asked for (``Attack.needs``, e.g. the previous global
    update for Neurotoxin); it is filled for attacking clients only.
    """

    client: int
    round: int
    global_weights: torch.Tensor
    num_selected: int
    attackers_in_round: int
    capture: bool = False
    knowledge: Mapping[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class CaptureRecord:
    """What the run directory keeps of one client's reply: the tensors it sent (``sent``), the
    ground truth behind them (``truth``, for scoring reconstructions only) and replay metadata."""

    sent: dict[str, torch.Tensor]
    truth: dict[str, torch.Tensor]
    meta: dict[str, Any]


@dataclass
class ClientReply:
    client: int
    update: torch.Tensor
    num_samples: int
    loss: float
    steps: int
    capture: CaptureRecord | None = field(default=None, repr=False)


def local_seed(seed: int, round_: int, client: int) -> int:
    """The seed of a client's local data order and poisoning draws in a round."""
    return derive_seed(seed, round_, client, LOCAL)


def boost_factor(fed: Federation, task: ClientTask, update: torch.Tensor | None = None) -> float:
    """gamma of model replacement for this client's round (1.0 when it does not scale). An attack
    that scales by itself (constrain-and-scale) scales without ``attack.boost``; given the finished
    ``update``, the attack may bound the factor (``Attack.scale_factor``)."""
    a = fed.config.attack
    if not ((a.boost or fed.attack.scales) and fed.attacking(task.client, task.round)):
        return 1.0
    gamma = a.boost_factor or default_boost_factor(task.num_selected, fed.config.training.server_lr,
                                                   task.attackers_in_round)
    return gamma if update is None else fed.attack.scale_factor(gamma, update)


def capture_gradients(fed: Federation, model: nn.Module, client: int, round_: int,
                      x: torch.Tensor, y: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """FedSGD gradients of one batch of each configured size, on the global model the client received."""
    sent: dict[str, torch.Tensor] = {}
    truth: dict[str, torch.Tensor] = {}
    for b in fed.config.capture.gradient_batch_sizes:
        g = generator(fed.config.seed, round_, client, CAPTURE, b)
        idx = torch.randperm(len(y), generator=g)[: min(b, len(y))]
        xb, yb = x[idx], y[idx]
        poisoned = torch.zeros(len(yb), dtype=torch.bool)
        out = fed.poison(client, round_, xb, yb, g)
        if out is not None:
            xb, yb, poisoned = out
        sent[f"gradient_b{b}"] = batch_gradient(model, xb, yb)
        truth[f"gradient_b{b}/images"] = xb
        truth[f"gradient_b{b}/labels"] = yb
        truth[f"gradient_b{b}/poisoned"] = poisoned.to(torch.uint8)
    return sent, truth


@dataclass
class ClientJob:
    """A client's round up to local training: its local hyper-parameters and training hooks this
    round, its data, its batches in training order (lazy), the seed they come from and the FedSGD
    gradients captured on the global model (if recorded)."""

    spec: LocalSpec
    hooks: TrainingHooks | None
    x: torch.Tensor
    y: torch.Tensor
    seed: int
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]]
    steps: int
    sent: dict[str, torch.Tensor]
    truth: dict[str, torch.Tensor]


def prepare_client(fed: Federation, model: nn.Module, task: ClientTask) -> ClientJob:
    """Everything of :func:`run_client` before local training. ``model`` is scratch space: it is set
    to ``task.global_weights`` (the model local training starts from)."""
    c, r = task.client, task.round
    spec = fed.client_spec(c, r)
    set_flat(model, task.global_weights)
    x, y = fed.client_data(c, r)
    sent: dict[str, torch.Tensor] = {}
    truth: dict[str, torch.Tensor] = {}
    if task.capture and fed.config.capture.gradient_batch_sizes:
        sent, truth = capture_gradients(fed, model, c, r, x, y)
    seed = local_seed(fed.config.seed, r, c)
    batches = client_batches(x, y, spec, torch.Generator().manual_seed(seed), fed.transform(c, r))
    hooks = fed.training_hooks(c, r, task.knowledge)
    return ClientJob(spec, hooks, x, y, seed, batches, spec.steps(len(y)), sent, truth)


def finish_client(fed: Federation, task: ClientTask, job: ClientJob, res: LocalResult) -> ClientReply:
    """Everything of :func:`run_client` after local training: the attack finishes and scales the
    update (update-level attacks), and the reply is built."""
    c, r, spec = task.client, task.round, job.spec
    update = fed.finish_update(c, r, res.update)
    gamma = boost_factor(fed, task, update)
    if gamma != 1.0:
        with fed.stopwatch.time("attack"):
            update = boost(update, gamma)
    capture = None
    if task.capture:
        sent, truth = dict(job.sent), dict(job.truth)
        if fed.config.capture.updates:
            sent["update"] = update
            truth["update/images"], truth["update/labels"] = job.x, job.y
        meta = {"malicious": c in fed.malicious, "attacking": fed.attacking(c, r), "num_samples": len(job.y),
                "epochs": spec.epochs, "batch_size": spec.batch_size, "lr": spec.lr,
                "momentum": spec.momentum, "weight_decay": spec.weight_decay, "augment_crop": spec.augment_crop,
                "augment_flip": spec.augment_flip, "steps": res.steps,
                "boost_factor": gamma, "local_seed": job.seed, "attack": fed.config.attack.kind,
                **({f"attack_{k}": v for k, v in job.hooks.info().items()} if isinstance(job.hooks, AttackHooks) else {})}
        capture = CaptureRecord(sent, truth, meta)
    return ClientReply(c, update, len(job.y), res.loss, res.steps, capture)


def run_client(fed: Federation, model: nn.Module, task: ClientTask) -> ClientReply:
    """One client's round: start from the global weights, (optionally) capture FedSGD gradients,
    train locally on its (possibly poisoned) data with the attack's training hooks, finish and scale
    the update as the attack says, reply. An honest client trains with plain SGD and no hooks.

    ``model`` is scratch space: its weights are overwritten with ``task.global_weights``.
    """
    job = prepare_client(fed, model, task)
    res = local_train_on(model, job.batches, job.spec, job.hooks, precision=fed.runtime.precision)
    return finish_client(fed, task, job, res)
