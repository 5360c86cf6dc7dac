"""Properties every aggregator shares (hypothesis), bad input, and the server side of aggregation:
rejection reasons in the history record, the per-round context, FLTrust's root dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flsec.aggregation import AGGREGATORS, AggregationContext, AggregationError, AggregatorParams, build_aggregator
from flsec.errors import ConfigError
from flsec.fl.engines import train
from flsec.fl.federation import Federation
from flsec.fl.server import Server
from tests.conftest import small_config

RULES = ["fedavg", "krum", "multi_krum", "trimmed_mean", "median", "foolsgold", "fl_defender", "bulyan",
         "norm_clip", "flame", "fltrust"]
finite = st.floats(-100, 100, allow_nan=False, width=32)


def context_for(u: torch.Tensor) -> AggregationContext:
    """A context every rule can use: a server update along the mean, the zero global model."""
    return AggregationContext(1, torch.Generator().manual_seed(0), torch.zeros(u.shape[1]),
                              u.double().mean(0).float() + 0.1)


def matrices(min_k: int = 7, max_k: int = 9, max_d: int = 6) -> st.SearchStrategy[torch.Tensor]:
    return st.integers(min_k, max_k).flatmap(
        lambda k: st.integers(1, max_d).flatmap(
            lambda d: st.lists(st.lists(finite, min_size=d, max_size=d), min_size=k, max_size=k)
        )
    ).map(lambda rows: torch.tensor(rows, dtype=torch.float32))


def test_every_rule_is_registered() -> None:
    assert set(RULES) <= set(AGGREGATORS.names())


@pytest.mark.parametrize("rule", RULES)
def test_every_rule_names_its_paper_in_one_place(rule: str) -> None:
    """The registry's citation (shown by the HTML report) names the paper README's defense table gives."""
    import re

    from flsec.aggregation import describe

    cls = AGGREGATORS.get(rule)
    m = re.match(r'(?P<who>[^"]+ (?:19|20)\d\d), "(?P<title>[^"]+)", \S', cls.citation)
    assert cls.summary and m, cls.citation
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("## Defenses", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("|") and f"`{rule}`" in line.split("|")[1]]
    assert len(rows) == 1, rule
    assert m["who"] in rows[0] and f'"{m["title"]}"' in rows[0]
    text = describe(rule)
    assert text.startswith(f"{rule}: ") and cls.citation in text and "`" not in text


@settings(max_examples=30, deadline=None)
@given(matrices(), st.randoms(use_true_random=False))
def test_permutation_invariance(u: torch.Tensor, rnd) -> None:
    # A small jitter keeps the input in general position (FL-Defender has its own test below).
    u = u + 1e-2 * torch.randn(u.shape, generator=torch.Generator().manual_seed(rnd.randint(0, 10**6)))
    n = torch.arange(1, u.shape[0] + 1, dtype=torch.float32)
    perm = list(range(u.shape[0]))
    rnd.shuffle(perm)
    p = torch.tensor(perm)
    for rule in [r for r in RULES if r != "fl_defender"]:
        a = build_aggregator(rule, AggregatorParams(f=1))(u, n, context=context_for(u))
        b = build_aggregator(rule, AggregatorParams(f=1))(u[p], n[p], [int(i) for i in p], context=context_for(u))
        assert torch.allclose(a.update, b.update, atol=1e-4, rtol=1e-4), rule
        assert torch.allclose(a.weights[p], b.weights, atol=1e-5), rule


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10**6), st.integers(6, 12), st.integers(1, 3))
def test_fl_defender_permutation_invariance(seed: int, k: int, attackers: int) -> None:
    """FL-Defender takes a coordinate-wise median in PCA space, defined up to the signs of the
    components: it is permutation invariant when the top singular values are distinct, as they are
    for updates with structure (a majority direction plus attackers)."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(1, 30, generator=g)
    u = torch.cat([-direction + 0.2 * torch.randn(attackers, 30, generator=g),
                   direction + 0.5 * torch.randn(k - attackers, 30, generator=g)])
    perm = torch.randperm(k, generator=g)
    a = build_aggregator("fl_defender", AggregatorParams())(u, torch.ones(k)).update
    b = build_aggregator("fl_defender", AggregatorParams())(u[perm], torch.ones(k), perm.tolist()).update
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e300])
def test_non_finite_rows_never_reach_the_rule_and_are_explained(rule: str, bad: float) -> None:
    """NaN / Inf rows, and float64 rows finite before the float32 cast but Inf after it (1e300), are
    rejected with a one-line reason; the rest is aggregated as if they had never been sent."""
    g = torch.Generator().manual_seed(0)
    u = torch.randn(12, 5, generator=g, dtype=torch.float64)
    u[2, 3] = bad
    u[5] = bad
    ids = list(range(100, 112))
    clean_rows = u.clone()
    clean_rows[[2, 5]] = 0.0
    res = build_aggregator(rule, AggregatorParams(f=1))(u, torch.ones(12), ids, context=context_for(clean_rows))
    assert torch.isfinite(res.update).all() and res.update.dtype == torch.float32
    assert res.weights[2] == 0 and res.weights[5] == 0
    assert set(res.rejected) == {102, 105}
    expected = "not finite in float32" if bad == 1e300 else ("NaN" if bad != bad else "Inf")
    assert expected in res.rejected[102]
    keep = [0, 1, 3, 4, 6, 7, 8, 9, 10, 11]
    clean = build_aggregator(rule, AggregatorParams(f=1))(u[keep].float(), torch.ones(10), [ids[i] for i in keep],
                                                       context=context_for(clean_rows))
    assert torch.allclose(res.update, clean.update, atol=1e-6)


