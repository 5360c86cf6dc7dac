"""Captured client updates / FedSGD gradients and their evaluation-only ground truth: the replay
metadata schema, and the checks a capture file must pass against the manifest before an attack or a
score reads it (the tensors the manifest lists, no others; dtypes, shapes, value ranges)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from flsec.errors import CheckpointError
from flsec.fl.checkpoint.tensors import read_tensor_metadata, read_tensors
from flsec.models import InputSpec

CAPTURE_NAME = re.compile(r"update|gradient_b\d{1,4}")
TRUTH_PARTS = ("images", "labels", "poisoned")

Scalar = str | int | float | bool | None


class CaptureMeta(BaseModel):
    """Replay metadata of one capture (what the client declared about its local training)."""

    model_config = ConfigDict(extra="allow", strict=True)
    malicious: bool
    attacking: bool
    num_samples: int = Field(ge=1)
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0)
    momentum: float = Field(ge=0, lt=1)
    weight_decay: float = Field(ge=0)
    steps: int = Field(ge=0)
    boost_factor: float
    local_seed: int = Field(ge=0)

    @model_validator(mode="before")
    @classmethod
    def _scalars_only(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, v in data.items():
                if isinstance(v, dict) or (isinstance(v, list) and not all(isinstance(x, Scalar) for x in v)):
                    raise ValueError(f"'{key}': capture metadata values must be JSON scalars or lists of scalars")
        return data


def check_capture_names(meta_path: Path, names: list[str]) -> None:
    for t in names:
        if not CAPTURE_NAME.fullmatch(t):
            raise CheckpointError(f"{meta_path}: capture tensor name {t!r} is not update or gradient_b<B>")


def _check_listed(path: Path, found: set[str], listed: set[str], what: str) -> None:
    missing, extra = sorted(listed - found), sorted(found - listed)
    if missing or extra:
        parts = ([f"lacks {', '.join(repr(n) for n in missing[:3])}"] if missing else []) + (
            [f"holds unlisted {', '.join(repr(n) for n in extra[:3])}"] if extra else [])
        raise CheckpointError(f"{path}: {' and '.join(parts)}; meta.json lists {what} "
                              f"{', '.join(sorted(listed)) or 'none'}")


def read_capture(path: Path, listed: list[str], size: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors a client sent (exactly the ``listed`` names, each a flat float32 vector of the
    model's ``size``) and their replay metadata."""
    try:
        meta = {k: json.loads(v) for k, v in read_tensor_metadata(path).items()}
        CaptureMeta.model_validate(meta)
    except (json.JSONDecodeError, ValidationError) as exc:
        raise CheckpointError(f"{path}: malformed replay metadata ({str(exc).splitlines()[0]})") from None
    tensors = read_tensors(path)
    _check_listed(path, set(tensors), set(listed), "the tensors")
    for name, t in tensors.items():
        if t.dtype != torch.float32 or t.ndim != 1 or t.numel() != size:
            raise CheckpointError(f"{path}: tensor '{name}' is {t.dtype} of shape {tuple(t.shape)}; expected "
                                  f"float32 of shape ({size},)")
    return tensors, meta


def _valid_truth(name: str, t: torch.Tensor, spec: InputSpec) -> bool:
    if name.endswith("/images"):
        in_box = t.numel() == 0 or 0.0 <= float(t.min()) <= float(t.max()) <= 1.0
        return (t.dtype == torch.float32 and t.ndim == 4 and in_box
                and tuple(t.shape[1:]) == (spec.channels, spec.height, spec.width))
    if name.endswith("/labels"):
        return t.dtype == torch.int64 and t.ndim == 1 and bool(((t >= 0) & (t < spec.num_classes)).all())
    return t.ndim == 1


def read_truth(path: Path, listed: list[str], spec: InputSpec) -> dict[str, torch.Tensor]:
    """Ground truth of a capture, for scoring reconstructions only: ``<tensor>/images`` and
    ``<tensor>/labels`` (and optionally ``<tensor>/poisoned``) of every ``listed`` tensor."""
    tensors = read_tensors(path)
    found = {n for n in tensors if n.rpartition("/")[2] in ("images", "labels")}
    _check_listed(path, found, {f"{t}/{part}" for t in listed for part in ("images", "labels")}, "ground truth")
    for name, t in tensors.items():
        prefix, _, part = name.rpartition("/")
        if prefix not in listed or part not in TRUTH_PARTS:
            raise CheckpointError(f"{path}: unexpected ground-truth tensor '{name}'")
        if not _valid_truth(name, t, spec):
            raise CheckpointError(f"{path}: tensor '{name}' ({t.dtype}, shape {tuple(t.shape)}) is not valid "
                                  "ground truth")
    for t in listed:
        if len(tensors[f"{t}/images"]) != len(tensors[f"{t}/labels"]):
            raise CheckpointError(f"{path}: '{t}/images' and '{t}/labels' hold different numbers of samples")
    return tensors
