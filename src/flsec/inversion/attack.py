"""A curious server inverting captured client gradients/updates from a checkpoint (no training).

Only what the server legitimately holds is used to attack: the global weights it sent in that
round, the tensor the client sent back, the client's declared local hyper-parameters (sample
count, epochs, batch size, learning rate, momentum, weight decay) and the norms of the other
updates it received in that round. The ``evaluation_only`` ground truth is opened afterwards, to
score the result.

A FedAvg update over more images than ``InversionSettings.max_images`` is inverted into that
many candidates by a surrogate replay (:class:`~flsec.inversion.cases.UpdateCase`); the metrics
say so (``reconstructed`` of ``true_images``).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from flsec.errors import ConfigError, FlsecError
from flsec.faults import fault_point
from flsec.fl.checkpoint import Checkpoint, load_checkpoint, read_tensor_metadata, read_tensors
from flsec.inversion.batched import BATCHED_METHODS, DEFAULT_BATCH_CAPTURES, batch_blocker, batch_key, geiping_batched
from flsec.inversion.boost import applied_factor, norm_ratio, replay_scale
from flsec.inversion.cases import Case, GradientCase, UpdateCase
from flsec.inversion.images import save_grid, save_png
from flsec.inversion.labels import candidate_labels, counts_to_labels, infer_counts, mean_softmax_along_update
from flsec.inversion.methods import METHODS, InversionSettings
from flsec.inversion.metrics import distribution, score
from flsec.inversion.records import write_strict_json
from flsec.inversion.truth import capture_truth, client_trigger
from flsec.io import write_tensors
from flsec.lock import locked_dir
from flsec.runtime import resolve_device

CACHE_VERSION = 2


class InversionInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``flsec invert``: finished captures are kept in ``parts/``; the message says how
    many (the CLI adds the command that resumes)."""


@dataclass(frozen=True)
class Target:
    round: int
    client: int
    kind: str  # "gradient_b<B>" or "update"

    @property
    def tag(self) -> str:
        return f"r{self.round}_c{self.client}_{self.kind}"


def part_path(out: Path, target: Target) -> Path:
    """Where a finished capture's reconstruction is kept (resume cache, report figures)."""
    return out / "parts" / f"{target.tag}.safetensors"


def available_targets(ckpt: Checkpoint) -> list[Target]:
    return [Target(c["round"], c["client"], kind) for c in ckpt.captures() for kind in c["tensors"]]


def prioritised(ckpt: Checkpoint, targets: list[Target], limit: int | None) -> list[Target]:
    """The ``limit`` targets phase 2 should invert first, returned in (round, client) order; ``limit``
    None keeps every target.

    Each client's *first* captured update comes before its later ones (clients ordered by that
    round, then by the detector's score recorded with the capture, larger first), then each
    client's second, and so on. Early updates of an attack say the most: the longer a backdoor has
    been in the global model, the better the model already fits the poisoned samples, and a
    saturated backdoor's triggered samples add nothing to the update (their gradient is zero).
    Taking one update per suspect before a second of any spreads the budget over the suspects."""
    if limit is None or len(targets) <= limit:
        return sorted(targets, key=lambda t: (t.round, t.client, t.kind))
    score = {(c["round"], c["client"]): c.get("suspicion") for c in ckpt.captures()}
    seen: dict[int, int] = {}
    keyed = []
    for t in sorted(targets, key=lambda t: (t.round, t.client, t.kind)):
        s = score.get((t.round, t.client))
        nth = seen.get(t.client, 0)
        seen[t.client] = nth + 1
        keyed.append(((nth, t.round, -s if isinstance(s, int | float) else math.inf, t.client, t.kind), t))
    return sorted((t for _, t in sorted(keyed, key=lambda kt: kt[0])[:limit]), key=lambda t: (t.round, t.client, t.kind))


