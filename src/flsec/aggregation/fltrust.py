"""FLTrust (Cao, Fang, Liu & Gong 2021, "FLTrust: Byzantine-robust Federated Learning via Trust
Bootstrapping", NDSS, Algorithm 1 and Eq. 2-5).

The server holds a small clean root dataset (``aggregation.root_size`` samples, 100 in the paper,
taken out of the training split before it is partitioned) and computes its own update g_0 on it
every round from the current global model, with the clients' optimiser and R local iterations
(``aggregation.fltrust_server_steps``; by default the mean number of local steps of the round's
clients, since the paper gives server and clients the same R). Then, for every client update g_i:

* trust score TS_i = ReLU(cos(g_i, g_0));
* magnitude normalisation: g_i <- (||g_0|| / ||g_i||) g_i;
* g = sum_i TS_i g_i / sum_j TS_j.

If no client has a positive trust score (or g_0 is zero), the paper's ratio is undefined; flsec
applies no update this round and says so in the round's notes.
"""

from __future__ import annotations

import torch

from flsec.aggregation.base import AggregationContext, AggregationResult, Aggregator, config_error
from flsec.aggregation.numerics import blocks, row_norms, weighted_sum
from flsec.aggregation.registry import AGGREGATORS


def fltrust(updates: torch.Tensor, server_update: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Returns (update in float64, weights TS_i / sum TS, notes)."""
    k, d = updates.shape
    g0 = server_update.to(torch.float64)
    dots = torch.zeros(k, dtype=torch.float64)
    for s in blocks(d):
        dots += updates[:, s].to(torch.float64) @ g0[s]
    norms = row_norms(updates)
    g0_norm = float(g0.norm())
    den = norms * g0_norm
    cos = torch.where(den > 0, dots / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(dots))
    trust = cos.clamp(-1.0, 1.0).clamp_min(0.0)
    if not trust.sum() > 0:
        return (torch.zeros(d, dtype=torch.float64), torch.zeros(k, dtype=torch.float64),
                ["fltrust: no client update has positive cosine similarity with the server's; no update applied"])
    weights = trust / trust.sum()
    scale = torch.where(norms > 0, g0_norm / torch.where(norms > 0, norms, torch.ones_like(norms)),
                        torch.zeros_like(norms))
    return weighted_sum(weights * scale, updates), weights, []


@AGGREGATORS.register("fltrust")
class FLTrust(Aggregator):
    name = "fltrust"
    summary = "trust = ReLU(cos) to the server's own update on `root_size` clean samples, magnitudes normalised to it"
    citation = "Cao, Fang, Liu & Gong 2021, \"FLTrust: Byzantine-robust Federated Learning via Trust Bootstrapping\", NDSS"
    excludes = True  # its zero-weight updates are the ones it judged adversarial
    needs = frozenset({"server_update"})
    uses_root_data = True

    def validate(self, per_round: int) -> None:
        steps = self.params.fltrust_server_steps
        if steps is not None and steps < 1:
            raise config_error("fltrust_server_steps", f"must be >= 1, got {steps}")
        super().validate(per_round)

    def server_steps(self, client_steps: list[int]) -> int:
        """R for the server's own update: the configured number, or the clients' mean."""
        if self.params.fltrust_server_steps is not None:
            return self.params.fltrust_server_steps
        return max(1, round(sum(client_steps) / max(len(client_steps), 1)))

    def _aggregate(self, updates: torch.Tensor, num_samples: torch.Tensor, client_ids: list[int],
                   context: AggregationContext | None = None) -> AggregationResult:
        assert context is not None and context.server_update is not None  # checked by Aggregator.__call__
        update, weights, notes = fltrust(updates, context.server_update)
        return AggregationResult(update, weights, notes=notes)
