"""Main-task accuracy and attack success rate (DESIGN.md definitions)."""

from __future__ import annotations

import torch
from torch import nn

from flsec.attacks.backdoor import Trigger, stamp


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    model.eval()
    return torch.cat([model(xb).argmax(dim=1) for xb in x.split(batch_size)]) if len(x) else torch.empty(0, dtype=torch.long)


def main_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """MA: accuracy on the clean held-out test set."""
    return float((predict(model, x) == y).float().mean())


def backdoor_asr(model: nn.Module, x: torch.Tensor, y: torch.Tensor, trigger: Trigger, target: int) -> float:
    """ASR: share of test images whose true label is not ``target`` that, stamped with the trigger,
    are classified as ``target``."""
    keep = y != target
    if not keep.any():
        return float("nan")
    return float((predict(model, stamp(x[keep], trigger)) == target).float().mean())


def label_flip_asr(model: nn.Module, x: torch.Tensor, y: torch.Tensor, source: int, target: int) -> float:
    """Label flipping: share of source-class test images classified as the target class."""
    keep = y == source
    if not keep.any():
        return float("nan")
    return float((predict(model, x[keep]) == target).float().mean())