def select_targets(ckpt: Checkpoint, round_: int | None, client: int | None, kind: str | None,
                   every: bool, limit: int | None = None) -> list[Target]:
    """The captures to invert. Default: the last captured round, its first client, the smallest
    gradient batch (or the update if no gradient was captured); ``every`` keeps all matches, or the
    ``limit`` of them to invert first (:func:`prioritised`)."""
    targets = available_targets(ckpt)
    if not targets:
        raise FlsecError(f"{ckpt.root}: the checkpoint holds no captured updates or gradients (see [capture])")
    have = sorted({t.kind for t in targets})
    if kind is not None and kind not in have:
        raise ConfigError(f"--target: '{kind}' was not captured; allowed: {', '.join(have)}")
    pool = [t for t in targets if (round_ is None or t.round == round_) and (client is None or t.client == client)
            and (kind is None or t.kind == kind)]
    if not pool:
        listed = ", ".join(sorted({f"round {t.round} client {t.client}" for t in targets}))
        raise ConfigError(f"--round/--client: no capture matches; captured: {listed}")
    if every:
        if kind is None and any(t.kind != "update" for t in pool):
            pool = [t for t in pool if t.kind != "update"]  # gradients are what can be inverted at scale
        return prioritised(ckpt, sorted(pool, key=lambda t: (t.round, t.client, t.kind)), limit)
    last_round = max(t.round for t in pool) if round_ is None else round_
    pool = [t for t in pool if t.round == last_round]
    first_client = min(t.client for t in pool)
    pool = [t for t in pool if t.client == first_client]

    def rank(t: Target) -> tuple[int, int]:
        return (1, 0) if t.kind == "update" else (0, int(t.kind.removeprefix("gradient_b")))

    return [min(pool, key=rank)]


def build_case(ckpt: Checkpoint, target: Target, settings: InversionSettings | None = None,
               device: torch.device | None = None) -> tuple[Case, torch.nn.Module]:
    """The server's view of one capture, on ``device``: the round's global model and what was sent."""
    settings = settings or InversionSettings()
    device = device or torch.device("cpu")
    model = ckpt.build_model(ckpt.round_model_weights(target.round)).to(device)
    tensors, meta = ckpt.capture(target.round, target.client)
    observed = tensors[target.kind].to(device)
    if target.kind == "update":
        n = int(meta["num_samples"])
        case: Case = UpdateCase(model, observed, n, meta["epochs"], meta["batch_size"], meta["lr"],
                                meta["momentum"], meta["weight_decay"], images=min(n, settings.max_images),
                                surrogate_steps=settings.surrogate_steps)
    else:
        case = GradientCase(model, observed, int(target.kind.removeprefix("gradient_b")))
    return case, model


def _skipped(target: Target, status: str, observed_norm: float, malicious: bool) -> dict[str, Any]:
    return {"target": target, "images": None, "labels": None, "truth": None,
            "metrics": {"status": status, "uninformative": status == "all_zero",
                        "observed_norm": observed_norm if math.isfinite(observed_norm) else None,
                        "psnr": [], "seconds": 0.0, "interrupted": False, "malicious_client": malicious}}


def invert_one(ckpt: Checkpoint, target: Target, method: str, settings: InversionSettings,
               device: torch.device | None = None) -> dict[str, Any]:
    """Reconstruct one capture; returns images, labels, the matched truth and scores.

    ``metrics["status"]``: ``ok``; ``all_zero`` (the gradient is exactly zero: a sample the model
    fits perfectly, e.g. a triggered input of a saturated backdoor, carries nothing to invert);
    ``non_finite_update`` (NaN/Inf in what the client sent); ``diverged`` (the objective was never
    finite). Only ``ok`` captures carry images. Ctrl-C raises KeyboardInterrupt."""
    case, model = build_case(ckpt, target, settings, device)
    skipped = _uninvertible(ckpt, target, case)
    if skipped is not None:
        return skipped
    spec = ckpt.input_spec()
    _, meta = ckpt.capture(target.round, target.client)
    est = None
    if target.kind == "update":
        record = next((h for h in ckpt.history if h.get("round") == target.round), None)
        est = norm_ratio(float(case.observed.double().norm()), record, target.client)
    att = attack_case(case, model, spec, method, settings, est)
    if att is None:
        return _skipped(target, "diverged", float(case.observed.double().norm()), _malicious(ckpt, target))
    images, labels, counts, out, boost = att
    boost["true_factor"] = meta.get("boost_factor") if target.kind == "update" else None  # evaluation only
    return _scored(ckpt, target, case, meta, images, labels, counts, out, boost, settings)


