"""PNG output of reconstructions: one file per image and a truth-vs-reconstruction grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from flsec.io import write_with


def to_pil(x: torch.Tensor, min_side: int = 112) -> Image.Image:
    """One C x H x W image in [0, 1] as an 8-bit PIL image, upscaled (nearest) to ``min_side``."""
    arr = (x.detach().clamp(0, 1).numpy() * 255.0 + 0.5).astype(np.uint8)
    img = Image.fromarray(arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0))
    scale = max(1, -(-min_side // min(img.size)))
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img


def save_png(path: Path, x: torch.Tensor, min_side: int = 112) -> None:
    img = to_pil(x, min_side)
    write_with(path, lambda tmp: img.save(tmp, format="PNG"))


def load_png(path: Path, shape: tuple[int, int, int]) -> torch.Tensor:
    """Read a PNG back as a C x H x W tensor in [0, 1], resized to ``shape`` (undoing upscaling)."""
    c, h, w = shape
    img = Image.open(path).convert("L" if c == 1 else "RGB").resize((w, h), Image.BOX)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(arr[None] if c == 1 else arr.transpose(2, 0, 1).copy())


def save_grid(path: Path, rows: list[torch.Tensor], cell: int = 84, pad: int = 4) -> None:
    """Rows of images (each N x C x H x W) tiled into one PNG, e.g. truth above reconstruction."""
    n = max(len(r) for r in rows)
    canvas = Image.new("RGB", (n * (cell + pad) + pad, len(rows) * (cell + pad) + pad), (255, 255, 255))
    for i, row in enumerate(rows):
        for j, x in enumerate(row):
            canvas.paste(to_pil(x, cell).convert("RGB").resize((cell, cell), Image.NEAREST),
                         (pad + j * (cell + pad), pad + i * (cell + pad)))
    write_with(path, lambda tmp: canvas.save(tmp, format="PNG"))
