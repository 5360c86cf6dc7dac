"""Main-task accuracy and attack success rate (DESIGN.md definitions).

A federation evaluates the global model every round on the same images, so :class:`TestSets` builds
the clean test set and the attack set (triggered non-target images, or the source class under label
flipping) once, on the device the model lives on, and :func:`evaluate` only runs forward passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from flsec.attacks.backdoor import Trigger, stamp

# Images per forward pass when evaluating: small batches keep a CNN's activations in the CPU's caches
# (64 is ~1.5-2x faster per image than 1000 for the MNIST CNN on CPU); a GPU wants large ones.
CPU_EVAL_BATCH, GPU_EVAL_BATCH = 64, 2048


@torch.inference_mode()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """Predicted classes of ``x`` (on the model's device), ``batch_size`` images per forward pass
    (default by device: ``CPU_EVAL_BATCH`` or ``GPU_EVAL_BATCH``)."""
    model.eval()
    if not len(x):
        return torch.empty(0, dtype=torch.long)
    device = next(model.parameters()).device
    size = batch_size or (CPU_EVAL_BATCH if device.type == "cpu" else GPU_EVAL_BATCH)
    return torch.cat([model(xb.to(device, non_blocking=True)).argmax(dim=1) for xb in x.split(size)])


def main_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """MA: accuracy on the clean held-out test set."""
    return float((predict(model, x) == y.to(_device(model))).float().mean())


def backdoor_asr(model: nn.Module, x: torch.Tensor, y: torch.Tensor, trigger: Trigger, target: int) -> float:
    """ASR: share of test images whose true label is not ``target`` that, stamped with the trigger,
    are classified as ``target``."""
    return target_rate(model, backdoor_attack_set(x, y, trigger, target), target)


def label_flip_asr(model: nn.Module, x: torch.Tensor, y: torch.Tensor, source: int, target: int) -> float:
    """Label flipping: share of source-class test images classified as the target class."""
    return target_rate(model, x[y == source], target)


def backdoor_attack_set(x: torch.Tensor, y: torch.Tensor, trigger: Trigger, target: int) -> torch.Tensor:
    """The images backdoor ASR is measured on: every non-target test image, stamped."""
    keep = y != target
    return stamp(x[keep], Trigger(trigger.mask.to(x.device), trigger.pattern.to(x.device)))


def target_rate(model: nn.Module, x: torch.Tensor, target: int) -> float:
    """Share of ``x`` classified as ``target`` (NaN for no images)."""
    if not len(x):
        return float("nan")
    return float((predict(model, x) == target).float().mean())


@dataclass(frozen=True)
class TestSets:
    """The clean test set (``x``, ``y``) and the attack set whose share classified as ``target`` is the ASR."""

    x: torch.Tensor
    y: torch.Tensor
    x_attack: torch.Tensor
    target: int

    def to(self, device: torch.device) -> TestSets:
        return TestSets(self.x.to(device), self.y.to(device), self.x_attack.to(device), self.target)


def evaluate(model: nn.Module, sets: TestSets) -> dict[str, float]:
    """``{"ma", "asr"}`` of ``model`` on prepared test sets."""
    return {"ma": main_accuracy(model, sets.x, sets.y), "asr": target_rate(model, sets.x_attack, sets.target)}


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
