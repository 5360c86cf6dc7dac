"""The numbers of a `flsec run` directory (train / invert / unlearn), for result files.

Reads only the JSON files the phases write (``train/history.jsonl``, ``invert*/metrics.json``,
``unlearn/metrics.json``); a phase that did not finish is reported as missing, never guessed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_history(train_dir: Path) -> list[dict[str, Any]]:
    """Per-round records of a training run (``round``, ``ma``, ``asr``, ...); [] when there are none."""
    path = train_dir / "history.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if "phase" not in r]


def read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def inversion_numbers(metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    """Mean PSNR and the per-capture scores of an inversion's metrics.json."""
    if metrics is None:
        return None
    s = metrics["summary"]
    targets = [{k: t.get(k) for k in ("round", "client", "kind", "status", "mean_psnr", "num_samples",
                                      "label_accuracy", "mean_trigger_correlation", "surrogate")}
               for t in metrics["targets"]]
    return {"mean_psnr": s.get("mean_psnr"), "images": s.get("images"), "label_accuracy": s.get("label_accuracy"),
            "summary": s, "targets": targets}


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def curve(history: list[dict[str, Any]], key: str) -> str:
    return ", ".join(pct(r.get(key)) for r in history)
