"""Seeded data augmentation of training batches: random crop after zero padding and horizontal flip.

The standard CIFAR augmentation of He et al. (CVPR 2016, Sec. 4.2: "4 pixels are padded on each side,
and a 32x32 crop is randomly sampled from the padded image or its horizontal flip"). Every draw comes
from the caller's ``torch.Generator`` in a fixed order (crop rows, crop columns, flips, each one value
per image), so a batch stream is reproduced exactly from its seed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Each image of ``x`` (N, C, H, W) zero-padded by ``padding`` pixels on every side and cropped back
    to H x W at a uniform offset: image ``i`` is ``pad(x)[i, :, dy_i : dy_i + H, dx_i : dx_i + W]`` with
    ``dy, dx`` drawn in ``0..2 * padding`` (``dy`` for all images first, then ``dx``)."""
    if padding <= 0:
        return x
    n, _, h, w = x.shape
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (N, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (N, 1, 1, W)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image of ``x`` mirrored left-right with probability 1/2 (one uniform draw per image, < 0.5 flips)."""
    flip = (torch.rand(len(x), generator=generator) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def crop_flip(x: torch.Tensor, padding: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """:func:`random_crop` (when ``padding`` > 0), then :func:`random_flip` (when ``flip``); no draws when neither."""
    x = random_crop(x, padding, generator)
    return random_flip(x, generator) if flip else x
