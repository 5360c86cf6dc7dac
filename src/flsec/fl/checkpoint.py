"""The run directory ("train once, attack many"), written atomically and read without pickle.

Layout::

    meta.json                                   config, seed, round, metrics, versions, sha256 of every file
    model.safetensors                           global weights after the last completed round
    history.jsonl                               one line of metrics per completed round
    state/round_<r>.safetensors                 what a resume needs (weights + aggregator state)
    updates/round_<r>/global_model.safetensors  the global weights sent to clients in a captured round
    updates/round_<r>/client_<c>.safetensors    captured updates / FedSGD gradients (+ replay metadata)
    evaluation_only/round_<r>/client_<c>.safetensors
                                                ground-truth images of captured batches: used only to
                                                score reconstructions, never by an attack

Each file is written to a temporary name and renamed; ``meta.json`` is written last and is the
commit point of a round. Loading verifies every sha256 listed in ``meta.json`` before reading
tensors with safetensors.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from flsec.config import ExperimentConfig, build_config
from flsec.errors import CheckpointError
from flsec.io import sha256_file, write_json, write_tensors, write_text
from flsec.models import InputSpec, build_model

FORMAT = "flsec-checkpoint/1"


def capture_path(kind: str, round_: int, client: int) -> str:
    folder = "updates" if kind == "updates" else "evaluation_only"
    return f"{folder}/round_{round_}/client_{client}.safetensors"


def global_model_path(round_: int) -> str:
    """The global weights a captured round's clients received (what the server sent them)."""
    return f"updates/round_{round_}/global_model.safetensors"


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
            return dict(fh.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a valid safetensors file ({exc})") from None


class RunWriter:
    """Writes one training run's directory round by round."""

    def __init__(self, root: Path, config: ExperimentConfig) -> None:
        self.root = root
        self.config = config
        self.files: dict[str, str] = {}
        self.captures: list[dict[str, Any]] = []

    def write_capture(self, round_: int, client: int, tensors: dict[str, torch.Tensor],
                      truth: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
        meta = {k: json.dumps(v) for k, v in metadata.items()}
        for kind, payload in (("updates", tensors), ("truth", truth)):
            self._write_listed(capture_path(kind, round_, client), payload, meta)
        self.captures.append({"round": round_, "client": client, "tensors": sorted(tensors), **metadata})

    def write_round_model(self, round_: int, model: nn.Module) -> None:
        self._write_listed(global_model_path(round_), dict(model.state_dict()))

    def _write_listed(self, rel: str, tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> None:
        """Write a tensor file that stays in the run and list its hash for meta.json."""
        write_tensors(self.root / rel, tensors, meta)
        self.files[rel] = sha256_file(self.root / rel)

    def commit_round(self, round_: int, model: nn.Module, aggregator_state: dict[str, torch.Tensor],
                     history: list[dict[str, Any]], extra_meta: dict[str, Any], complete: bool) -> None:
        state = {f"model/{k}": v for k, v in model.state_dict().items()}
        state.update({f"aggregator/{k}": v for k, v in aggregator_state.items()})
        state_rel = f"state/round_{round_}.safetensors"
        write_tensors(self.root / state_rel, state)
        write_tensors(self.root / "model.safetensors", dict(model.state_dict()))
        write_text(self.root / "history.jsonl", "".join(json.dumps(h, sort_keys=True) + "\n" for h in history))
        files = {k: v for k, v in self.files.items() if not k.startswith("state/")}
        for rel in (state_rel, "model.safetensors", "history.jsonl"):
            files[rel] = sha256_file(self.root / rel)
        self.files = files
        meta = {
            "format": FORMAT,
            "status": "complete" if complete else "running",
            "round": round_,
            "rounds": self.config.training.rounds,
            "seed": self.config.seed,
            "config": self.config.model_dump(mode="json"),
            "metrics": history[-1] if history else {},
            "captures": self.captures,
            "versions": library_versions(),
            "state_file": state_rel,
            "files": files,
            **extra_meta,
        }
        write_json(self.root / "meta.json", meta)
        for old in (self.root / "state").glob("round_*.safetensors"):
            if old.name != Path(state_rel).name:
                old.unlink()


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
        return self.root / rel

    def input_spec(self) -> InputSpec:
        spec = self.meta["input_spec"]
        return InputSpec(spec["channels"], spec["height"], spec["width"], spec["num_classes"],
                         tuple(spec["mean"]), tuple(spec["std"]))

    def build_model(self, weights: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """The run's model architecture holding ``weights`` (default: the final global weights)."""
        model = build_model(self.config.model.name, self.input_spec(), self.config.seed)
        model.load_state_dict(self.weights() if weights is None else weights)
        model.eval()
        return model

    def weights(self) -> dict[str, torch.Tensor]:
        return read_tensors(self.path("model.safetensors"))

    def state(self) -> dict[str, torch.Tensor]:
        return read_tensors(self.path(self.meta["state_file"]))

    def captures(self) -> list[dict[str, Any]]:
        return list(self.meta.get("captures", []))

    def capture(self, round_: int, client: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The tensors a client sent in a round, and their replay metadata."""
        path = self.path_for_capture("updates", round_, client)
        meta = {k: json.loads(v) for k, v in read_tensor_metadata(path).items()}
        return read_tensors(path), meta

    def round_model_weights(self, round_: int) -> dict[str, torch.Tensor]:
        """Global weights at the start of a captured round (the model the gradient was taken on)."""
        return read_tensors(self.path(global_model_path(round_)))

    def truth(self, round_: int, client: int) -> dict[str, torch.Tensor]:
        """Ground truth of a capture: for scoring reconstructions only."""
        return read_tensors(self.path_for_capture("truth", round_, client))

    def path_for_capture(self, kind: str, round_: int, client: int) -> Path:
        rel = capture_path(kind, round_, client)
        if rel not in self.meta["files"]:
            have = ", ".join(f"round {c['round']} client {c['client']}" for c in self.captures()) or "none"
            raise CheckpointError(f"no capture for round {round_}, client {client}; captured: {have}")
        return self.root / rel


def load_checkpoint(root: Path, require_complete: bool = True, verify: bool = True) -> Checkpoint:
    """Open a run directory, verifying every file's sha256 against ``meta.json``."""
    root = Path(root)
    meta_path = root / "meta.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{root}: not a flsec checkpoint (no meta.json)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{meta_path}: corrupted ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("files"), dict):
        raise CheckpointError(f"{meta_path}: not a {FORMAT} file")
    if require_complete and meta.get("status") != "complete":
        raise CheckpointError(
            f"{root}: training stopped after round {meta.get('round')} of {meta.get('rounds')}; "
            "finish it with `flsec train --resume` first"
        )
    if verify:
        for rel, digest in meta["files"].items():
            path = root / rel
            if not path.is_file():
                raise CheckpointError(f"{path}: missing (listed in meta.json)")
            if sha256_file(path) != digest:
                raise CheckpointError(f"{path}: sha256 mismatch; the file was corrupted or tampered with")
    config = build_config(meta["config"])
    history: list[dict[str, Any]] = []
    hist_path = root / "history.jsonl"
    if hist_path.is_file():
        history = [json.loads(line) for line in hist_path.read_text().splitlines() if line.strip()]
    return Checkpoint(root, meta, config, history)
