"""The run directory ("train once, attack many"): committed round by round as a unit, read as
untrusted input.

Layout::

    meta.json                                   the manifest and commit point: config, seed, round, status,
                                                metrics, versions, captures, the sha256 of every file below and
                                                the sha256 of the manifest itself
    rounds/round_<r>/model.safetensors          global weights after round r   (only the last committed round
    rounds/round_<r>/state.safetensors          what a resume needs             is kept; r = 0 is the initial
    rounds/round_<r>/history.jsonl              one line of metrics per round   model, before any round)
    model.safetensors, history.jsonl            links to the last committed round's files, for other tools
    updates/round_<r>/global_model.safetensors  the global weights sent to clients in a captured round
    updates/round_<r>/client_<c>.safetensors    captured updates / FedSGD gradients (+ replay metadata)
    evaluation_only/round_<r>/client_<c>.safetensors
                                                ground-truth images of captured batches: used only to
                                                score reconstructions, never by an attack

**Commit protocol.** A round's files are written (each atomically) into a fresh ``rounds/round_<r>/``
and its captures under ``updates/`` and ``evaluation_only/``; then ``meta.json`` is replaced in one
atomic rename: that rename *is* the commit. Only then are the previous round's folder and the
top-level links updated. A process killed at any instant leaves ``meta.json`` naming a complete,
hash-consistent round (the new one or the previous one); files of an uncommitted round are
unreferenced leftovers that the next writer removes.

**Loading.** ``meta.json`` is parsed as strict JSON, validated against a schema and checked against its
own hash; every file it names must be a regular file inside the directory (no ``..``, no absolute
path, no symlink anywhere on the way) with the listed sha256; tensors are read with safetensors only
and checked for names, shapes, dtypes and finiteness before use. Plugin modules named in a
checkpoint's config are never imported: the user enables plugins with ``--plugin`` (their own choice).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from flsec.config import ExperimentConfig, build_config
from flsec.errors import CheckpointError, ConfigError
from flsec.faults import fault_point
from flsec.io import dumps, is_temp_file, sha256_file, unpack_metadata, write_json, write_jsonl, write_tensors
from flsec.lock import LOCK_NAME
from flsec.models import InputSpec, build_model
from flsec.paths import confined

FORMAT = "flsec-checkpoint/2"
META = "meta.json"
MAX_META_BYTES = 256 << 20
ALIASES = {"model_file": "model.safetensors", "history_file": "history.jsonl"}
_SHA256 = re.compile(r"[0-9a-f]{64}")


def capture_path(kind: str, round_: int, client: int) -> str:
    folder = "updates" if kind == "updates" else "evaluation_only"
    return f"{folder}/round_{round_}/client_{client}.safetensors"


def global_model_path(round_: int) -> str:
    """The global weights a captured round's clients received (what the server sent them)."""
    return f"updates/round_{round_}/global_model.safetensors"


def generation_dir(round_: int) -> str:
    return f"rounds/round_{round_}"


def library_versions() -> dict[str, str]:
    import numpy
    import safetensors

    import flsec

    return {"flsec": flsec.__version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version()}


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


# --- Schema of meta.json --------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


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


