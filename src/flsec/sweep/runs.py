"""The runs of a sweep: one ordinary run directory per (cell, seed), where it lives and how far it got."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from flsec.sweep.grid import Axis, Cell


@dataclass(frozen=True)
class Run:
    """One seed of one cell and its run directory."""

    cell: Cell
    seed: int
    dir: Path


@dataclass
class SweepResult:
    out: Path
    axes: list[Axis]
    cells: list[Cell]
    seeds: list[int]
    runs: list[Run]
    name: str = "sweep"
    trained: int = 0
    skipped: int = 0
    failed: list[tuple[Run, str]] = field(default_factory=list)


def run_dir(out: Path, cell: Cell, seed: int) -> Path:
    return out / "runs" / cell.id / f"seed_{seed}"


def run_status(path: Path) -> str:
    """``complete``, ``partial`` (a run was started; resume it) or ``missing``."""
    meta = path / "meta.json"
    if not meta.is_file():
        return "partial" if path.exists() and any(path.iterdir()) else "missing"
    try:
        status = json.loads(meta.read_text(encoding="utf-8")).get("status")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return "partial"
    return "complete" if status == "complete" else "partial"
