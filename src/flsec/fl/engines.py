"""Engines: which one runs a training (:func:`train`), and how the clients of a round are run in this
process (the client-engine registry).

``runtime.engine`` picks where the clients run: ``inprocess`` (here, by a client engine) or ``flower``
(Flower's simulation engine, :mod:`flsec.flower.engine`, imported only when chosen). Both drive the
same :class:`~flsec.fl.server.Server`.

A client engine turns the round's :class:`~flsec.fl.rounds.ClientTask`\\ s into replies, in task order.

* ``sequential`` runs :func:`~flsec.fl.rounds.run_client` one client after another on one scratch
  model; it is the reference every other engine must agree with.
* ``vectorised`` trains ``runtime.client_chunk`` clients at once with ``torch.func``
  (:mod:`flsec.fl.vectorised`), with the same batches, poisoning, optimiser maths and replies;
  clients whose attack changes local optimisation (:class:`~flsec.fl.client.TrainingHooks`) are run
  sequentially.
* ``auto`` picks one of the two from the device, the batch size and the model (:func:`choose_engine`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm

from flsec.config import ExperimentConfig
from flsec.errors import ConfigError
from flsec.fl.checkpoint import Checkpoint
from flsec.fl.federation import Federation
from flsec.fl.rounds import ClientReply, ClientTask, finish_client, prepare_client, run_client
from flsec.fl.server import RoundCallback, Server, fmt_rate
from flsec.fl.vectorised import train_clients, unsupported_reason
from flsec.lock import locked_dir
from flsec.models import build_model
from flsec.registry import Registry


class ClientEngine(Protocol):
    name: str

    def run(self, tasks: Sequence[ClientTask]) -> list[ClientReply]: ...


CLIENT_ENGINES: Registry[Callable[[Federation], ClientEngine]] = Registry("client engine")

@CLIENT_ENGINES.register("sequential")
class SequentialClients:
    """One client after another, each starting from the global weights on a shared scratch model."""

    name = "sequential"

    def __init__(self, fed: Federation) -> None:
        self.fed = fed
        self.model = fed.new_model()

    def run(self, tasks: Sequence[ClientTask]) -> list[ClientReply]:
        return [run_client(self.fed, self.model, t) for t in tasks]


@CLIENT_ENGINES.register("vectorised")
class VectorisedClients:
    """Chunks of ``runtime.client_chunk`` clients trained at once; the same replies as ``sequential``
    up to float rounding. Clients are grouped by step count (then id) so that a chunk's clients
    finish together; memory is bounded by one chunk of stacked weights, momenta and activations."""

    name = "vectorised"

    def __init__(self, fed: Federation) -> None:
        self.fed = fed
        self.model = fed.new_model()
        reason = unsupported_reason(self.model)
        if reason is not None:
            raise ConfigError(f"runtime.client_engine: 'vectorised' cannot train model '{fed.config.model.name}' "
                              f"({reason}); allowed for it: sequential, auto")
        self.chunk = fed.config.runtime.client_chunk

    def run(self, tasks: Sequence[ClientTask]) -> list[ClientReply]:
        fed = self.fed
        spec = fed.round_spec(tasks[0].round) if tasks else fed.local_spec  # a round's tasks share one round
        replies: dict[int, ClientReply] = {}
        plain = []
        for task in tasks:
            # An attacker (its own data, local spec and hooks) or a hooked client: the reference path.
            if fed.attacking(task.client, task.round) or fed.training_hooks(task.client, task.round) is not None:
                replies[task.client] = run_client(fed, self.model, task)
            else:
                plain.append(task)
        steps = {t.client: spec.steps(len(fed.shards[t.client])) for t in plain}
        plain.sort(key=lambda t: (steps[t.client], t.client))
        for lo in range(0, len(plain), self.chunk):
            chunk = plain[lo : lo + self.chunk]
            jobs = [prepare_client(fed, self.model, t) for t in chunk]
            starts = torch.stack([t.global_weights for t in chunk])
            results = train_clients(self.model, starts, [j.batches for j in jobs], [j.steps for j in jobs], spec,
                                    fed.runtime.precision)
            for task, job, res in zip(chunk, jobs, results, strict=True):
                replies[task.client] = finish_client(fed, task, job, res)
        return [replies[t.client] for t in tasks]


def choose_engine(fed: Federation) -> str:
    """``auto``: the vectorised engine on an accelerator (CUDA, MPS), where one small client leaves
    the device idle; the sequential one on a CPU, where benchmarks/results/throughput.md measured
    vectorising slower at every batch size tried (0.36-0.96x at batch 10-64, 20-100 clients: one
    client's batch already keeps a core busy, and vmapped convolutions become slower grouped ones);
    sequential also for models the vectorised engine cannot train and for one client per round."""
    if fed.runtime.device.type == "cpu" or fed.config.clients_per_round == 1:
        return "sequential"
    model = build_model(fed.config.model.name, fed.spec, fed.config.seed, fed.config.model.width)
    if unsupported_reason(model) is not None:
        return "sequential"
    return "vectorised"


@CLIENT_ENGINES.register("auto")
def auto_engine(fed: Federation) -> ClientEngine:
    return CLIENT_ENGINES.get(choose_engine(fed))(fed)


def train(
    config: ExperimentConfig,
    out: Path,
    resume: bool = False,
    progress: bool = True,
    on_round_end: RoundCallback | None = None,
) -> Checkpoint:
    """Run (or resume) a federated training experiment into the run directory ``out``, with the
    clients of each round run in this process by the configured client engine (``runtime.engine =
    "flower"``: on Flower's simulation engine, see :mod:`flsec.flower.engine`). The directory is
    locked for the duration: a second process writing it is refused."""
    with locked_dir(Path(out)):
        if config.runtime.engine == "flower":
            from flsec.flower.engine import train_on_flower

            return train_on_flower(config, Path(out), resume, progress, on_round_end)
        return train_in_process(config, Path(out), resume, progress, on_round_end)


def train_in_process(config: ExperimentConfig, out: Path, resume: bool, progress: bool,
                     on_round_end: RoundCallback | None) -> Checkpoint:
    """The rounds of :func:`train` with the clients run here by ``runtime.client_engine`` (``out`` locked)."""
    server = Server(config, out, resume)
    if server.finished is not None:
        return server.finished
    clients = CLIENT_ENGINES.get(config.runtime.client_engine)(server.fed)
    server.client_engine = getattr(clients, "name", config.runtime.client_engine)
    bar = tqdm(server.rounds, initial=server.start_round - 1, total=config.training.rounds,
               desc=f"train {config.aggregation.name}", disable=not progress, unit="round", dynamic_ncols=True)
    for r in bar:
        tasks = server.begin_round(r)
        record = server.finish_round(r, clients.run(tasks))
        bar.set_postfix(ma=f"{record['ma']:.3f}", asr=fmt_rate(record["asr"]))
        if on_round_end is not None:
            on_round_end(r, record)
    bar.close()
    return server.checkpoint()
