"""The server side of a run: selection, aggregation, evaluation and the run directory.

A round is: :meth:`Server.begin_round` (select clients, record the global model of a captured round,
hand out :class:`~flsec.fl.rounds.ClientTask`\\ s) -> the clients run their tasks (anywhere: one after
another in this process, vectorised, or on Flower workers) -> :meth:`Server.finish_round` (store
captures, aggregate, evaluate, commit the round to the run directory). Every engine shares these two
methods and :func:`~flsec.fl.rounds.run_client`, so none re-implements the federation; which engine
runs a training is chosen in :mod:`flsec.fl.engines`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flsec.aggregation import AggregationContext, build_aggregator, params_from_config
from flsec.attacks.base import KNOWLEDGE, PREVIOUS_GLOBAL_UPDATE
from flsec.attacks.durability import rounds_since_attack
from flsec.config import ExperimentConfig
from flsec.detection import Suspicion, detect, resolve_detector
from flsec.errors import CheckpointError, ConfigError, FlsecError
from flsec.faults import fault_point
from flsec.fl.checkpoint import (
    ALIASES,
    META,
    Checkpoint,
    RunWriter,
    load_checkpoint,
    only_flsec_leftovers,
    refresh_alias,
    remove_leftovers,
)
from flsec.fl.client import local_train_on
from flsec.fl.federation import Federation
from flsec.fl.params import derive_seed, generator, get_flat, set_flat
from flsec.fl.rounds import AGGREGATE, SELECT, ClientReply, ClientTask

RoundCallback = Callable[[int, dict[str, Any]], None]

# The server's own resume state travels in the state file next to the aggregator's, under this prefix.
SERVER_STATE = "server."


class TrainingDivergedError(FlsecError):
    """The federation produced non-finite weights: nothing of that round is written."""


def training_fields(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a config that determines training (later phases' settings and how the run is
    executed may change freely, e.g. on resume)."""
    return {k: v for k, v in config.items() if k not in ("inversion", "unlearning", "name", "runtime")}


def select_clients(seed: int, round_: int, num_clients: int, per_round: int, excluded: Sequence[int] = ()) -> list[int]:
    """The round's ``per_round`` clients, drawn without replacement among those not ``excluded`` (with
    none excluded, the draw is the same as over all ``num_clients``)."""
    rng = np.random.default_rng(derive_seed(seed, round_, SELECT))
    allowed = np.array([c for c in range(num_clients) if c not in set(excluded)])
    return sorted(allowed[rng.choice(len(allowed), size=per_round, replace=False)].tolist())


def capture_plan(config: ExperimentConfig) -> tuple[set[int], set[int]]:
    """The captured rounds and the clients whose replies carry a capture. With ``capture.clients =
    "suspects"`` every client's reply does, and the server keeps those of the round's suspects."""
    cap, rounds = config.capture, config.training.rounds
    cap_rounds = {rounds} if cap.rounds == "last" else set(range(1, rounds + 1)) if cap.rounds == "all" else set(cap.rounds)
    if cap.clients == "malicious":
        cap_clients = set(config.malicious_ids)
    elif cap.clients in ("all", "suspects"):
        cap_clients = set(range(config.training.num_clients))
    else:
        cap_clients = set(cap.clients)
    return cap_rounds, cap_clients


def detection_record(suspicion: Suspicion, attackers: list[int]) -> dict[str, Any]:
    """The round record's suspect fields: the detector's verdict (what the server decided) and, for
    evaluation only, its precision and recall against the round's true attackers (None where undefined)."""
    hits = len(set(suspicion.suspects) & set(attackers))
    return {"detector": suspicion.detector, "suspects": suspicion.suspects,
            "suspicion": [_rounded(float(v)) for v in suspicion.scores],
            "suspects_precision": round(hits / len(suspicion.suspects), 6) if suspicion.suspects else None,
            "suspects_recall": round(hits / len(attackers), 6) if attackers else None}


