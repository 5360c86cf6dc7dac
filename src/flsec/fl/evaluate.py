"""Main-task accuracy and attack success rate (DESIGN.md definitions).

Every function runs its forward passes on the model's device in small batches; the federation moves
its test set to that device once (:meth:`flsec.fl.federation.Federation.test_set`) and each attack
measures its own success on it (:meth:`flsec.attacks.base.Attack.evaluate`).
"""

from __future__ import annotations

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


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
