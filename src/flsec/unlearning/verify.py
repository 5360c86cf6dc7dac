"""Verification: do the reconstructions trigger the backdoor, and where is the trigger?

The defender holds the global model and the reconstructed images (with their inferred labels).
1. A backdoored prediction hangs on a small, *universal* region. For each reconstruction: its
   fragility is the largest drop of its predicted-class probability when a small window is
   occluded (Zeiler & Fergus 2014); its universality is the share of the other reconstructions
   that flip to its class when the region around that window is pasted onto them. Suspects have
   both >= 0.5; the suspected target is their most common predicted class.
2. Trigger localisation: the mask is the region the universality test pasted (around the
   suspects' common decisive centre), trimmed of border rows/columns where the suspects do not
   differ from the clean reference (the non-suspect reconstructions, or the suspects' typical
   background if there are none): what the suspects share that clean images lack. The pattern is
   the suspects' mean inside the mask. A heat map (distinctness x occlusion drop) is kept for display.
3. Response: the share of suspects still predicted as the target once the mask is filled with the
   reference values, and the share of clean reconstructions flipped to the target by stamping the
   estimated trigger.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from flsec.fl.evaluate import predict


@dataclass
class TriggerEstimate:
    mask: torch.Tensor  # 1 x H x W bool
    pattern: torch.Tensor  # C x H x W (values inside the mask)
    fill: torch.Tensor  # C x H x W: what a clean image looks like there (reference mean)
    heatmap: torch.Tensor  # H x W, in [0, 1]

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(self.mask, self.pattern, x)

    def remove(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(self.mask, self.fill, x)

    def to(self, device: torch.device) -> TriggerEstimate:
        return TriggerEstimate(self.mask.to(device), self.pattern.to(device), self.fill.to(device),
                               self.heatmap.to(device))


@torch.no_grad()
def occlusion_drops(model: nn.Module, x: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each image and pixel: the drop of the probability of the image's predicted class when a
    ``window`` x ``window`` square centred there is set to 0 (Zeiler & Fergus 2014). Returns
    (drops N x H x W, predictions N)."""
    model.eval()
    n, _, h, w = x.shape
    probs0 = torch.softmax(model(x), dim=1)
    pred = probs0.argmax(dim=1)
    base = probs0.gather(1, pred[:, None])[:, 0]
    drops = torch.zeros(n, h, w, device=x.device)
    r = window // 2
    for i in range(h):
        batch = []
        for j in range(w):
            occluded = x.clone()
            occluded[:, :, max(0, i - r) : i - r + window, max(0, j - r) : j - r + window] = 0.0
            batch.append(occluded)
        probs = torch.softmax(model(torch.cat(batch)), dim=1).view(w, n, -1)
        drops[:, i, :] = (base[None, :] - probs.gather(2, pred[None, :, None].expand(w, n, 1))[..., 0]).T
    return drops.clamp_min(0.0), pred


def _normalise(t: torch.Tensor) -> torch.Tensor:
    t = t - t.min()
    return t / t.max() if t.max() > 0 else t


def box_origin(centre: tuple[int, int], box: int, h: int, w: int) -> tuple[int, int]:
    """Top-left corner of the ``box`` x ``box`` square centred on ``centre``, shifted to lie inside H x W."""
    half = box // 2
    return min(max(0, centre[0] - half), max(0, h - box)), min(max(0, centre[1] - half), max(0, w - box))


def estimate_trigger(suspects: torch.Tensor, looked_at: torch.Tensor, reference: torch.Tensor | None,
                     centre: tuple[int, int], box: int, margin: float = 0.1) -> TriggerEstimate:
    """The trigger shared by the suspect reconstructions (see the module docstring).

    The mask starts as the ``box`` x ``box`` square around the suspects' decisive centre (the region
    the universality test pasted) and is trimmed of border rows and columns where the suspects do
    not differ from the clean reference by more than ``margin``. ``looked_at`` (their mean
    occlusion drop) and the suspects' distinctness from the reference form the displayed heat map.
    """
    _, c, h, w = suspects.shape
    if reference is not None and len(reference) > 0:
        ref_mean = reference.mean(dim=0)
    else:
        ref_mean = suspects.median(dim=0).values.median(dim=-1, keepdim=True).values.expand(c, h, w)
    mean = suspects.mean(dim=0)
    distinct = ((mean - ref_mean).abs() / (suspects.std(dim=0, unbiased=False) + 0.05)).mean(dim=0)
    heat = _normalise(_normalise(distinct) * _normalise(looked_at))
    r0, c0 = box_origin(centre, box, h, w)
    r1, c1 = r0 + box, c0 + box
    differs = (mean - ref_mean).abs().amax(dim=0) > margin
    while r1 - r0 > 1 and not differs[r0, c0:c1].any():
        r0 += 1
    while r1 - r0 > 1 and not differs[r1 - 1, c0:c1].any():
        r1 -= 1
    while c1 - c0 > 1 and not differs[r0:r1, c0].any():
        c0 += 1
    while c1 - c0 > 1 and not differs[r0:r1, c1 - 1].any():
        c1 -= 1
    mask = torch.zeros(1, h, w, dtype=torch.bool, device=suspects.device)
    mask[0, r0:r1, c0:c1] = True
    pattern = torch.where(mask, mean, 0.0)
    return TriggerEstimate(mask, pattern, ref_mean, heat)


