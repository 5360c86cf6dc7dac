"""The aggregator interface: a stack of flattened client updates in, one update out.

Every aggregator receives ``U`` (k x d), the clients' sample counts ``n`` (k), their ids and, when
it declares it needs one, an :class:`AggregationContext` (the round, a seeded random generator, the
global weights, the server's own update on its root data). The base class makes the numbers safe
before any rule sees them:

* the stack is cast to float32 first and checked for NaN / Inf *after* the cast, so a float64 row of
  1e300 (finite in float64, Inf in float32) is rejected like a NaN row; every rejected client gets a
  one-line reason in :attr:`AggregationResult.rejected` (the server writes it into the round's
  history record);
* sample counts must be finite and >= 0;
* rules compute sums, norms and distances in float64 (see :mod:`flsec.aggregation.numerics`), and
  the aggregated update is cast back to float32 and checked again: a result that is not finite in
  float32 is an :class:`AggregationError`, never a silently corrupted model;
* a rule whose robustness needs more updates than it was given (e.g. k <= 2f) refuses with a clear
  error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from flsec.errors import ConfigError, FlsecError


class AggregationError(FlsecError):
    """Too few (finite) updates for the rule's assumptions, or a result that is not finite."""


@dataclass(frozen=True)
class AggregatorParams:
    """Every rule's settings (built from ``[aggregation]`` by :func:`flsec.aggregation.params_from_config`)."""

    f: int = 0
    multi_krum_m: int | None = None
    trim_beta: int | None = None
    sample_weighted: bool = True
    foolsgold_kappa: float = 1.0
    fl_defender_components: int = 2
    similarity_features: str = "output_weights"
    clip_norm: float = 1.0
    clip_noise: float = 0.0
    flame_noise: float = 0.001
    flame_distance: str = "models"
    fltrust_server_steps: int | None = None
    num_clients: int | None = None
    output_layer: slice = field(default_factory=lambda: slice(0, None))
    #: The output layer's weight matrix alone (None: ``output_layer``).
    output_weights: slice | None = None


@dataclass(frozen=True)
class AggregationContext:
    """What the server knows about the round beyond the updates (passed to rules that need it).

    ``generator`` seeds any randomness of the rule (noise), derived from the run seed and the round.
    ``global_weights`` are the flat weights the clients started from (FLAME's cosine distances are
    between local models W_i = G + U_i). ``server_update`` is the update the server computed on its
    own root dataset this round (FLTrust's g_0).
    """

    round: int = 0
    generator: torch.Generator | None = None
    global_weights: torch.Tensor | None = None
    server_update: torch.Tensor | None = None


