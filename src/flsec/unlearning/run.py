"""``flsec unlearn``: verification, corrective unlearning, baselines and the repaired checkpoint.

What the defender is assumed to hold: the global model of the checkpoint and the reconstructions
written by ``flsec invert`` (images and inferred labels). Nothing else: no clean data, no
knowledge of the attackers, the target class or the trigger. The *evaluation* (MA, ASR, mask IoU)
uses the test set and the true trigger, which the defender never sees. The plain fine-tuning
baseline is given as many real clean images as there are reconstructions.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from flsec.config import ExperimentConfig, UnlearningConfig
from flsec.errors import FlsecError
from flsec.fl.checkpoint import RunWriter, load_checkpoint
from flsec.fl.federation import Federation
from flsec.inversion.attack import read_reconstructions
from flsec.inversion.images import save_grid
from flsec.io import write_json, write_tensors
from flsec.unlearning.finetune import FinetuneSettings, corrective_unlearning, plain_finetune
from flsec.unlearning.verify import TriggerEstimate, mask_iou, verify


def settings_from(cfg: UnlearningConfig, seed: int, progress: bool) -> FinetuneSettings:
    return FinetuneSettings(cfg.steps, cfg.batch_size, cfg.lr, cfg.retention_weight, cfg.augment_shift,
                            cfg.augment_noise, seed, progress)


def run_unlearning(checkpoint: Path, images: Path, out: Path, settings: FinetuneSettings | None = None,
                   baselines: bool = True, progress: bool = True) -> dict[str, Any]:
    ckpt = load_checkpoint(checkpoint)
    settings = settings or settings_from(ckpt.config.unlearning, ckpt.config.seed, progress)
    rec = read_reconstructions(images)
    x, y = rec["images"], rec["labels"]
    spec = ckpt.input_spec()
    if tuple(x.shape[1:]) != (spec.channels, spec.height, spec.width):
        raise FlsecError(f"--images: reconstructions are {tuple(x.shape[1:])}, the model expects "
                         f"{(spec.channels, spec.height, spec.width)}: they come from another run")
    model = ckpt.build_model()
    fed = Federation.from_config(ckpt.config)  # evaluation only (test set, true trigger)

    ver = verify(model, x, y)
    result: dict[str, Any] = {"checkpoint": str(checkpoint), "images": str(images), "verification": ver.report,
                              "settings": asdict(settings),
                              "defender_holds": "the global model and the reconstructions only"}
    before = fed.evaluate(model)
    result["before"] = before
    result["verification"]["true_target"] = ckpt.config.attack.target_label
    est = ver.estimate
    if est is None:
        # Nothing to unlearn from these reconstructions: the model is kept as it is.
        result["verification"]["mask_iou_with_true_trigger"] = float("nan")
        result["after"] = before
        result["unlearned"] = False
        repaired = model
    else:
        result["verification"]["mask_iou_with_true_trigger"] = mask_iou(est.mask, fed.trigger.mask)
        result["unlearned"] = True
        repaired = _unlearn(model, x, est, out, fed, settings)
        result["after"] = fed.evaluate(repaired)

    if baselines:
        n = len(x)
        g = torch.Generator().manual_seed(settings.seed)
        idx = torch.randperm(len(fed.data.y_train), generator=g)[:n]
        tuned = plain_finetune(model, fed.data.x_train[idx], fed.data.y_train[idx],
                               replace(settings, progress=progress))
        result["baseline_finetune"] = {**fed.evaluate(tuned), "clean_images": n}
        result["baseline_retrain"] = _retrain_without_attackers(ckpt.config, fed, progress)

    writer = RunWriter(out / "checkpoint", ckpt.config)
    history = [*ckpt.history, {"round": ckpt.round, "phase": "unlearning", **result["after"]}]
    writer.commit_round(ckpt.round, repaired, {}, history,
                        {"input_spec": ckpt.meta["input_spec"], "malicious_ids": ckpt.meta.get("malicious_ids", []),
                         "unlearned_from": str(checkpoint), "unlearning": {"before": before, "after": result["after"]}},
                        complete=True)
    write_json(out / "metrics.json", result)
    return result


def _unlearn(model: torch.nn.Module, x: torch.Tensor, est: TriggerEstimate, out: Path, fed: Federation,
             settings: FinetuneSettings) -> torch.nn.Module:
    blank = torch.zeros_like(x[0])
    save_grid(out / "trigger_estimate.png",
              [torch.stack([est.heatmap[None].expand_as(blank), est.mask.float().expand_as(blank),
                            est.stamp(blank), fed.trigger.pattern.expand_as(blank)])])
    write_tensors(out / "trigger_estimate.safetensors",
                  {"mask": est.mask.to(torch.uint8), "pattern": est.stamp(blank), "fill": est.fill,
                   "heatmap": est.heatmap})
    return corrective_unlearning(model, x, est, settings)


def _retrain_without_attackers(config: ExperimentConfig, fed: Federation, progress: bool) -> dict[str, Any]:
    """Baseline: the same federation and rounds with the attackers' participation removed; scored by
    ``fed`` (the original federation), so ASR uses the original trigger and target."""
    from flsec.fl.server import train

    data = copy.deepcopy(config.model_dump(mode="json"))
    data["attack"] = {**data["attack"], "kind": "none", "num_malicious": 0, "malicious_ids": None}
    data["capture"] = {**data["capture"], "updates": False, "gradient_batch_sizes": [], "clients": []}
    data["aggregation"] = {**data["aggregation"], "f": 0}
    clean_cfg = type(config).model_validate(data)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = train(clean_cfg, Path(tmp) / "retrain", progress=progress)
        model = ckpt.build_model()
    return {**fed.evaluate(model), "rounds": config.training.rounds}
