"""Opening a run directory as untrusted input: the verified manifest, the files it lists (hashes,
confined paths), the run's config (its plugins never imported) and typed access to weights, resume
state and captures."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flsec.config import ExperimentConfig, build_config
from flsec.errors import CheckpointError, ConfigError
from flsec.fl.checkpoint.captures import read_capture, read_truth
from flsec.fl.checkpoint.layout import META, capture_path, global_model_path
from flsec.fl.checkpoint.manifest import read_meta, reject_constant
from flsec.fl.checkpoint.tensors import check_finite_state, check_weights, read_tensors
from flsec.io import sha256_file
from flsec.models import InputSpec, build_model
from flsec.paths import confined


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
        check_finite_state(tensors, path, ("model/", "aggregator/"))
        return tensors

    def captures(self) -> list[dict[str, Any]]:
        return list(self.meta.get("captures", []))

    def _listed(self, round_: int, client: int) -> list[str]:
        entry = next((c for c in self.captures() if (c["round"], c["client"]) == (round_, client)), None)
        if entry is None:
            raise CheckpointError(f"{self.root / META}: lists no capture entry for round {round_}, client {client}")
        return list(entry["tensors"])

    def capture(self, round_: int, client: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The tensors a client sent in a round (flat float32 vectors of the model's size), and their
        replay metadata."""
        path = self.path_for_capture("updates", round_, client)
        size = sum(p.numel() for p in self.new_model().parameters())
        return read_capture(path, self._listed(round_, client), size)

    def round_model_weights(self, round_: int) -> dict[str, torch.Tensor]:
        """Global weights at the start of a captured round (the model the gradient was taken on)."""
        return self._weights_at(global_model_path(round_))

    def truth(self, round_: int, client: int) -> dict[str, torch.Tensor]:
        """Ground truth of a capture: for scoring reconstructions only."""
        path = self.path_for_capture("truth", round_, client)
        return read_truth(path, self._listed(round_, client), self.input_spec())

    def path_for_capture(self, kind: str, round_: int, client: int) -> Path:
        rel = capture_path(kind, round_, client)
        if rel not in self.meta["files"]:
            have = ", ".join(f"round {c['round']} client {c['client']}" for c in self.captures()) or "none"
            raise CheckpointError(f"no capture for round {round_}, client {client}; captured: {have}")
        return confined(self.root, rel)


def _read_history(path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
        for line in lines:
            if line.strip():
                row = json.loads(line, parse_constant=reject_constant)
                if not isinstance(row, dict) or not isinstance(row.get("round"), int):
                    raise ValueError("a line is not a round record")
                rows.append(row)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupted ({str(exc).splitlines()[0]})") from None
    return rows


def load_checkpoint(root: Path, require_complete: bool = True, verify: bool = True) -> Checkpoint:
    """Open a run directory as untrusted input (see :mod:`flsec.fl.checkpoint`)."""
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
