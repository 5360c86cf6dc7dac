"""The server loop: sample clients, collect their updates, aggregate, evaluate, checkpoint."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from flsec.aggregation import AggregatorParams, build_aggregator
from flsec.attacks.backdoor import poison_batch
from flsec.attacks.boosting import boost, default_boost_factor
from flsec.config import ExperimentConfig
from flsec.errors import CheckpointError
from flsec.fl.checkpoint import Checkpoint, RunWriter, load_checkpoint
from flsec.fl.client import batch_gradient, local_train
from flsec.fl.federation import Federation
from flsec.fl.params import derive_seed, generator, get_flat, set_flat
from flsec.models import output_layer_slice

RoundCallback = Callable[[int, dict[str, Any]], None]

# Purposes mixed into derived seeds so that streams never overlap.
_SELECT, _LOCAL, _CAPTURE = 1, 2, 3


def training_fields(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a config that determines training (later phases' settings may change freely)."""
    return {k: v for k, v in config.items() if k not in ("inversion", "unlearning", "name")}


def select_clients(seed: int, round_: int, num_clients: int, per_round: int) -> list[int]:
    rng = np.random.default_rng(derive_seed(seed, round_, _SELECT))
    return sorted(rng.choice(num_clients, size=per_round, replace=False).tolist())


def capture_plan(config: ExperimentConfig) -> tuple[set[int], set[int]]:
    cap, rounds = config.capture, config.training.rounds
    cap_rounds = {rounds} if cap.rounds == "last" else set(range(1, rounds + 1)) if cap.rounds == "all" else set(cap.rounds)
    if cap.clients == "malicious":
        cap_clients = set(config.malicious_ids)
    elif cap.clients == "all":
        cap_clients = set(range(config.training.num_clients))
    else:
        cap_clients = set(cap.clients)
    return cap_rounds, cap_clients


