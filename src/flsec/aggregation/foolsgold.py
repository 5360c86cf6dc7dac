"""FoolsGold (Fung, Yoon & Beschastnikh 2020, "The Limitations of Federated Learning in Sybil
Settings", Algorithm 1).

Clients whose *accumulated* update histories are too similar (sybils pushing one objective)
are down-weighted: pairwise cosine similarity of histories, pardoning of honest clients that
merely resemble a sybil, then a logit with confidence kappa maps 1 - max similarity to a
learning-rate weight in [0, 1].
"""

from __future__ import annotations

import torch

from flsec.aggregation.base import AggregationResult, Aggregator, normalise
from flsec.aggregation.registry import AGGREGATORS


def cosine_matrix(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    unit = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return unit @ unit.T


def foolsgold_weights(histories: torch.Tensor, kappa: float = 1.0) -> torch.Tensor:
    """Per-client weights in [0, 1] from their update histories (Algorithm 1, lines 5-23)."""
    k = histories.shape[0]
    cs = cosine_matrix(histories) - torch.eye(k, dtype=torch.float64)
    maxcs = cs.max(dim=1).values
    # Pardoning (lines 9-12): if v_i resembles a client that is more sybil-like than itself,
    # scale that similarity down by maxcs_i / maxcs_j.
    ratio = maxcs[:, None] / torch.where(maxcs[None, :].abs() > 1e-12, maxcs[None, :], torch.ones(1, dtype=cs.dtype))
    pardon = (maxcs[:, None] < maxcs[None, :]) & (maxcs[None, :].abs() > 1e-12)
    cs = torch.where(pardon, cs * ratio, cs)
    wv = (1.0 - cs.max(dim=1).values).clamp(0.0, 1.0)
    if wv.max() <= 0:
        return torch.zeros(k)
    wv = wv / wv.max()
    wv = torch.where(wv >= 1.0, torch.full_like(wv, 0.99), wv)
    with torch.no_grad():
        wv = kappa * (torch.log(wv / (1.0 - wv)) + 0.5)
    wv = torch.where(torch.isinf(wv) | (wv > 1.0), torch.ones_like(wv), wv)
    wv = torch.nan_to_num(wv, nan=0.0).clamp_min(0.0)
    return wv.float()


@AGGREGATORS.register("foolsgold")
class FoolsGold(Aggregator):
    """Stateful: keeps each client's sum of past updates (the history h_i of Algorithm 1)."""

    name = "foolsgold"

    def __init__(self, params=None) -> None:  # type: ignore[no-untyped-def]
        super().__init__(params)
        self.histories: dict[int, torch.Tensor] = {}

    def _aggregate(self, updates: torch.Tensor, num_samples: torch.Tensor, client_ids: list[int]) -> AggregationResult:
        for cid, u in zip(client_ids, updates, strict=True):
            self.histories[cid] = self.histories.get(cid, torch.zeros_like(u)) + u
        hist = torch.stack([self.histories[c] for c in client_ids])
        w = normalise(foolsgold_weights(hist, self.params.foolsgold_kappa))
        return AggregationResult(w @ updates, w)

    def state_dict(self) -> dict[str, torch.Tensor]:
        if not self.histories:
            return {}
        ids = sorted(self.histories)
        return {"ids": torch.tensor(ids), "histories": torch.stack([self.histories[i] for i in ids])}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.histories = {}
        if "ids" in state:
            for cid, h in zip(state["ids"].tolist(), state["histories"], strict=True):
                self.histories[int(cid)] = h.clone()
