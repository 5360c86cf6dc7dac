"""Pixel-pattern backdoor (Gu et al. 2017 "BadNets"; Bagdasaryan et al. 2020; DBA, Xie et al. 2020).

The trigger is a small patch whose pixels are forced to a pattern: "on" pixels take ``value``,
"off" pixels inside the patch take 0. It is stamped on raw [0, 1] pixels of every channel,
before the model's own normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flsec.config import TriggerConfig


@dataclass(frozen=True)
class Trigger:
    """``mask`` (1 x H x W, bool) marks the stamped pixels; ``pattern`` (1 x H x W) their values."""

    mask: torch.Tensor
    pattern: torch.Tensor

    def part(self, index: int, parts: int) -> Trigger:
        """The ``index``-th of ``parts`` pieces (DBA): the patch rows split into contiguous bands."""
        if parts == 1:
            return self
        rows = torch.nonzero(self.mask.any(dim=-1)[0]).flatten()
        bands = torch.tensor_split(rows, parts)
        keep = torch.zeros_like(self.mask)
        keep[0, bands[index % parts]] = True
        return Trigger(self.mask & keep, torch.where(self.mask & keep, self.pattern, 0.0))

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """(row0, row1, col0, col1) of the stamped region, end-exclusive."""
        rows = torch.nonzero(self.mask[0].any(dim=1)).flatten()
        cols = torch.nonzero(self.mask[0].any(dim=0)).flatten()
        return int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1


def _pattern(kind: str, size: int) -> torch.Tensor:
    i, j = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    if kind == "checkerboard":
        return ((i + j) % 2 == 0).float()
    if kind == "square":
        return torch.ones(size, size)
    if kind == "cross":
        mid = size // 2
        return ((i == mid) | (j == mid)).float()
    raise ValueError(f"attack.trigger.pattern: unknown '{kind}'; allowed: checkerboard, square, cross")


def make_trigger(cfg: TriggerConfig, height: int, width: int) -> Trigger:
    """Build the trigger for images of ``height`` x ``width`` from its configuration."""
    from flsec.errors import ConfigError

    s, o = cfg.size, cfg.offset
    if s + o > min(height, width):
        raise ConfigError(
            f"attack.trigger.size: size {s} + offset {o} does not fit a {height}x{width} image"
        )
    r0 = height - o - s if cfg.position.startswith("bottom") else o
    c0 = width - o - s if cfg.position.endswith("right") else o
    mask = torch.zeros(1, height, width, dtype=torch.bool)
    pattern = torch.zeros(1, height, width)
    mask[0, r0 : r0 + s, c0 : c0 + s] = True
    pattern[0, r0 : r0 + s, c0 : c0 + s] = _pattern(cfg.pattern, s) * cfg.value
    return Trigger(mask, pattern)


def stamp(x: torch.Tensor, trigger: Trigger) -> torch.Tensor:
    """Images (N x C x H x W in [0,1]) with the trigger stamped on every channel."""
    return torch.where(trigger.mask, trigger.pattern.to(x.dtype), x)


def num_poisoned(batch_size: int, fraction: float) -> int:
    """Poisoned samples per batch: ``fraction * batch_size`` rounded half up (so 1 of a batch of 1 at 0.5)."""
    return min(batch_size, int(fraction * batch_size + 0.5))


def poison_batch(
    x: torch.Tensor,
    y: torch.Tensor,
    trigger: Trigger,
    target: int,
    fraction: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stamp and relabel a random ``fraction`` of the batch; returns (x, y, poisoned mask)."""
    k = num_poisoned(len(y), fraction)
    chosen = torch.randperm(len(y), generator=generator)[:k]
    poisoned = torch.zeros(len(y), dtype=torch.bool)
    poisoned[chosen] = True
    x = torch.where(poisoned.view(-1, 1, 1, 1), stamp(x, trigger), x)
    y = torch.where(poisoned, torch.full_like(y, target), y)
    return x, y, poisoned
