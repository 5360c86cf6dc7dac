"""Dataset parsing (on files the tests make), partitions and the safe CIFAR unpickler."""

from __future__ import annotations

import gzip
import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from flsec.data import datasets as ds
from flsec.data import dirichlet_partition, iid_partition, load_dataset
from flsec.errors import ConfigError, DataError


def test_digits_shapes_and_range() -> None:
    d = load_dataset("digits")
    assert d.x_train.shape[1:] == (1, 8, 8) and d.num_classes == 10
    assert len(d.y_train) + len(d.y_test) == 1797
    assert float(d.x_train.min()) >= 0.0 and float(d.x_train.max()) <= 1.0
    sub = d.subset(100, 50, seed=3)
    assert len(sub.y_train) == 100 and len(sub.y_test) == 50
    assert torch.equal(sub.y_train, d.subset(100, 50, seed=3).y_train)


def _idx(array: np.ndarray) -> bytes:
    header = b"\x00\x00\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _fake_mnist(folder: Path, monkeypatch: pytest.MonkeyPatch, gz: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (12, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, 12),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (5, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, 5),
    }
    specs = []
    for name, arr in arrays.items():
        raw = _idx(arr)
        packed = gzip.compress(raw)
        (folder / (f"{name}.gz" if gz else name)).write_bytes(packed if gz else raw)
        specs.append(ds._IdxFile(name, hashlib.md5(packed).hexdigest(), hashlib.md5(raw).hexdigest()))
    monkeypatch.setattr(ds, "_MNIST_FILES", specs)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_parsing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gz: bool) -> None:
    arrays = _fake_mnist(tmp_path, monkeypatch, gz)
    d = load_dataset("mnist", tmp_path, download=False)
    assert d.x_train.shape == (12, 1, 28, 28) and d.x_test.shape == (5, 1, 28, 28)
    assert torch.allclose(d.x_train[3, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"][3] / 255.0).float())
    assert d.y_test.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()


def test_mnist_md5_mismatch_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_mnist(tmp_path, monkeypatch, gz=True)
    p = tmp_path / "train-labels-idx1-ubyte.gz"
    p.write_bytes(p.read_bytes() + b"x")
    with pytest.raises(DataError, match="md5 mismatch"):
        load_dataset("mnist", tmp_path, download=False)


def test_missing_files_give_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found under"):
        load_dataset("mnist", tmp_path, download=False)
    with pytest.raises(DataError, match="data.data_dir is required"):
        load_dataset("fashion_mnist", None, download=False)


def test_cifar_binary_layout(tmp_path: Path) -> None:
    root = tmp_path / "cifar-10-batches-bin"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        rec = rng.integers(0, 256, (3, 3073)).astype(np.uint8)
        rec[:, 0] %= 10
        rec.tofile(root / name)
    d = load_dataset("cifar10", tmp_path)
    assert d.x_train.shape == (15, 3, 32, 32) and d.x_test.shape == (3, 3, 32, 32)
    first = np.fromfile(root / "data_batch_1.bin", np.uint8).reshape(-1, 3073)[0]
    assert int(d.y_train[0]) == first[0]
    assert torch.allclose(d.x_train[0], torch.from_numpy(first[1:].reshape(3, 32, 32) / 255.0).float())


class _Evil:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (print, ("executed",))


def test_cifar_python_batch_unpickler_only_rebuilds_arrays(tmp_path: Path) -> None:
    good = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 2]}
    arr = ds._ArrayOnlyUnpickler(__import__("io").BytesIO(pickle.dumps(good)), encoding="bytes").load()
    assert arr[b"labels"] == [1, 2] and arr[b"data"].shape == (2, 3072)
    p = tmp_path / "evil_batch"
    p.write_bytes(pickle.dumps({b"data": _Evil(), b"labels": []}))
    with pytest.raises(DataError, match="refusing to load global"):
        ds._read_cifar_py(p)


def test_iid_partition_is_a_seeded_partition() -> None:
    parts = iid_partition(103, 10, seed=4)
    allidx = np.concatenate(parts)
    assert sorted(allidx.tolist()) == list(range(103))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert all(np.array_equal(a, b) for a, b in zip(parts, iid_partition(103, 10, seed=4), strict=True))


def test_dirichlet_partition_skews_labels() -> None:
    labels = np.repeat(np.arange(10), 100)
    skewed = dirichlet_partition(labels, 10, alpha=0.1, seed=0)
    flat = dirichlet_partition(labels, 10, alpha=100.0, seed=0)
    assert sorted(np.concatenate(skewed).tolist()) == list(range(1000))

    def mean_max_share(parts: list[np.ndarray]) -> float:
        return float(np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in parts]))

    assert mean_max_share(skewed) > 0.5 > mean_max_share(flat)
    assert min(map(len, skewed)) >= 8


def test_dirichlet_impossible_request_is_config_error() -> None:
    with pytest.raises(ConfigError, match="data.min_client_size"):
        dirichlet_partition(np.zeros(20, dtype=int), 10, 0.5, 0, min_size=8)