def manifest_digest(meta: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON, without its own digest field."""
    body = {k: v for k, v in meta.items() if k != "manifest_sha256"}
    return hashlib.sha256(dumps(body).encode("utf-8")).hexdigest()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON token {name}")


def _schema_error(path: Path, exc: ValidationError) -> CheckpointError:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    return CheckpointError(f"{path}: field '{where}': {err['msg']}")


# --- Writing ----------------------------------------------------------------------------------


class RunWriter:
    """Writes one run directory round by round (see the module docstring for the commit protocol)."""

    def __init__(self, root: Path, config: ExperimentConfig) -> None:
        self.root = Path(root)
        self.config = config
        self.files: dict[str, str] = {}
        self.captures: list[dict[str, Any]] = []
        self.committed_round: int | None = None

    def resume_from(self, ckpt: Checkpoint) -> None:
        """Continue after the last committed round of ``ckpt`` (the same directory)."""
        gen = {ckpt.meta[k] for k in ("model_file", "history_file", "state_file")}
        self.files = {k: v for k, v in ckpt.meta["files"].items() if k not in gen}
        self.captures = list(ckpt.meta["captures"])
        self.committed_round = ckpt.round

    def _path(self, rel: str) -> Path:
        return confined(self.root, rel)

    def _write_listed(self, rel: str, tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> None:
        """Write a tensor file of the round being made and list its hash for the next commit."""
        path = self._path(rel)
        write_tensors(path, tensors, meta)
        self.files[rel] = sha256_file(path)

    def write_capture(self, round_: int, client: int, tensors: dict[str, torch.Tensor],
                      truth: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
        meta = {k: json.dumps(v) for k, v in metadata.items()}
        for kind, payload in (("updates", tensors), ("truth", truth)):
            self._write_listed(capture_path(kind, round_, client), payload, meta)
            fault_point("capture")
        self.captures = [c for c in self.captures if (c["round"], c["client"]) != (round_, client)]
        self.captures.append({"round": round_, "client": client, "tensors": sorted(tensors), **metadata})

    def write_round_model(self, round_: int, model: nn.Module) -> None:
        self._write_listed(global_model_path(round_), dict(model.state_dict()))

    def commit_round(self, round_: int, model: nn.Module, aggregator_state: dict[str, torch.Tensor],
                     history: list[dict[str, Any]], extra_meta: dict[str, Any], complete: bool) -> None:
        """Commit round ``round_`` (0: the initial model) with one atomic rename of ``meta.json``."""
        gen = generation_dir(round_)
        gen_path = self._path(gen)
        if self.committed_round == round_:
            raise RuntimeError(f"round {round_} is already committed")
        if gen_path.exists():  # an uncommitted attempt of this round (the committed one is never this one)
            shutil.rmtree(gen_path)
        weights = dict(model.state_dict())
        state = {f"model/{k}": v for k, v in weights.items()}
        state.update({f"aggregator/{k}": v for k, v in aggregator_state.items()})
        names = {"model_file": f"{gen}/model.safetensors", "state_file": f"{gen}/state.safetensors",
                 "history_file": f"{gen}/history.jsonl"}
        write_tensors(self._path(names["state_file"]), state)
        fault_point("commit:state")
        write_tensors(self._path(names["model_file"]), weights)
        fault_point("commit:model")
        write_jsonl(self._path(names["history_file"]), history)
        fault_point("commit:history")
        files = dict(self.files)
        for rel in names.values():
            files[rel] = sha256_file(self.root / rel)
        meta: dict[str, Any] = {
            "format": FORMAT,
            "status": "complete" if complete else "running",
            "round": round_,
            "rounds": self.config.training.rounds,
            "seed": self.config.seed,
            "config": self.config.model_dump(mode="json"),
            "metrics": history[-1] if history else {},
            "captures": sorted(self.captures, key=lambda c: (c["round"], c["client"])),
            "versions": library_versions(),
            "files": dict(sorted(files.items())),
            **names,
            **extra_meta,
        }
        meta = json.loads(dumps(meta))
        meta["manifest_sha256"] = manifest_digest(meta)
        write_json(self._path(META), meta)  # the commit point
        self.committed_round = round_
        fault_point("commit:meta")
        self._refresh_aliases(names)
        fault_point("commit:aliases")
        remove_leftovers(self.root, meta)

    def _refresh_aliases(self, names: dict[str, str]) -> None:
        for key, alias in ALIASES.items():
            refresh_alias(self.root, names[key], alias)


def refresh_alias(root: Path, rel: str, alias: str) -> None:
    """Point the top-level ``alias`` at ``rel`` (a hard link, or a copy where links are unsupported)."""
    src, dst = confined(root, rel), confined(root, alias)
    tmp = root / f".{alias}.{uuid.uuid4().hex}.tmp"
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def remove_leftovers(root: Path, meta: dict[str, Any] | None) -> list[str]:
    """Delete what an interrupted writer left: temporary files, round folders and captures that no
    committed manifest lists. Only flsec's own names are touched, never through a symlink."""
    listed = set(meta["files"]) if meta else set()
    removed: list[str] = []
    root = Path(root)
    current = str(Path(meta["model_file"]).parent) if meta else None
    for folder in ("rounds", "updates", "evaluation_only"):
        top = root / folder
        if top.is_symlink():
            raise CheckpointError(f"{top}: is a symbolic link; a run directory must not contain links")
        if not top.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
            for name in filenames:
                path = Path(dirpath) / name
                rel = path.relative_to(root).as_posix()
                stale_round = folder == "rounds" and not rel.startswith(f"{current}/")
                if is_temp_file(path) or stale_round or (folder != "rounds" and rel not in listed):
                    path.unlink()
                    removed.append(rel)
            for d in list(dirnames):
                if (Path(dirpath) / d).is_symlink():
                    raise CheckpointError(f"{Path(dirpath) / d}: is a symbolic link; a run directory must not contain links")
        for dirpath, _dirs, _files in sorted(os.walk(top, followlinks=False), reverse=True):
            if dirpath != str(top) and not os.listdir(dirpath):
                os.rmdir(dirpath)
    for path in root.iterdir():
        if path.is_file() and not path.is_symlink() and is_temp_file(path):
            path.unlink()
            removed.append(path.name)
    return removed


FLSEC_NAMES = {META, LOCK_NAME, "rounds", "updates", "evaluation_only", *ALIASES.values()}


def only_flsec_leftovers(root: Path) -> bool:
    """True when ``root`` holds nothing but what an interrupted flsec writer makes before its first
    commit (so starting afresh there loses nothing of the user's)."""
    return all(p.name in FLSEC_NAMES or is_temp_file(p) for p in Path(root).iterdir())


# --- Reading ----------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """A verified run directory."""

    root: Path
    meta: dict[str, Any]
    config: ExperimentConfig
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def round(self) -> int:
        return int(self.meta["round"])

    @property
    def complete(self) -> bool:
        return self.meta.get("status") == "complete"

    def path(self, rel: str) -> Path:
        if rel not in self.meta["files"]:
            raise CheckpointError(f"{self.root}: no file {rel} in this checkpoint")
        return confined(self.root, rel)

    def input_spec(self) -> InputSpec:
        spec = self.meta["input_spec"]
        return InputSpec(spec["channels"], spec["height"], spec["width"], spec["num_classes"],
                         tuple(spec["mean"]), tuple(spec["std"]))

    def new_model(self) -> nn.Module:
        return build_model(self.config.model.name, self.input_spec(), self.config.seed, self.config.model.width)

    def build_model(self, weights: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """The run's model architecture holding ``weights`` (default: the final global weights)."""
        model = self.new_model()
        model.load_state_dict(self.weights() if weights is None else weights)
        model.eval()
        return model

    def _weights_at(self, rel: str, prefix: str = "") -> dict[str, torch.Tensor]:
        path = self.path(rel)
        tensors = read_tensors(path)
        weights = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        check_weights(weights, self.new_model(), path)
        return weights

    def weights(self) -> dict[str, torch.Tensor]:
        return self._weights_at(self.meta["model_file"])

    def state(self) -> dict[str, torch.Tensor]:
        """What a resume needs: ``model/...`` weights (checked) and ``aggregator/...`` state (finite)."""
        path = self.path(self.meta["state_file"])
        tensors = read_tensors(path)
        model = {k: v for k, v in tensors.items() if k.startswith("model/")}
        check_weights({k[len("model/"):]: v for k, v in model.items()}, self.new_model(), path)
        for k, v in tensors.items():
            if not k.startswith(("model/", "aggregator/")):
                raise CheckpointError(f"{path}: unexpected tensor '{k}'")
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                raise CheckpointError(f"{path}: tensor '{k}' holds NaN or Inf")
        return tensors

    def captures(self) -> list[dict[str, Any]]:
        return list(self.meta.get("captures", []))

    def capture(self, round_: int, client: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The tensors a client sent in a round (flat float32 vectors of the model's size), and their
        replay metadata."""
        path = self.path_for_capture("updates", round_, client)
        try:
            meta = {k: json.loads(v) for k, v in read_tensor_metadata(path).items()}
            CaptureMeta.model_validate(meta)
        except (json.JSONDecodeError, ValidationError) as exc:
            raise CheckpointError(f"{path}: malformed replay metadata ({str(exc).splitlines()[0]})") from None
        tensors = read_tensors(path)
        size = sum(p.numel() for p in self.new_model().parameters())
        for name, t in tensors.items():
            if t.dtype != torch.float32 or t.ndim != 1 or t.numel() != size:
                raise CheckpointError(f"{path}: tensor '{name}' is {t.dtype} of shape {tuple(t.shape)}; expected "
                                      f"float32 of shape ({size},)")
        return tensors, meta

    def round_model_weights(self, round_: int) -> dict[str, torch.Tensor]:
        """Global weights at the start of a captured round (the model the gradient was taken on)."""
        return self._weights_at(global_model_path(round_))

    def truth(self, round_: int, client: int) -> dict[str, torch.Tensor]:
        """Ground truth of a capture: for scoring reconstructions only."""
        path = self.path_for_capture("truth", round_, client)
        tensors = read_tensors(path)
        spec = self.input_spec()
        for name, t in tensors.items():
            if name.endswith("/images"):
                in_box = t.numel() == 0 or 0.0 <= float(t.min()) <= float(t.max()) <= 1.0
                ok = (t.dtype == torch.float32 and t.ndim == 4 and in_box
                      and tuple(t.shape[1:]) == (spec.channels, spec.height, spec.width))
            elif name.endswith("/labels"):
                ok = t.dtype == torch.int64 and t.ndim == 1 and bool(((t >= 0) & (t < spec.num_classes)).all())
            else:
                ok = t.ndim == 1
            if not ok:
                raise CheckpointError(f"{path}: tensor '{name}' ({t.dtype}, shape {tuple(t.shape)}) is not valid "
                                      "ground truth")
        return tensors

    def path_for_capture(self, kind: str, round_: int, client: int) -> Path:
        rel = capture_path(kind, round_, client)
        if rel not in self.meta["files"]:
            have = ", ".join(f"round {c['round']} client {c['client']}" for c in self.captures()) or "none"
            raise CheckpointError(f"no capture for round {round_}, client {client}; captured: {have}")
        return confined(self.root, rel)


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
        meta = json.loads(meta_path.read_bytes().decode("utf-8"), parse_constant=_reject_constant)
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
        for t in c["tensors"]:
            if not re.fullmatch(r"update|gradient_b\d{1,4}", t):
                raise CheckpointError(f"{meta_path}: capture tensor name {t!r} is not update or gradient_b<B>")
    return meta


def _read_history(path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
        for line in lines:
            if line.strip():
                row = json.loads(line, parse_constant=_reject_constant)
                if not isinstance(row, dict) or not isinstance(row.get("round"), int):
                    raise ValueError("a line is not a round record")
                rows.append(row)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupted ({str(exc).splitlines()[0]})") from None
    return rows


def load_checkpoint(root: Path, require_complete: bool = True, verify: bool = True) -> Checkpoint:
    """Open a run directory as untrusted input (see the module docstring)."""
    root = Path(root)
    meta = read_meta(root)
    if require_complete and meta["status"] != "complete":
        raise CheckpointError(
            f"{root}: training stopped after round {meta['round']} of {meta['rounds']}; "
            "finish it with `flsec train --resume` first"
        )
    for rel, digest in meta["files"].items():
        path = confined(root, rel)
        if not verify:
            continue
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (listed in meta.json)")
        if sha256_file(path) != digest:
            raise CheckpointError(f"{path}: sha256 mismatch; the file was corrupted or tampered with")
    try:
        config = build_config(meta["config"], import_plugins=False)
    except ConfigError as exc:
        plugins = meta["config"].get("plugins") or []
        hint = (f"; it names plugins {plugins}, which flsec never imports from a run directory: pass --plugin "
                "MODULE for those you trust") if plugins else ""
        raise CheckpointError(f"{root / META}: config: {exc}{hint}") from None
    history = _read_history(confined(root, meta["history_file"]))
    return Checkpoint(root, meta, config, history)


def verify_run(root: Path) -> dict[str, Any]:
    """Load a run directory and check every file it lists, tensors included (``flsec verify``)."""
    ckpt = load_checkpoint(root, require_complete=False)
    ckpt.weights()
    ckpt.state()
    rounds = set()
    for c in ckpt.captures():
        ckpt.capture(c["round"], c["client"])
        ckpt.truth(c["round"], c["client"])
        rounds.add(c["round"])
    for r in sorted(rounds):
        if global_model_path(r) in ckpt.meta["files"]:
            ckpt.round_model_weights(r)
    last = ckpt.history[-1] if ckpt.history else {}
    return {"status": ckpt.meta["status"], "round": ckpt.round, "rounds": ckpt.meta["rounds"],
            "files": len(ckpt.meta["files"]), "captures": len(ckpt.captures()), "ma": last.get("ma"),
            "asr": last.get("asr")}
