"""Checkpoints are verified on load and never unpickled."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest

from flsec.errors import CheckpointError
from flsec.fl.checkpoint import load_checkpoint
from flsec.io import sha256_file


@pytest.fixture
def run_copy(trained_run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(trained_run, dst)
    return dst


def test_meta_lists_every_file_with_its_hash(trained_run: Path) -> None:
    meta = json.loads((trained_run / "meta.json").read_text())
    files = {str(p.relative_to(trained_run)) for p in trained_run.rglob("*") if p.is_file()} - {"meta.json"}
    assert set(meta["files"]) == files
    for rel, digest in meta["files"].items():
        assert sha256_file(trained_run / rel) == digest
    assert meta["versions"]["torch"] and meta["status"] == "complete" and meta["seed"] == 1
    assert not list(trained_run.rglob("*.tmp"))


def test_flipped_byte_is_refused(run_copy: Path) -> None:
    p = run_copy / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        load_checkpoint(run_copy)


def test_missing_file_is_refused(run_copy: Path) -> None:
    (run_copy / "updates" / "round_4" / "client_0.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(run_copy)


def test_corrupted_meta_is_refused(run_copy: Path) -> None:
    (run_copy / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(run_copy)


class _Payload:
    """Unpickling this would create a marker file: proof of code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.marker,))


def test_planted_pickle_is_never_executed(run_copy: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    weights = run_copy / "model.safetensors"
    weights.write_bytes(pickle.dumps(_Payload(marker)))
    # The attacker also fixes the hash in meta.json so that only the format check can stop it.
    meta = json.loads((run_copy / "meta.json").read_text())
    meta["files"]["model.safetensors"] = sha256_file(weights)
    (run_copy / "meta.json").write_text(json.dumps(meta))
    ckpt = load_checkpoint(run_copy)
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        ckpt.weights()
    assert not marker.exists()


def test_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no meta.json"):
        load_checkpoint(tmp_path)