class Server:
    """Selection, aggregation, evaluation and the run directory of one training run.

    Opening a server on a directory that holds an unfinished run (``resume=True``) restores the
    global model, the aggregator's state and the history, so the next round is ``start_round``.
    """

    def __init__(self, config: ExperimentConfig, out: Path | None, resume: bool = False,
                 federation: Federation | None = None) -> None:
        self.config = config
        self.out = Path(out) if out is not None else Path()
        self.fed = federation or Federation.from_config(config)
        self.model = self.fed.new_model()
        self.per_round = config.clients_per_round
        self.aggregator = build_aggregator(config.aggregation.name, params_from_config(config, self.model))
        self.aggregator.validate(self.per_round)
        self.writer = RunWriter(self.out, config)
        self.history: list[dict[str, Any]] = []
        self.start_round = 1
        self.finished: Checkpoint | None = None
        self.cap_rounds, self.cap_clients = capture_plan(config)
        self.keep_suspects_only = config.capture.clients == "suspects"
        self.detector = resolve_detector(config.detection.detector, self.aggregator)
        self.timings: list[dict[str, float]] = []
        self.client_engine = config.runtime.client_engine
        self._saving = 0.0
        self.seconds: list[float] = []
        self._round: tuple[int, list[int], torch.Tensor, float] | None = None
        unknown = self.fed.attack.needs - KNOWLEDGE
        if unknown:
            raise ConfigError(f"attack.kind: '{config.attack.kind}' needs {sorted(unknown)}, which the server does "
                              f"not provide; it provides: {', '.join(sorted(KNOWLEDGE))}")
        self.previous_update: torch.Tensor | None = None  # the last global update (G_r - G_{r-1})
        if out is not None:  # None: a dry run that builds and checks everything and writes nothing
            self._open(resume)

    def _open(self, resume: bool) -> None:
        out, config = self.out, self.config
        if out.exists() and not out.is_dir():
            raise CheckpointError(f"--out: {out} exists and is not a directory; choose a directory")
        if (out / META).exists() or (out / META).is_symlink():
            if not resume:
                raise CheckpointError(
                    f"--out: {out} already holds a run; pass --resume to continue it or choose a new --out")
            ckpt = load_checkpoint(out, require_complete=False)
            # Compared as parsed, so a setting added to flsec since (with the default that keeps the
            # old behaviour) does not refuse a run started before it.
            if training_fields(ckpt.config.model_dump(mode="json")) != training_fields(config.model_dump(mode="json")):
                raise CheckpointError(f"--resume: {out} was started with a different config; use a new --out")
            remove_leftovers(out, ckpt.meta)
            for key, alias in ALIASES.items():
                refresh_alias(out, ckpt.meta[key], alias)
            self.seconds = list(ckpt.meta["seconds_per_round"])
            if ckpt.complete:
                self.finished = ckpt
                self.start_round = config.training.rounds + 1
                return
            state = ckpt.state()
            self.model.load_state_dict({k[len("model/"):]: v for k, v in state.items() if k.startswith("model/")})
            saved = {k[len("aggregator/"):]: v for k, v in state.items() if k.startswith("aggregator/")}
            self.aggregator.load_state_dict({k: v.to(self.aggregation_device) for k, v in saved.items()
                                             if not k.startswith(SERVER_STATE)})
            self.previous_update = saved.get(SERVER_STATE + PREVIOUS_GLOBAL_UPDATE)
            if self.previous_update is not None:
                self.previous_update = self.previous_update.to(self.fed.runtime.device)
            self.history = ckpt.history[: ckpt.round]
            self.writer.resume_from(ckpt)
            self.start_round = ckpt.round + 1
            return
        if out.exists() and any(out.iterdir()):
            if not only_flsec_leftovers(out):
                what = "holds no flsec run (no meta.json)" if resume else "is not empty and holds no flsec run"
                raise CheckpointError(f"--out: {out} {what}; choose an empty or new directory")
            remove_leftovers(out, None)  # a run killed before its first commit: start it afresh
        # Round 0: the initial model is committed first, so a run killed at any later point resumes.
        self.writer.commit_round(0, self.model, self.aggregator.state_dict(), [], self._meta_extra(), complete=False)

    def _meta_extra(self) -> dict[str, Any]:
        return {"malicious_ids": sorted(self.fed.malicious), "seconds_per_round": list(self.seconds),
                "input_spec": dataclasses.asdict(self.fed.spec),
                "runtime": {**self.fed.runtime.describe(), "client_engine": self.client_engine}}

    @property
    def aggregation_device(self) -> torch.device:
        """Where the update stack is aggregated: the run's device for rules that declare
        ``supports_device = True`` (pure tensor maths), the CPU for the others (e.g. NumPy-based)."""
        return self.fed.runtime.device if getattr(self.aggregator, "supports_device", False) else torch.device("cpu")

    @property
    def rounds(self) -> range:
        """The rounds still to run."""
        return range(self.start_round, self.config.training.rounds + 1)

    def begin_round(self, r: int) -> list[ClientTask]:
        """Select the round's clients and build their tasks (in increasing client id)."""
        t = self.config.training
        selected = select_clients(self.config.seed, r, t.num_clients, self.per_round, t.exclude_clients)
        attackers = sum(self.fed.attacking(c, r) for c in selected)
        t0 = time.perf_counter()
        if r in self.cap_rounds and self.cap_clients & set(selected):
            self.writer.write_round_model(r, self.model)
        global_flat = get_flat(self.model)
        self.fed.stopwatch.pop("attack")
        t_begin = time.perf_counter()
        self._saving = t_begin - t0
        self._round = (r, selected, global_flat, t_begin)
        knowledge = self.attacker_knowledge()
        return [ClientTask(c, r, global_flat, len(selected), attackers,
                           capture=r in self.cap_rounds and c in self.cap_clients,
                           knowledge=knowledge if self.fed.attacking(c, r) else {}) for c in selected]

    def attacker_knowledge(self) -> dict[str, torch.Tensor]:
        """The server-side quantities the attack asked for (``Attack.needs``) that exist by now."""
        out: dict[str, torch.Tensor] = {}
        if PREVIOUS_GLOBAL_UPDATE in self.fed.attack.needs and self.previous_update is not None:
            out[PREVIOUS_GLOBAL_UPDATE] = self.previous_update
        return out

    def _state(self) -> dict[str, torch.Tensor]:
        state = dict(self.aggregator.state_dict())
        if PREVIOUS_GLOBAL_UPDATE in self.fed.attack.needs and self.previous_update is not None:
            state[SERVER_STATE + PREVIOUS_GLOBAL_UPDATE] = self.previous_update
        return state

    def finish_round(self, r: int, replies: Sequence[ClientReply]) -> dict[str, Any]:
        """Store captures, aggregate the replies (in client-id order), evaluate and commit round ``r``."""
        if self._round is None or self._round[0] != r:
            raise RuntimeError(f"finish_round({r}) without begin_round({r})")
        _, selected, global_flat, t_begin = self._round
        replies = sorted(replies, key=lambda rep: rep.client)
        if [rep.client for rep in replies] != selected:
            raise RuntimeError(f"round {r}: replies from {[rep.client for rep in replies]}, selected {selected}")
        _sync(self.fed.runtime.device)
        t_clients = time.perf_counter()
        attack = self.fed.stopwatch.pop("attack")
        t_agg = time.perf_counter()
        updates = [rep.update for rep in replies]
        stack = torch.stack(updates)
        finite = torch.isfinite(stack).all(dim=1)
        if not bool(finite.any()):
            raise TrainingDivergedError(f"round {r}: every client update ({len(updates)}) holds NaN or Inf, so "
                                        f"training diverged; lower training.lr (now {self.config.training.lr}). Rounds "
                                        f"up to {r - 1} are saved")
        dev = self.aggregation_device
        ctx = self._context(r, global_flat, [rep.steps for rep in replies])
        ctx = dataclasses.replace(
            ctx, global_weights=ctx.global_weights.to(dev),
            server_update=None if ctx.server_update is None else ctx.server_update.to(dev))
        with torch.device(dev):
            result = self.aggregator(stack.to(dev), torch.tensor([rep.num_samples for rep in replies]), selected, ctx)
        new_global = global_flat + self.config.training.server_lr * result.update.to(global_flat.device)
        if not bool(torch.isfinite(new_global).all()):
            raise TrainingDivergedError(f"round {r}: the aggregated model ({self.config.aggregation.name}) holds NaN or "
                                        f"Inf; training diverged. Rounds up to {r - 1} are saved")
        set_flat(self.model, new_global)
        _sync(self.fed.runtime.device)
        self.previous_update = new_global - global_flat
        suspicion = detect(self.detector, stack, selected, result, self.config.detection.threshold)
        t_eval = time.perf_counter()
        metrics = self.fed.evaluate(self.model)
        record = {
            "round": r,
            "ma": round(metrics["ma"], 6),
            "asr": round(metrics["asr"], 6) if math.isfinite(metrics["asr"]) else None,
            "train_loss": round(float(np.mean([rep.loss for rep in replies])), 6),
            "selected": selected,
            "attackers": [c for c in selected if self.fed.attacking(c, r)],
            "weights": [round(float(w), 6) for w in result.weights],
            "update_norms": [round(float(u.norm()), 6) for u in updates],
            "rejected": {str(c): why for c, why in sorted(result.rejected.items())},
            "notes": result.notes,
        }
        if record["asr"] is None:
            record["asr_status"] = "undefined: no test image to measure it on (see the ASR definition)"
        if not bool(finite.all()):
            record["non_finite_updates"] = [c for c, ok in zip(selected, finite.tolist(), strict=True) if not ok]
        record.update({k: _rounded(v) for k, v in metrics.items() if k not in record})
        record["rounds_since_attack"] = rounds_since_attack([*self.history, record])
        record.update(detection_record(suspicion, record["attackers"]))
        self.history.append(record)
        t_commit = time.perf_counter()
        self._write_captures(r, replies, suspicion)
        timing = {"local_training": t_clients - t_begin - attack, "attack": attack, "aggregation": t_eval - t_agg,
                  "evaluation": t_commit - t_eval}
        self.seconds.append(sum(timing.values()))
        fault_point("round:before_commit")
        self.writer.commit_round(r, self.model, self._state(), self.history, self._meta_extra(),
                                 complete=r == self.config.training.rounds)
        timing["capture_and_save"] = time.perf_counter() - t_commit + (t_agg - t_clients) + self._saving
        self.timings.append(timing)
        self._round = None
        return record

    def _write_captures(self, r: int, replies: Sequence[ClientReply], suspicion: Suspicion) -> None:
        """Store the round's captures (with ``capture.clients = "suspects"``: the suspects' only), each with
        the detector's score of its client, by which phase 2 ranks them."""
        for rep in replies:
            if rep.capture is None or (self.keep_suspects_only and rep.client not in suspicion.suspects):
                continue
            score = suspicion.score_of(rep.client)
            meta = {**rep.capture.meta, "suspected": rep.client in suspicion.suspects, "detector": suspicion.detector,
                    "suspicion": score if math.isfinite(score) else None}
            self.writer.write_capture(r, rep.client, rep.capture.sent, rep.capture.truth, meta)

    def _context(self, r: int, global_flat: torch.Tensor, client_steps: list[int]) -> AggregationContext:
        """What the aggregator may use besides the updates: a seeded generator, the global weights
        and, for rules that need one, the server's own update on its root data (same local
        optimiser as the clients, ``aggregator.server_steps`` steps of random root batches)."""
        server_update = None
        if "server_update" in self.aggregator.needs and self.fed.root is not None:
            x, y = self.fed.root
            g = generator(self.config.seed, r, AGGREGATE, 1)
            spec = self.fed.local_spec
            batches = [(x[i], y[i]) for i in (torch.randperm(len(y), generator=g)[: spec.batch_size]
                                              for _ in range(self.aggregator.server_steps(client_steps)))]
            model = self.fed.new_model()
            set_flat(model, global_flat)
            server_update = local_train_on(model, batches, spec).update
        return AggregationContext(r, generator(self.config.seed, r, AGGREGATE), global_flat, server_update)

    def checkpoint(self) -> Checkpoint:
        return self.finished or load_checkpoint(self.out)


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock timings are attributed to the right part."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rounded(value: Any) -> Any:
    """A metric for history.jsonl: floats to 6 decimals (None where undefined), lists element-wise."""
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    if isinstance(value, float):
        return round(value, 6) if math.isfinite(value) else None  # history.jsonl is strict JSON
    return value


