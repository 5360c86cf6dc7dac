"""Image datasets as tensors in [0, 1], NCHW, read from their standard file layouts.

* ``digits``: scikit-learn's 8x8 handwritten digits (UCI), shipped with scikit-learn: no download.
* ``mnist`` / ``fashion_mnist``: the official IDX files (``.gz`` or uncompressed), md5-checked.
* ``cifar10``: the official python batches (read with a restricted unpickler that only rebuilds
  numpy arrays) or binary batches; the documented 4,000/1,000-image subset of the binary layout
  is also recognised.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from flsec.errors import DataError
from flsec.io import md5_file, write_bytes
from flsec.registry import Registry


@dataclass(frozen=True)
class ImageDataset:
    """Train and test images in [0, 1] (float32, NCHW) with int64 labels."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for split, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            if x.ndim != 4 or len(x) != len(y) or y.ndim != 1:
                raise DataError(f"{self.name}: {split} images {tuple(x.shape)} and labels {tuple(y.shape)} do not pair up")
            bad = y[(y < 0) | (y >= self.num_classes)]
            if len(bad):
                raise DataError(f"{self.name}: {split} label {int(bad[0])} is not a class (0..{self.num_classes - 1}); "
                                "the file is corrupt")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.x_train.shape[1:]
        return int(c), int(h), int(w)

    def subset(self, train_size: int | None, test_size: int | None, seed: int) -> ImageDataset:
        """A seeded random subset of each split (the whole split where the size is None or too big)."""
        g = torch.Generator().manual_seed(seed)

        def pick(x: torch.Tensor, y: torch.Tensor, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
            if n is None or n >= len(y):
                return x, y
            idx = torch.randperm(len(y), generator=g)[:n].sort().values
            return x[idx], y[idx]

        xtr, ytr = pick(self.x_train, self.y_train, train_size)
        xte, yte = pick(self.x_test, self.y_test, test_size)
        return ImageDataset(self.name, xtr, ytr, xte, yte, self.mean, self.std, self.class_names)


Loader = Callable[[Path | None, bool], ImageDataset]
DATASETS: Registry[Loader] = Registry("dataset")


def load_dataset(name: str, data_dir: str | Path | None = None, download: bool = True) -> ImageDataset:
    loader = DATASETS.get(name)
    return loader(Path(data_dir).expanduser() if data_dir else None, download)


# --- digits ---------------------------------------------------------------------------------


@DATASETS.register("digits")
def load_digits(data_dir: Path | None = None, download: bool = False) -> ImageDataset:
    """scikit-learn's 1,797 8x8 digits; a fixed stratified 80/20 split (seed 0)."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    return ImageDataset(
        "digits",
        torch.from_numpy(xtr),
        torch.from_numpy(ytr),
        torch.from_numpy(xte),
        torch.from_numpy(yte),
        mean=(float(xtr.mean()),),
        std=(float(xtr.std()),),
        class_names=[str(i) for i in range(10)],
    )


# --- IDX (MNIST, Fashion-MNIST) -------------------------------------------------------------


@dataclass(frozen=True)
class _IdxFile:
    name: str
    md5_gz: str
    md5_raw: str


def _parse_idx(data: bytes, path: Path) -> np.ndarray:
    if len(data) < 8:
        raise DataError(f"{path}: too short for an IDX file")
    zero, dtype_code, ndim = data[0:2], data[2], data[3]
    if zero != b"\x00\x00" or dtype_code != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path}: header says {dims} but holds {body.size} values")
    return body.reshape(dims)


def _find_idx(
    roots: list[Path], spec: _IdxFile, mirrors: list[str], download: bool, label: str
) -> np.ndarray:
    for root in roots:
        gz, raw = root / f"{spec.name}.gz", root / spec.name
        if gz.is_file():
            if md5_file(gz) != spec.md5_gz:
                raise DataError(f"{gz}: md5 mismatch (expected {spec.md5_gz}); the file is corrupt or not {label}")
            return _parse_idx(gzip.decompress(gz.read_bytes()), gz)
        if raw.is_file():
            if md5_file(raw) != spec.md5_raw:
                raise DataError(f"{raw}: md5 mismatch (expected {spec.md5_raw}); the file is corrupt or not {label}")
            return _parse_idx(raw.read_bytes(), raw)
    if download and roots:
        target = roots[0] / f"{spec.name}.gz"
        errors = []
        for mirror in mirrors:
            try:
                with urllib.request.urlopen(mirror + spec.name + ".gz", timeout=30) as resp:
                    payload = resp.read()
            except OSError as exc:
                errors.append(f"{mirror}: {exc}")
                continue
            import hashlib

            if hashlib.md5(payload).hexdigest() != spec.md5_gz:
                errors.append(f"{mirror}: md5 mismatch")
                continue
            write_bytes(target, payload)
            return _parse_idx(gzip.decompress(payload), target)
        raise DataError(
            f"{label}: {spec.name}(.gz) not found under {', '.join(map(str, roots))} and download failed "
            f"({'; '.join(errors)})"
        )
    where = ", ".join(map(str, roots)) or "(no data.data_dir given)"
    raise DataError(f"{label}: {spec.name}(.gz) not found under {where}; set data.data_dir")


def _idx_dataset(
    name: str,
    label: str,
    subdirs: list[str],
    files: list[_IdxFile],
    mirrors: list[str],
    class_names: list[str],
    mean: float,
    std: float,
    data_dir: Path | None,
    download: bool,
) -> ImageDataset:
    if data_dir is None:
        raise DataError(f"{label}: data.data_dir is required (a folder holding the IDX files)")
    roots = [data_dir / s for s in subdirs if (data_dir / s).is_dir()] + [data_dir]
    arrays = [_find_idx(roots, f, mirrors, download, label) for f in files]
    xtr, ytr, xte, yte = arrays

    def images(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.float32) / 255.0)[:, None]

    def labels(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.int64))

    return ImageDataset(name, images(xtr), labels(ytr), images(xte), labels(yte), (mean,), (std,), class_names)


_MNIST_FILES = [
    _IdxFile("train-images-idx3-ubyte", "f68b3c2dcbeaaa9fbdd348bbdeb94873", "6bbc9ace898e44ae57da46a324031adb"),
    _IdxFile("train-labels-idx1-ubyte", "d53e105ee54ea40749a09fcbcd1e9432", "a25bea736e30d166cdddb491f175f624"),
    _IdxFile("t10k-images-idx3-ubyte", "9fb629c4189551a2d022fa330f9573f3", "2646ac647ad5339dbf082846283269ea"),
    _IdxFile("t10k-labels-idx1-ubyte", "ec29112dd5afa0611ce80d1b7f02629c", "27ae3e4e09519cfbb04c329615203637"),
]
_FASHION_FILES = [
    _IdxFile("train-images-idx3-ubyte", "8d4fb7e6c68d591d4c3dfef9ec88bf0d", "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
    _IdxFile("train-labels-idx1-ubyte", "25c81989df183df01b3e8a0aad5dffbe", "9018921c3c673c538a1fc5bad174d6f9"),
    _IdxFile("t10k-images-idx3-ubyte", "bef4ecab320f06d8554ea6380940ec79", "8181f5470baa50b63fa0f6fddb340f0a"),
    _IdxFile("t10k-labels-idx1-ubyte", "bb300cfdad3c16e7a12a480ee83cd310", "15d484375f8d13e6eb1aabb0c3f46965"),
]


@DATASETS.register("mnist")
def load_mnist(data_dir: Path | None, download: bool = True) -> ImageDataset:
    """MNIST (LeCun et al. 1998) from ``data_dir``, ``data_dir/mnist`` or ``data_dir/MNIST/raw``."""
    return _idx_dataset(
        "mnist", "MNIST", ["mnist", "MNIST/raw"], _MNIST_FILES,
        ["https://ossci-datasets.s3.amazonaws.com/mnist/"],
        [str(i) for i in range(10)], 0.1307, 0.3081, data_dir, download,
    )


@DATASETS.register("fashion_mnist")
def load_fashion_mnist(data_dir: Path | None, download: bool = True) -> ImageDataset:
    """Fashion-MNIST (Xiao et al. 2017) from ``data_dir``, ``data_dir/fashion-mnist`` or ``FashionMNIST/raw``."""
    names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    return _idx_dataset(
        "fashion_mnist", "Fashion-MNIST", ["fashion-mnist", "fashion_mnist", "FashionMNIST/raw"], _FASHION_FILES,
        ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
        names, 0.2860, 0.3530, data_dir, download,
    )


# --- CIFAR-10 ---------------------------------------------------------------------------------

_CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
_CIFAR_PY_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
_CIFAR_SUBSET_MD5 = {
    "data_batch_1.first4000.bin": "07704ae233cc40e200a600eed4f4e13c",
    "test_batch.first1000.bin": "371f65da31ad652f5e24b3699a3e6515",
}
_CIFAR_RECORD = 1 + 3 * 32 * 32


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Rebuilds only numpy arrays, lists, dicts and bytes: any other global is refused."""

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> type:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _read_cifar_py(path: Path) -> tuple[np.ndarray, np.ndarray]:
    expected = _CIFAR_PY_MD5.get(path.name)
    if expected and md5_file(path) != expected:
        raise DataError(f"{path}: md5 mismatch (expected {expected})")
    try:
        batch = _ArrayOnlyUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise DataError(f"{path}: not a CIFAR-10 python batch ({exc})") from None
    try:
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: not a CIFAR-10 python batch (no valid data/labels: {exc})") from None
    return data, labels


def _read_cifar_bin(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % _CIFAR_RECORD:
        raise DataError(f"{path}: size {raw.size} is not a whole number of CIFAR-10 records ({_CIFAR_RECORD} bytes)")
    expected = _CIFAR_SUBSET_MD5.get(path.name)
    if expected and md5_file(path) != expected:
        raise DataError(f"{path}: md5 mismatch (expected {expected})")
    rec = raw.reshape(-1, _CIFAR_RECORD)
    return rec[:, 1:].reshape(-1, 3, 32, 32), rec[:, 0].astype(np.int64)


@DATASETS.register("cifar10")
def load_cifar10(data_dir: Path | None, download: bool = False) -> ImageDataset:
    """CIFAR-10 (Krizhevsky 2009): python batches, binary batches, or the documented binary subset."""
    if data_dir is None:
        raise DataError("CIFAR-10: data.data_dir is required")
    candidates = [data_dir / "cifar-10-batches-py", data_dir / "cifar-10-batches-bin",
                  data_dir / "cifar-10-subset", data_dir]
    for root in candidates:
        py = [root / f"data_batch_{i}" for i in range(1, 6)]
        if all(p.is_file() for p in py) and (root / "test_batch").is_file():
            parts = [_read_cifar_py(p) for p in py]
            test = _read_cifar_py(root / "test_batch")
            break
        binf = [root / f"data_batch_{i}.bin" for i in range(1, 6)]
        if all(p.is_file() for p in binf) and (root / "test_batch.bin").is_file():
            parts = [_read_cifar_bin(p) for p in binf]
            test = _read_cifar_bin(root / "test_batch.bin")
            break
        sub = [root / n for n in _CIFAR_SUBSET_MD5]
        if all(p.is_file() for p in sub):
            parts = [_read_cifar_bin(sub[0])]
            test = _read_cifar_bin(sub[1])
            break
    else:
        raise DataError(
            f"CIFAR-10: no cifar-10-batches-py or cifar-10-batches-bin layout under {data_dir}"
            + (" (automatic download is not supported for CIFAR-10)" if download else "")
        )
    xtr = np.concatenate([p[0] for p in parts])
    ytr = np.concatenate([p[1] for p in parts])

    def images(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.float32) / 255.0)

    return ImageDataset(
        "cifar10", images(xtr), torch.from_numpy(ytr), images(test[0]), torch.from_numpy(test[1]),
        (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), list(_CIFAR_NAMES),
    )
