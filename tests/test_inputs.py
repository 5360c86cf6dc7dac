"""Inputs that used to end in tracebacks or silent garbage now stop with one clear line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flsec.data.datasets import load_dataset
from flsec.errors import DataError, FlsecError
from flsec.fl.checkpoint import load_checkpoint
from flsec.fl.engines import train
from flsec.fl.server import TrainingDivergedError

from .conftest import small_config


def _cifar_bin(path: Path, labels: list[int]) -> None:
    records = [bytes([lab]) + bytes(3 * 32 * 32) for lab in labels]
    path.write_bytes(b"".join(records))


def test_cifar_label_out_of_range_is_a_data_error(tmp_path: Path) -> None:
    root = tmp_path / "cifar-10-batches-bin"
    root.mkdir()
    for i in range(1, 6):
        _cifar_bin(root / f"data_batch_{i}.bin", [1, 2])
    _cifar_bin(root / "test_batch.bin", [3, 200])
    with pytest.raises(DataError, match="test label 200 is not a class"):
        load_dataset("cifar10", tmp_path)


def test_diverging_run_says_so_and_keeps_the_finished_rounds(tmp_path: Path) -> None:
    cfg = small_config(training={"lr": 1e12, "rounds": 4}, attack={"boost": False})
    with pytest.raises(TrainingDivergedError, match="diverged") as info:
        train(cfg, tmp_path / "run", progress=False)
    assert "needs at least" not in str(info.value)
    ckpt = load_checkpoint(tmp_path / "run", require_complete=False)
    r = int(str(info.value).split("round ", 1)[1].split(":", 1)[0])
    assert ckpt.round == r - 1 and len(ckpt.history) == r - 1
    assert np.isfinite([float(v.abs().max()) for v in ckpt.weights().values()]).all()


def test_history_and_manifest_are_strict_json(trained_run: Path) -> None:
    def no_constants(name: str) -> None:
        raise AssertionError(f"non-standard JSON token {name}")

    for line in (trained_run / "history.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=no_constants)
    json.loads((trained_run / "meta.json").read_text(), parse_constant=no_constants)


def test_errors_are_flsec_errors() -> None:
    assert issubclass(TrainingDivergedError, FlsecError) and issubclass(DataError, FlsecError)
