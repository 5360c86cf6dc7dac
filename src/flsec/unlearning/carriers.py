"""Carriers: the images the estimated trigger is stamped on while the backdoor is unlearned.

* ``reconstructions``: what phase 2 recovered from the inverted updates (nothing else held);
* ``root``: a clean set of ``root_size`` training images the server holds (FLTrust's assumption, Cao
  et al. 2021: the same seeded draw as its root set, so with both on the server holds one set);
* ``synthetic``: no data at all: images synthesised from the global model
  (:mod:`flsec.unlearning.synthesis`), labelled by it.

Whatever the carriers, unlearning distils the pre-unlearning model's outputs on the untriggered
carriers (:func:`flsec.unlearning.finetune.corrective_unlearning`), and :func:`describe` states
exactly what the defender held.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from flsec.config import ExperimentConfig, SyntheticCarriersConfig
from flsec.data import load_dataset
from flsec.fl.federation import root_indices
from flsec.unlearning.synthesis import SynthesisSettings, has_feature_statistics, synthesise

CARRIERS = ("reconstructions", "root", "synthetic")


@dataclass
class Carriers:
    kind: str
    images: torch.Tensor  # N x C x H x W in [0, 1], on the CPU
    labels: torch.Tensor  # N: true labels (root), the model's (synthetic) or inferred ones (reconstructions)
    clean_images: int  # real clean images the defender holds
    how: str
    details: dict[str, Any] = field(default_factory=dict)


def synthesis_settings(cfg: SyntheticCarriersConfig, seed: int, progress: bool) -> SynthesisSettings:
    return SynthesisSettings(cfg.per_class, cfg.steps, cfg.lr, cfg.tv_weight, cfg.l2_weight, cfg.jitter, cfg.bn_weight,
                             seed, progress)


def root_set(config: ExperimentConfig, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The server's clean root images and labels: the first ``size`` of FLTrust's seeded draw from the
    run's training split (:func:`flsec.fl.federation.root_indices`)."""
    data = load_dataset(config.data.name, config.data.data_dir, config.data.download)
    data = data.subset(config.data.train_size, config.data.test_size, config.seed)
    idx = root_indices(len(data.y_train), size, config.seed)
    return data.x_train[idx], data.y_train[idx]


def build_carriers(kind: str, config: ExperimentConfig, model: nn.Module, reconstructions: torch.Tensor,
                   labels: torch.Tensor, progress: bool = False) -> Carriers:
    """The carriers of ``kind`` (see the module docstring) for the run of ``config`` and its global ``model``."""
    if kind == "reconstructions":
        return Carriers(kind, reconstructions, labels, 0, f"the {len(reconstructions)} reconstructions")
    if kind == "root":
        size = config.unlearning.root_size
        x, y = root_set(config, size)
        with_labels = config.unlearning.root_labels == "true"
        return Carriers(kind, x, y, len(y), f"{len(y)} clean training images held by the server (FLTrust's root set "
                        f"assumption), {'with their labels' if with_labels else 'labelled by the model'}",
                        {"root_size": size, "root_labels": config.unlearning.root_labels})
    if kind == "synthetic":
        s = synthesis_settings(config.unlearning.synthetic, config.seed, progress)
        shape = tuple(reconstructions.shape[1:])
        num_classes = int(model(reconstructions[:1].to(next(model.parameters()).device)).shape[1])
        x, y = synthesise(model, shape, num_classes, s)  # type: ignore[arg-type]
        stats = has_feature_statistics(model)
        how = (f"{len(y)} images synthesised from the global model ({s.per_class} per class, {s.steps} steps of model "
               f"inversion with TV and L2 priors{' and batch-norm statistics' if stats else ''}), labelled by it")
        agree = float((y == torch.arange(num_classes).repeat_interleave(s.per_class)).float().mean())
        return Carriers(kind, x, y, 0, how, {"per_class": s.per_class, "steps": s.steps, "feature_statistics": stats,
                                             "reached_class": agree})
    raise ValueError(f"unlearning.carriers: unknown '{kind}'; allowed: {', '.join(CARRIERS)}")