@pytest.mark.parametrize(("rule", "k", "f"), [("krum", 6, 2), ("multi_krum", 4, 1), ("trimmed_mean", 4, 2),
                                              ("median", 4, 2), ("bulyan", 6, 1)])
def test_too_few_updates_is_a_clear_error(rule: str, k: int, f: int) -> None:
    agg = build_aggregator(rule, AggregatorParams(f=f))
    with pytest.raises(AggregationError, match=f"{rule} needs at least"):
        agg(torch.randn(k, 3), torch.ones(k))


def test_all_rows_non_finite_is_an_error() -> None:
    with pytest.raises(AggregationError):
        build_aggregator("fedavg", AggregatorParams())(torch.full((3, 2), float("nan")))


def test_a_result_not_finite_in_float32_is_refused() -> None:
    rule = build_aggregator("norm_clip", AggregatorParams(clip_norm=1.0, clip_noise=1e39))
    message = r"aggregated update is not finite in float32 \(largest \|value\| 2\.\d+e\+39\); nothing was applied"
    with pytest.raises(AggregationError, match=message):
        rule(torch.randn(4, 3))


def test_stateful_rules_round_trip_state() -> None:
    g = torch.Generator().manual_seed(0)
    for rule in ("foolsgold", "fl_defender"):
        a = build_aggregator(rule, AggregatorParams(output_weights=slice(0, 4), num_clients=10))
        a(torch.randn(6, 8, generator=g), torch.ones(6), [3, 4, 5, 6, 7, 8])
        b = build_aggregator(rule, AggregatorParams(output_weights=slice(0, 4), num_clients=10))
        b.load_state_dict(a.state_dict())
        u = torch.randn(6, 8, generator=g)
        assert torch.equal(a(u, torch.ones(6), [3, 4, 5, 6, 7, 8]).update, b(u, torch.ones(6), [3, 4, 5, 6, 7, 8]).update)


def test_multi_krum_m_above_clients_per_round_stops_before_training(tmp_path: Path) -> None:
    cfg = small_config(aggregation={"name": "multi_krum", "multi_krum_m": 7})
    message = r"^aggregation\.multi_krum_m: 7 exceeds the 6 updates per round; allowed: 1\.\.6$"
    with pytest.raises(ConfigError, match=message):
        Server(cfg, tmp_path / "r")


