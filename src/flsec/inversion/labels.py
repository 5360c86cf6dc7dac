"""Label inference from a shared gradient.

* Batch of 1 (iDLG, Zhao et al. 2020): with cross-entropy, the output-layer bias gradient is
  p - onehot(y); only the true class has a negative entry, so y = argmin of that gradient.
* Batch of B (label-count heuristic; Wainakh et al. 2022 "LLG", Geiping's breaching "bias-corrected"
  strategy): for the mean loss, grad_b = mean_n p_n - counts / B, so counts = B (p_bar - grad_b).
  p_bar is estimated from the model's softmax on random inputs; counts are rounded by largest
  remainder so they sum to B.
"""

from __future__ import annotations

import torch
from torch import nn


def idlg_label(bias_grad: torch.Tensor) -> int:
    return int(torch.argmin(bias_grad))


@torch.no_grad()
def mean_softmax_on_noise(model: nn.Module, image_shape: tuple[int, ...], samples: int = 64,
                          seed: int = 0) -> torch.Tensor:
    """The model's mean softmax over uniform-noise images of shape C x H x W (the p_bar estimate)."""
    g = torch.Generator().manual_seed(seed)
    model.eval()
    x = torch.rand((samples, *image_shape), generator=g)
    return torch.softmax(model(x), dim=1).mean(dim=0)


def label_counts(bias_grad: torch.Tensor, batch_size: int, p_bar: torch.Tensor) -> torch.Tensor:
    """Estimated number of samples of each class in the batch (sums to ``batch_size``).

    A class whose bias gradient is negative must be present (p_bar >= 0), so each such class gets
    one sample first (most negative first); the rest follows the estimated counts by largest remainder.
    """
    counts = torch.zeros_like(bias_grad, dtype=torch.long)
    for i in torch.argsort(bias_grad)[:batch_size]:
        if bias_grad[i] < 0:
            counts[i] = 1
    left = batch_size - int(counts.sum())
    if left == 0:
        return counts
    est = (batch_size * (p_bar - bias_grad)).clamp_min(0.0) - counts
    est = est.clamp_min(0.0)
    if est.sum() <= 0:
        est = torch.ones_like(est)
    est = est * left / est.sum()
    extra = est.floor().long()
    remainder = est - extra
    for i in torch.argsort(remainder, descending=True)[: left - int(extra.sum())]:
        extra[i] += 1
    return counts + extra


def infer_labels(model: nn.Module, bias_grad: torch.Tensor, batch_size: int,
                 image_shape: tuple[int, ...]) -> torch.Tensor:
    """Labels of a batch from its output-layer bias gradient (iDLG for B = 1)."""
    if batch_size == 1:
        return torch.tensor([idlg_label(bias_grad)])
    counts = label_counts(bias_grad, batch_size, mean_softmax_on_noise(model, image_shape))
    return torch.repeat_interleave(torch.arange(len(counts)), counts)
