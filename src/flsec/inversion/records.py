"""Strict JSON for phase 2-3 outputs: no NaN / Infinity tokens (they are not JSON).

A value that is not a finite number is written as ``null``; the record that holds it says why in
a ``*_status`` field next to it (e.g. ``mask_iou_status: "no trigger estimated"``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from flsec.io import write_text


def finite(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (tensors, paths and numpy scalars converted)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return finite(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        return finite(obj.item())
    return obj


def dumps(obj: Any) -> str:
    return json.dumps(finite(obj), indent=2, sort_keys=True, allow_nan=False) + "\n"


def write_strict_json(path: Path, obj: Any) -> None:
    """Atomically write ``obj`` as strict JSON (see the module docstring)."""
    write_text(path, dumps(obj))


def number_or_status(value: float | None, reason: str) -> tuple[float | None, str]:
    """(value, "ok") for a finite number, else (None, reason)."""
    if value is None or not math.isfinite(float(value)):
        return None, reason
    return float(value), "ok"
