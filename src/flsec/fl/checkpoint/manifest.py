"""``meta.json``, the manifest and commit point of a run directory: its schema, its self-digest and the
strict reader (strict JSON, schema, own hash; see :mod:`flsec.fl.checkpoint` for the whole protocol)."""

from __future__ import annotations

import hashlib
import json
import platform
import re
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from flsec.errors import CheckpointError
from flsec.fl.checkpoint.captures import CaptureMeta, check_capture_names
from flsec.fl.checkpoint.layout import META
from flsec.io import dumps

FORMAT = "flsec-checkpoint/2"
MAX_META_BYTES = 256 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


Scalar = str | int | float | bool | None


class CaptureEntry(CaptureMeta):
    round: int = Field(ge=0)
    client: int = Field(ge=0)
    tensors: list[str]


class InputSpecMeta(_Strict):
    channels: int = Field(ge=1, le=64)
    height: int = Field(ge=1, le=8192)
    width: int = Field(ge=1, le=8192)
    num_classes: int = Field(ge=2, le=1_000_000)
    mean: list[float]
    std: list[float]

    @field_validator("std")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if any(not s > 0 for s in v):
            raise ValueError("every std must be > 0")
        return v


class MetaSchema(_Strict):
    format: Literal["flsec-checkpoint/2"]
    status: Literal["running", "complete"]
    round: int = Field(ge=0)
    rounds: int = Field(ge=1)
    seed: int = Field(ge=0)
    config: dict[str, Any]
    metrics: dict[str, Any]
    captures: list[CaptureEntry]
    versions: dict[str, str]
    model_file: str
    history_file: str
    state_file: str
    files: dict[str, str]
    input_spec: InputSpecMeta
    malicious_ids: list[int]
    seconds_per_round: list[float] = Field(default_factory=list)
    runtime: dict[str, Scalar] | None = None
    unlearned_from: str | None = None
    unlearning: dict[str, Any] | None = None
    manifest_sha256: str

    @field_validator("files")
    @classmethod
    def _digests(cls, v: dict[str, str]) -> dict[str, str]:
        for rel, digest in v.items():
            if not _SHA256.fullmatch(digest):
                raise ValueError(f"'{rel}' has no valid sha256")
        return v


def library_versions() -> dict[str, str]:
    import numpy
    import safetensors

    import flsec

    return {"flsec": flsec.__version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version()}


def manifest_digest(meta: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON, without its own digest field."""
    body = {k: v for k, v in meta.items() if k != "manifest_sha256"}
    return hashlib.sha256(dumps(body).encode("utf-8")).hexdigest()


def signed(meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` as it is written: canonical JSON values and its own digest."""
    meta = json.loads(dumps(meta))
    meta["manifest_sha256"] = manifest_digest(meta)
    return meta


def reject_constant(name: str) -> Any:
    """``parse_constant`` for :func:`json.loads`: NaN and Infinity are not JSON."""
    raise ValueError(f"non-standard JSON token {name}")


def _schema_error(path: Path, exc: ValidationError) -> CheckpointError:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    return CheckpointError(f"{path}: field '{where}': {err['msg']}")


def read_meta(root: Path) -> dict[str, Any]:
    """Parse and validate ``root/meta.json`` (strict JSON, schema, self-hash)."""
    meta_path = root / META
    if meta_path.is_symlink():
        raise CheckpointError(f"{meta_path}: is a symbolic link; a run directory must not contain links")
    if not meta_path.is_file():
        raise CheckpointError(f"{root}: not a flsec checkpoint (no meta.json)")
    if meta_path.stat().st_size > MAX_META_BYTES:
        raise CheckpointError(f"{meta_path}: larger than {MAX_META_BYTES >> 20} MiB; not a flsec manifest")
    try:
        meta = json.loads(meta_path.read_bytes().decode("utf-8"), parse_constant=reject_constant)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{meta_path}: corrupted ({str(exc).splitlines()[0]})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path}: corrupted (not a JSON object)")
    if meta.get("format") != FORMAT:
        found = meta.get("format")
        raise CheckpointError(f"{meta_path}: not a {FORMAT} manifest (format {found!r}"
                              + ("; written by an older flsec: train again" if found == "flsec-checkpoint/1" else "")
                              + ")")
    try:
        MetaSchema.model_validate(meta)
    except ValidationError as exc:
        raise _schema_error(meta_path, exc) from None
    if manifest_digest(meta) != meta["manifest_sha256"]:
        raise CheckpointError(f"{meta_path}: manifest sha256 mismatch; the manifest was edited or corrupted")
    for key in ("model_file", "history_file", "state_file"):
        if meta[key] not in meta["files"]:
            raise CheckpointError(f"{meta_path}: field '{key}' names {meta[key]!r}, which the manifest does not list")
    for c in meta["captures"]:
        check_capture_names(meta_path, c["tensors"])
    return meta
