"""Figures of a run, each returned as PNG bytes (matplotlib, Agg backend)."""

from __future__ import annotations

import io
import textwrap
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch


def _png(fig: plt.Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def rounds_plot(history: list[dict[str, Any]]) -> bytes:
    """MA and ASR per round."""
    rows = [h for h in history if "phase" not in h]
    r = [h["round"] for h in rows]
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    ax.plot(r, [100 * h["ma"] for h in rows], marker="o", ms=3, label="main-task accuracy (MA)")
    ax.plot(r, [100 * h["asr"] for h in rows], marker="s", ms=3, label="attack success rate (ASR)")
    ax.set_xlabel("round")
    ax.set_ylabel("%")
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.legend(loc="center right")
    return _png(fig)


def weights_plot(history: list[dict[str, Any]]) -> bytes:
    """Aggregation weight given to attackers vs honest clients per round."""
    rows = [h for h in history if "phase" not in h]
    att, hon = [], []
    for h in rows:
        w = dict(zip(h["selected"], h["weights"], strict=True))
        att.append(sum(w[c] for c in h["attackers"]))
        hon.append(sum(v for c, v in w.items() if c not in h["attackers"]))
    fig, ax = plt.subplots(figsize=(6.4, 2.6))
    r = [h["round"] for h in rows]
    ax.stackplot(r, att, hon, labels=["attackers", "honest clients"], colors=["#d62728", "#1f77b4"], alpha=0.8)
    ax.set_xlabel("round")
    ax.set_ylabel("weight given by the rule")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper right", fontsize=8)
    return _png(fig)


def _show(ax: plt.Axes, x: torch.Tensor, title: str | None = None) -> None:
    img = x.detach().clamp(0, 1).numpy()
    ax.imshow(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0), cmap="gray", vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=7)


def reconstruction_grid(truth: torch.Tensor, recon: torch.Tensor, captions: list[str], limit: int = 12) -> bytes:
    """Truth (top) above reconstruction (bottom) for up to ``limit`` images."""
    n = min(limit, len(truth))
    fig, axes = plt.subplots(2, n, figsize=(1.1 * n + 0.6, 2.6), squeeze=False)
    for j in range(n):
        _show(axes[0, j], truth[j], captions[j])
        _show(axes[1, j], recon[j])
    axes[0, 0].set_ylabel("truth", fontsize=8)
    axes[1, 0].set_ylabel("reconstruction", fontsize=8)
    return _png(fig)


def trigger_plot(heatmap: np.ndarray, mask: np.ndarray, estimate: torch.Tensor, true_pattern: torch.Tensor) -> bytes:
    fig, axes = plt.subplots(1, 4, figsize=(7.5, 2.2))
    axes[0].imshow(heatmap, cmap="magma")
    axes[0].set_title("evidence heat map", fontsize=8)
    axes[1].imshow(mask, cmap="gray")
    axes[1].set_title("estimated mask", fontsize=8)
    _show(axes[2], estimate, "estimated trigger")
    _show(axes[3], true_pattern, "true trigger (eval. only)")
    for ax in axes[:2]:
        ax.set_xticks([])
        ax.set_yticks([])
    return _png(fig)


def before_after_plot(rows: list[tuple[str, dict[str, float]]]) -> bytes:
    """Horizontal MA / ASR bars, one pair per model (the first row on top), labels in full."""
    names = [textwrap.fill(n, 34) for n, _ in rows]
    y = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(7.2, 0.62 * len(rows) + 0.9))
    ma = [100 * m["ma"] for _, m in rows]
    asr = [100 * m["asr"] for _, m in rows]
    b1 = ax.barh(y - 0.2, ma, 0.4, label="MA", color="#1f77b4")
    b2 = ax.barh(y + 0.2, asr, 0.4, label="ASR", color="#d62728")
    ax.bar_label(b1, fmt="%.1f", fontsize=7, padding=2)
    ax.bar_label(b2, fmt="%.1f", fontsize=7, padding=2)
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("%")
    ax.set_xlim(0, 112)
    ax.legend(fontsize=8, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=2, frameon=False)
    fig.tight_layout()
    return _png(fig)
