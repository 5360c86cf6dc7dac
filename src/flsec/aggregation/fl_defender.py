"""FL-Defender (Jebreel & Domingo-Ferrer 2023, "FL-Defender: Combating targeted attacks in
federated learning", Knowledge-Based Systems 260:110178, Algorithm 1; reference code
najeebjebreel/FL-Defender, ``aggregation.py`` and ``environment_federated.py``).

Per round, on the updates of the output layer's weights (``aggregation.similarity_features``):

1. cs = cosine(U_out) - I (k x k; the identity removes each peer's similarity to itself);
2. standardise each column of cs (zero mean, unit population variance; a constant column is only
   centred, as scikit-learn's ``StandardScaler``) and project it on its first
   ``fl_defender_components`` (default 2) principal components (PCA);
3. centroid = coordinate-wise median of the projected rows (the mean of the two middle values when
   k is even); round score s_i = cos(row_i, centroid), 0 for a zero row, and 0 for everyone when
   the centroid is the origin up to rounding (|centroid| <= 1e-9 max |z|: its direction is noise);
4. accumulate h_i += s_i over rounds; with q1 the first quartile (linear interpolation) and the
   maximum taken over the histories of *all* peers of the federation (zeros for peers never
   selected): trust_i = max(h_i - q1, 0) / max_j(h_j - q1);
5. the update is the trust-weighted mean of the round's updates (weights trust / sum(trust)).

If every history is equal (max_j(h_j - q1) = 0: nothing tells the peers apart yet), the reference
divides by zero; flsec trusts every peer equally and says so in the round's notes.
"""

from __future__ import annotations

import torch

from flsec.aggregation.base import AggregationResult, Aggregator, client_ids_state, normalise
from flsec.aggregation.features import select_features
from flsec.aggregation.numerics import cosine_matrix, weighted_sum
from flsec.aggregation.registry import AGGREGATORS

#: Relative size below which the PCA-space centroid counts as the origin.
NEGLIGIBLE = 1e-9


def standardise(x: torch.Tensor) -> torch.Tensor:
    """Columns to zero mean and unit population variance; zero-variance columns are only centred."""
    centred = x - x.mean(dim=0, keepdim=True)
    std = centred.pow(2).mean(dim=0, keepdim=True).sqrt()
    return centred / torch.where(std > 0, std, torch.ones_like(std))


def pca_scores(x: torch.Tensor, components: int) -> torch.Tensor:
    """Coordinates of the (centred) rows of ``x`` on its top principal components: U_c S_c."""
    centred = x - x.mean(dim=0, keepdim=True)
    u, s, _ = torch.linalg.svd(centred, full_matrices=False)
    c = min(components, s.numel())
    return u[:, :c] * s[:c]


def fl_defender_round_scores(last_layer: torch.Tensor, components: int = 2) -> torch.Tensor:
    """Steps 1-3: one round's score in [-1, 1] per client (float64; higher = closer to the majority)."""
    k = last_layer.shape[0]
    cs = cosine_matrix(last_layer) - torch.eye(k, dtype=torch.float64)
    z = pca_scores(standardise(cs), components)
    centroid = z.quantile(0.5, dim=0)
    if not centroid.norm() > NEGLIGIBLE * z.abs().max():
        # A centroid at the origin up to rounding (e.g. two equal camps): its direction is noise and
        # the paper's cosine to it is undefined; every client scores 0 this round.
        return torch.zeros(k, dtype=torch.float64)
    num = z @ centroid
    den = z.norm(dim=1) * centroid.norm()
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))


def trust_from_history(history: torch.Tensor) -> torch.Tensor:
    """Step 4: trust in [0, 1] from the accumulated scores of all peers (float64); all ones if every
    history is equal."""
    h = history.to(torch.float64)
    shifted = h - torch.quantile(h, 0.25)
    top = shifted.max()
    if not top > 0:
        return torch.ones_like(h)
    return (shifted / top).clamp_min(0.0)


@AGGREGATORS.register("fl_defender")
class FLDefender(Aggregator):
    """Stateful: keeps each peer's accumulated score."""

    name = "fl_defender"
    summary = (
        "cosine similarity of output-layer updates, standardised, PCA, cosine to the median centroid, "
        "accumulated trust"
    )
    citation = (
        "Jebreel & Domingo-Ferrer 2023, \"FL-Defender: Combating Targeted Attacks in Federated Learning\", "
        "Knowledge-Based Systems 260 (code: najeebjebreel/FL-Defender)"
    )
    excludes = True  # its zero-weight updates are the ones it judged adversarial

    def __init__(self, params=None) -> None:  # type: ignore[no-untyped-def]
        super().__init__(params)
        self.scores: dict[int, float] = {}

    def _aggregate(self, updates: torch.Tensor, num_samples: torch.Tensor, client_ids: list[int]) -> AggregationResult:
        feats = select_features(updates, self.params)
        round_scores = fl_defender_round_scores(feats, self.params.fl_defender_components)
        for cid, s in zip(client_ids, round_scores.tolist(), strict=True):
            self.scores[cid] = self.scores.get(cid, 0.0) + s
        peers = sorted(set(self.scores) | set(range(self.params.num_clients or 0)))
        history = torch.tensor([self.scores.get(p, 0.0) for p in peers], dtype=torch.float64)
        trust_all = trust_from_history(history)
        notes = []
        if not (history - torch.quantile(history, 0.25)).max() > 0:
            notes.append("fl_defender: every peer's accumulated score is equal; all trusted equally")
        trust = trust_all[[peers.index(c) for c in client_ids]]
        if not trust.sum() > 0:
            notes.append("fl_defender: no client of this round is above the first quartile of trust; "
                         "no update applied")
        w = normalise(trust)
        return AggregationResult(weighted_sum(w, updates), w, notes=notes)

    def state_dict(self) -> dict[str, torch.Tensor]:
        if not self.scores:
            return {}
        ids = sorted(self.scores)
        return {"ids": torch.tensor(ids), "scores": torch.tensor([self.scores[i] for i in ids], dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.scores = {}
        if state:
            ids, scores = client_ids_state(state, self.name, "scores", 1)
            self.scores = dict(zip(ids, scores.tolist(), strict=True))
