"""Client partitions of a training set: IID and Dirichlet(alpha) label skew."""

from __future__ import annotations

import numpy as np

from flsec.errors import ConfigError


def iid_partition(num_samples: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """Shuffle and split into ``num_clients`` near-equal shards."""
    if num_clients > num_samples:
        raise ConfigError(f"training.num_clients: {num_clients} exceeds the {num_samples} training samples")
    rng = np.random.default_rng(seed)
    return [np.sort(s) for s in np.array_split(rng.permutation(num_samples), num_clients)]


def dirichlet_partition(
    labels: np.ndarray, num_clients: int, alpha: float, seed: int, min_size: int = 8, max_tries: int = 1000
) -> list[np.ndarray]:
    """Label-skewed split (Hsu, Qi & Brown 2019): per class, client shares ~ Dir(alpha * 1).

    Resamples until every client holds at least ``min_size`` samples. Each try costs a few NumPy
    passes over the labels whatever the number of clients (no per-client Python loop), so 10,000
    clients try fast, and fail fast when the split is hopeless (Dirichlet shares leave some clients
    empty once there are only a few samples per client).
    """
    labels = np.asarray(labels)
    if num_clients * min_size > len(labels):
        raise ConfigError(
            f"data.min_client_size: {num_clients} clients x {min_size} exceeds the {len(labels)} training samples"
        )
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    by_class = [np.flatnonzero(labels == c) for c in classes]
    owner = np.empty(len(labels), dtype=np.int64)
    for _ in range(max_tries):
        for idx in by_class:
            idx = rng.permutation(idx)
            shares = rng.dirichlet(np.full(num_clients, alpha))
            if not np.isfinite(shares).all():
                raise ConfigError(f"data.alpha: Dirichlet({alpha}) cannot be sampled in floating point; use alpha >= 1e-3")
            cuts = (np.cumsum(shares) * len(idx)).astype(int)[:-1]
            counts = np.diff(np.concatenate(([0], np.clip(cuts, 0, len(idx)), [len(idx)])))
            owner[idx] = np.repeat(np.arange(num_clients), counts)
        sizes = np.bincount(owner, minlength=num_clients)
        if sizes.min() >= min_size:
            order = np.argsort(owner, kind="stable")
            return [np.sort(part) for part in np.split(order, np.cumsum(sizes)[:-1])]
    raise ConfigError(
        f"data.alpha: no Dirichlet({alpha}) split gave every client >= {min_size} samples in {max_tries} tries; "
        "raise data.alpha or lower data.min_client_size (or use data.partition = 'iid')"
    )


def make_partition(
    kind: str, labels: np.ndarray, num_clients: int, seed: int, alpha: float = 0.5, min_size: int = 8
) -> list[np.ndarray]:
    if kind == "iid":
        return iid_partition(len(labels), num_clients, seed)
    if kind == "dirichlet":
        return dirichlet_partition(labels, num_clients, alpha, seed, min_size)
    raise ConfigError(f"data.partition: unknown '{kind}'; allowed: iid, dirichlet")
