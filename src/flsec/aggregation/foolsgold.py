"""FoolsGold (Fung, Yoon & Beschastnikh 2020, "The Limitations of Federated Learning in Sybil
Settings", RAID, Algorithm 1; reference code DistributedML/FoolsGold, ``deep-fg/fg/foolsgold.py``).

Clients whose *accumulated* update histories H_i are too similar (sybils pushing one objective)
are down-weighted. With cs = cosine(H) - I and v_i = max_j cs_ij:

1. pardoning: cs_ij <- cs_ij * v_i / v_j whenever v_i < v_j (an honest client that merely resembles
   a more sybil-like one is not punished for it);
2. alpha_i = 1 - max_j cs_ij, clipped to [0, 1], then alpha <- alpha / max(alpha) and 1 -> 0.99;
3. logit: alpha_i = kappa (ln(alpha_i / (1 - alpha_i)) + 0.5); +inf or > 1 -> 1, -inf or < 0 -> 0.
   An exact duplicate (cosine 1) thus gets alpha 0: the strongest sybil signal is the one punished.

As in the reference code, the maximum over j includes the diagonal of cs (cos(H_i, H_i) - 1 = 0),
and histories are those of the output layer's weights (``aggregation.similarity_features``).
The histories of every peer of the federation enter the similarities (zeros for peers not yet
selected), as in FL-Defender's FoolsGold implementation; the weights of the round's clients are
read off.

Deliberate choices (documented, not options):

* The paper applies w += sum_i alpha_i Delta_i to FedSGD gradients; the deep-learning reference
  code divides that sum by k, FL-Defender's code by sum_i alpha_i. flsec aggregates multi-step
  FedAvg updates and every rule returns a convex combination, so the weights are alpha / sum(alpha).
* If every alpha is 0 (all histories collinear, e.g. identical rows or d = 1 with one sign), the
  reference code divides 0 by 0 and produces NaN weights. flsec gives every client weight 0 and
  returns a zero update (the global model is unchanged this round), with a note in the history.
* Histories are kept in float64, so updates up to float32's range can never overflow them.
"""

from __future__ import annotations

import torch

from flsec.aggregation.base import AggregationError, AggregationResult, Aggregator, client_ids_state, normalise
from flsec.aggregation.features import select_features
from flsec.aggregation.numerics import cosine_matrix, weighted_sum
from flsec.aggregation.registry import AGGREGATORS


def foolsgold_weights(histories: torch.Tensor, kappa: float = 1.0) -> torch.Tensor:
    """alpha in [0, 1] (float64) of every row of ``histories`` (Algorithm 1, lines 5-23)."""
    k = histories.shape[0]
    cs = cosine_matrix(histories) - torch.eye(k, dtype=torch.float64)
    v = cs.amax(dim=1)
    off_diagonal = ~torch.eye(k, dtype=torch.bool)
    pardon = (v[:, None] < v[None, :]) & off_diagonal
    ratio = v[:, None] / torch.where(pardon, v[None, :], torch.ones_like(cs))
    cs = torch.where(pardon, cs * ratio, cs)
    alpha = (1.0 - cs.amax(dim=1)).clamp(0.0, 1.0)
    top = alpha.max()
    if not top > 0:
        return torch.zeros(k, dtype=torch.float64)
    alpha = alpha / top
    alpha = torch.where(alpha == 1.0, torch.full_like(alpha, 0.99), alpha)
    logit = kappa * (torch.log(alpha / (1.0 - alpha)) + 0.5)
    logit = torch.where(torch.isposinf(logit) | (logit > 1.0), torch.ones_like(logit), logit)
    return torch.where(torch.isneginf(logit) | (logit < 0.0), torch.zeros_like(logit), logit)


@AGGREGATORS.register("foolsgold")
class FoolsGold(Aggregator):
    """Stateful: keeps each client's sum of past updates (the history H_i of Algorithm 1), float64."""

    name = "foolsgold"
    summary = "down-weights clients whose update histories are alike (sybils): cosine similarity, pardoning, logit"
    citation = (
        "Fung, Yoon & Beschastnikh 2020, \"The Limitations of Federated Learning in Sybil Settings\", RAID "
        "(code: DistributedML/FoolsGold)"
    )
    excludes = True  # its zero-weight updates are the ones it judged adversarial

    def __init__(self, params=None) -> None:  # type: ignore[no-untyped-def]
        super().__init__(params)
        self.histories: dict[int, torch.Tensor] = {}

    def _aggregate(self, updates: torch.Tensor, num_samples: torch.Tensor, client_ids: list[int]) -> AggregationResult:
        feats = select_features(updates, self.params).to(torch.float64)
        widths = {h.numel() for h in self.histories.values()}
        if widths and widths != {feats.shape[1]}:
            raise AggregationError(f"foolsgold: saved histories have {sorted(widths)} values, this round's features "
                                   f"{feats.shape[1]}; the state belongs to another model or similarity_features")
        for cid, u in zip(client_ids, feats, strict=True):
            self.histories[cid] = self.histories.get(cid, torch.zeros_like(u)) + u
        peers = sorted(set(self.histories) | set(range(self.params.num_clients or 0)))
        zero = torch.zeros(feats.shape[1], dtype=torch.float64)
        alpha_all = foolsgold_weights(torch.stack([self.histories.get(p, zero) for p in peers]),
                                      self.params.foolsgold_kappa)
        alpha = alpha_all[[peers.index(c) for c in client_ids]]
        notes = []
        if not alpha.sum() > 0:
            notes.append("foolsgold: every client's history is collinear with another's (all weights 0); "
                         "no update applied this round")
        w = normalise(alpha)
        return AggregationResult(weighted_sum(w, updates), w, notes=notes)

    def state_dict(self) -> dict[str, torch.Tensor]:
        if not self.histories:
            return {}
        ids = sorted(self.histories)
        return {"ids": torch.tensor(ids), "histories": torch.stack([self.histories[i] for i in ids])}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.histories = {}
        if state:
            ids, rows = client_ids_state(state, self.name, "histories", 2)
            self.histories = {cid: row.clone() for cid, row in zip(ids, rows, strict=True)}