def _malicious(ckpt: Checkpoint, target: Target) -> bool:
    return target.client in ckpt.meta.get("malicious_ids", [])


def _uninvertible(ckpt: Checkpoint, target: Target, case: Case) -> dict[str, Any] | None:
    """The skipped-capture record of a capture holding NaN/Inf or exactly zero, else None."""
    observed_norm = float(case.observed.double().norm())
    if not bool(torch.isfinite(case.observed).all()):
        return _skipped(target, "non_finite_update", observed_norm, _malicious(ckpt, target))
    if observed_norm == 0.0:
        return _skipped(target, "all_zero", observed_norm, _malicious(ckpt, target))
    return None


def _scored(ckpt: Checkpoint, target: Target, case: Case, meta: dict[str, Any], images: torch.Tensor,
            labels: torch.Tensor, counts: torch.Tensor, out: Any, boost: dict[str, Any],
            settings: InversionSettings) -> dict[str, Any]:
    """A finished capture's result: the reconstruction scored against the evaluation-only truth."""
    spec = ckpt.input_spec()
    seconds = out.seconds
    true_x, true_y, poisoned = capture_truth(ckpt, target.round, target.client, target.kind, meta)
    trigger = client_trigger(ckpt, target.client, spec.height, spec.width)
    inferred = counts_to_labels(counts)
    metrics = score(images, true_x, inferred, true_y, poisoned, trigger.mask, candidate_labels=labels.cpu())
    assigned = torch.tensor(metrics["assigned"], dtype=torch.long)
    return {"target": target, "images": images, "labels": labels.cpu(), "truth": true_x[assigned],
            "metrics": {**metrics, "status": "ok", "loss": out.loss, "restart_losses": out.restart_losses,
                        "iterations_done": out.iterations_done, "interrupted": out.interrupted,
                        "seconds": seconds, "seconds_per_image": seconds / case.num_images,
                        "iterations_per_second": out.iterations_done / seconds if seconds > 0 else None,
                        "num_samples": case.num_samples, "surrogate": case.num_images < case.num_samples,
                        "label_strategy": settings.label_strategy, "boost": boost,
                        "true_labels": true_y.tolist(), "inferred_counts": counts.tolist(),
                        "candidate_labels": labels.cpu().tolist(), "inferred_labels": labels.cpu().tolist(),
                        "malicious_client": _malicious(ckpt, target),
                        "suspected": meta.get("suspected"), "suspicion": meta.get("suspicion"),
                        "observed_norm": float(case.observed.double().norm()),
                        "poisoned": poisoned.long().tolist()}}


