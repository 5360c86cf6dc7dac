"""``flsec unlearn``: verification, corrective unlearning, baselines and the repaired checkpoint.

What the defender is assumed to hold: the global model of the checkpoint and the reconstructions
written by ``flsec invert`` (images and inferred labels), i.e. what was leaked by the updates it
inverted. Nothing else: no clean data, no knowledge of the attackers, the target class or the
trigger. ``metrics.json`` states it exactly under ``defender_holds`` (which clients' updates of
which rounds, how many reconstructions, the estimated trigger, clean images: 0). The
*evaluation* (MA, ASR, mask IoU) uses the test set and the true trigger, which the defender never
sees. The plain fine-tuning baseline is given as many real clean images as there are
reconstructions.

Every output is checked: reconstructions must be finite images in [0, 1] and the repaired weights
finite, or nothing is written.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from flsec.config import ExperimentConfig, UnlearningConfig
from flsec.errors import FlsecError
from flsec.fl.checkpoint import RunWriter, load_checkpoint
from flsec.fl.federation import Federation
from flsec.inversion.images import save_grid
from flsec.inversion.reconstructions import read_reconstructions
from flsec.inversion.records import finite, write_strict_json
from flsec.io import write_tensors
from flsec.lock import locked_dir
from flsec.runtime import resolve_device
from flsec.unlearning.finetune import FinetuneSettings, corrective_unlearning, plain_finetune
from flsec.unlearning.reverse import ReverseSettings, neural_cleanse
from flsec.unlearning.verify import TriggerEstimate, mask_iou, verify


def settings_from(cfg: UnlearningConfig, seed: int, progress: bool) -> FinetuneSettings:
    return FinetuneSettings(cfg.steps, cfg.batch_size, cfg.lr, cfg.retention_weight, cfg.augment_shift,
                            cfg.augment_noise, seed, progress)


def _cpu_eval(fed: Federation, model: torch.nn.Module) -> dict[str, float]:
    return fed.evaluate(copy.deepcopy(model).cpu().eval())


def require_finite(model: torch.nn.Module, what: str) -> None:
    bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise FlsecError(f"{what}: the fine-tuned weights are NaN/Inf ({bad[0]}, ...); nothing was written; "
                         "lower unlearning.lr or check the reconstructions")


def defender_holdings(images: Path, sources: torch.Tensor, n: int, estimate: TriggerEstimate | None) -> dict[str, Any]:
    """Exactly what phase 3 used: whose updates of which rounds were inverted, into how many images."""
    captures: dict[tuple[int, int], int] = {}
    for r, c, _ in sources.tolist():
        captures[(int(r), int(c))] = captures.get((int(r), int(c)), 0) + 1
    inv = _inversion_metrics(images)
    listed = []
    for (r, c), k in sorted(captures.items()):
        row: dict[str, Any] = {"round": r, "client": c, "reconstructions": k}
        for t in inv.get("targets", []):
            if (t.get("round"), t.get("client")) == (r, c) and t.get("status", "ok") == "ok":
                row.update({"kind": t.get("kind"), "images_in_update": t.get("num_samples", t.get("true_images")),
                            "surrogate": bool(t.get("surrogate", False))})
        listed.append(row)
    return {"model": "the global model of the checkpoint",
            "captures": listed,
            "reconstructions": n,
            "estimated_trigger": None if estimate is None else {"mask_pixels": int(estimate.mask.sum())},
            "clean_images": 0,
            "summary": f"the global model and {n} reconstructions from {len(listed)} inverted capture(s); "
                       "no clean data, no knowledge of attackers, target or trigger"}


def _inversion_metrics(images: Path) -> dict[str, Any]:
    for cand in (images / "metrics.json", images.parent / "metrics.json") if images.is_dir() else (
            images.parent / "metrics.json",):
        if cand.is_file():
            try:
                data = json.loads(cand.read_text(encoding="utf-8"))
                return data if isinstance(data, dict) else {}
            except (json.JSONDecodeError, UnicodeDecodeError):
                return {}
    return {}


def estimate_trigger(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, source: str,
                     seed: int) -> tuple[TriggerEstimate | None, dict[str, Any]]:
    """The trigger estimate and the verification report. ``source``: ``verification`` (what the
    reconstructions show, :func:`~flsec.unlearning.verify.verify`), ``reverse`` (Neural Cleanse on
    the reconstructions as carriers, :mod:`flsec.unlearning.reverse`) or ``auto`` (verification,
    then reverse engineering when the reconstructions are too poor to show a trigger)."""
    report: dict[str, Any] = {}
    est = None
    if source in ("auto", "verification"):
        ver = verify(model, x, y)
        est, report = ver.estimate, {**ver.report, "trigger_source": "verification"}
    if est is None and source in ("auto", "reverse"):
        nc = neural_cleanse(model, x, num_classes, ReverseSettings(seed=seed))
        report = {**report, "reverse_engineering": nc.report}
        if nc.estimate is not None:
            est = nc.estimate
            report.update({"trigger_source": "neural_cleanse", "suspected_target": nc.target,
                           "backdoor_found": True, "suspects": None, "mask_pixels": int(est.mask.sum()),
                           "suspects_predicted_target_trigger_removed": None,
                           "clean_reconstructions_flipped_by_estimated_trigger": _flip_rate(model, x, est, nc.target)})
        else:
            report.setdefault("reason", nc.report["reason"])
    report.setdefault("reconstructions", len(x))
    return est, report


def _flip_rate(model: torch.nn.Module, x: torch.Tensor, est: TriggerEstimate, target: int) -> float | None:
    from flsec.fl.evaluate import predict

    others = x[predict(model, x) != target]
    if len(others) == 0:
        return None
    return float((predict(model, est.to(x.device).stamp(others)) == target).float().mean())


def run_unlearning(checkpoint: Path, images: Path, out: Path, settings: FinetuneSettings | None = None,
                   baselines: bool = True, progress: bool = True, device: torch.device | None = None,
                   retrain: bool = True, trigger_source: str | None = None) -> dict[str, Any]:
    """Phase 3: verify the backdoor on the reconstructions in ``images``, estimate its trigger, fine-tune
    it out of the checkpoint's global model and measure MA / ASR before and after (and the baselines).
    Writes the repaired checkpoint to ``out/checkpoint`` and ``out/metrics.json`` last (the phase's
    completion mark); ``out`` is held under its write lock, so a second process writing it is refused."""
    with locked_dir(Path(out)):
        return _run_unlearning(checkpoint, images, Path(out), settings, baselines, progress, device, retrain,
                               trigger_source)


def _run_unlearning(checkpoint: Path, images: Path, out: Path, settings: FinetuneSettings | None, baselines: bool,
                    progress: bool, device: torch.device | None, retrain: bool,
                    trigger_source: str | None) -> dict[str, Any]:
    ckpt = load_checkpoint(checkpoint)
    device = device or resolve_device(ckpt.config.runtime.device)
    settings = settings or settings_from(ckpt.config.unlearning, ckpt.config.seed, progress)
    spec = ckpt.input_spec()
    rec = read_reconstructions(Path(images), (spec.channels, spec.height, spec.width), spec.num_classes)
    x, y = rec["images"], rec["labels"]
    model = ckpt.build_model().to(device)
    fed = Federation.from_config(ckpt.config)  # evaluation only (test set, true trigger)

    source = trigger_source or ckpt.config.unlearning.trigger_source
    est, ver_report = estimate_trigger(model, x.to(device), y.to(device), spec.num_classes, source, settings.seed)
    holdings = defender_holdings(Path(images), rec["sources"], len(x), est)
    result: dict[str, Any] = {"checkpoint": str(checkpoint), "images": str(images), "verification": ver_report,
                              "settings": asdict(settings), "device": str(device),
                              "defender_holds": holdings["summary"], "defender_holdings": holdings}
    before = _cpu_eval(fed, model)
    result["before"] = before
    result["verification"]["true_target"] = ckpt.config.attack.target_label
    if est is None:
        # Nothing to unlearn from these reconstructions: the model is kept as it is.
        result["verification"]["mask_iou_with_true_trigger"] = None
        result["verification"]["mask_iou_status"] = "no trigger estimated"
        result["after"] = before
        result["unlearned"] = False
        repaired = model
    else:
        iou = mask_iou(est.mask.cpu(), fed.trigger.mask)
        result["verification"]["mask_iou_with_true_trigger"] = iou if math.isfinite(iou) else None
        result["verification"]["mask_iou_status"] = "ok" if math.isfinite(iou) else "empty masks"
        result["unlearned"] = True
        repaired = corrective_unlearning(model, x.to(device), est, settings)
        require_finite(repaired, "unlearning")
        result["after"] = _cpu_eval(fed, repaired)

    if baselines:
        n = len(x)
        g = torch.Generator().manual_seed(settings.seed)
        idx = torch.randperm(len(fed.data.y_train), generator=g)[:n]
        tuned = plain_finetune(model, fed.data.x_train[idx].to(device), fed.data.y_train[idx].to(device),
                               replace(settings, progress=progress))
        result["baseline_finetune"] = {**_cpu_eval(fed, tuned), "clean_images": n}
        if retrain:
            result["baseline_retrain"] = _retrain_without_attackers(ckpt.config, fed, progress)

    if est is not None:
        _save_trigger(est, x, out, fed)
    writer = RunWriter(out / "checkpoint", ckpt.config)
    history = [*ckpt.history, {"round": ckpt.round, "phase": "unlearning", **finite(result["after"])}]
    writer.commit_round(ckpt.round, copy.deepcopy(repaired).cpu(), {}, history,
                        {"input_spec": ckpt.meta["input_spec"], "malicious_ids": ckpt.meta.get("malicious_ids", []),
                         "unlearned_from": str(checkpoint),
                         "unlearning": finite({"before": before, "after": result["after"]})},
                        complete=True)
    write_strict_json(out / "metrics.json", result)
    return finite(result)


def _save_trigger(est: TriggerEstimate, x: torch.Tensor, out: Path, fed: Federation) -> None:
    est = est.to(torch.device("cpu"))
    blank = torch.zeros_like(x[0])
    save_grid(out / "trigger_estimate.png",
              [torch.stack([est.heatmap[None].expand_as(blank), est.mask.float().expand_as(blank),
                            est.stamp(blank), fed.trigger.pattern.expand_as(blank)])])
    write_tensors(out / "trigger_estimate.safetensors",
                  {"mask": est.mask.to(torch.uint8), "pattern": est.stamp(blank), "fill": est.fill,
                   "heatmap": est.heatmap})


def _retrain_without_attackers(config: ExperimentConfig, fed: Federation, progress: bool) -> dict[str, Any]:
    """Baseline: the same federation and rounds with the attackers' participation removed; scored by
    ``fed`` (the original federation), so ASR uses the original trigger and target."""
    from flsec.fl.engines import train

    data = copy.deepcopy(config.model_dump(mode="json"))
    data["attack"] = {**data["attack"], "kind": "none", "num_malicious": 0, "malicious_ids": None}
    data["capture"] = {**data["capture"], "updates": False, "gradient_batch_sizes": [], "clients": []}
    data["aggregation"] = {**data["aggregation"], "f": 0}
    clean_cfg = type(config).model_validate(data)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = train(clean_cfg, Path(tmp) / "retrain", progress=progress)
        model = ckpt.build_model()
    return {**fed.evaluate(model), "rounds": config.training.rounds}
