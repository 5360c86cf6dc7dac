"""Corrective unlearning by fine-tuning, and the plain fine-tuning baseline.

Corrective unlearning (in the spirit of Neural Cleanse's unlearning step, Wang et al. 2019, here
with a trigger estimated from gradient-inversion reconstructions): the model is fine-tuned so
that reconstructions *stamped with the estimated trigger* give the output the original model
gives on the clean reconstruction, while a distillation term (Hinton et al. 2015) towards the
original model on the clean reconstructions retains the main task:

    L = [KL(f_orig(aug(x)) || f(stamp(aug(x)))) + lambda * KL(f_orig(aug(x)) || f(aug(x)))] / (1 + lambda)

where x are the carriers (:mod:`flsec.unlearning.carriers`: reconstructions, a clean root set or
synthesised images) with the trigger region filled by their clean reference. Matching the whole
output distribution (rather than a hard label) keeps the clean class and its uncertainty. The
With a labelled root set (``unlearning.root_labels = "true"``, the default for root carriers) the
target of both terms is the true one-hot label instead of f_orig's output (Neural Cleanse's own
unlearning step, Wang et al. 2019 Sec. VI-C). The
division by 1 + lambda makes lambda (``retention_weight``, default 3) the balance of the two terms
without changing the step size: unnormalised, lambda = 10 at lr 0.01 threw a 98%-accurate MNIST
model to 9% (benchmarks/results/unlearning_realistic.md).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from flsec.unlearning.verify import TriggerEstimate


@dataclass(frozen=True)
class FinetuneSettings:
    steps: int = 300
    batch_size: int = 32
    lr: float = 0.01
    retention_weight: float = 3.0
    shift: int = 2
    noise: float = 0.05
    seed: int = 0
    progress: bool = True


def augment(x: torch.Tensor, g: torch.Generator, shift: int, noise: float) -> torch.Tensor:
    """Random translation (zero padding, up to ``shift`` px) and Gaussian pixel noise, clipped to [0, 1]."""
    if shift > 0:
        n, _, h, w = x.shape
        padded = F.pad(x, (shift, shift, shift, shift))
        dy = torch.randint(0, 2 * shift + 1, (n,), generator=g).tolist()
        dx = torch.randint(0, 2 * shift + 1, (n,), generator=g).tolist()
        x = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    if noise > 0:
        x = x + noise * torch.randn(x.shape, generator=g).to(x.device)
    return x.clamp(0.0, 1.0)


def _loop(model: nn.Module, s: FinetuneSettings, desc: str,
          loss_fn: Callable[[nn.Module, torch.Generator], torch.Tensor]) -> nn.Module:
    student = copy.deepcopy(model)
    student.train()
    opt = torch.optim.SGD(student.parameters(), lr=s.lr, momentum=0.9)
    g = torch.Generator().manual_seed(s.seed)
    for _ in tqdm(range(s.steps), desc=desc, disable=not s.progress, dynamic_ncols=True):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(student, g)
        loss.backward()
        opt.step()
    student.eval()
    return student


def corrective_unlearning(model: nn.Module, images: torch.Tensor, estimate: TriggerEstimate,
                          s: FinetuneSettings, labels: torch.Tensor | None = None) -> nn.Module:
    """Fine-tune a copy of ``model`` on the carriers (see the module docstring).

    With ``labels`` (a labelled clean root set), both terms take the one-hot true label as their
    target instead of the teacher's output, so the KL terms become cross-entropies: Neural Cleanse's
    own unlearning step (Wang et al. 2019, Sec. VI-C: stamped clean images with their correct
    labels). The translation of :func:`augment` is then off, as in :func:`plain_finetune`: a hard
    label on a shifted small image teaches the shift."""
    teacher = copy.deepcopy(model).eval()
    estimate = estimate.to(images.device)
    clean = estimate.remove(images)
    shift = s.shift if labels is None else 0
    onehot = None if labels is None else F.one_hot(labels.long(), _classes(teacher, images)).float().to(images.device)

    def loss_fn(student: nn.Module, g: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, len(clean), (s.batch_size,), generator=g).to(images.device)
        xb = augment(clean[idx], g, shift, s.noise)
        if onehot is not None:
            soft = onehot[idx]
        else:
            with torch.no_grad():
                soft = torch.softmax(teacher(xb), dim=1)
        both = F.log_softmax(student(torch.cat([estimate.stamp(xb), xb])), dim=1)
        unlearn = F.kl_div(both[: len(xb)], soft, reduction="batchmean")
        retain = F.kl_div(both[len(xb) :], soft, reduction="batchmean")
        return (unlearn + s.retention_weight * retain) / (1.0 + s.retention_weight)

    return _loop(model, s, "unlearn", loss_fn)


def _classes(model: nn.Module, images: torch.Tensor) -> int:
    with torch.no_grad():
        return int(model(images[:1]).shape[1])


def plain_finetune(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, s: FinetuneSettings) -> nn.Module:
    """Baseline: the same budget of steps on real clean images with their true labels, no trigger knowledge.

    Only the pixel noise of :func:`augment` is used: cross-entropy on a few dozen shifted images
    teaches small-image models the shifted digits instead (on 8x8 digits a 1-pixel shift drops MA
    from 97% to 58%), which would make the baseline look worse than plain fine-tuning is."""

    def loss_fn(student: nn.Module, g: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, len(images), (s.batch_size,), generator=g).to(images.device)
        return F.cross_entropy(student(augment(images[idx], g, 0, s.noise)), labels[idx])

    return _loop(model, s, "fine-tune baseline", loss_fn)