def _capture_gradients(fed: Federation, model: torch.nn.Module, client: int, round_: int,
                       x: torch.Tensor, y: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """FedSGD gradients of one batch of each configured size, on the current global model."""
    sent: dict[str, torch.Tensor] = {}
    truth: dict[str, torch.Tensor] = {}
    a = fed.config.attack
    for b in fed.config.capture.gradient_batch_sizes:
        g = generator(fed.config.seed, round_, client, _CAPTURE, b)
        idx = torch.randperm(len(y), generator=g)[: min(b, len(y))]
        xb, yb = x[idx], y[idx]
        poisoned = torch.zeros(len(yb), dtype=torch.bool)
        if a.kind == "backdoor" and fed.attacking(client, round_):
            xb, yb, poisoned = poison_batch(xb, yb, fed.client_trigger(client), a.target_label, a.poison_fraction, g)
        sent[f"gradient_b{b}"] = batch_gradient(model, xb, yb)
        truth[f"gradient_b{b}/images"] = xb
        truth[f"gradient_b{b}/labels"] = yb
        truth[f"gradient_b{b}/poisoned"] = poisoned.to(torch.uint8)
    return sent, truth


def train(
    config: ExperimentConfig,
    out: Path,
    resume: bool = False,
    progress: bool = True,
    on_round_end: RoundCallback | None = None,
) -> Checkpoint:
    """Run (or resume) a federated training experiment into the run directory ``out``."""
    out = Path(out)
    fed = Federation.from_config(config)
    model = fed.new_model()
    per_round = config.clients_per_round
    params = AggregatorParams(
        f=config.assumed_attackers, multi_krum_m=config.aggregation.multi_krum_m,
        trim_beta=config.aggregation.trim_beta, foolsgold_kappa=config.aggregation.foolsgold_kappa,
        fl_defender_components=config.aggregation.fl_defender_components, output_layer=output_layer_slice(model),
    )
    aggregator = build_aggregator(config.aggregation.name, params)
    aggregator.check(per_round)
    writer = RunWriter(out, config)
    history: list[dict[str, Any]] = []
    start_round = 1

    if (out / "meta.json").exists():
        if not resume:
            raise CheckpointError(f"--out: {out} already holds a run; pass --resume to continue it or choose a new --out")
        ckpt = load_checkpoint(out, require_complete=False)
        if training_fields(ckpt.meta["config"]) != training_fields(config.model_dump(mode="json")):
            raise CheckpointError(f"--resume: {out} was started with a different config; use a new --out")
        if ckpt.complete:
            return ckpt
        state = ckpt.state()
        model.load_state_dict({k[len("model/"):]: v for k, v in state.items() if k.startswith("model/")})
        aggregator.load_state_dict({k[len("aggregator/"):]: v for k, v in state.items() if k.startswith("aggregator/")})
        history = ckpt.history[: ckpt.round]
        writer.files = dict(ckpt.meta["files"])
        writer.captures = list(ckpt.meta.get("captures", []))
        start_round = ckpt.round + 1
    elif resume and out.exists() and any(out.iterdir()):
        raise CheckpointError(f"--resume: {out} holds no flsec run (no meta.json)")

    cap_rounds, cap_clients = capture_plan(config)
    spec = fed.local_spec
    timings: list[float] = []
    bar = tqdm(range(start_round, config.training.rounds + 1), initial=start_round - 1,
               total=config.training.rounds, desc=f"train {config.aggregation.name}", disable=not progress,
               unit="round", dynamic_ncols=True)
    for r in bar:
        t0 = time.perf_counter()
        global_flat = get_flat(model)
        selected = select_clients(config.seed, r, config.training.num_clients, per_round)
        updates, counts, losses = [], [], []
        if r in cap_rounds and cap_clients & set(selected):
            writer.write_round_model(r, model)
        gamma = config.attack.boost_factor or default_boost_factor(
            per_round, config.training.server_lr, sum(fed.attacking(c, r) for c in selected))
        for c in selected:
            set_flat(model, global_flat)
            x, y = fed.client_data(c)
            capture = r in cap_rounds and c in cap_clients
            sent: dict[str, torch.Tensor] = {}
            truth: dict[str, torch.Tensor] = {}
            if capture and config.capture.gradient_batch_sizes:
                sent, truth = _capture_gradients(fed, model, c, r, x, y)
            res = local_train(model, x, y, spec, generator(config.seed, r, c, _LOCAL), fed.transform(c, r))
            update = res.update
            boosted = config.attack.boost and fed.attacking(c, r)
            if boosted:
                update = boost(update, gamma)
            if capture:
                if config.capture.updates:
                    sent["update"] = update
                    truth["update/images"], truth["update/labels"] = x, y
                meta = {"malicious": c in fed.malicious, "attacking": fed.attacking(c, r), "num_samples": len(y),
                        "epochs": spec.epochs, "batch_size": spec.batch_size, "lr": spec.lr,
                        "momentum": spec.momentum, "weight_decay": spec.weight_decay, "steps": res.steps,
                        "boost_factor": gamma if boosted else 1.0,
                        "local_seed": derive_seed(config.seed, r, c, _LOCAL)}
                writer.write_capture(r, c, sent, truth, meta)
            updates.append(update)
            counts.append(len(y))
            losses.append(res.loss)
        stacked = torch.stack(updates)
        result = aggregator(stacked, torch.tensor(counts), selected)
        set_flat(model, global_flat + config.training.server_lr * result.update)
        metrics = fed.evaluate(model)
        record = {
            "round": r,
            "ma": round(metrics["ma"], 6),
            "asr": round(metrics["asr"], 6),
            "train_loss": round(float(np.mean(losses)), 6),
            "selected": selected,
            "attackers": [c for c in selected if fed.attacking(c, r)],
            "weights": [round(float(w), 6) for w in result.weights],
            "update_norms": [round(float(u.norm()), 6) for u in updates],
        }
        history.append(record)
        timings.append(time.perf_counter() - t0)
        writer.commit_round(r, model, aggregator.state_dict(), history,
                            {"malicious_ids": sorted(fed.malicious), "seconds_per_round": timings,
                             "input_spec": dataclasses.asdict(fed.spec)},
                            complete=r == config.training.rounds)
        bar.set_postfix(ma=f"{metrics['ma']:.3f}", asr=f"{metrics['asr']:.3f}")
        if on_round_end is not None:
            on_round_end(r, record)
    bar.close()
    return load_checkpoint(out)
