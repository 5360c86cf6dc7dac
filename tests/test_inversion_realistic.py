"""Phase 2 on what a server really receives: multi-step FedAvg updates over many images, boosted
updates, label counts, Hungarian-matched distributions, and the hardening of `flsec invert`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from flsec.config import build_config
from flsec.errors import ConfigError, FlsecError
from flsec.fl.checkpoint import load_checkpoint
from flsec.fl.client import LocalSpec, local_train_on
from flsec.fl.params import set_flat
from flsec.inversion import attack
from flsec.inversion.boost import applied_factor, norm_ratio, replay_scale
from flsec.inversion.cases import UpdateCase, momentum_multiplier
from flsec.inversion.labels import bias_corrected_counts, candidate_labels, label_counts, largest_remainder
from flsec.inversion.methods import InversionSettings
from flsec.inversion.metrics import distribution, match, score
from flsec.inversion.truth import capture_truth

FAST = InversionSettings(iterations=10, max_images=4, progress=False)


# --- numpy transcriptions of the papers' pseudo-code ------------------------------------------


def breaching_bias_corrected(bias: np.ndarray, n: int) -> np.ndarray:
    """breaching/attacks/base_attack.py, label_strategy == "bias-corrected", one query."""
    b = bias.astype(np.float64).copy()
    labels = [int(i) for i in np.nonzero(b < 0)[0]]
    m = b[labels].sum() / n
    b[labels] = b[labels] - m
    while len(labels) < n:
        i = int(np.argmin(b))
        labels.append(i)
        b[i] -= m
    return np.bincount(np.asarray(labels[:n]), minlength=len(bias))


def heavy_ball_displacement(g: float, lr: float, m: float, steps: int) -> float:
    """torch.optim.SGD with momentum on a constant gradient: buf = m buf + g; w -= lr buf."""
    w, buf = 0.0, None
    for _ in range(steps):
        buf = g if buf is None else m * buf + g
        w -= lr * buf
    return w


@pytest.mark.parametrize("seed", range(5))
def test_bias_corrected_counts_match_breaching(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 40))
    true = np.bincount(rng.integers(0, 10, n), minlength=10)
    p_bar = rng.dirichlet(np.ones(10))
    bias = p_bar - true / n + rng.normal(0, 0.002, 10)
    ours = bias_corrected_counts(torch.tensor(bias), n)
    assert ours.tolist() == breaching_bias_corrected(bias, n).tolist()
    assert int(ours.sum()) == n
    # Scale-invariant: a boosted (x10) or momentum-amplified update gives the same counts.
    assert bias_corrected_counts(torch.tensor(10.0 * bias), n).tolist() == ours.tolist()


@pytest.mark.parametrize(("m", "steps"), [(0.0, 7), (0.9, 1), (0.9, 13), (0.5, 40)])
def test_momentum_multiplier_is_sgd_displacement(m: float, steps: int) -> None:
    assert -heavy_ball_displacement(0.3, 0.05, m, steps) == pytest.approx(0.05 * 0.3 * momentum_multiplier(steps, m))


def test_llg_needs_true_scale_but_bias_corrected_does_not() -> None:
    p_bar = torch.full((10,), 0.1)
    counts = torch.tensor([30, 0, 10, 0, 0, 0, 0, 24, 0, 0])
    grad = p_bar - counts / 64
    assert label_counts(grad, 64, p_bar).tolist() == counts.tolist()
    assert label_counts(6.0 * grad, 64, p_bar).tolist() != counts.tolist()  # a boost of 6 breaks llg
    assert applied_factor(6.0) == 6.0 and applied_factor(1.8) == 1.0  # ordinary size differences are kept
    assert label_counts(6.0 * grad / applied_factor(6.0), 64, p_bar).tolist() == counts.tolist()


def test_candidate_labels_share_counts_proportionally() -> None:
    counts = torch.tensor([120, 0, 40, 0, 0, 0, 0, 80, 0, 0])
    lab = candidate_labels(counts, 12)
    assert torch.bincount(lab, minlength=10).tolist() == [6, 0, 2, 0, 0, 0, 0, 4, 0, 0]
    assert candidate_labels(torch.tensor([1, 2]), 3).tolist() == [0, 1, 1]
    assert largest_remainder(torch.tensor([1.0, 1.0, 1.0]), 4).sum() == 4


def test_boost_estimates() -> None:
    record = {"selected": [0, 3, 5, 7], "update_norms": [50.0, 4.0, 5.0, 6.0]}
    assert norm_ratio(50.0, record, 0) == pytest.approx(10.0)
    assert norm_ratio(50.0, {"selected": [0], "update_norms": [50.0]}, 0) is None
    u = torch.randn(100)
    assert replay_scale(7.5 * u, u) == pytest.approx(7.5)


def test_rectangular_matching_and_distribution() -> None:
    g = torch.Generator().manual_seed(0)
    truth = torch.rand(10, 1, 8, 8, generator=g)
    recon = truth[[7, 2, 4]] + 0.01
    assert match(recon, truth).tolist() == [7, 2, 4]
    with pytest.raises(ValueError):
        match(truth, truth[:3])
    s = score(recon, truth, torch.arange(10), torch.arange(10), candidate_labels=torch.tensor([0, 1, 2]))
    assert s["assigned"] == [7, 2, 4] and s["reconstructed"] == 3 and s["true_images"] == 10
    assert s["psnr_stats"]["mean"] == pytest.approx(40.0, abs=1e-4)  # MSE 1e-4 everywhere
    assert s["matched_label_accuracy"] == 0.0  # candidate labels 0, 1, 2 vs truth 7, 2, 4
    d = distribution([1.0, 2.0, 10.0, float("nan")])
    assert d == {"mean": pytest.approx(13 / 3), "median": 2.0, "best": 10.0, "worst": 1.0}


def test_surrogate_schedule_cycles_candidates() -> None:
    model = torch.nn.Linear(2, 2)
    case = UpdateCase(model, torch.zeros(6), num_samples=100, epochs=2, batch_size=32, lr=0.1, images=5)
    sched = case.schedule()
    assert case.surrogate and case.steps == 8 and len(sched) == 8
    assert all(len(idx) == 5 for idx in sched)  # min(batch, candidates)
    full = UpdateCase(model, torch.zeros(6), num_samples=10, epochs=2, batch_size=4, lr=0.1)
    assert [len(i) for i in full.schedule()] == [4, 4, 2, 4, 4, 2]


# --- on a real backdoored digits run ----------------------------------------------------------


def test_capture_truth_reproduces_the_poisoned_update(trained_run: Path) -> None:
    """The regenerated first-epoch batches (with the attacker's poisoning) are the batches the
    update was computed on: local training on them gives the captured update exactly."""
    ckpt = load_checkpoint(trained_run)
    r, c = ckpt.round, 0
    tensors, meta = ckpt.capture(r, c)
    x, y, poisoned = capture_truth(ckpt, r, c, "update", meta)
    assert meta["epochs"] == 1 and poisoned.any() and (y[poisoned] == ckpt.config.attack.target_label).all()
    model = ckpt.build_model(ckpt.round_model_weights(r))
    spec = LocalSpec(1, meta["batch_size"], meta["lr"], meta["momentum"], meta["weight_decay"])
    batches = list(zip(x.split(meta["batch_size"]), y.split(meta["batch_size"]), strict=True))
    update = local_train_on(model, batches, spec).update * meta["boost_factor"]
    assert torch.allclose(update, tensors["update"], atol=1e-6)


def test_inverts_a_large_boosted_update(trained_run: Path) -> None:
    """A >64-image boosted FedAvg update of the attacker: inverted into 4 images (surrogate replay),
    boost estimated from the round's norms, the target class found by label counts, metrics in range."""
    ckpt = load_checkpoint(trained_run)
    target = attack.Target(ckpt.round, 0, "update")
    res = attack.invert_one(ckpt, target, "geiping", FAST)
    m = res["metrics"]
    assert m["status"] == "ok" and m["num_samples"] > 64 and m["surrogate"]
    assert m["reconstructed"] == 4 and res["images"].shape == (4, 1, 8, 8) and res["truth"].shape == (4, 1, 8, 8)
    assert len(set(m["assigned"])) == 4 and all(0 <= a < m["num_samples"] for a in m["assigned"])
    assert all(0.0 < p <= 100.0 for p in m["psnr"]) and -1.0 <= m["mean_ssim"] <= 1.0
    ps = m["psnr_stats"]
    assert ps["worst"] <= ps["median"] <= ps["best"] and ps["worst"] <= ps["mean"] <= ps["best"]
    true_gamma = m["boost"]["true_factor"]
    assert true_gamma == 6.0 and 3.0 < m["boost"]["norm_estimate"] < 12.0
    counts = torch.tensor(m["inferred_counts"])
    assert int(counts.sum()) == m["num_samples"] and int(counts.argmax()) == ckpt.config.attack.target_label
    assert 0.5 < m["label_accuracy"] <= 1.0


def test_invert_cli_reports_surrogate_and_strict_json(trained_run: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    out = tmp_path / "inv"
    proc = subprocess.run([sys.executable, "-m", "flsec.cli", "invert", "--checkpoint", str(trained_run), "--out",
                           str(out), "--target", "update", "--iterations", "3", "--max-images", "4", "-q"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "4 of " in proc.stdout and "surrogate replay" in proc.stdout

    def refuse(token: str) -> float:
        raise AssertionError(f"non-standard JSON token {token}")

    report = json.loads((out / "metrics.json").read_text(), parse_constant=refuse)
    (t,) = report["targets"]
    assert t["reconstructed"] == 4 and t["true_images"] == t["num_samples"] > 64


@pytest.fixture(scope="module")
def four_captures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from flsec.fl.engines import train
    from tests.conftest import small_config

    run = tmp_path_factory.mktemp("runs") / "four"
    train(small_config(capture={"rounds": [3, 4], "clients": [0, 1]}), run, progress=False)
    return run


def _rewrite_listed(run: Path, rel: str, tensors: dict[str, torch.Tensor]) -> None:
    """Replace a listed checkpoint file consistently (as a re-run of training would)."""
    from flsec.fl.checkpoint import manifest_digest
    from flsec.io import sha256_file, write_json, write_tensors

    write_tensors(run / rel, tensors)
    meta = json.loads((run / "meta.json").read_text())
    meta["files"][rel] = sha256_file(run / rel)
    meta["manifest_sha256"] = manifest_digest(meta)
    write_json(run / "meta.json", meta)


def test_cache_is_keyed_on_checkpoint_content(four_captures: Path, tmp_path: Path) -> None:
    """Re-inverting into the same --out after the checkpoint changed must not return the old result."""
    import shutil

    from flsec.fl.checkpoint import global_model_path, read_tensors

    run = tmp_path / "run"
    shutil.copytree(four_captures, run)
    out = tmp_path / "inv"
    pick = {"round_": 4, "client": 0, "kind": "gradient_b1", "settings": FAST}
    first = attack.run_inversion(run, out, **pick)["targets"][0]
    weights = read_tensors(run / global_model_path(4))
    _rewrite_listed(run, global_model_path(4), {k: v * 0.5 for k, v in weights.items()})
    second = attack.run_inversion(run, out, **pick)["targets"][0]
    fresh = attack.run_inversion(run, tmp_path / "fresh", **pick)["targets"][0]
    assert second["psnr"] == fresh["psnr"] and second["psnr"] != first["psnr"]


def test_ctrl_c_stops_the_whole_command_and_resumes(four_captures: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    real = attack.invert_one
    calls: list[str] = []

    def interrupt_second(ckpt, target, method, settings, device=None):  # type: ignore[no-untyped-def]
        calls.append(target.tag)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as Ctrl-C inside the second capture's optimisation
        return real(ckpt, target, method, settings, device)

    monkeypatch.setattr(attack, "invert_one", interrupt_second)
    out = tmp_path / "inv"
    with pytest.raises(attack.InversionInterrupted, match="1 of 4 inversion captures finished"):
        attack.run_inversion(four_captures, out, every=True, settings=FAST, batch_captures=1)
    assert len(calls) == 2  # the third and fourth captures were never started
    assert len(list((out / "parts").glob("*.safetensors"))) == 1
    assert not (out / "metrics.json").exists() and not (out / "reconstructions.safetensors").exists()
    calls.clear()
    monkeypatch.setattr(attack, "invert_one", lambda *a, **k: (calls.append(a[1].tag), real(*a, **k))[1])
    report = attack.run_inversion(four_captures, out, every=True, settings=FAST, batch_captures=1)
    assert len(calls) == 3 and report["summary"]["targets"] == 4  # the finished capture was reused


def test_nan_update_is_reported_non_finite_not_all_zero(trained_run: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    real_build = attack.build_case

    def poisoned(ckpt, target, settings=None, device=None):  # type: ignore[no-untyped-def]
        case, model = real_build(ckpt, target, settings, device)
        case.observed = case.observed.clone()
        case.observed[3] = float("nan")
        return case, model

    monkeypatch.setattr(attack, "build_case", poisoned)
    ckpt = load_checkpoint(trained_run)
    res = attack.invert_one(ckpt, attack.Target(ckpt.round, 0, "gradient_b1"), "geiping", FAST)
    assert res["metrics"]["status"] == "non_finite_update" and not res["metrics"]["uninformative"]
    with pytest.raises(FlsecError, match="NaN/Inf") as err:
        attack.run_inversion(trained_run, tmp_path / "inv", settings=FAST)
    assert "all-zero" not in str(err.value)
    assert not (tmp_path / "inv" / "metrics.json").exists()


def test_diverged_objective_writes_nothing(trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flsec.inversion import methods

    def nan_step(case, labels, shape, s, *, stats=None):  # type: ignore[no-untyped-def]
        return methods.InversionOutput(torch.full(shape, float("nan")), float("inf"))

    monkeypatch.setitem(methods.METHODS._items, "geiping", nan_step)
    with pytest.raises(FlsecError, match="diverged"):
        attack.run_inversion(trained_run, tmp_path / "inv", settings=FAST)
    assert not (tmp_path / "inv" / "reconstructions.safetensors").exists()


def test_capture_modes() -> None:
    assert build_config({"capture": {"mode": "realistic"}}).capture.gradient_batch_sizes == []
    assert build_config({"capture": {"gradient_batch_sizes": [4]}}).capture.mode == "cooperative"
    with pytest.raises(ConfigError, match="capture.gradient_batch_sizes: must be \\[\\] when capture.mode"):
        build_config({"capture": {"mode": "realistic", "gradient_batch_sizes": [1]}})


def test_replay_of_an_update_on_device_matches_cpu(trained_run: Path) -> None:
    """Phase 2 takes a device; on this machine only the CPU exists, so check the device plumbing
    (model, observed update and candidates all on it; results written from CPU copies)."""
    ckpt = load_checkpoint(trained_run)
    case, model = attack.build_case(ckpt, attack.Target(ckpt.round, 0, "update"), FAST, torch.device("cpu"))
    assert case.observed.device.type == "cpu" and next(model.parameters()).device.type == "cpu"
    x = torch.rand(8, 1, 8, 8)
    labels = torch.zeros(8, dtype=torch.long)
    assert math.isfinite(float(case.simulate(x, labels).detach().norm()))
    set_flat(model, torch.zeros(sum(p.numel() for p in model.parameters())))


def test_mean_softmax_along_update_follows_the_path() -> None:
    from flsec.fl.params import get_flat
    from flsec.inversion.labels import mean_softmax_along_update, mean_softmax_on_noise
    from flsec.models import InputSpec, build_model

    model = build_model("digits_cnn", InputSpec(1, 8, 8, 10, (0.3,), (0.4,)), 0)
    start = get_flat(model)
    zero = torch.zeros_like(start)
    assert torch.allclose(mean_softmax_along_update(model, zero, (1, 8, 8)), mean_softmax_on_noise(model, (1, 8, 8)))
    push = zero.clone()
    push[-10] = 20.0  # the output bias of class 0 rises along the path
    p = mean_softmax_along_update(model, push, (1, 8, 8), points=5)
    assert torch.equal(get_flat(model), start)  # the model is left as it was
    # Points at 0, 1/4, ..., 1: class 0 dominates from the second point on, so it holds ~4/5 of the mass.
    assert 0.7 < float(p[0]) < 0.85 and float(p.sum()) == pytest.approx(1.0)
