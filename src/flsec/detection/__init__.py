"""Suspects: whose updates a server would invert, decided from what it receives (never from who attacked)."""

from __future__ import annotations

from flsec.detection.base import DETECTORS, Suspicion, detect, modified_z, resolve_detector

from flsec.detection import update_space as _update_space  # noqa: F401  isort: skip

__all__ = ["DETECTORS", "Suspicion", "detect", "modified_z", "resolve_detector"]
