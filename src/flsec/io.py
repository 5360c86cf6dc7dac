"""Atomic file writes and hashing: nothing half-written is ever left under a final name.

Every file is written to a temporary name in its final directory, flushed to disk and renamed
over the final name; the directory is synced too so the rename survives a power cut. Files get
the permissions an ordinary ``open()`` would give them (0666 minus the umask), so shared run
directories stay readable. JSON is strict (no ``NaN``/``Infinity`` tokens: non-finite numbers are
written as ``null``), and safetensors files are byte-identical for identical content.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes

from flsec.faults import fault_point

TEMP_SUFFIX = ".tmp"
METADATA_KEY = "flsec"


def _default_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


FILE_MODE = _default_mode()


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def is_temp_file(path: Path) -> bool:
    """A temporary file left by an interrupted :func:`atomic_path` (safe to delete)."""
    return path.name.startswith(".") and path.name.endswith(TEMP_SUFFIX)


def remove_temp_files(root: Path, owned_marker: str | None = None) -> list[Path]:
    """Delete the temporary files interrupted writers left under ``root`` (only flsec's own
    ``.<name>.<random>.tmp`` names; symbolic links are neither followed nor removed). Sub-directories
    holding a file named ``owned_marker`` (another writer's lock) are left to that writer."""
    removed = []
    for dirpath, dirs, files in os.walk(root, followlinks=False):
        if owned_marker:
            dirs[:] = [d for d in dirs if not (Path(dirpath) / d / owned_marker).exists()]
        for name in files:
            path = Path(dirpath) / name
            if is_temp_file(path) and not path.is_symlink():
                path.unlink()
                removed.append(path)
    return removed


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path in the same directory; rename it onto ``path`` on success. An
    ``OSError`` that names no file (e.g. a full disk found by ``write``) is raised naming ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, FILE_MODE)
        fault_point("atomic:before_rename")
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    except OSError as exc:
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def strict_json(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (JSON has no NaN or Infinity)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [strict_json(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """Strict, deterministic JSON text of ``obj`` (sorted keys, no NaN/Infinity)."""
    return json.dumps(strict_json(_plain(obj)), sort_keys=True, allow_nan=False, **kwargs)


def write_json(path: Path, obj: Any) -> None:
    write_text(path, dumps(obj, indent=2) + "\n")


def write_jsonl(path: Path, rows: list[Any]) -> None:
    write_text(path, "".join(dumps(r) + "\n" for r in rows))


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write tensors as safetensors (no pickle), atomically, as CPU tensors.

    The metadata is stored as one sorted JSON string under the key ``flsec``: safetensors keeps its
    header's metadata in a hash map, so several keys would come out in a different order from run to
    run and identical content would give different bytes.

    The bytes are built in memory and written by :func:`write_bytes`, so a failed write (a full disk)
    is an ``OSError`` naming ``path``, like every other file flsec writes.
    """
    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    header = {METADATA_KEY: json.dumps(metadata, sort_keys=True)} if metadata else None
    write_bytes(path, safetensors_bytes(contiguous, metadata=header))


def unpack_metadata(header: dict[str, str]) -> dict[str, str]:
    """The metadata dict given to :func:`write_tensors`, from a safetensors header's metadata."""
    if set(header) == {METADATA_KEY}:
        try:
            inner = json.loads(header[METADATA_KEY])
        except json.JSONDecodeError:
            return {}
        if isinstance(inner, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in inner.items()):
            return inner
        return {}
    return dict(header)


def write_with(path: Path, writer: Callable[[Path], None]) -> None:
    """Atomically write ``path`` with a function that writes to the path it is given."""
    with atomic_path(path) as tmp:
        writer(tmp)


def file_digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    return file_digest(path, "sha256")


def md5_file(path: Path) -> str:
    return file_digest(path, "md5")


def _plain(obj: Any) -> Any:
    """Convert paths, tensors and numpy scalars/arrays into JSON-native values, recursively."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, str | int | float | bool):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return _plain(obj.tolist())
    if hasattr(obj, "tolist"):
        return _plain(obj.tolist())
    if hasattr(obj, "item"):
        return _plain(obj.item())
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
