"""Scale in clients: partitions of 10,000 clients, rounds whose cost follows the sampled clients only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from flsec.data import DATASETS, ImageDataset
from flsec.data.partition import dirichlet_partition, iid_partition
from flsec.errors import ConfigError
from flsec.fl.engines import train
from flsec.fl.federation import Federation
from tests.conftest import small_config


def reference_dirichlet(labels: np.ndarray, num_clients: int, alpha: float, seed: int, min_size: int,
                        max_tries: int = 1000) -> list[np.ndarray] | None:
    """The per-client loop of Hsu et al.'s split as first written (per class: permute, draw
    Dir(alpha), cut, append); None when no try satisfies min_size."""
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        shards: list[list[int]] = [[] for _ in range(num_clients)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares) * len(idx)).astype(int)[:-1]
            for client, part in enumerate(np.split(idx, cuts)):
                shards[client].extend(part.tolist())
        if min(len(s) for s in shards) >= min_size:
            return [np.sort(np.asarray(s, dtype=np.int64)) for s in shards]
    return None


@pytest.mark.parametrize(("n", "clients", "alpha", "seed", "min_size"),
                         [(500, 10, 0.5, 0, 8), (2000, 50, 0.1, 3, 2), (3000, 7, 5.0, 1, 20), (400, 40, 0.5, 2, 5)])
def test_dirichlet_split_equals_the_reference_loop(n: int, clients: int, alpha: float, seed: int, min_size: int) -> None:
    labels = np.random.default_rng(seed + 100).integers(0, 10, n)
    ref = reference_dirichlet(labels, clients, alpha, seed, min_size, max_tries=50)
    if ref is None:
        with pytest.raises(ConfigError, match=r"^data.alpha: no Dirichlet"):
            dirichlet_partition(labels, clients, alpha, seed, min_size, max_tries=50)
        return
    got = dirichlet_partition(labels, clients, alpha, seed, min_size, max_tries=50)
    assert len(got) == clients and all(np.array_equal(a, b) for a, b in zip(got, ref, strict=True))


def test_ten_thousand_clients_partition() -> None:
    labels = np.random.default_rng(0).integers(0, 10, 60_000)
    shards = iid_partition(len(labels), 10_000, seed=0)
    assert len(shards) == 10_000 and {len(s) for s in shards} == {6}
    assert np.array_equal(np.sort(np.concatenate(shards)), np.arange(60_000))
    with pytest.raises(ConfigError, match=r"raise data.alpha or lower data.min_client_size"):
        dirichlet_partition(labels, 10_000, 0.5, 0, min_size=1, max_tries=3)  # Dir(0.5) leaves clients empty
    thousand = dirichlet_partition(labels, 1_000, 0.5, 0, min_size=8)
    assert sum(len(s) for s in thousand) == 60_000 and min(len(s) for s in thousand) >= 8


@DATASETS.register("noise_8x8")
def _noise(data_dir: Path | None = None, download: bool = False) -> ImageDataset:
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(20_200, 1, 8, 8, generator=g), torch.randint(0, 10, (20_200,), generator=g)
    return ImageDataset("noise_8x8", x[:20_000], y[:20_000], x[20_000:], y[20_000:], (0.5,), (0.29,),
                        [str(i) for i in range(10)])


@pytest.mark.parametrize("engine", ["sequential", "vectorised"])
def test_ten_thousand_clients_run_a_round_with_one_model_per_engine(tmp_path: Path, engine: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[int] = []
    new_model = Federation.new_model
    monkeypatch.setattr(Federation, "new_model", lambda self: built.append(1) or new_model(self))
    cfg = small_config(data={"name": "noise_8x8"}, training={"num_clients": 10_000, "client_fraction": 0.01, "rounds": 1},
                       attack={"num_malicious": 5}, runtime={"client_engine": engine})
    ckpt = train(cfg, tmp_path / engine, progress=False)
    (record,) = ckpt.history
    assert len(record["selected"]) == 100 == len(record["update_norms"]) and all(u > 0 for u in record["update_norms"])
    assert len(built) == 2  # the server's model and the engine's scratch model: never one per client
    assert sum(record["weights"]) == pytest.approx(1.0, abs=1e-5)
