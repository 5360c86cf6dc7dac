"""Where each file of a run directory lives, the top-level links to the last committed round, and the
removal of what an interrupted writer left (only flsec's own names, never through a symbolic link;
every path is confined to the directory by :func:`flsec.paths.confined`)."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from flsec.errors import CheckpointError
from flsec.io import is_temp_file
from flsec.lock import LOCK_NAME
from flsec.paths import confined

META = "meta.json"
ALIASES = {"model_file": "model.safetensors", "history_file": "history.jsonl"}
FLSEC_NAMES = {META, LOCK_NAME, "rounds", "updates", "evaluation_only", *ALIASES.values()}


def capture_path(kind: str, round_: int, client: int) -> str:
    folder = "updates" if kind == "updates" else "evaluation_only"
    return f"{folder}/round_{round_}/client_{client}.safetensors"


def global_model_path(round_: int) -> str:
    """The global weights a captured round's clients received (what the server sent them)."""
    return f"updates/round_{round_}/global_model.safetensors"


def generation_dir(round_: int) -> str:
    return f"rounds/round_{round_}"


def generation_files(round_: int) -> dict[str, str]:
    """The manifest's ``model_file``, ``state_file`` and ``history_file`` of round ``round_``."""
    gen = generation_dir(round_)
    return {"model_file": f"{gen}/model.safetensors", "state_file": f"{gen}/state.safetensors",
            "history_file": f"{gen}/history.jsonl"}


def refresh_alias(root: Path, rel: str, alias: str) -> None:
    """Point the top-level ``alias`` at ``rel`` (a hard link, or a copy where links are unsupported)."""
    src, dst = confined(root, rel), confined(root, alias)
    tmp = root / f".{alias}.{uuid.uuid4().hex}.tmp"
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def refresh_aliases(root: Path, meta: dict[str, Any]) -> None:
    """Point every top-level link at the files of the round ``meta`` commits."""
    for key, alias in ALIASES.items():
        refresh_alias(root, meta[key], alias)


def _refuse_link(path: Path) -> None:
    if path.is_symlink():
        raise CheckpointError(f"{path}: is a symbolic link; a run directory must not contain links")


def remove_leftovers(root: Path, meta: dict[str, Any] | None) -> list[str]:
    """Delete what an interrupted writer left: temporary files, round folders and captures that no
    committed manifest lists. Only flsec's own names are touched, never through a symlink."""
    listed = set(meta["files"]) if meta else set()
    removed: list[str] = []
    root = Path(root)
    current = str(Path(meta["model_file"]).parent) if meta else None
    for folder in ("rounds", "updates", "evaluation_only"):
        top = root / folder
        _refuse_link(top)
        if not top.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
            for name in filenames:
                path = Path(dirpath) / name
                rel = path.relative_to(root).as_posix()
                stale_round = folder == "rounds" and not rel.startswith(f"{current}/")
                if is_temp_file(path) or stale_round or (folder != "rounds" and rel not in listed):
                    path.unlink()
                    removed.append(rel)
            for d in dirnames:
                _refuse_link(Path(dirpath) / d)
        for dirpath, _dirs, _files in sorted(os.walk(top, followlinks=False), reverse=True):
            if dirpath != str(top) and not os.listdir(dirpath):
                os.rmdir(dirpath)
    for path in root.iterdir():
        if path.is_file() and not path.is_symlink() and is_temp_file(path):
            path.unlink()
            removed.append(path.name)
    return removed


def only_flsec_leftovers(root: Path) -> bool:
    """True when ``root`` holds nothing but what an interrupted flsec writer makes before its first
    commit (so starting afresh there loses nothing of the user's)."""
    return all(p.name in FLSEC_NAMES or is_temp_file(p) for p in Path(root).iterdir())
