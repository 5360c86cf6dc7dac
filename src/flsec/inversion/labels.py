"""Label inference from a shared gradient or update (the output-layer bias).

* Batch of 1 (iDLG, Zhao et al. 2020): with cross-entropy, the output-layer bias gradient is
  p - onehot(y); only the true class has a negative entry, so y = argmin of that gradient.
* ``llg`` (label-count heuristic; Wainakh et al. 2022 "LLG"): for the mean loss,
  grad_b = mean_n p_n - counts / B, so counts = B (p_bar - grad_b). p_bar is estimated from the
  model's softmax on random inputs; counts are rounded by largest remainder so they sum to B.
  Needs the gradient at its true scale (a boosted update must be divided by its boost first).
  For a multi-step update, p_bar is averaged along the client's path
  (:func:`mean_softmax_along_update`), which accounts for the model fitting the client's labels
  during the local epoch.
* ``bias-corrected`` (breaching's ``label_strategy = "bias-corrected"``, Geiping et al.): every
  class with a negative bias gradient is present once; the "impact" of one sample is
  m = (sum of the negative entries) / B; the remaining labels are drawn greedily from the most
  negative entry, each draw raising that entry by |m|. Invariant to the gradient's scale, so it
  needs neither the boost factor nor the momentum multiplier of a FedAvg update.
"""

from __future__ import annotations

import torch
from torch import nn

LABEL_STRATEGIES = ("llg", "bias-corrected")


def idlg_label(bias_grad: torch.Tensor) -> int:
    return int(torch.argmin(bias_grad))


@torch.no_grad()
def mean_softmax_on_noise(model: nn.Module, image_shape: tuple[int, ...], samples: int = 64,
                          seed: int = 0) -> torch.Tensor:
    """The model's mean softmax over uniform-noise images of shape C x H x W (the p_bar estimate)."""
    g = torch.Generator().manual_seed(seed)
    model.eval()
    device = next(model.parameters()).device
    x = torch.rand((samples, *image_shape), generator=g).to(device)
    return torch.softmax(model(x), dim=1).mean(dim=0)


@torch.no_grad()
def mean_softmax_along_update(model: nn.Module, update: torch.Tensor, image_shape: tuple[int, ...],
                              points: int = 5) -> torch.Tensor:
    """p_bar averaged over the client's path: the mean softmax on noise (:func:`mean_softmax_on_noise`)
    at ``points`` models evenly spaced on the straight line from the global weights to the weights
    the client ended at (global + ``update``, the update with its boost undone).

    First-order label counting reads the update as T steps of one mean gradient p_bar - counts / N
    taken at the global model; but during a local epoch the model fits the client's labels, so its
    softmax drifts towards them and the later steps' bias gradients shrink. Averaging p_bar along
    the path (trapezoid-free mean of ``points`` samples) puts that drift into the estimate."""
    from flsec.fl.params import get_flat, set_flat

    start = get_flat(model)
    try:
        out = []
        for a in torch.linspace(0.0, 1.0, points).tolist():
            set_flat(model, start + a * update.to(start.device))
            out.append(mean_softmax_on_noise(model, image_shape))
    finally:
        set_flat(model, start)
    return torch.stack(out).mean(dim=0)


def label_counts(bias_grad: torch.Tensor, batch_size: int, p_bar: torch.Tensor) -> torch.Tensor:
    """``llg``: estimated number of samples of each class in the batch (sums to ``batch_size``).

    A class whose bias gradient is negative must be present (p_bar >= 0), so each such class gets
    one sample first (most negative first); the rest follows the estimated counts by largest remainder.
    """
    bias_grad, p_bar = bias_grad.detach().double().cpu(), p_bar.detach().double().cpu()
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
    return counts + largest_remainder(est, left)


def bias_corrected_counts(bias_grad: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``bias-corrected``: scale-invariant greedy label counts (see the module docstring)."""
    g = bias_grad.detach().double().cpu().clone()
    counts = torch.zeros_like(g, dtype=torch.long)
    negative = torch.argsort(g)[: batch_size]
    negative = negative[g[negative] < 0]
    if len(negative) == 0:  # degenerate (e.g. all-zero gradient): nothing to go by
        return largest_remainder(torch.ones_like(g), batch_size)
    counts[negative] = 1
    impact = float(g[negative].sum()) / batch_size  # < 0
    g[negative] -= impact
    for _ in range(batch_size - len(negative)):
        i = int(torch.argmin(g))
        counts[i] += 1
        g[i] -= impact
    return counts


def largest_remainder(weights: torch.Tensor, total: int) -> torch.Tensor:
    """Integers proportional to non-negative ``weights`` that sum to ``total`` (Hamilton's method)."""
    w = weights.detach().double().cpu().clamp_min(0.0)
    if float(w.sum()) <= 0.0:
        w = torch.ones_like(w)
    est = w * total / w.sum()
    out = est.floor().long()
    for i in torch.argsort(est - out, descending=True)[: total - int(out.sum())]:
        out[i] += 1
    return out


def counts_to_labels(counts: torch.Tensor) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(counts)), counts.cpu())


def infer_counts(model: nn.Module, bias_grad: torch.Tensor, num_samples: int, image_shape: tuple[int, ...],
                 strategy: str = "llg", p_bar: torch.Tensor | None = None) -> torch.Tensor:
    """Label counts of the ``num_samples`` images behind an output-bias gradient (iDLG for one image).
    ``p_bar`` (llg): the mean softmax to use (default: the model's, on noise)."""
    bias_grad = bias_grad.detach().cpu()
    if num_samples == 1:
        counts = torch.zeros(len(bias_grad), dtype=torch.long)
        counts[idlg_label(bias_grad)] = 1
        return counts
    if strategy == "llg":
        if p_bar is None:
            p_bar = mean_softmax_on_noise(model, image_shape)
        return label_counts(bias_grad, num_samples, p_bar.cpu())
    if strategy == "bias-corrected":
        return bias_corrected_counts(bias_grad, num_samples)
    raise ValueError(f"label strategy: unknown '{strategy}'; allowed: {', '.join(LABEL_STRATEGIES)}")


def infer_labels(model: nn.Module, bias_grad: torch.Tensor, batch_size: int,
                 image_shape: tuple[int, ...], strategy: str = "llg") -> torch.Tensor:
    """Labels of a batch from its output-layer bias gradient (iDLG for B = 1), sorted."""
    return counts_to_labels(infer_counts(model, bias_grad, batch_size, image_shape, strategy))


def candidate_labels(counts: torch.Tensor, images: int) -> torch.Tensor:
    """Labels of ``images`` candidates standing for a client whose label counts are ``counts``:
    all of them when there are as many candidates as images, otherwise a proportional share
    (largest remainder), so that the surrogate replay sees the client's label mix."""
    if images == int(counts.sum()):
        return counts_to_labels(counts)
    return counts_to_labels(largest_remainder(counts.double(), images))
