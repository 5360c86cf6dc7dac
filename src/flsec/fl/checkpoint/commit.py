"""Writing a run directory round by round: every file of a round atomically, then one atomic rename of
``meta.json`` commits it (the protocol is in :mod:`flsec.fl.checkpoint`); a resumed writer continues
after the last committed round."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from flsec.config import ExperimentConfig
from flsec.faults import fault_point
from flsec.fl.checkpoint.layout import (
    META,
    capture_path,
    generation_dir,
    generation_files,
    global_model_path,
    refresh_aliases,
    remove_leftovers,
)
from flsec.fl.checkpoint.manifest import FORMAT, library_versions, signed
from flsec.io import sha256_file, write_json, write_jsonl, write_tensors
from flsec.paths import confined

if TYPE_CHECKING:
    from flsec.fl.checkpoint.load import Checkpoint


class RunWriter:
    """Writes one run directory round by round (see :mod:`flsec.fl.checkpoint` for the commit protocol)."""

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
        gen_path = self._path(generation_dir(round_))
        if self.committed_round == round_:
            raise RuntimeError(f"round {round_} is already committed")
        if gen_path.exists():  # an uncommitted attempt of this round (the committed one is never this one)
            shutil.rmtree(gen_path)
        weights = dict(model.state_dict())
        state = {f"model/{k}": v for k, v in weights.items()}
        state.update({f"aggregator/{k}": v for k, v in aggregator_state.items()})
        names = generation_files(round_)
        write_tensors(self._path(names["state_file"]), state)
        fault_point("commit:state")
        write_tensors(self._path(names["model_file"]), weights)
        fault_point("commit:model")
        write_jsonl(self._path(names["history_file"]), history)
        fault_point("commit:history")
        files = dict(self.files)
        for rel in names.values():
            files[rel] = sha256_file(self.root / rel)
        meta = signed({
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
        })
        write_json(self._path(META), meta)  # the commit point
        self.committed_round = round_
        fault_point("commit:meta")
        refresh_aliases(self.root, meta)
        fault_point("commit:aliases")
        remove_leftovers(self.root, meta)
