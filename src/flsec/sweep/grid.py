"""A sweep's cells: the Cartesian product of the grid's axes, each a validated experiment config.

A cell's id is a readable slug of its values plus a digest of everything that determines its training
(base config and overrides, not the seed or the runtime), so a run directory is only ever reused by the
same experiment: change the base config and the cells get new directories instead of mixing results.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from typing import Any

from flsec.config import ExperimentConfig, SweepGrid, build_config
from flsec.errors import ConfigError


@dataclass(frozen=True)
class Axis:
    """One dimension of a sweep: a dotted config path, its values and their display labels."""

    key: str
    values: tuple[Any, ...]
    labels: tuple[str, ...]


@dataclass(frozen=True)
class Cell:
    """One point of the grid (all seeds of it): its id, the value of each axis and its label."""

    id: str
    overrides: tuple[tuple[str, Any], ...]
    labels: tuple[str, ...]

    def config(self, base: dict[str, Any], seed: int) -> ExperimentConfig:
        return build_config(with_seed(apply_cell(base, self.overrides), seed))


def value_label(value: Any) -> str:
    """A short display name for an axis value without a label."""
    if isinstance(value, dict):
        return ",".join(f"{k}={value_label(v)}" for k, v in value.items())
    if isinstance(value, str):
        return value
    return json.dumps(value)


def axes_of(grid: SweepGrid) -> list[Axis]:
    return [Axis(key, tuple(values), tuple(grid.labels.get(key) or [value_label(v) for v in values]))
            for key, values in grid.grid.items()]


def set_path(data: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """``data`` with ``value`` at the dotted ``key``; a table value is merged into the section there."""
    out = copy.deepcopy(data)
    parts = key.split(".")
    node = out
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"grid.{key}: '{p}' is a value, not a section")
        node = child
    last = parts[-1]
    if isinstance(value, dict) and isinstance(node.get(last), dict):
        node[last] = _merge(node[last], value)
    else:
        node[last] = copy.deepcopy(value)
    return out


def _merge(into: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    out = dict(into)
    for k, v in new.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def apply_cell(base: dict[str, Any], overrides: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
    """The base config with the cell's values; shorter paths first, so a table value never erases a
    more specific axis (``"attack" = {kind = ...}`` with ``"attack.num_malicious"``)."""
    out = base
    for key, value in sorted(overrides, key=lambda kv: kv[0].count(".")):
        out = set_path(out, key, value)
    return out


def with_seed(data: dict[str, Any], seed: int) -> dict[str, Any]:
    return {**data, "seed": seed}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")[:24] or "x"


def training_digest(config: ExperimentConfig) -> str:
    """Digest of what determines a cell's training, whatever its seed and runtime."""
    from flsec.fl.server import training_fields

    fields = training_fields(config.model_dump(mode="json"))
    fields.pop("seed", None)
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]


def expand(base: dict[str, Any], grid: SweepGrid, seeds: list[int]) -> tuple[list[Axis], list[Cell]]:
    """Every cell of the grid, validated for every seed (a bad value stops before anything runs)."""
    axes = axes_of(grid)
    cells: list[Cell] = []
    for combo in itertools.product(*(range(len(a.values)) for a in axes)):
        overrides = tuple((a.key, a.values[i]) for a, i in zip(axes, combo, strict=True))
        labels = tuple(a.labels[i] for a, i in zip(axes, combo, strict=True))
        where = ", ".join(f"{a.key} = {lab}" for a, lab in zip(axes, labels, strict=True))
        try:
            configs = [build_config(with_seed(apply_cell(base, overrides), s)) for s in seeds]
        except ConfigError as exc:
            raise ConfigError(f"grid cell ({where}): {exc}") from None
        cell_id = "_".join(_slug(lab) for lab in labels) + "-" + training_digest(configs[0])
        cells.append(Cell(cell_id, overrides, labels))
    return axes, cells