def invert_batch(ckpt: Checkpoint, targets: list[Target], method: str, settings: InversionSettings,
                 device: torch.device | None = None,
                 on_iteration: Callable[[int], None] | None = None
                 ) -> tuple[list[dict[str, Any]], dict[Target, str]]:
    """Reconstruct several gradient captures in one vectorised optimisation
    (:func:`flsec.inversion.batched.geiping_batched`: each step is :func:`invert_one`'s step up to float
    rounding; the labels, statuses and iteration counts are the same, the pixels need not be).

    Returns the finished results (in the order of ``targets``) and, for the captures that cannot
    join the batch, the reason (:func:`~flsec.inversion.batched.batch_blocker`): the caller inverts
    those one by one. The seconds of the batch are shared equally by its captures (``seconds``;
    ``batch_seconds`` is the whole batch). Ctrl-C raises KeyboardInterrupt (nothing of the batch
    is finished)."""
    spec = ckpt.input_spec()
    image_shape = (spec.channels, spec.height, spec.width)
    done: dict[Target, dict[str, Any]] = {}
    blocked: dict[Target, str] = {}
    members: list[tuple[Target, GradientCase, dict[str, Any], torch.Tensor, torch.Tensor, dict[str, Any]]] = []
    for target in targets:
        case, model = build_case(ckpt, target, settings, device)
        reason = batch_blocker(case, method)
        if reason is None and members and batch_key(case) != batch_key(members[0][1]):  # type: ignore[arg-type]
            reason = "different kind or shapes than the rest of its batch"
        if reason is not None:
            blocked[target] = reason
            continue
        skipped = _uninvertible(ckpt, target, case)
        if skipped is not None:
            done[target] = skipped
            continue
        assert isinstance(case, GradientCase)
        _, meta = ckpt.capture(target.round, target.client)
        labels, counts, boost = infer_labels(case, model, spec, settings)
        boost["true_factor"] = None
        members.append((target, case, meta, labels, counts, boost))
    if len(members) == 1:  # nothing to vectorise with: the reference path
        blocked[members[0][0]] = "alone in its batch"
        members = []
    if members:
        t0 = time.perf_counter()
        try:
            outs = geiping_batched([m[1] for m in members], [m[3] for m in members],
                                   (members[0][1].num_images, *image_shape), settings,
                                   stats=(spec.mean, spec.std), on_iteration=on_iteration)
        except RuntimeError as exc:  # an operation torch.func cannot vectorise: the captures go one by one
            reason = f"torch.func could not vectorise the model ({str(exc).splitlines()[0][:120]})"
            blocked.update({m[0]: reason for m in members})
            outs = []
        batch_seconds = time.perf_counter() - t0
        for (target, case, meta, labels, counts, boost), out in zip(members, outs, strict=False):
            out.seconds = batch_seconds / len(members)
            images = out.images.detach().cpu()
            if not math.isfinite(out.loss) or not bool(torch.isfinite(images).all()):
                done[target] = _skipped(target, "diverged", float(case.observed.double().norm()),
                                        _malicious(ckpt, target))
                continue
            res = _scored(ckpt, target, case, meta, images, labels.cpu(), counts, out, boost, settings)
            res["metrics"]["batch"] = {"size": len(members), "vectorised": True, "fallback": None,
                                       "batch_seconds": batch_seconds}
            done[target] = res
    return [done[t] for t in targets if t in done], blocked


