"""Reconstruction quality: PSNR, SSIM, total variation, label accuracy, trigger recovery.

All images are N x C x H x W tensors in [0, 1].
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from skimage.metrics import structural_similarity


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic TV as in Geiping et al. 2020 (eq. 4 prior): mean |horizontal diffs| + mean |vertical diffs|."""
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    return dx + dy


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB: 10 log10(range^2 / MSE); +inf for identical images."""
    mse = ((x.double() - ref.double()) ** 2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(data_range**2 / mse)


def ssim(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004) from scikit-image, on [0, 1] images, channels averaged."""
    out = []
    side = min(x.shape[-2:])
    win = min(7, side if side % 2 else side - 1)
    for a, b in zip(x.double().numpy(), ref.double().numpy(), strict=True):
        out.append(float(structural_similarity(a, b, data_range=1.0, channel_axis=0, win_size=win)))
    return torch.tensor(out, dtype=torch.float32)


def match(recon: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Order of ``recon`` that best matches ``truth`` (Hungarian assignment on MSE): a batch
    reconstruction recovers a set of images, not their order."""
    cost = ((recon[:, None].double() - truth[None].double()) ** 2).flatten(2).mean(dim=2).numpy()
    rows, cols = linear_sum_assignment(cost)
    order = np.empty(len(cols), dtype=np.int64)
    order[cols] = rows
    return torch.from_numpy(order)


def trigger_correlation(recon: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Pearson correlation between reconstructed and true pixels inside the trigger region, per image."""
    m = mask.expand_as(truth[0]).bool()
    out = []
    for a, b in zip(recon, truth, strict=True):
        va, vb = a[m].double(), b[m].double()
        va, vb = va - va.mean(), vb - vb.mean()
        den = va.norm() * vb.norm()
        out.append(float(va @ vb / den) if den > 0 else float("nan"))
    return torch.tensor(out, dtype=torch.float32)


def score(recon: torch.Tensor, truth: torch.Tensor, labels_hat: torch.Tensor, labels: torch.Tensor,
          poisoned: torch.Tensor | None = None, trigger_mask: torch.Tensor | None = None) -> dict[str, object]:
    """All metrics for one reconstructed batch, after matching reconstructions to the truth."""
    order = match(recon, truth)
    recon = recon[order]
    p, s = psnr(recon, truth), ssim(recon, truth)
    label_acc = _label_accuracy(labels_hat, labels)
    out: dict[str, object] = {
        "psnr": p.tolist(), "ssim": s.tolist(), "mean_psnr": float(p.clamp_max(100).mean()),
        "mean_ssim": float(s.mean()), "label_accuracy": label_acc, "order": order.tolist(),
    }
    if poisoned is not None and trigger_mask is not None and bool(poisoned.any()):
        corr = trigger_correlation(recon[poisoned.bool()], truth[poisoned.bool()], trigger_mask)
        out["trigger_correlation"] = corr.tolist()
        out["mean_trigger_correlation"] = float(corr.nanmean())
    return out


def _label_accuracy(pred: torch.Tensor, true: torch.Tensor) -> float:
    """Multiset accuracy: share of true labels recovered (order-free, as labels of a batch are a set)."""
    pc = torch.bincount(pred.long(), minlength=256)
    tc = torch.bincount(true.long(), minlength=256)
    return float(torch.minimum(pc, tc).sum()) / max(len(true), 1)
