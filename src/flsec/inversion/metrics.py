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
    """For each reconstruction, the index of the true image it is matched to (Hungarian assignment
    on MSE, scipy's ``linear_sum_assignment``): a batch reconstruction recovers a set of images, not
    their order. With fewer reconstructions than true images (k < N, a surrogate replay of a large
    update), each reconstruction gets a distinct true image and N - k true images stay unmatched."""
    if len(recon) > len(truth):
        raise ValueError(f"match: {len(recon)} reconstructions but only {len(truth)} true images")
    cost = ((recon[:, None].double().cpu() - truth[None].double().cpu()) ** 2).flatten(2).mean(dim=2).numpy()
    rows, cols = linear_sum_assignment(cost)
    assigned = np.empty(len(rows), dtype=np.int64)
    assigned[rows] = cols
    return torch.from_numpy(assigned)


def distribution(values: list[float]) -> dict[str, float | None]:
    """mean, median, best, worst of finite values (None when there are none)."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if len(v) == 0:
        return {"mean": None, "median": None, "best": None, "worst": None}
    return {"mean": float(v.mean()), "median": float(np.median(v)), "best": float(v.max()), "worst": float(v.min())}


PSNR_CAP = 100.0  # dB; identical images have infinite PSNR


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
          poisoned: torch.Tensor | None = None, trigger_mask: torch.Tensor | None = None,
          candidate_labels: torch.Tensor | None = None) -> dict[str, object]:
    """All metrics for one reconstructed batch or update, after matching reconstructions to the truth.

    ``labels_hat`` are the inferred labels of all N images (their multiset is scored against
    ``labels``); ``candidate_labels`` (default ``labels_hat``) are the labels the k
    reconstructions were given, scored against the label of the true image each is matched to.
    ``assigned[i]`` is the true image matched to reconstruction i; PSNR is capped at
    ``PSNR_CAP`` so that the distributions stay finite."""
    recon, truth = recon.detach().cpu(), truth.detach().cpu()
    assigned = match(recon, truth)
    matched = truth[assigned]
    p = psnr(recon, matched).clamp_max(PSNR_CAP)
    s = ssim(recon, matched)
    cand = labels_hat if candidate_labels is None else candidate_labels
    if len(cand) != len(recon):
        raise ValueError(f"score: {len(recon)} reconstructions but {len(cand)} candidate labels")
    out: dict[str, object] = {
        "psnr": p.tolist(), "ssim": s.tolist(), "assigned": assigned.tolist(),
        "psnr_stats": distribution(p.tolist()), "ssim_stats": distribution(s.tolist()),
        "mean_psnr": float(p.mean()), "mean_ssim": float(s.mean()),
        "label_accuracy": _label_accuracy(labels_hat.cpu(), labels.cpu()),
        "matched_label_accuracy": float((cand.cpu() == labels.cpu()[assigned]).float().mean()),
        "reconstructed": len(recon), "true_images": len(truth),
    }
    if poisoned is not None and trigger_mask is not None:
        hit = poisoned.cpu().bool()[assigned]
        out["matched_poisoned"] = int(hit.sum())
        if bool(hit.any()):
            corr = trigger_correlation(recon[hit], matched[hit], trigger_mask.cpu())
            out["trigger_correlation"] = [None if c != c else float(c) for c in corr.tolist()]
            out["mean_trigger_correlation"] = None if bool(corr.isnan().all()) else float(corr.nanmean())
    return out


def _label_accuracy(pred: torch.Tensor, true: torch.Tensor) -> float:
    """Multiset accuracy: share of true labels recovered (order-free, as labels of a batch are a set)."""
    pc = torch.bincount(pred.long(), minlength=256)
    tc = torch.bincount(true.long(), minlength=256)
    return float(torch.minimum(pc, tc).sum()) / max(len(true), 1)