def describe(config: ExperimentConfig) -> dict[str, Any]:
    """Build the whole experiment (data, partition, model, attackers, aggregator) without training or
    writing anything, and summarise it: what ``flsec check`` prints.

    Building the server applies ``runtime.threads``; the caller's thread count is restored, so that checking a
    config leaves the process as it was.
    """
    threads = torch.get_num_threads()
    try:
        server = Server(config, None)
    finally:
        torch.set_num_threads(threads)
    sizes = [len(s) for s in server.fed.shards]
    return {"dataset": config.data.name, "train_images": len(server.fed.data.y_train),
            "test_images": len(server.fed.data.y_test), "image": list(server.fed.data.image_shape),
            "classes": server.fed.spec.num_classes, "model": config.model.name,
            "parameters": sum(p.numel() for p in server.model.parameters()), "clients": len(sizes),
            "clients_per_round": server.per_round, "client_images": [min(sizes), max(sizes)],
            "rounds": config.training.rounds, "attack": config.attack.kind, "attackers": sorted(server.fed.malicious),
            "aggregation": config.aggregation.name, "captured_rounds": sorted(server.cap_rounds),
            "captured_clients": sorted(server.cap_clients)}


def fmt_rate(x: float | None, digits: int = 3) -> str:
    """A rate for display; ``n/a`` where it is undefined."""
    return "n/a" if x is None else f"{x:.{digits}f}"
