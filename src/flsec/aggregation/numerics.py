"""Overflow- and cancellation-safe building blocks shared by the rules.

Updates arrive as a k x d float32 stack (d up to tens of millions). Everything that sums over
coordinates or over clients (weighted means, norms, Gram matrices, distances) is computed in
float64, one block of columns at a time, so the float64 temporaries stay small (k x ``BLOCK``) and a
float32-finite input can never overflow: |x| < 3.4e38 gives x^2 < 1.2e77, far inside float64.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

#: Columns per block: k x BLOCK float64 temporaries (20 clients: 10 MiB, cache-sized; 4x larger
#: blocks were 7x slower on an 11M-parameter stack).
BLOCK = 1 << 16


def blocks(d: int, size: int = BLOCK) -> Iterator[slice]:
    """Consecutive column slices covering ``0..d``."""
    for start in range(0, d, size):
        yield slice(start, min(start + size, d))


def weighted_sum(weights: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
    """sum_i w_i U_i in float64 (d)."""
    w = weights.to(torch.float64)
    out = torch.empty(updates.shape[1], dtype=torch.float64)
    for s in blocks(updates.shape[1]):
        out[s] = w @ updates[:, s].to(torch.float64)
    return out


def row_norms(updates: torch.Tensor) -> torch.Tensor:
    """Euclidean norm of each row, in float64 (k)."""
    sq = torch.zeros(updates.shape[0], dtype=torch.float64)
    for s in blocks(updates.shape[1]):
        x = updates[:, s].to(torch.float64)
        sq += (x * x).sum(dim=1)
    return sq.sqrt()


def first_copies(updates: torch.Tensor) -> list[int]:
    """For every row, the index of the first row identical to it (itself if none): rows equal on a
    sample of every 61st column are compared in full."""
    k = updates.shape[0]
    sample = updates[:, ::61]
    first = list(range(k))
    for i in range(k):
        for j in range(i):
            if first[j] == j and torch.equal(sample[i], sample[j]) and torch.equal(updates[i], updates[j]):
                first[i] = j
                break
    return first


def gram(updates: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
    """(U - shift)(U - shift)^T in float64 (k x k); ``shift`` is one d-vector subtracted from every row.

    Exactly symmetric, and identical rows get bit-identical rows and columns (the product is taken
    over the distinct rows only), so ties between duplicates are real ties for every rule."""
    first = first_copies(updates)
    distinct = sorted(set(first))
    rows = torch.tensor(distinct)
    sub = updates if len(distinct) == updates.shape[0] else updates[rows]
    m = len(distinct)
    g = torch.zeros(m, m, dtype=torch.float64)
    for s in blocks(updates.shape[1]):
        x = sub[:, s].to(torch.float64)
        if shift is not None:
            x = x - shift[s].to(torch.float64)
        g += x @ x.T
    g = (g + g.T) / 2  # exactly symmetric whatever order the matrix product summed in
    where = torch.tensor([distinct.index(f) for f in first])
    return g[where][:, where]


def column_mean(updates: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise mean in float64 (d)."""
    return weighted_sum(torch.full((updates.shape[0],), 1.0 / updates.shape[0], dtype=torch.float64), updates)


def cosine_from_gram(g: torch.Tensor) -> torch.Tensor:
    """Cosine similarities from a Gram matrix, clamped to [-1, 1]. A zero row has similarity 0 to
    everything, itself included (as scikit-learn's ``cosine_similarity``); a non-zero row has
    similarity exactly 1 to itself."""
    norms = g.diagonal().clamp_min(0).sqrt()
    nonzero = norms > 0
    safe = torch.where(nonzero, norms, torch.ones_like(norms))
    cos = (g / safe[:, None] / safe[None, :]).clamp(-1.0, 1.0)
    cos = torch.where(nonzero[:, None] & nonzero[None, :], cos, torch.zeros_like(cos))
    cos.diagonal().copy_(nonzero.to(cos.dtype))
    return cos


def cosine_matrix(x: torch.Tensor) -> torch.Tensor:
    """k x k cosine similarities of the rows of ``x``, in float64."""
    return cosine_from_gram(gram(x))


def pairwise_sq_distances(updates: torch.Tensor, recheck: float = 1e-3) -> torch.Tensor:
    """k x k squared Euclidean distances in float64, free of the cancellation of |a|^2+|b|^2-2ab.

    The Gram formula is applied to the rows *centred* on their coordinate-wise mean (in float64),
    which removes the shared offset that makes the plain formula cancel (updates that all lie near a
    common large vector). Its remaining rounding error is at most ~d * 1e-16 * (|a|^2 + |b|^2) of the
    centred rows; every pair whose distance is below ``recheck`` times that scale (near-duplicates,
    sybils) is recomputed exactly from the differences, block by block. The diagonal is exactly 0.
    """
    d = updates.shape[1]
    g = gram(updates, shift=column_mean(updates))
    sq = g.diagonal().clone()
    dist = (sq[:, None] + sq[None, :] - 2.0 * g).clamp_min(0.0)
    idx = torch.arange(dist.shape[0])
    close = (dist <= recheck * (sq[:, None] + sq[None, :])) & (idx[:, None] < idx[None, :])
    pairs = torch.nonzero(close).tolist()
    if pairs:
        exact = torch.zeros(len(pairs), dtype=torch.float64)
        left = torch.tensor([i for i, _ in pairs])
        right = torch.tensor([j for _, j in pairs])
        for s in blocks(d):
            x = updates[:, s].to(torch.float64)
            diff = x[left] - x[right]
            exact += (diff * diff).sum(dim=1)
        dist[left, right] = exact
        dist[right, left] = exact
    dist.fill_diagonal_(0.0)
    return dist


def sorted_blocks(updates: torch.Tensor) -> Iterator[tuple[slice, np.ndarray, np.ndarray]]:
    """For each block of columns: (columns, values sorted per coordinate, the rows they came from).

    ``values`` and ``order`` are (block x k) numpy arrays; the sort is stable, so equal values keep
    the order of their rows and the result is a function of the multiset of rows.
    """
    for s in blocks(updates.shape[1], BLOCK // 4):
        col = np.ascontiguousarray(updates[:, s].numpy().T)
        order = np.argsort(col, axis=1, kind="stable")
        yield s, np.take_along_axis(col, order, axis=1), order
