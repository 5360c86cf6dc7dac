"""Reading reconstructions back for phase 3: a ``reconstructions.safetensors`` or a folder of PNGs.

``--images`` may name

* ``reconstructions.safetensors`` (or a folder holding it: the ``flsec invert`` output folder);
* a folder of PNGs, e.g. ``reconstructed_images/`` after removing the images one does not trust.
  Each ``*.png`` (grids ``*_grid.png`` excepted) is one image, resized back to the model's input
  size. Its label comes from the file name when it ends in ``_label<k>.png``, otherwise from the
  ``metrics.json`` that ``flsec invert`` wrote beside the folder (the PNG ``r<R>_c<C>_<kind>_<i>.png``
  is image i of that capture).

Everything read is checked (shapes, dtypes, finite values in [0, 1], labels in range); a bad file
stops with one line naming it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from flsec.errors import FlsecError
from flsec.fl.checkpoint import read_tensors
from flsec.inversion.images import load_png

_TAGGED = re.compile(r"^r(\d+)_c(\d+)_(update|gradient_b\d+)_(\d+)$")
_LABELLED = re.compile(r"^(.*)_label(\d+)$")


def read_reconstructions(path: Path, image_shape: tuple[int, int, int] | None = None,
                         num_classes: int | None = None) -> dict[str, torch.Tensor]:
    """``images`` (N x C x H x W in [0, 1]), ``labels`` (N) and ``sources`` (N x 3: round, client,
    index; -1 where unknown) from ``path`` (see the module docstring)."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise FlsecError(f"--images: {path} is not a .safetensors file or a folder of PNGs")
        return _checked(_tensors(path), path, image_shape, num_classes)
    if path.is_dir():
        file = path / "reconstructions.safetensors"
        if file.is_file():
            return _checked(_tensors(file), file, image_shape, num_classes)
        pngs = sorted(p for p in path.glob("*.png") if not p.stem.endswith("_grid"))
        if pngs:
            if image_shape is None:
                raise FlsecError("--images: reading PNGs needs the model's input shape")
            return _checked(_read_pngs(path, pngs, image_shape), path, image_shape, num_classes)
    raise FlsecError(f"--images: {path} holds no reconstructions.safetensors and no PNGs; run `flsec invert` first")


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return read_tensors(path)
    except FlsecError as exc:
        raise FlsecError(f"--images: {exc}") from None


def _read_pngs(folder: Path, pngs: list[Path], shape: tuple[int, int, int]) -> dict[str, torch.Tensor]:
    by_tag = _labels_from_metrics(folder)
    images, labels, sources = [], [], []
    for png in pngs:
        label: int | None = None
        source = [-1, -1, -1]
        named = _LABELLED.match(png.stem)
        tagged = _TAGGED.match(png.stem)
        if named:
            label = int(named.group(2))
        elif tagged:
            r, c, kind, i = int(tagged.group(1)), int(tagged.group(2)), tagged.group(3), int(tagged.group(4))
            source = [r, c, i]
            listed = by_tag.get(f"r{r}_c{c}_{kind}")
            if listed is not None and 0 <= i < len(listed):
                label = int(listed[i])
        if label is None:
            raise FlsecError(f"--images: no label for {png}: name it <name>_label<k>.png, or keep the metrics.json "
                             "that `flsec invert` wrote beside the folder")
        try:
            images.append(load_png(png, shape))
        except (OSError, ValueError) as exc:
            raise FlsecError(f"--images: {png} is not a readable PNG ({exc})") from None
        labels.append(label)
        sources.append(source)
    return {"images": torch.stack(images), "labels": torch.tensor(labels, dtype=torch.long),
            "sources": torch.tensor(sources, dtype=torch.long)}


def _labels_from_metrics(folder: Path) -> dict[str, list[int]]:
    for candidate in (folder / "metrics.json", folder.parent / "metrics.json"):
        if not candidate.is_file():
            continue
        try:
            data: Any = json.loads(candidate.read_text(encoding="utf-8"))
            out: dict[str, list[int]] = {}
            for t in data["targets"]:
                labels = t.get("candidate_labels", t.get("inferred_labels"))
                if labels is not None:
                    out[f"r{int(t['round'])}_c{int(t['client'])}_{t['kind']}"] = [int(v) for v in labels]
            return out
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
            raise FlsecError(f"--images: {candidate} is not a metrics.json written by `flsec invert`") from None
    return {}


def _checked(t: dict[str, torch.Tensor], where: Path, image_shape: tuple[int, int, int] | None,
             num_classes: int | None) -> dict[str, torch.Tensor]:
    if "images" not in t or "labels" not in t:
        raise FlsecError(f"--images: {where} lacks the 'images' and 'labels' tensors of `flsec invert`")
    x, y = t["images"], t["labels"]
    if not x.is_floating_point() or x.dim() != 4 or len(x) == 0:
        raise FlsecError(f"--images: {where}: 'images' must be a non-empty float N x C x H x W tensor, "
                         f"got {x.dtype} {tuple(x.shape)}")
    if image_shape is not None and tuple(x.shape[1:]) != tuple(image_shape):
        raise FlsecError(f"--images: {where}: reconstructions are {tuple(x.shape[1:])}, the model expects "
                         f"{tuple(image_shape)}: they come from another run")
    if not bool(torch.isfinite(x).all()):
        raise FlsecError(f"--images: {where}: 'images' holds NaN or Inf values; refusing to unlearn from them")
    if float(x.min()) < -1e-6 or float(x.max()) > 1 + 1e-6:
        raise FlsecError(f"--images: {where}: 'images' must lie in [0, 1], got [{float(x.min()):.3g}, {float(x.max()):.3g}]")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool or y.dim() != 1 or len(y) != len(x):
        raise FlsecError(f"--images: {where}: 'labels' must be {len(x)} integers, got {y.dtype} {tuple(y.shape)}")
    if len(y) and (int(y.min()) < 0 or (num_classes is not None and int(y.max()) >= num_classes)):
        raise FlsecError(f"--images: {where}: labels must be in 0..{(num_classes or 1) - 1}, "
                         f"got {int(y.min())}..{int(y.max())}")
    sources = t.get("sources")
    if sources is None or sources.shape != (len(x), 3) or sources.is_floating_point():
        sources = torch.full((len(x), 3), -1, dtype=torch.long)
    return {"images": x.float().clamp(0.0, 1.0), "labels": y.long(), "sources": sources.long()}
