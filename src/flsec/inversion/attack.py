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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from flsec.errors import ConfigError, FlsecError
from flsec.faults import fault_point
from flsec.fl.checkpoint import Checkpoint, load_checkpoint, read_tensor_metadata, read_tensors
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


def select_targets(ckpt: Checkpoint, round_: int | None, client: int | None, kind: str | None,
                   every: bool) -> list[Target]:
    """The captures to invert. Default: the last captured round, its first client, the smallest
    gradient batch (or the update if no gradient was captured); ``every`` keeps all matches."""
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
        return pool
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
    malicious = target.client in ckpt.meta.get("malicious_ids", [])
    observed_norm = float(case.observed.double().norm())
    if not bool(torch.isfinite(case.observed).all()):
        return _skipped(target, "non_finite_update", observed_norm, malicious)
    if observed_norm == 0.0:
        return _skipped(target, "all_zero", observed_norm, malicious)
    spec = ckpt.input_spec()
    _, meta = ckpt.capture(target.round, target.client)
    est = None
    if target.kind == "update":
        record = next((h for h in ckpt.history if h.get("round") == target.round), None)
        est = norm_ratio(observed_norm, record, target.client)
    att = attack_case(case, model, spec, method, settings, est)
    if att is None:
        return _skipped(target, "diverged", observed_norm, malicious)
    images, labels, counts, out, boost = att
    boost["true_factor"] = meta.get("boost_factor") if target.kind == "update" else None  # evaluation only
    strategy, seconds = settings.label_strategy, out.seconds
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
                        "label_strategy": strategy, "boost": boost,
                        "true_labels": true_y.tolist(), "inferred_counts": counts.tolist(),
                        "candidate_labels": labels.cpu().tolist(), "inferred_labels": labels.cpu().tolist(),
                        "malicious_client": malicious, "observed_norm": observed_norm,
                        "poisoned": poisoned.long().tolist()}}


def attack_case(case: Case, model: torch.nn.Module, spec: Any, method: str, settings: InversionSettings,
                norm_estimate: float | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any, dict[str, Any]] | None:
    """The attack itself on one case: undo the estimated boost, infer the label counts of the
    case's N images, give the k candidates their share, invert, and estimate the boost again from
    the replay. Returns (images on the CPU, candidate labels, counts, method output, boost record),
    or None when the objective never became finite. Ctrl-C during the optimisation raises
    KeyboardInterrupt (the best-so-far is not a finished reconstruction)."""
    invert = METHODS.get(method)
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


def run_inversion(checkpoint: Path, out: Path, *, round_: int | None = None, client: int | None = None,
                  kind: str | None = None, method: str = "geiping", every: bool = False,
                  settings: InversionSettings | None = None, device: torch.device | None = None) -> dict[str, Any]:
    """Invert the selected captures of a checkpoint and write ``out/reconstructed_images/`` (PNGs and
    grids), ``out/reconstructions.safetensors`` and ``out/metrics.json`` (written last).

    Each finished capture is cached in ``out/parts/`` under a key of the method, the settings and
    the checkpoint's content hash. Ctrl-C stops the whole command (:class:`InversionInterrupted`):
    the captures finished so far stay cached, the interrupted one is dropped, nothing else is
    written; running the same command again resumes. ``out`` is held under its write lock (a second
    process writing it is refused)."""
    with locked_dir(Path(out)):
        return _run_inversion(checkpoint, Path(out), round_, client, kind, method, every, settings, device)


def _run_inversion(checkpoint: Path, out: Path, round_: int | None, client: int | None, kind: str | None,
                   method: str, every: bool, settings: InversionSettings | None,
                   device: torch.device | None) -> dict[str, Any]:
    settings = settings or InversionSettings()
    METHODS.get(method)
    ckpt = load_checkpoint(checkpoint)
    device = device or resolve_device(ckpt.config.runtime.device)
    targets = select_targets(ckpt, round_, client, kind, every)
    images_dir = out / "reconstructed_images"
    results, all_images, all_labels, sources = [], [], [], []
    key = cache_key(ckpt, method, settings)
    for n_done, target in enumerate(targets):
        res = _cached(out, target, key)
        if res is None:
            try:
                res = invert_one(ckpt, target, method, settings, device)
            except KeyboardInterrupt:
                raise InversionInterrupted(
                    f"{n_done} of {len(targets)} inversion captures finished and kept in {out / 'parts'}") from None
            if res["images"] is None:
                results.append({**asdict(target), **res["metrics"]})
                continue
            _cache(out, target, key, res)
        for i, img in enumerate(res["images"]):
            save_png(images_dir / f"{target.tag}_{i}.png", img)
        save_grid(images_dir / f"{target.tag}_grid.png", [res["truth"], res["images"]])
        all_images.append(res["images"])
        all_labels.append(res["labels"])
        sources += [[target.round, target.client, i] for i in range(len(res["labels"]))]
        results.append({**asdict(target), **res["metrics"]})
    if not all_images:
        statuses = sorted({r["status"] for r in results})
        if statuses == ["all_zero"]:
            raise FlsecError(
                f"checkpoint: every selected capture ({len(results)}) is an all-zero gradient, so there is nothing to "
                "invert; capture earlier rounds (capture.rounds) where the model does not yet fit those samples")
        raise FlsecError(f"checkpoint: no selected capture ({len(results)}) could be inverted (status: "
                         f"{', '.join(statuses)}); non_finite_update means the client sent NaN/Inf values")
    write_tensors(out / "reconstructions.safetensors",
                  {"images": torch.cat(all_images), "labels": torch.cat(all_labels).long(),
                   "sources": torch.tensor(sources, dtype=torch.long)},
                  {"checkpoint": str(checkpoint), "method": method})
    summary = _summarise(results)
    report = {"checkpoint": str(checkpoint), "method": method, "settings": asdict(settings), "summary": summary,
              "device": str(device), "targets": results,
              "note": "scores use the evaluation_only ground truth; the attack did not"}
    write_strict_json(out / "metrics.json", report)
    return report


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
           "invert_one", "part_path", "run_inversion", "select_targets"]
