"""Random update stacks for checking flsec's aggregators against plain numpy transcriptions.

``stacks()`` draws k in 3..30 clients and d in 1..2000 coordinates at a scale between 1e-8 and 1e8,
in one of several shapes: independent Gaussian rows (each with its own norm), exact duplicates,
a sybil cluster (rows that differ by 1e-3 of their norm), and rows near a large common offset (the
case where |a|^2 + |b|^2 - 2ab cancels). Rows are float32, as clients send them; the references
work on the same values in float64.
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st

SHAPES = ("gaussian", "duplicates", "sybils", "offset")


@st.composite
def stacks(draw: st.DrawFn, min_k: int = 3, max_k: int = 30, max_d: int = 2000,
           shapes: tuple[str, ...] = SHAPES) -> np.ndarray:
    k = draw(st.integers(min_k, max_k))
    d = draw(st.integers(1, max_d))
    scale = 10.0 ** draw(st.floats(-8, 8))
    shape = draw(st.sampled_from(shapes))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.standard_normal((k, d)) * np.exp(rng.uniform(-1, 1, size=(k, 1)))
    if shape == "duplicates":
        copies = draw(st.integers(1, k - 1))
        for i in rng.choice(k, size=copies, replace=False):
            x[i] = x[rng.integers(k)]
    elif shape == "sybils":
        size = draw(st.integers(2, max(2, k // 2)))
        centre = rng.standard_normal(d) * 3
        x[:size] = centre + 1e-3 * np.linalg.norm(centre) / np.sqrt(d) * rng.standard_normal((size, d))
        x = x[rng.permutation(k)]
    elif shape == "offset":
        x = 1e3 * rng.standard_normal(d) + x
    return (x * scale).astype(np.float32)


def as_torch(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x))


def assert_close(actual: torch.Tensor | np.ndarray, expected: np.ndarray, rtol: float = 1e-5, what: str = "") -> None:
    """max |actual - expected| <= rtol * max |expected| (relative to the vector's scale)."""
    a = actual.detach().double().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    scale = max(float(np.abs(e).max(initial=0.0)), float(np.abs(a).max(initial=0.0)), 1e-300)
    err = float(np.abs(a - e).max(initial=0.0))
    assert err <= rtol * scale, f"{what}: max error {err:.3g} exceeds {rtol:g} x scale {scale:.3g}"


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to norm 1 (zero rows stay zero)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def cosine(x: np.ndarray) -> np.ndarray:
    """Pairwise cosine similarity of the rows; cos(x, x) = 1 for a non-zero row, 0 for a zero row."""
    u = unit_rows(x)
    cs = np.clip(u @ u.T, -1.0, 1.0)
    np.fill_diagonal(cs, (np.linalg.norm(x, axis=1) > 0).astype(float))
    return cs
