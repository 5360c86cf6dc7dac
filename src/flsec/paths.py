"""Paths inside a run directory, which is untrusted input: every file flsec reads or writes there is
named relative to the directory, stays inside it and is reached without following a symlink.

A shared run directory could otherwise point flsec elsewhere: a manifest entry ``../../x`` or
``/etc/passwd``, or a ``state`` / ``updates`` folder that is a symlink to somewhere else, would make
flsec read, overwrite or delete files outside the directory.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath

from flsec.errors import CheckpointError


def check_relative(rel: str, root: Path) -> PurePosixPath:
    """``rel`` as a normalised relative POSIX path with no ``..``, drive, absolute or empty part."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        raise CheckpointError(f"{root}: file entry {rel!r} is not a relative path inside the run directory")
    p = PurePosixPath(rel)
    if p.is_absolute() or any(part in ("", ".", "..") for part in rel.split("/")) or ":" in p.parts[0]:
        raise CheckpointError(f"{root}: file entry {rel!r} points outside the run directory")
    return p


def confined(root: Path, rel: str) -> Path:
    """The path of ``rel`` under ``root``, refusing escapes and symlinks on the way (``rel`` itself
    may not exist yet: its parents that do exist must be real directories)."""
    p = check_relative(rel, root)
    current = Path(root)
    for part in p.parts:
        current = current / part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            return Path(root).joinpath(*p.parts)
        if stat.S_ISLNK(st.st_mode):
            raise CheckpointError(f"{current}: is a symbolic link; a run directory must not contain links")
    return current