@dataclass
class Verification:
    target: int | None
    suspects: torch.Tensor  # bool over reconstructions
    estimate: TriggerEstimate | None
    report: dict[str, object]


def decisive_centres(drops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, the centroid (rounded) of the pixels whose occlusion drop is at least half its maximum."""
    _n, h, w = drops.shape
    peak = drops.flatten(1).max(dim=1).values.clamp_min(1e-12)
    weight = (drops >= 0.5 * peak[:, None, None]).float()
    ys = torch.arange(h, dtype=torch.float32, device=drops.device)[None, :, None]
    xs = torch.arange(w, dtype=torch.float32, device=drops.device)[None, None, :]
    total = weight.sum(dim=(1, 2)).clamp_min(1.0)
    rows = ((weight * ys).sum(dim=(1, 2)) / total).round().long()
    cols = ((weight * xs).sum(dim=(1, 2)) / total).round().long()
    return rows, cols


@torch.no_grad()
def paste_flip_rates(model: nn.Module, images: torch.Tensor, pred: torch.Tensor, rows: torch.Tensor,
                     cols: torch.Tensor, box: int) -> torch.Tensor:
    """For each image i: paste the ``box`` x ``box`` region around its decisive pixel onto every image
    predicted as another class, and return the share of those that then flip to pred[i]. A backdoor
    trigger is universal (near 1); a piece of a clean digit rarely is."""
    n, _, h, w = images.shape
    rates = torch.zeros(n)
    for i in range(n):
        others = images[pred != pred[i]]
        if len(others) == 0:
            continue
        r0, c0 = box_origin((int(rows[i]), int(cols[i])), box, h, w)
        r1, c1 = r0 + box, c0 + box
        pasted = others.clone()
        pasted[:, :, r0:r1, c0:c1] = images[i, :, r0:r1, c0:c1]
        rates[i] = float((predict(model, pasted) == pred[i]).float().mean())
    return rates


def verify(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, fragile: float = 0.5,
           universal: float = 0.5) -> Verification:
    """Steps 1-3 of the module docstring on reconstructions ``images`` with inferred ``labels``."""
    _, _, h, w = images.shape
    window = max(2, min(h, w) // 8)
    drops, pred = occlusion_drops(model, images, window)
    fragility = drops.flatten(1).max(dim=1).values
    rows, cols = decisive_centres(drops)
    universality = paste_flip_rates(model, images, pred, rows, cols, 2 * window - 1)
    report: dict[str, object] = {"reconstructions": len(images), "predictions": pred.tolist(),
                                 "inferred_labels": labels.tolist(), "fragility": fragility.tolist(),
                                 "universality": universality.tolist(), "occlusion_window": window}
    candidates = (fragility >= fragile) & (universality >= universal)
    if int(candidates.sum()) < 2:
        return Verification(None, candidates, None, {**report, "backdoor_found": False,
                                                     "reason": "fewer than 2 reconstructions carry a universal trigger"})
    target = int(torch.mode(pred[candidates]).values)
    suspects = candidates & (pred == target)
    if int(suspects.sum()) < 2:
        return Verification(None, suspects, None, {**report, "backdoor_found": False,
                                                   "reason": "no class has 2 reconstructions with a universal trigger"})
    reference = images[~suspects]
    centre = (int(torch.mode(rows[suspects]).values), int(torch.mode(cols[suspects]).values))
    est = estimate_trigger(images[suspects], drops[suspects].mean(dim=0), reference if len(reference) >= 2 else None,
                           centre, 2 * window - 1)
    removed = predict(model, est.remove(images[suspects]))
    still_target = float((removed == target).float().mean())
    flip_rate = float("nan")
    others = reference[predict(model, reference) != target] if len(reference) else reference
    if len(others):
        flip_rate = float((predict(model, est.stamp(others)) == target).float().mean())
    depends = still_target < 0.5 and (flip_rate != flip_rate or flip_rate > 0.5)
    report.update({
        "backdoor_found": bool(depends),
        "suspected_target": target,
        "suspects": int(suspects.sum()),
        "suspect_indices": torch.nonzero(suspects).flatten().tolist(),
        "suspects_predicted_target_with_trigger": 1.0,
        "suspects_predicted_target_trigger_removed": still_target,
        "clean_reconstructions_flipped_by_estimated_trigger": flip_rate,
        "mask_pixels": int(est.mask.sum()),
        "mask_bbox": _bbox(est.mask),
        "predictions_trigger_removed": predict(model, est.remove(images)).tolist(),
    })
    return Verification(target, suspects, est, report)


def _bbox(mask: torch.Tensor) -> list[int]:
    rows = torch.nonzero(mask[0].any(dim=1)).flatten()
    cols = torch.nonzero(mask[0].any(dim=0)).flatten()
    if len(rows) == 0:
        return []
    return [int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1]


def mask_iou(estimated: torch.Tensor, true: torch.Tensor) -> float:
    inter = float((estimated & true).sum())
    union = float((estimated | true).sum())
    return inter / union if union else float("nan")
