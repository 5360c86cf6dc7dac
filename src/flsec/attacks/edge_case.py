"""Edge-case backdoor (Wang et al. 2020, "Attack of the Tails: Yes, You Really Can Backdoor Federated
Learning", Sec. 3).

The backdoor targets inputs from the tail of the data distribution: images that are legitimate but so
rare that the honest clients (almost) never hold them, so that flipping their label costs the main task
nothing and the honest updates hardly fight it. The paper's tail sets come from outside data (ARDIS 7s
for EMNIST, Southwest airliners for CIFAR-10). flsec builds an in-distribution tail from the data it has:
the ``source_label`` training images are embedded by PCA (``components``) and ranked by their mean
distance to their ``neighbours`` nearest other images of the class, a k-nearest-neighbour estimate of
low density (the paper's p-edge-case: inputs of small probability under the data distribution). The
rarest ``tail_fraction`` form the tail, a rare-style subset of the class (on MNIST: unusually slanted,
thick or open 7s).

The tail is held by the attackers only (the paper's edge-case setting): it is removed from every honest
shard, and each attacker trains on its own clean shard plus the whole tail relabelled ``target_label``.
ASR is the share of the test images of the class that fall in the tail (distance to the training
class at least the tail's threshold) classified as ``target_label``; ``asr_typical`` is the same rate on
the class's other test images, which a specific edge-case backdoor leaves low.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.neighbors import NearestNeighbors
from torch import nn

from flsec.attacks.base import Attack, AttackSetting, targeted_rate
from flsec.attacks.registry import ATTACKS
from flsec.errors import ConfigError
from flsec.fl.evaluate import main_accuracy


def rarity_scores(reference: np.ndarray, queries: np.ndarray, neighbours: int,
                  components: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean distance to the ``neighbours`` nearest reference points in a PCA embedding of the reference.

    Returns (scores of the reference points, excluding each point itself; scores of the queries).
    """
    n, d = reference.shape
    if n < 2:
        raise ValueError("rarity_scores needs at least two reference points")
    k = min(neighbours, n - 1)
    pca = PCA(n_components=min(components, n - 1, d), svd_solver="full").fit(reference)
    ref, qry = pca.transform(reference), pca.transform(queries) if len(queries) else np.empty((0, 1))
    nn_index = NearestNeighbors(n_neighbors=k + 1).fit(ref)
    ref_dist, _ = nn_index.kneighbors(ref)
    ref_scores = ref_dist[:, 1:].mean(axis=1)  # column 0 is the point itself
    qry_scores = nn_index.kneighbors(qry, n_neighbors=k)[0].mean(axis=1) if len(queries) else np.empty(0)
    return ref_scores, qry_scores


def select_tail(scores: np.ndarray, fraction: float) -> np.ndarray:
    """Positions of the ``ceil(fraction * n)`` largest scores (at least one), rarest first."""
    count = max(1, int(np.ceil(fraction * len(scores))))
    return np.argsort(-scores, kind="stable")[:count]


@ATTACKS.register("edge_case")
class EdgeCaseBackdoor(Attack):
    name = "edge_case"

    def __init__(self, setting: AttackSetting) -> None:
        super().__init__(setting)
        a, e, data = self.config.attack, self.config.attack.edge_case, setting.data
        src_train = np.flatnonzero(data.y_train.numpy() == a.source_label)
        src_test = np.flatnonzero(data.y_test.numpy() == a.source_label)
        if len(src_train) < 2:
            raise ConfigError(f"attack.source_label: the training data holds {len(src_train)} image(s) of class "
                              f"{a.source_label}; the edge-case tail needs at least two")
        train_scores, test_scores = rarity_scores(
            data.x_train[src_train].flatten(1).numpy(), data.x_test[src_test].flatten(1).numpy(), e.neighbours, e.components)
        tail_pos = select_tail(train_scores, e.tail_fraction)
        self.tail_idx = np.sort(src_train[tail_pos])
        self.threshold = float(train_scores[tail_pos].min())
        in_tail = test_scores >= self.threshold
        self.test_tail = torch.from_numpy(src_test[in_tail])
        self.test_typical = torch.from_numpy(src_test[~in_tail])
        if len(self.test_tail) == 0:
            raise ConfigError(f"attack.edge_case.tail_fraction: no test image of class {a.source_label} falls in "
                              f"the tail; raise tail_fraction or test_size")
        self._is_tail = np.zeros(len(data.y_train), dtype=bool)
        self._is_tail[self.tail_idx] = True

    def client_data(self, client: int, attacking: bool) -> tuple[torch.Tensor, torch.Tensor]:
        shard = self.setting.shards[client]
        idx = torch.from_numpy(shard[~self._is_tail[shard]])
        x, y = self.setting.data.x_train[idx], self.setting.data.y_train[idx]
        if not attacking:
            return x, y
        tail = torch.from_numpy(self.tail_idx)
        target = torch.full((len(tail),), self.config.attack.target_label, dtype=torch.long)
        return torch.cat([x, self.setting.data.x_train[tail]]), torch.cat([y, target])

    def evaluate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        """MA on (x, y), the federation's test set (the tail was found among its images), and the tail's ASR."""
        t = self.config.attack.target_label
        return {"ma": main_accuracy(model, x, y), "asr": targeted_rate(model, x[self.test_tail], t),
                "asr_typical": targeted_rate(model, x[self.test_typical], t)}