def infer_labels(case: Case, model: torch.nn.Module, spec: Any, settings: InversionSettings,
                 norm_estimate: float | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Undo the estimated boost, infer the label counts of the case's N images and give the k
    candidates their share. Returns (candidate labels on the case's device, counts, boost record)."""
    image_shape = (spec.channels, spec.height, spec.width)
    boost: dict[str, Any] = {"norm_estimate": norm_estimate, "applied": 1.0}
    if isinstance(case, UpdateCase) and settings.boost_correction == "norm":
        boost["applied"] = applied_factor(norm_estimate, settings.boost_threshold)
    bias = case.output_bias_gradient().detach() / boost["applied"]
    p_bar = None
    if isinstance(case, UpdateCase) and settings.label_strategy == "llg":
        p_bar = mean_softmax_along_update(model, case.observed.detach() / boost["applied"], image_shape)
    counts = infer_counts(model, bias, case.num_samples, image_shape, settings.label_strategy, p_bar)
    labels = candidate_labels(counts, case.num_images).to(case.observed.device)
    return labels, counts, boost


def attack_case(case: Case, model: torch.nn.Module, spec: Any, method: str, settings: InversionSettings,
                norm_estimate: float | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any, dict[str, Any]] | None:
    """The attack itself on one case: labels (:func:`infer_labels`), inversion, and the boost
    estimated again from the replay. Returns (images on the CPU, candidate labels, counts, method
    output, boost record), or None when the objective never became finite. Ctrl-C during the
    optimisation raises KeyboardInterrupt (the best-so-far is not a finished reconstruction)."""
    invert = METHODS.get(method)
    image_shape = (spec.channels, spec.height, spec.width)
    labels, counts, boost = infer_labels(case, model, spec, settings, norm_estimate)
    t0 = time.perf_counter()
    out = invert(case, labels, (case.num_images, *image_shape), settings, stats=(spec.mean, spec.std))
    out.seconds = time.perf_counter() - t0
    if out.interrupted:
        raise KeyboardInterrupt
    images = out.images.detach().cpu()
    if not math.isfinite(out.loss) or not bool(torch.isfinite(images).all()):
        return None
    if isinstance(case, UpdateCase):
        sim = case.simulate(out.images.to(case.observed.device), labels).detach()
        boost["replay_estimate"] = replay_scale(case.observed.detach(), sim)
    return images, labels.cpu(), counts, out, boost


def checkpoint_digest(ckpt: Checkpoint) -> str:
    """A content hash of the checkpoint (the sha256 of every listed file and the config)."""
    blob = json.dumps({"files": ckpt.meta.get("files", {}), "config": ckpt.meta.get("config", {})}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_key(ckpt: Checkpoint, method: str, settings: InversionSettings) -> str:
    return json.dumps({"version": CACHE_VERSION, "method": method, **asdict(settings), "progress": None,
                       "checkpoint": checkpoint_digest(ckpt)}, sort_keys=True)


def plan_batches(targets: list[Target], method: str, batch_captures: int) -> list[tuple[list[Target], str | None]]:
    """Group captures for :func:`invert_batch`: gradient captures of one kind, in order, at most
    ``batch_captures`` at a time; every other capture alone, with the reason it is not batched
    (None when batching was not asked for)."""
    if batch_captures <= 1:
        return [([t], None) for t in targets]
    plan: list[tuple[list[Target], str | None]] = []
    kinds: dict[str, list[Target]] = {}
    for t in targets:
        if method not in BATCHED_METHODS:
            plan.append(([t], f"method '{method}' has no vectorised path (allowed: {', '.join(BATCHED_METHODS)})"))
        elif t.kind == "update":
            plan.append(([t], "update inversion replays several local steps"))
        else:
            kinds.setdefault(t.kind, []).append(t)
    for group in kinds.values():
        plan += [(group[i:i + batch_captures], None) for i in range(0, len(group), batch_captures)]
    return plan


def run_inversion(checkpoint: Path, out: Path, *, round_: int | None = None, client: int | None = None,
                  kind: str | None = None, method: str = "geiping", every: bool = False,
                  settings: InversionSettings | None = None, device: torch.device | None = None,
                  batch_captures: int = DEFAULT_BATCH_CAPTURES, max_captures: int | None = None) -> dict[str, Any]:
    """Invert the selected captures of a checkpoint and write ``out/reconstructed_images/`` (PNGs and
    grids), ``out/reconstructions.safetensors`` and ``out/metrics.json`` (written last).

    Gradient captures of one kind are inverted ``batch_captures`` at a time in one vectorised
    optimisation (:func:`invert_batch`); the others, and those the vectorised path cannot take,
    one by one (:func:`invert_one`, the reference); each capture's ``batch`` record says which and
    why. One progress bar counts the captures of the whole command (best PSNR so far as postfix).
    ``max_captures`` inverts only that many of the selected captures (:func:`prioritised`).

    ``out`` is write-locked for the command (:func:`flsec.lock.locked_dir`): a second process
    inverting into the same directory is refused. Each finished capture is cached in ``out/parts/``
    under a key of the method, the settings and the checkpoint's content hash. Ctrl-C stops the
    whole command (:class:`InversionInterrupted`): the captures finished so far stay cached, the
    interrupted capture (or batch) is dropped, nothing else is written; running the same command
    again resumes."""
    settings = settings or InversionSettings()
    if batch_captures < 1:
        raise ConfigError(f"--batch-captures: must be >= 1, got {batch_captures}")
    if max_captures is not None and max_captures < 1:
        raise ConfigError(f"--max-captures: must be >= 1, got {max_captures}")
    METHODS.get(method)
    ckpt = load_checkpoint(checkpoint)
    device = device or resolve_device(ckpt.config.runtime.device)
    targets = select_targets(ckpt, round_, client, kind, every, max_captures)
    with locked_dir(out):
        finished = _invert_targets(ckpt, targets, out, method, settings, device, batch_captures)
        return _write_outputs(checkpoint, out, method, settings, device, targets, finished, batch_captures)


def _invert_targets(ckpt: Checkpoint, targets: list[Target], out: Path, method: str, settings: InversionSettings,
                    device: torch.device, batch_captures: int) -> dict[Target, dict[str, Any]]:
    key = cache_key(ckpt, method, settings)
    quiet = replace(settings, progress=False)  # one bar for the command, not one per capture
    finished: dict[Target, dict[str, Any]] = {}
    for target in targets:
        res = _cached(out, target, key)
        if res is not None:
            finished[target] = res
    bar = tqdm(total=len(targets), desc=f"invert {method}", unit="capture", disable=not settings.progress,
               dynamic_ncols=True, initial=len(finished))
    best = [max((p for r in finished.values() for p in r["metrics"].get("psnr", [])), default=None)]

    def postfix(**extra: str) -> None:
        shown = {"best_psnr": f"{best[0]:.2f} dB"} if best[0] is not None else {}
        bar.set_postfix(**shown, **extra, refresh=True)

    def keep(res: dict[str, Any], batch: dict[str, Any]) -> None:
        res["metrics"].setdefault("batch", batch)
        if res["images"] is not None:
            _cache(out, res["target"], key, res)
        finished[res["target"]] = res
        psnrs = [p for p in res["metrics"].get("psnr", []) if p is not None and math.isfinite(p)]
        if psnrs:
            best[0] = max([*psnrs, *([best[0]] if best[0] is not None else [])])
        bar.update(1)
        postfix()

    pending = [t for t in targets if t not in finished]
    steps = settings.iterations * settings.restarts
    try:
        for chunk, why in plan_batches(pending, method, batch_captures):
            singles = [(chunk[0], why)]
            if len(chunk) > 1:
                def tick(i: int, n: int = len(chunk)) -> None:
                    if i % 25 == 0 or i == steps:
                        postfix(batch=f"{n} captures, step {i}/{steps}")

                results, blocked = invert_batch(ckpt, chunk, method, quiet, device, on_iteration=tick)
                for res in results:
                    keep(res, {"size": 1, "vectorised": False, "fallback": None})
                singles = [(t, blocked[t]) for t in chunk if t in blocked]
            for target, reason in singles:
                keep(invert_one(ckpt, target, method, quiet, device),
                     {"size": 1, "vectorised": False, "fallback": reason})
    except KeyboardInterrupt:
        bar.close()
        raise InversionInterrupted(
            f"{len(finished)} of {len(targets)} inversion captures finished and kept in {out / 'parts'}") from None
    bar.close()
    return finished


def _write_outputs(checkpoint: Path, out: Path, method: str, settings: InversionSettings, device: torch.device,
                   targets: list[Target], finished: dict[Target, dict[str, Any]], batch_captures: int
                   ) -> dict[str, Any]:
    images_dir = out / "reconstructed_images"
    results, all_images, all_labels, sources = [], [], [], []
    for target in targets:
        res = finished[target]
        results.append({**asdict(target), **res["metrics"]})
        if res["images"] is None:
            continue
        for i, img in enumerate(res["images"]):
            save_png(images_dir / f"{target.tag}_{i}.png", img)
        save_grid(images_dir / f"{target.tag}_grid.png", [res["truth"], res["images"]])
        all_images.append(res["images"])
        all_labels.append(res["labels"])
        sources += [[target.round, target.client, i] for i in range(len(res["labels"]))]
    if not all_images:
        raise FlsecError(nothing_inverted(results))
    write_tensors(out / "reconstructions.safetensors",
                  {"images": torch.cat(all_images), "labels": torch.cat(all_labels).long(),
                   "sources": torch.tensor(sources, dtype=torch.long)},
                  {"checkpoint": str(checkpoint), "method": method})
    summary = _summarise(results)
    summary["batching"] = _batching(results, batch_captures)
    report = {"checkpoint": str(checkpoint), "method": method, "settings": asdict(settings), "summary": summary,
              "device": str(device), "targets": results,
              "note": "scores use the evaluation_only ground truth; the attack did not"}
    write_strict_json(out / "metrics.json", report)
    return report


# What each status of a capture that gave no images means (``metrics.json`` records the status).
SKIPPED_STATUS = {"all_zero": "an all-zero gradient or update (the model already fits those samples)",
                  "non_finite_update": "NaN/Inf values in what the client sent",
                  "diverged": "an inversion objective that never became finite"}


def nothing_inverted(results: list[dict[str, Any]]) -> str:
    """One line on why none of the selected captures gave images, each status counted and named."""
    counts: dict[str, int] = {}
    for r in results:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    why = "; ".join(f"{n} with {SKIPPED_STATUS.get(status, status)} ({status})" for status, n in sorted(counts.items()))
    hint = ("; capture earlier rounds (capture.rounds) where the model does not yet fit those samples"
            if set(counts) == {"all_zero"} else "")
    return f"checkpoint: none of the {len(results)} selected capture(s) could be inverted: {why}{hint}"


def _batching(results: list[dict[str, Any]], batch_captures: int) -> dict[str, Any]:
    """How the captures were inverted: vectorised or one by one, and why not vectorised."""
    records = [r.get("batch") or {} for r in results]
    reasons: dict[str, int] = {}
    for rec in records:
        if rec.get("fallback"):
            reasons[rec["fallback"]] = reasons.get(rec["fallback"], 0) + 1
    return {"batch_captures": batch_captures, "vectorised_targets": sum(bool(r.get("vectorised")) for r in records),
            "one_by_one_targets": sum(not r.get("vectorised") for r in records), "fallbacks": reasons}


def _cache(out: Path, target: Target, key: str, res: dict[str, Any]) -> None:
    write_tensors(part_path(out, target),
                  {"images": res["images"], "labels": res["labels"].long(), "truth": res["truth"]},
                  {"key": key, "metrics": json.dumps(res["metrics"])})
    fault_point("invert:capture")


def _cached(out: Path, target: Target, key: str) -> dict[str, Any] | None:
    """A finished target of an earlier, interrupted run with the same settings and checkpoint."""
    path = part_path(out, target)
    if not path.is_file():
        return None
    try:
        meta = read_tensor_metadata(path)
        if meta.get("key") != key:
            return None
        t = read_tensors(path)
        metrics = json.loads(meta["metrics"])
    except (FlsecError, KeyError, json.JSONDecodeError):
        return None  # a damaged cache entry is recomputed
    if not {"images", "labels", "truth"} <= set(t) or not bool(torch.isfinite(t["images"]).all()):
        return None
    return {"target": target, "images": t["images"], "labels": t["labels"], "truth": t["truth"], "metrics": metrics}


def _summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    def mean(key: str, rows: list[dict[str, Any]]) -> float | None:
        vals = [r[key] for r in rows if r.get(key) is not None]
        return float(sum(vals) / len(vals)) if vals else None

    done = [r for r in results if r.get("status") == "ok"]
    psnrs = [p for r in done for p in r["psnr"]]
    ssims = [s for r in done for s in r["ssim"]]
    n_images = len(psnrs)
    return {"targets": len(results), "images": n_images, "mean_psnr": mean("mean_psnr", done),
            "mean_ssim": mean("mean_ssim", done), "label_accuracy": mean("label_accuracy", done),
            "psnr_stats": distribution(psnrs), "ssim_stats": distribution(ssims),
            "matched_label_accuracy": mean("matched_label_accuracy", done),
            "true_images": sum(int(r.get("true_images", 0)) for r in done),
            "surrogate_targets": sum(bool(r.get("surrogate")) for r in done),
            "mean_trigger_correlation": mean("mean_trigger_correlation", done),
            "seconds_per_image": sum(r["seconds"] for r in done) / max(n_images, 1),
            "uninformative_targets": sum(r.get("status") == "all_zero" for r in results),
            "non_finite_targets": sum(r.get("status") == "non_finite_update" for r in results),
            "diverged_targets": sum(r.get("status") == "diverged" for r in results),
            "interrupted": False}


__all__ = ["InversionInterrupted", "Target", "available_targets", "build_case", "checkpoint_digest",
           "invert_batch", "invert_one", "part_path", "plan_batches", "run_inversion", "select_targets"]