def test_rejection_reason_is_written_into_the_round_record(tmp_path: Path) -> None:
    """A boost factor of 1e39 overflows the attacker's float32 update: the round is aggregated
    without it and history.jsonl says why."""
    cfg = small_config(training={"rounds": 2}, attack={"boost_factor": 1e39}, aggregation={"name": "median"},
                       capture={"gradient_batch_sizes": []})
    train(cfg, tmp_path / "r", progress=False)
    records = [json.loads(line) for line in (tmp_path / "r" / "history.jsonl").read_text().splitlines()]
    assert all(rec["rejected"] == {"0": "update holds NaN and Inf values"} for rec in records)
    assert all(rec["weights"][0] == 0 for rec in records) and all(rec["notes"] == [] for rec in records)


def test_fltrust_root_data_is_taken_out_of_the_training_split_reproducibly() -> None:
    cfg = small_config(aggregation={"name": "fltrust", "root_size": 50})
    plain = Federation.from_config(small_config())
    fed = Federation.from_config(cfg)
    assert plain.root is None and fed.root is not None
    x_root, y_root = fed.root
    assert len(y_root) == 50 and len(fed.data.y_train) == len(plain.data.y_train) - 50
    assert sum(len(s) for s in fed.shards) == len(fed.data.y_train)
    # the root samples are not in any client's data
    train_rows = {tuple(r.flatten().tolist()) for r in fed.data.x_train}
    assert not any(tuple(r.flatten().tolist()) in train_rows for r in x_root)
    again = Federation.from_config(cfg)
    assert again.root is not None and torch.equal(again.root[0], x_root) and torch.equal(again.root[1], y_root)
    with pytest.raises(ConfigError, match="aggregation.root_size"):
        Federation.from_config(small_config(aggregation={"name": "fltrust", "root_size": 100_000}))


@pytest.mark.parametrize("rule", ["fltrust", "flame"])
def test_context_rules_train_reproducibly(tmp_path: Path, rule: str) -> None:
    cfg = small_config(training={"rounds": 2}, attack={"boost": False}, aggregation={"name": rule},
                       capture={"gradient_batch_sizes": []})
    a = train(cfg, tmp_path / "a", progress=False)
    b = train(cfg, tmp_path / "b", progress=False)
    assert a.history == b.history
    assert a.history[-1]["ma"] > 0.3  # learning (chance is 0.1)


@pytest.mark.parametrize(("rule", "bad"), [
    ("foolsgold", {"ids": torch.tensor([0, 0]), "histories": torch.zeros(2, 3, dtype=torch.float64)}),
    ("foolsgold", {"ids": torch.tensor([0, 1], dtype=torch.int32), "histories": torch.zeros(2, 3)}),
    ("fl_defender", {"ids": torch.tensor([0, 1]), "scores": torch.zeros(3)}),
    ("fl_defender", {"ids": torch.tensor([-1]), "scores": torch.zeros(1)}),
    ("fl_defender", {"ids": torch.tensor([0]), "scores": torch.zeros(1), "extra": torch.zeros(1)}),
])
def test_saved_state_from_a_run_directory_is_validated(rule: str, bad: dict[str, torch.Tensor]) -> None:
    with pytest.raises(AggregationError, match=f"{rule}: saved aggregator state must be"):
        build_aggregator(rule, AggregatorParams()).load_state_dict(bad)


def test_foolsgold_state_of_another_model_is_refused() -> None:
    rule = build_aggregator("foolsgold", AggregatorParams(similarity_features="all"))
    rule.load_state_dict({"ids": torch.tensor([0, 1]), "histories": torch.zeros(2, 7, dtype=torch.float64)})
    with pytest.raises(AggregationError, match="saved histories have \\[7\\] values"):
        rule(torch.randn(2, 5))