@dataclass(frozen=True)
class AggregationResult:
    """``update`` (d) and each client's share in it (k, zeros for rejected rows).

    ``rejected`` maps a client id to the reason its update was not used at all (e.g. not finite);
    ``notes`` are one-line remarks on what the rule did this round (e.g. a fallback it took).

    Rules that exclude clients on purpose (:attr:`Aggregator.excludes`) also say whom and how
    strongly: ``excluded`` (k booleans: the rule judged the update adversarial and left it out) and
    ``suspicion`` (k floats, larger = more suspect; only the order matters). A rule that excludes but
    leaves them unset gets them from its weights (excluded = weight 0, suspicion = 1 - w / max w);
    rejected (non-finite) rows are always excluded. :mod:`flsec.detection` reads them.
    """

    update: torch.Tensor
    weights: torch.Tensor
    rejected: dict[int, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    excluded: torch.Tensor | None = None
    suspicion: torch.Tensor | None = None


def finite_rows(updates: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the rows without NaN or Inf (row max and min propagate both; 15x faster than
    ``isfinite(updates).all(dim=1)`` on a 20 x 11M stack)."""
    return torch.isfinite(updates.amax(dim=1)) & torch.isfinite(updates.amin(dim=1))


def normalise(weights: torch.Tensor) -> torch.Tensor:
    total = weights.sum()
    return weights / total if total > 0 else torch.zeros_like(weights)


def _why_not_finite(raw: torch.Tensor) -> str:
    """One line saying why a row was rejected (``raw``: the row as the client sent it)."""
    kinds = [name for name, bad in (("NaN", torch.isnan(raw).any()), ("Inf", torch.isinf(raw).any())) if bad]
    if kinds:
        return f"update holds {' and '.join(kinds)} values"
    top = float(raw.abs().max())
    return f"update is not finite in float32 (largest |value| {top:.3g} exceeds float32's range)"


class Aggregator:
    """Base class: subclasses implement :meth:`_aggregate` on the finite float32 rows only."""

    name: ClassVar[str] = "base"
    #: One line on what the rule computes (README's defense table and the HTML report show it).
    summary: ClassVar[str] = ""
    #: The paper the rule follows: authors year, "title" (venue), and the reference code where used.
    citation: ClassVar[str] = ""
    #: Context fields the rule needs (``"global_weights"``, ``"server_update"``, ``"generator"``);
    #: a rule that declares any gets ``context=`` in :meth:`_aggregate`.
    needs: ClassVar[frozenset[str]] = frozenset()
    #: The server keeps a root dataset out of the training split for this rule (``aggregation.root_size``).
    uses_root_data: ClassVar[bool] = False
    #: The rule leaves out (or weighs to zero) updates it judges adversarial; its ``excluded`` and
    #: ``suspicion`` are then what the ``rule`` suspect detector reports (:mod:`flsec.detection`).
    excludes: ClassVar[bool] = False

    def __init__(self, params: AggregatorParams | None = None) -> None:
        self.params = params or AggregatorParams()

    def min_updates(self) -> int:
        """Fewest updates the rule accepts (its robustness assumption)."""
        return 1

    def check(self, k: int) -> None:
        """Refuse a round of ``k`` updates the rule cannot aggregate robustly."""
        need = self.min_updates()
        if k < need:
            raise AggregationError(
                f"aggregation.name: {self.name} needs at least {need} updates per round with f = {self.params.f}, "
                f"got {k}; raise training.client_fraction or lower aggregation.f"
            )

    def validate(self, per_round: int) -> None:
        """Check the settings against the number of updates a round will have (before training)."""
        self.check(per_round)

    def server_steps(self, client_steps: list[int]) -> int:
        """Local steps of the server's own update on its root data (rules that need ``server_update``)."""
        return max(1, round(sum(client_steps) / max(len(client_steps), 1)))

    def __call__(
        self,
        updates: torch.Tensor,
        num_samples: torch.Tensor | None = None,
        client_ids: list[int] | None = None,
        context: AggregationContext | None = None,
    ) -> AggregationResult:
        if updates.ndim != 2 or updates.shape[0] == 0:
            raise AggregationError(f"expected a non-empty k x d stack of updates, got shape {tuple(updates.shape)}")
        if not (updates.is_floating_point()):
            raise AggregationError(f"expected floating-point updates, got {updates.dtype}")
        k = updates.shape[0]
        n = torch.ones(k, dtype=torch.float64) if num_samples is None else num_samples.to(torch.float64).flatten()
        if n.numel() != k or not torch.isfinite(n).all() or (n < 0).any():
            raise AggregationError(f"sample counts must be k = {k} finite values >= 0, got {n.tolist()}")
        ids = list(range(k)) if client_ids is None else [int(c) for c in client_ids]
        if len(ids) != k:
            raise AggregationError(f"got {len(ids)} client ids for {k} updates")
        required = sorted(self.needs & {"global_weights", "server_update"})
        missing = [f for f in required if context is None or getattr(context, f) is None]
        if missing:
            raise AggregationError(f"{self.name} needs the server's {', '.join(missing)} (an AggregationContext)")
        for f in required:
            value = getattr(context, f)
            if value.shape != (updates.shape[1],) or not torch.isfinite(value).all():
                raise AggregationError(f"{self.name}: context.{f} must be a finite vector of {updates.shape[1]} values")
        work = updates if updates.dtype == torch.float32 else updates.to(torch.float32)
        keep = finite_rows(work)
        rejected = {ids[i]: _why_not_finite(updates[i]) for i in range(k) if not bool(keep[i])}
        kept = torch.nonzero(keep).flatten()
        self.check(len(kept))
        rows = work if len(kept) == k else work[kept]
        kept_ids = [ids[i] for i in kept.tolist()]
        # Rules that declare ``needs`` also get the context; the plain signature stays (updates, n, ids).
        result = (self._aggregate(rows, n[kept], kept_ids, context=context) if self.needs
                  else self._aggregate(rows, n[kept], kept_ids))
        update = result.update.to(torch.float32)
        if not torch.isfinite(update).all():
            raise AggregationError(
                f"{self.name}: the aggregated update is not finite in float32 (largest |value| "
                f"{float(result.update.double().abs().nan_to_num(float('inf')).max()):.3g}); nothing was applied"
            )
        weights = torch.zeros(k)
        weights[kept] = result.weights.to(torch.float32)
        excluded, suspicion = self._judgement(result, kept, k)
        return AggregationResult(update, weights, {**rejected, **result.rejected}, list(result.notes), excluded,
                                 suspicion)

    def _judgement(self, result: AggregationResult, kept: torch.Tensor, k: int
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``excluded`` and ``suspicion`` over all k rows (see :class:`AggregationResult`), or (None,
        None) for a rule that does not exclude."""
        if not self.excludes:
            return None, None
        w = result.weights.to(torch.float64)
        top = float(w.max()) if len(w) else 0.0
        excl = result.excluded if result.excluded is not None else w <= 0
        susp = result.suspicion if result.suspicion is not None else (
            1.0 - w / top if top > 0 else torch.ones_like(w))
        excluded = torch.ones(k, dtype=torch.bool)
        suspicion = torch.full((k,), float("inf"), dtype=torch.float64)
        excluded[kept] = excl.to(torch.bool)
        suspicion[kept] = susp.to(torch.float64)
        return excluded, suspicion

    def _aggregate(self, updates: torch.Tensor, num_samples: torch.Tensor, client_ids: list[int],
                   context: AggregationContext | None = None) -> AggregationResult:
        """The rule itself, on finite float32 rows; ``context`` is passed only to rules with ``needs``."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors that must survive a resume (history-based rules)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        del state


def client_ids_state(state: dict[str, torch.Tensor], rule: str, values: str, ndim: int) -> tuple[list[int], torch.Tensor]:
    """Validate a history-based rule's saved state (a run directory is untrusted input): distinct
    non-negative int64 client ids and one finite float row (``ndim`` 1: a score, 2: a vector) per id."""
    ids, vals = state.get("ids"), state.get(values)
    ok = (ids is not None and vals is not None and ids.dtype == torch.int64 and ids.ndim == 1
          and vals.is_floating_point() and vals.ndim == ndim and len(vals) == len(ids)
          and bool((ids >= 0).all()) and len(set(ids.tolist())) == len(ids) and bool(torch.isfinite(vals).all()))
    if not ok or set(state) != {"ids", values}:
        raise AggregationError(f"{rule}: saved aggregator state must be 'ids' (distinct int64 >= 0) and '{values}' "
                               f"(one finite float {'value' if ndim == 1 else 'row'} per id); got "
                               f"{ {k: (str(v.dtype), tuple(v.shape)) for k, v in state.items()} }")
    return [int(i) for i in ids.tolist()], vals.to(torch.float64)


def config_error(field_name: str, message: str) -> ConfigError:
    """A one-line configuration error naming ``aggregation.<field_name>``."""
    return ConfigError(f"aggregation.{field_name}: {message}")
