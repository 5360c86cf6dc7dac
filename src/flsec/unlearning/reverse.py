"""Trigger reverse engineering (Neural Cleanse, Wang et al., IEEE S&P 2019, Sec. IV, eq. 2-3), for
reconstructions too poor to carry the trigger themselves.

For each candidate target class t, find the smallest mask m (H x W, in [0, 1]) and a pattern p
(C x H x W, in [0, 1]) such that stamping x' = (1 - m) * x + m * p sends the carriers x to t:

    min_{m, p}  CE(f(x'), t) + lambda * |m|_1

with m = tanh(m_raw) / (2 - eps) + 1/2 and p likewise (their ``visualizer.py``), Adam, and
lambda adapted as in their code: raised by ``cost_multiplier`` after ``patience`` mini-batches
with an attack success of at least ``success``, lowered by ``cost_multiplier ** 1.5`` after as
many below it; the mask of least L1 norm among those reaching ``success`` is kept. A backdoor
target needs a far smaller mask than the other classes: its anomaly index (the deviation of its
L1 norm from the median, over 1.4826 x the median absolute deviation; ``mad_outlier_detection.py``)
exceeds 2. The carriers here are the defender's reconstructions: they need to look like inputs
of the task, not to show the trigger.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flsec.unlearning.verify import TriggerEstimate

EPS = 1e-7


@dataclass(frozen=True)
class ReverseSettings:
    steps: int = 300
    batch_size: int = 32
    lr: float = 0.1
    init_cost: float = 1e-3
    success: float = 0.99
    patience: int = 5
    cost_multiplier: float = 2.0
    seed: int = 0


@dataclass
class Reversed:
    target: int
    mask: torch.Tensor  # H x W in [0, 1]
    pattern: torch.Tensor  # C x H x W in [0, 1]
    l1: float
    success: float
    log: list[tuple[int, float, float]] = field(default_factory=list)


def anomaly_indices(l1: np.ndarray) -> np.ndarray:
    """|l1 - median| / (1.4826 * MAD), per class (Neural Cleanse's outlier test)."""
    med = np.median(l1)
    mad = 1.4826 * np.median(np.abs(l1 - med))
    return np.abs(l1 - med) / max(mad, 1e-12)


def reverse_engineer(model: nn.Module, carriers: torch.Tensor, target: int, s: ReverseSettings) -> Reversed:
    """The smallest trigger that sends ``carriers`` to ``target`` (see the module docstring)."""
    model.eval()
    device = carriers.device
    _, c, h, w = carriers.shape
    g = torch.Generator().manual_seed(s.seed * 1000 + target)
    mask_raw = (torch.rand(1, 1, h, w, generator=g).to(device) - 0.5).requires_grad_(True)
    pattern_raw = (torch.rand(1, c, h, w, generator=g).to(device) - 0.5).requires_grad_(True)
    opt = torch.optim.Adam([mask_raw, pattern_raw], lr=s.lr, betas=(0.5, 0.9))
    cost, best = 0.0, None
    up = down = set_counter = 0
    labels = torch.full((s.batch_size,), target, dtype=torch.long, device=device)
    log = []
    for step in range(s.steps):
        idx = torch.randint(0, len(carriers), (s.batch_size,), generator=g).to(device)
        mask = torch.tanh(mask_raw) / (2 - EPS) + 0.5
        pattern = torch.tanh(pattern_raw) / (2 - EPS) + 0.5
        x = (1 - mask) * carriers[idx] + mask * pattern
        logits = model(x)
        ce = F.cross_entropy(logits, labels)
        l1 = mask.sum()
        loss = ce + cost * l1
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        acc = float((logits.argmax(dim=1) == target).float().mean())
        if acc >= s.success and (best is None or float(l1.detach()) < best[0]):
            best = (float(l1.detach()), mask.detach()[0, 0].clone(), pattern.detach()[0].clone(), acc)
        if cost == 0.0 and acc >= s.success:  # start penalising the mask once the attack works
            set_counter += 1
            if set_counter >= s.patience:
                cost, up, down = s.init_cost, 0, 0
        else:
            set_counter = 0
        up, down = (up + 1, 0) if acc >= s.success else (0, down + 1)
        if up >= s.patience:
            cost, up = cost * s.cost_multiplier, 0
        elif down >= s.patience:
            cost, down = cost / s.cost_multiplier ** 1.5, 0
        log.append((step, float(ce.detach()), float(l1.detach())))
    if best is None:  # never reached the success rate: keep the last iterate
        mask = (torch.tanh(mask_raw) / (2 - EPS) + 0.5).detach()[0, 0]
        pattern = (torch.tanh(pattern_raw) / (2 - EPS) + 0.5).detach()[0]
        with torch.no_grad():
            acc = float((model((1 - mask) * carriers + mask * pattern).argmax(dim=1) == target).float().mean())
        best = (float(mask.sum()), mask, pattern, acc)
    return Reversed(target, best[1], best[2], best[0], best[3], log)


@dataclass
class CleanseResult:
    target: int | None
    estimate: TriggerEstimate | None
    report: dict[str, object]


def neural_cleanse(model: nn.Module, carriers: torch.Tensor, num_classes: int, s: ReverseSettings,
                   threshold: float = 2.0) -> CleanseResult:
    """Reverse-engineer a trigger for every class; the class whose mask is an outlier on the small
    side (anomaly index > ``threshold``) is the suspected target, its binarised mask (m > 0.5) and
    pattern the trigger estimate (fill: the carriers' mean)."""
    found = [reverse_engineer(model, carriers, t, s) for t in range(num_classes)]
    l1 = np.array([r.l1 for r in found])
    idx = anomaly_indices(l1)
    med = float(np.median(l1))
    flagged = [t for t in range(num_classes) if l1[t] < med and idx[t] > threshold]
    report: dict[str, object] = {"method": "neural_cleanse", "l1_norms": l1.tolist(), "anomaly_index": idx.tolist(),
                                 "success": [r.success for r in found], "flagged": flagged}
    if not flagged:
        return CleanseResult(None, None, {**report, "reason": "no class needs an outlying small mask"})
    target = min(flagged, key=lambda t: l1[t])
    r = found[target]
    mask = (r.mask > 0.5)[None]
    if not bool(mask.any()):
        mask = (r.mask >= r.mask.max())[None]
    fill = carriers.mean(dim=0)
    pattern = torch.where(mask, r.pattern, 0.0)
    heat = r.mask / r.mask.max().clamp_min(1e-12)
    est = TriggerEstimate(mask, pattern, fill, heat)
    return CleanseResult(target, est, {**report, "suspected_target": target, "mask_pixels": int(mask.sum())})
