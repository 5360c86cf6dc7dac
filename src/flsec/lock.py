"""One writer per output directory: a second flsec process writing the same ``--out`` is refused.

A directory the lock created and nothing else wrote into is removed again when the lock is released;
temporary files a killed writer left in it are removed when the lock is taken.

The lock is an advisory ``flock`` on ``<dir>/.lock``, held by the open file for the life of the
process, so it is released even when the process is killed (no stale lock to clean up by hand).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from flsec.errors import CheckpointError
from flsec.io import remove_temp_files

LOCK_NAME = ".lock"

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, fall back to exclusive create
    fcntl = None  # type: ignore[assignment]


@contextlib.contextmanager
def locked_dir(path: Path, option: str = "--out") -> Iterator[None]:
    """Hold the write lock of directory ``path`` (created if needed) for the ``with`` block."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{option}: {path} exists and is not a directory; choose a directory")
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    lock = path / LOCK_NAME
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    if fcntl is None:
        flags |= os.O_EXCL
    try:
        fd = os.open(lock, flags, 0o644)
    except FileExistsError:
        raise CheckpointError(f"{option}: {path} is in use by another flsec process (remove {lock} if none runs)") from None
    except OSError as exc:
        raise CheckpointError(f"{option}: cannot lock {lock} ({exc.strerror})") from None
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                other = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
                raise CheckpointError(f"{option}: {path} is in use by another flsec process"
                                      f"{f' (pid {other})' if other.isdigit() else ''}; wait for it or choose "
                                      "another directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        remove_temp_files(path, LOCK_NAME)  # the only writer now: what a killed one left half-written goes
        yield
    finally:
        if created and os.listdir(path) == [LOCK_NAME]:
            # Nothing was written (e.g. the config was refused): leave no empty directory behind.
            with contextlib.suppress(OSError):
                lock.unlink()
                path.rmdir()
        elif fcntl is None:
            with contextlib.suppress(OSError):
                lock.unlink()
        os.close(fd)
