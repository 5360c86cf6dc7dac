"""``flsec unlearn``: verification, corrective unlearning on carriers, baselines and the repaired checkpoint.

What the defender holds: the global model of the checkpoint, the reconstructions written by ``flsec
invert`` (images and inferred labels: what the updates it inverted leaked, and whose updates those
were, which the server chose itself under ``capture.clients = "suspects"``) and, with ``carriers =
"root"``, a clean root set of ``unlearning.root_size`` images (FLTrust's assumption). Nothing else:
no knowledge of the attackers, the target class or the trigger. ``metrics.json`` states it exactly
under ``defender_holdings``. The *evaluation* (MA, ASR, mask IoU, the retraining baseline without
the true attackers) uses the test set and the ground truth, which no decision of this phase reads.

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
from flsec.fl.checkpoint import Checkpoint, RunWriter, load_checkpoint
from flsec.fl.federation import Federation
from flsec.inversion.images import save_grid
from flsec.inversion.reconstructions import read_reconstructions
from flsec.inversion.records import finite, write_strict_json
from flsec.io import write_tensors
from flsec.lock import locked_dir
from flsec.runtime import resolve_device
from flsec.unlearning.carriers import Carriers, build_carriers, root_set
from flsec.unlearning.finetune import FinetuneSettings, corrective_unlearning, plain_finetune
from flsec.unlearning.reverse import ReverseSettings, neural_cleanse
from flsec.unlearning.trigger import GuidedSettings, estimate_backdoor
from flsec.unlearning.verify import TriggerEstimate, mask_iou


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


def _choice(config: ExperimentConfig) -> str:
    """How the inverted captures were chosen, in words."""
    cap = config.capture
    if cap.clients == "suspects":
        return (f"chosen by the server: the clients its {config.detection.detector} detector suspected"
                + (f", the {config.inversion.max_captures} most suspicious captures" if config.inversion.max_captures
                   else ""))
    if cap.clients == "malicious":
        return "chosen with the ground truth of who attacked (the cooperative capture's setting)"
    if cap.clients == "all":
        return "every client's captures"
    return f"the clients the user listed (capture.clients = {list(cap.clients)})"


def defender_holdings(config: ExperimentConfig, images: Path, sources: torch.Tensor, n: int,
                      carriers: Carriers, estimate: TriggerEstimate | None, trigger_source: str | None
                      ) -> dict[str, Any]:
    """Exactly what phase 3 used: whose updates of which rounds were inverted (and why those), into
    how many images, the carriers and how many clean images they hold."""
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
                            "surrogate": bool(t.get("surrogate", False)), "suspicion": t.get("suspicion")})
        listed.append(row)
    clean = carriers.clean_images
    suspects = sorted({row["client"] for row in listed})
    return {"model": "the global model of the checkpoint",
            "captures": listed,
            "captures_chosen": _choice(config),
            "inverted_clients": suspects,
            "reconstructions": n,
            "carriers": {"kind": carriers.kind, "images": len(carriers.images), "how": carriers.how,
                         **carriers.details},
            "estimated_trigger": None if estimate is None else {"mask_pixels": int(estimate.mask.sum()),
                                                                "source": trigger_source},
            "clean_images": clean,
            "summary": (f"the global model, {n} reconstructions from {len(listed)} inverted update(s) of client(s) "
                        f"{suspects} ({_choice(config)}) and {clean} clean images; carriers: {carriers.how}; no "
                        "knowledge of attackers, target or trigger")}


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


def run_unlearning(checkpoint: Path, images: Path, out: Path, settings: FinetuneSettings | None = None,
                   baselines: bool = True, progress: bool = True, device: torch.device | None = None,
                   retrain: bool = True, trigger_source: str | None = None, carriers: str | None = None,
                   root_labels: str | None = None) -> dict[str, Any]:
    """Phase 3: verify the backdoor on the reconstructions in ``images``, estimate its target and
    trigger, unlearn it from the checkpoint's global model on the carriers (``carriers`` or the
    config's; ``root_labels`` overrides ``unlearning.root_labels``), and measure MA / ASR before and
    after (and the baselines). Writes the repaired
    checkpoint to ``out/checkpoint`` and ``out/metrics.json`` last (the phase's completion mark);
    ``out`` is held under its write lock, so a second process writing it is refused."""
    with locked_dir(Path(out)):
        return _run_unlearning(checkpoint, images, Path(out), settings, baselines, progress, device, retrain,
                               trigger_source, carriers, root_labels)


def _run_unlearning(checkpoint: Path, images: Path, out: Path, settings: FinetuneSettings | None, baselines: bool,
                    progress: bool, device: torch.device | None, retrain: bool, trigger_source: str | None,
                    carrier_kind: str | None, root_labels: str | None) -> dict[str, Any]:
    ckpt = load_checkpoint(checkpoint)
    cfg = ckpt.config
    if root_labels is not None:
        cfg = cfg.model_copy(update={"unlearning": cfg.unlearning.model_copy(update={"root_labels": root_labels})})
    device = device or resolve_device(cfg.runtime.device)
    settings = settings or settings_from(cfg.unlearning, cfg.seed, progress)
    spec = ckpt.input_spec()
    rec = read_reconstructions(Path(images), (spec.channels, spec.height, spec.width), spec.num_classes)
    x, y = rec["images"], rec["labels"]
    model = ckpt.build_model().to(device)
    carriers = build_carriers(carrier_kind or cfg.carriers, cfg, model, x, y, progress)
    fed = Federation.from_config(cfg)  # evaluation only (test set, true trigger)

    source = trigger_source or cfg.unlearning.trigger_source
    reverse = ReverseSettings(steps=cfg.unlearning.reverse_steps, seed=settings.seed)
    guided = GuidedSettings(cfg.unlearning.reverse_references, cfg.unlearning.reverse_ratio)
    est, ver_report = estimate_backdoor(model, x.to(device), y.to(device), carriers.images.to(device),
                                        spec.num_classes, source, reverse, guided)
    holdings = defender_holdings(cfg, Path(images), rec["sources"], len(x), carriers, est,
                                 ver_report.get("trigger_source"))
    result: dict[str, Any] = {"checkpoint": str(checkpoint), "images": str(images), "verification": ver_report,
                              "settings": asdict(settings), "device": str(device), "carriers": carriers.kind,
                              "defender_holds": holdings["summary"], "defender_holdings": holdings}
    before = _cpu_eval(fed, model)
    result["before"] = before
    result["verification"]["true_target"] = cfg.attack.target_label
    if est is None:
        # Nothing to unlearn: the model is kept as it is.
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
        true_labels = carriers.labels.to(device) if carriers.details.get("root_labels") == "true" else None
        repaired = corrective_unlearning(model, carriers.images.to(device), est, settings, labels=true_labels)
        require_finite(repaired, "unlearning")
        result["after"] = _cpu_eval(fed, repaired)

    if baselines:
        result.update(_baselines(ckpt, fed, model, carriers, settings, reverse, device, progress, retrain,
                                 holdings["inverted_clients"]))

    if est is not None:
        _save_trigger(est, x, out, fed)
    writer = RunWriter(out / "checkpoint", cfg)
    history = [*ckpt.history, {"round": ckpt.round, "phase": "unlearning", **finite(result["after"])}]
    writer.commit_round(ckpt.round, copy.deepcopy(repaired).cpu(), {}, history,
                        {"input_spec": ckpt.meta["input_spec"], "malicious_ids": ckpt.meta.get("malicious_ids", []),
                         "unlearned_from": str(checkpoint),
                         "unlearning": finite({"before": before, "after": result["after"]})},
                        complete=True)
    write_strict_json(out / "metrics.json", result)
    return finite(result)


def _baselines(ckpt: Checkpoint, fed: Federation, model: torch.nn.Module, carriers: Carriers,
               settings: FinetuneSettings, reverse: ReverseSettings, device: torch.device, progress: bool,
               retrain: bool, suspects: list[int]) -> dict[str, Any]:
    """What the reconstructions add, measured: Neural Cleanse on the model alone (all classes, on
    carriers that owe nothing to the reconstructions), plain fine-tuning on the clean root set, and
    retraining without the inverted suspects and without the true attackers (evaluation only)."""
    cfg = ckpt.config
    out: dict[str, Any] = {}
    alone = carriers if carriers.kind != "reconstructions" else build_carriers("synthetic", cfg, model,
                                                                              carriers.images, carriers.labels)
    nc = neural_cleanse(model, alone.images.to(device), ckpt.input_spec().num_classes, reverse)
    row: dict[str, Any] = {"carriers": alone.kind, "found": nc.estimate is not None, "suspected_target": nc.target}
    if nc.estimate is not None:
        tuned = corrective_unlearning(model, alone.images.to(device), nc.estimate, settings)
        row.update({**_cpu_eval(fed, tuned), "mask_iou_with_true_trigger": _iou(nc.estimate, fed)})
    else:
        row.update({**_cpu_eval(fed, model), "note": "no trigger found; model unchanged"})
    out["baseline_neural_cleanse"] = row
    rx, ry = root_set(cfg, cfg.unlearning.root_size)
    tuned = plain_finetune(model, rx.to(device), ry.to(device), replace(settings, progress=progress))
    out["baseline_finetune"] = {**_cpu_eval(fed, tuned), "clean_images": len(ry)}
    if retrain:
        out["baseline_retrain_suspects"] = {**_retrain_without(cfg, fed, suspects, progress), "excluded": suspects}
        attackers = sorted(fed.malicious)  # evaluation only: the oracle baseline
        out["baseline_retrain"] = {**_retrain_without(cfg, fed, attackers, progress), "excluded": attackers}
    return out


def _iou(est: TriggerEstimate, fed: Federation) -> float | None:
    v = mask_iou(est.mask.cpu(), fed.trigger.mask)
    return v if math.isfinite(v) else None


def _save_trigger(est: TriggerEstimate, x: torch.Tensor, out: Path, fed: Federation) -> None:
    est = est.to(torch.device("cpu"))
    blank = torch.zeros_like(x[0])
    save_grid(out / "trigger_estimate.png",
              [torch.stack([est.heatmap[None].expand_as(blank), est.mask.float().expand_as(blank),
                            est.stamp(blank), fed.trigger.pattern.expand_as(blank)])])
    write_tensors(out / "trigger_estimate.safetensors",
                  {"mask": est.mask.to(torch.uint8), "pattern": est.stamp(blank), "fill": est.fill,
                   "heatmap": est.heatmap})


def _retrain_without(config: ExperimentConfig, fed: Federation, excluded: list[int], progress: bool) -> dict[str, Any]:
    """Baseline: the same federation and rounds with the ``excluded`` clients never taking part (the
    others, attackers among them, behave as before); scored by ``fed`` (the original federation), so
    ASR uses the original trigger and target."""
    from flsec.fl.engines import train

    data = copy.deepcopy(config.model_dump(mode="json"))
    n = config.training.num_clients
    keep = [c for c in excluded if 0 <= c < n][: n - 1]
    data["training"] = {**data["training"], "exclude_clients": keep}
    data["capture"] = {**data["capture"], "updates": False, "gradient_batch_sizes": [], "clients": []}
    clean_cfg = type(config).model_validate(data)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = train(clean_cfg, Path(tmp) / "retrain", progress=progress)
        model = ckpt.build_model()
    return {**fed.evaluate(model), "rounds": config.training.rounds}
