"""The tensor store of a run directory: safetensors only (never pickle), and the checks weights must
pass before a model holds them."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from flsec.errors import CheckpointError
from flsec.io import unpack_metadata


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """safetensors only; anything else (a planted pickle, a truncated file) is refused."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a valid safetensors file ({exc})") from None


def read_tensor_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as fh:
            return unpack_metadata(dict(fh.metadata() or {}))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a valid safetensors file ({exc})") from None


def check_weights(weights: dict[str, torch.Tensor], model: nn.Module, path: Path) -> None:
    """Refuse weights that do not fit ``model`` exactly: names, shapes, float32, finite."""
    expected = model.state_dict()
    missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{path}: weights do not match the model (missing {missing[:3]}, unexpected {extra[:3]})")
    for name, ref in expected.items():
        t = weights[name]
        if t.dtype != ref.dtype or t.shape != ref.shape:
            raise CheckpointError(f"{path}: '{name}' is {t.dtype} {tuple(t.shape)}; the model needs {ref.dtype} "
                                  f"{tuple(ref.shape)}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{path}: '{name}' holds NaN or Inf")


def check_finite_state(tensors: dict[str, torch.Tensor], path: Path, prefixes: tuple[str, ...]) -> None:
    """Every tensor of a resume state under one of ``prefixes``, and finite where it is a float."""
    for k, v in tensors.items():
        if not k.startswith(prefixes):
            raise CheckpointError(f"{path}: unexpected tensor '{k}'")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise CheckpointError(f"{path}: tensor '{k}' holds NaN or Inf")
