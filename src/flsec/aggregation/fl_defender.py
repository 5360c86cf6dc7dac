"""FL-Defender (Jebreel & Domingo-Ferrer 2023, "FL-Defender: Combating targeted attacks in
federated learning", Knowledge-Based Systems 260, Algorithm 1).

1. Take each client's output-layer gradients (here: its update restricted to the last layer).
2. Pairwise cosine similarity of those -> a k x k matrix whose rows describe the clients.
3. PCA of the rows (centred; top ``components`` directions) to remove noise; the rows are kept
   in the original coordinates (projection onto the principal subspace), which makes the result
   independent of the basis the SVD returns inside that subspace.
4. Centroid = coordinate-wise median of the projected rows; round score = cos(row, centroid).
5. Scores are accumulated per client over rounds; trust = (h - q1(h)) / (max(h) - q1(h)),
   clipped to [0, 1], so clients below the first quartile of accumulated score get no weight.
6. The new update is the trust-weighted mean of the updates.
"""

from __future__ import annotations

import torch

from flsec.aggregation.base import AggregationResult, Aggregator, normalise
from flsec.aggregation.foolsgold import cosine_matrix
from flsec.aggregation.registry import AGGREGATORS


def pca_project(x: torch.Tensor, components: int) -> torch.Tensor:
    """Rows of ``x`` (centred) projected onto the span of its top principal directions, expressed
    in the original coordinates: the result does not depend on the sign or rotation that the SVD
    picks inside that span, so the median taken next is permutation-equivariant."""
    centred = x - x.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    v = vh[: max(1, min(components, vh.shape[0]))]
    return centred @ v.T @ v


def fl_defender_round_scores(last_layer: torch.Tensor, components: int = 2) -> torch.Tensor:
    """Steps 2-4: one round's score in [-1, 1] per client (higher = closer to the majority)."""
    k = last_layer.shape[0]
    if k < 3:
        return torch.ones(k)
    z = pca_project(cosine_matrix(last_layer), components)
    centroid = z.median(dim=0).values
    num = z @ centroid
    den = z.norm(dim=1) * centroid.norm()
    return torch.where(den > 1e-12, num / den.clamp_min(1e-12), torch.ones_like(num)).float()


def trust_from_history(history: torch.Tensor) -> torch.Tensor:
    """Step 5: quartile-normalised trust in [0, 1]."""
    q1 = torch.quantile(history.double(), 0.25)
    top = history.double().max()
    if top - q1 <= 1e-12:
        return torch.ones_like(history)
    return ((history.double() - q1) / (top - q1)).clamp(0.0, 1.0).float()


@AGGREGATORS.register("fl_defender")
class FLDefender(Aggregator):
    """Stateful: keeps each client's accumulated score."""

    name = "fl_defender"

    def __init__(self, params=None) -> None:  # type: ignore[no-untyped-def]
        super().__init__(params)
        self.scores: dict[int, float] = {}

    def _aggregate(self, updates: torch.Tensor, num_samples: torch.Tensor, client_ids: list[int]) -> AggregationResult:
        last = updates[:, self.params.output_layer]
        round_scores = fl_defender_round_scores(last, self.params.fl_defender_components)
        for cid, s in zip(client_ids, round_scores.tolist(), strict=True):
            self.scores[cid] = self.scores.get(cid, 0.0) + s
        history = torch.tensor([self.scores[c] for c in client_ids])
        w = normalise(trust_from_history(history))
        return AggregationResult(w @ updates, w)

    def state_dict(self) -> dict[str, torch.Tensor]:
        if not self.scores:
            return {}
        ids = sorted(self.scores)
        return {"ids": torch.tensor(ids), "scores": torch.tensor([self.scores[i] for i in ids], dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.scores = {}
        if "ids" in state:
            for cid, s in zip(state["ids"].tolist(), state["scores"].tolist(), strict=True):
                self.scores[int(cid)] = float(s)
