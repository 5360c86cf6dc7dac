"""Suspect detection: the modified z-score against a numpy transcription of Iglewicz & Hoaglin's
definition, the update-space detectors on stacks with known outliers, the rules' own exclusions,
and precision/recall bookkeeping."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flsec.aggregation import AggregatorParams, build_aggregator
from flsec.detection import detect, modified_z, resolve_detector
from flsec.errors import ConfigError
from flsec.fl.server import detection_record


def reference_modified_z(x: np.ndarray) -> np.ndarray:
    """Iglewicz & Hoaglin (1993), eq. 3.3: M_i = 0.6745 (x_i - median(x)) / median(|x - median(x)|);
    with MAD = 0, the mean absolute deviation x 1.253314 (IBM's convention); all 0 if that is 0 too."""
    med = np.median(x)
    mad = np.median(np.abs(x - med))
    if mad > 0:
        with np.errstate(over="ignore"):  # a subnormal MAD: both sides give inf
            return 0.6745 * (x - med) / mad
    mean_ad = np.mean(np.abs(x - med))
    if mean_ad > 0:
        return (x - med) / (1.253314 * mean_ad)
    return np.zeros_like(x)


@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=40))
def test_modified_z_matches_the_definition(values: list[float]) -> None:
    x = np.array(values, dtype=np.float64)
    np.testing.assert_allclose(modified_z(torch.tensor(x)).numpy(), reference_modified_z(x), rtol=1e-9, atol=1e-9)


def test_modified_z_known_answer() -> None:
    # median 3, |deviations| 2 1 0 1 97 -> MAD 1; M = 0.6745 * (x - 3)
    z = modified_z(torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0]))
    assert torch.allclose(z, 0.6745 * torch.tensor([-2.0, -1.0, 0.0, 1.0, 97.0], dtype=torch.float64))


def _stack(k: int = 10, d: int = 200, seed: int = 0) -> torch.Tensor:
    """Honest updates: a shared direction plus client noise, norms within a factor ~1.5 of each other."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(d, generator=g)
    scale = 1.0 + 0.5 * torch.rand(k, 1, generator=g)
    return scale * (base + 0.6 * torch.randn(k, d, generator=g))


def _fedavg_result(stack: torch.Tensor):  # type: ignore[no-untyped-def]
    return build_aggregator("fedavg", AggregatorParams())(stack)


@pytest.mark.parametrize("seed", range(5))
def test_norm_detector_flags_exactly_the_boosted_updates(seed: int) -> None:
    stack = _stack(seed=seed)
    stack[[2, 7]] *= 10.0  # model replacement: n / attackers
    s = detect("norm", stack, list(range(10, 20)), _fedavg_result(stack), 3.5)
    assert s.suspects == [12, 17]
    assert min(s.score_of(12), s.score_of(17)) > max(v for c, v in zip(s.clients, s.scores, strict=True)
                                                     if c not in (12, 17))


@pytest.mark.parametrize("seed", range(5))
def test_cosine_detector_flags_updates_pointing_away(seed: int) -> None:
    stack = _stack(seed=seed)
    g = torch.Generator().manual_seed(100 + seed)
    stack[4] = torch.randn(stack.shape[1], generator=g) * stack[4].norm() / math.sqrt(stack.shape[1])
    s = detect("cosine", stack, list(range(10)), _fedavg_result(stack), 3.5)
    assert 4 in s.suspects and len(s.suspects) <= 2
    combined = detect("norm_cosine", stack, list(range(10)), _fedavg_result(stack), 3.5)
    assert set(s.suspects) <= set(combined.suspects)


def test_honest_round_has_no_suspects_and_nan_rows_always_do() -> None:
    stack = _stack(seed=3)
    assert detect("norm_cosine", stack, list(range(10)), _fedavg_result(stack), 3.5).suspects == []
    stack[5] = float("nan")
    s = detect("norm_cosine", stack, list(range(10)), _fedavg_result(stack), 3.5)
    assert 5 in s.suspects and s.score_of(5) == math.inf


def test_multi_krum_suspects_are_its_f_worst_scores() -> None:
    stack = _stack(seed=1)
    stack[[0, 3]] += 5.0  # far from the rest
    rule = build_aggregator("multi_krum", AggregatorParams(f=2))
    res = rule(stack)
    assert resolve_detector("auto", rule) == "rule"
    s = detect("rule", stack, list(range(10)), res, 3.5)
    assert s.suspects == [0, 3]
    assert torch.equal(res.excluded, res.weights == 0)  # m = k - f: excluded = left out
    krum = build_aggregator("krum", AggregatorParams(f=2))
    assert detect("rule", stack, list(range(10)), krum(stack), 3.5).suspects == [0, 3]  # not the k - 1 unchosen


def test_weight_based_rules_suspect_their_zero_weights() -> None:
    """FoolsGold: identical sybil histories get weight 0 (Fung et al. 2020, Alg. 1)."""
    stack = _stack(seed=2)
    stack[6] = stack[1].clone()
    rule = build_aggregator("foolsgold", AggregatorParams(num_clients=10))
    res = rule(stack, client_ids=list(range(10)))
    s = detect("rule", stack, list(range(10)), res, 3.5)
    assert s.suspects == sorted(i for i in range(10) if float(res.weights[i]) == 0.0)
    assert {1, 6} <= set(s.suspects)


def test_rule_detector_needs_a_rule_that_excludes() -> None:
    with pytest.raises(ConfigError, match="detection.detector: 'fedavg' excludes no client"):
        resolve_detector("rule", build_aggregator("fedavg", AggregatorParams()))
    assert resolve_detector("auto", build_aggregator("median", AggregatorParams())) == "norm_cosine"


def test_precision_and_recall_are_evaluation_only_bookkeeping() -> None:
    stack = _stack(seed=0)
    stack[[2, 7]] *= 10.0
    s = detect("norm", stack, list(range(10)), _fedavg_result(stack), 3.5)
    rec = detection_record(s, [2, 9])
    assert rec["suspects"] == [2, 7] and rec["suspects_precision"] == 0.5 and rec["suspects_recall"] == 0.5
    none = detection_record(detect("norm", _stack(seed=3), list(range(10)), _fedavg_result(_stack(seed=3)), 3.5), [])
    assert none["suspects"] == [] and none["suspects_precision"] is None and none["suspects_recall"] is None
