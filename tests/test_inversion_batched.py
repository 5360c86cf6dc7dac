"""Batched inversion (``--batch-captures``): the vectorised optimisation gives the one-by-one
reconstructions, falls back where it cannot vectorise and says so, shows one progress bar, keeps
finished batches on Ctrl-C and resumes; ``--out`` is write-locked."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from flsec.config import build_config
from flsec.errors import CheckpointError, ConfigError
from flsec.fl.checkpoint import load_checkpoint
from flsec.inversion import attack
from flsec.inversion.batched import batch_blocker, geiping_batched
from flsec.inversion.cases import GradientCase
from flsec.inversion.methods import InversionSettings, geiping
from flsec.lock import locked_dir

FAST = InversionSettings(iterations=10, max_images=4, progress=False)


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Batch-1 gradients of clients 0 and 1 in rounds 3 and 4 (two different global models)."""
    from flsec.fl.engines import train
    from tests.conftest import small_config

    run = tmp_path_factory.mktemp("runs") / "two_rounds"
    train(small_config(capture={"rounds": [3, 4], "clients": [0, 1], "updates": True}), run, progress=False)
    return run


def test_batched_equals_one_by_one_across_rounds(two_rounds: Path) -> None:
    ckpt = load_checkpoint(two_rounds)
    targets = [t for t in attack.available_targets(ckpt) if t.kind == "gradient_b1"]
    assert sorted({t.round for t in targets}) == [3, 4] and len(targets) == 4
    w3, w4 = (ckpt.round_model_weights(r) for r in (3, 4))
    assert any(not torch.equal(w3[k], w4[k]) for k in w3)  # the batch really spans two models
    settings = InversionSettings(iterations=100, restarts=2, tv_weight=1e-3, progress=False)
    results, blocked = attack.invert_batch(ckpt, targets, "geiping", settings)
    assert blocked == {} and [r["target"] for r in results] == targets
    for res in results:
        ref = attack.invert_one(ckpt, res["target"], "geiping", settings)
        assert res["metrics"]["batch"]["vectorised"] and res["metrics"]["batch"]["size"] == 4
        assert torch.equal(res["labels"], ref["labels"])
        # Not bit-identical: float rounding in the vectorised kernels can flip the sign of a near-zero
        # gradient coordinate (signed Adam then moves that pixel by one decayed step), or pick another
        # best iterate among losses equal to ~1e-7. A thousandth of the pixel range bounds both.
        diff = (res["images"] - ref["images"]).abs()
        assert float(diff.max()) <= 1e-3 and float(diff.mean()) <= 2e-4
        assert res["metrics"]["restart_losses"] == pytest.approx(ref["metrics"]["restart_losses"], abs=1e-4)
        assert res["metrics"]["psnr"] == pytest.approx(ref["metrics"]["psnr"], abs=0.1)
        assert res["metrics"]["iterations_done"] == ref["metrics"]["iterations_done"] == 200
    assert min(p for r in results for p in r["metrics"]["psnr"]) > 12  # and they are reconstructions, not noise


def test_geiping_batched_equals_geiping_on_normalised_space() -> None:
    """The pure functions agree in the authors' setting (normalised space, normal init), with
    different weights per case."""
    from flsec.data import load_dataset
    from flsec.fl.client import batch_gradient
    from flsec.models import InputSpec, build_model

    d = load_dataset("digits")
    spec = InputSpec(1, 8, 8, 10, d.mean, d.std)
    cases, labels = [], []
    for i in range(3):
        model = build_model("digits_cnn", spec, i)
        x, y = d.x_test[2 * i:2 * i + 2], d.y_test[2 * i:2 * i + 2]
        cases.append(GradientCase(model, batch_gradient(model, x, y), 2))
        labels.append(y)
    s = InversionSettings(iterations=60, space="normalised", init="normal", progress=False)
    batched = geiping_batched(cases, labels, (2, 1, 8, 8), s, stats=(spec.mean, spec.std))
    for case, y, out in zip(cases, labels, batched, strict=True):
        ref = geiping(case, y, (2, 1, 8, 8), s, stats=(spec.mean, spec.std))
        assert float((out.images - ref.images).abs().max()) <= 1e-3
        assert out.loss == pytest.approx(ref.loss, abs=1e-4)
        assert float(out.images.min()) >= 0.0 and float(out.images.max()) <= 1.0


def test_run_inversion_batches_and_states_fallbacks(two_rounds: Path, tmp_path: Path) -> None:
    report = attack.run_inversion(two_rounds, tmp_path / "b", every=True, settings=FAST, batch_captures=3)
    assert [r["batch"]["size"] for r in report["targets"]] == [3, 3, 3, 1]  # the fourth is alone: the reference path
    assert report["summary"]["batching"] == {"batch_captures": 3, "vectorised_targets": 3, "one_by_one_targets": 1,
                                             "fallbacks": {}}
    one = attack.run_inversion(two_rounds, tmp_path / "one", every=True, settings=FAST, batch_captures=1)
    assert one["summary"]["batching"]["one_by_one_targets"] == 4
    assert [r["psnr"] for r in report["targets"]] == [pytest.approx(r["psnr"], abs=0.1) for r in one["targets"]]

    upd = attack.run_inversion(two_rounds, tmp_path / "u", kind="update", round_=4, every=True, settings=FAST,
                               batch_captures=4)
    assert upd["summary"]["batching"]["fallbacks"] == {"update inversion replays several local steps": 2}
    dlg = attack.run_inversion(two_rounds, tmp_path / "d", round_=4, every=True, method="dlg",
                               settings=replace(FAST, iterations=2), batch_captures=4)
    assert dlg["summary"]["batching"]["vectorised_targets"] == 0
    assert list(dlg["summary"]["batching"]["fallbacks"]) == ["method 'dlg' has no vectorised path (allowed: geiping)"]


def test_batch_norm_in_train_mode_is_not_vectorised() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(72, 10))
    case = GradientCase(model, torch.ones(sum(p.numel() for p in model.parameters())), 1)
    assert batch_blocker(case, "geiping") is None  # eval mode: running statistics, vectorisable
    model.train()
    assert batch_blocker(case, "geiping") == "the model has BatchNorm2d in train mode"
    assert attack.plan_batches([attack.Target(1, c, "gradient_b1") for c in range(5)], "geiping", 2)[-1] == (
        [attack.Target(1, 4, "gradient_b1")], None)


def test_ctrl_c_keeps_finished_batches_and_resumes(two_rounds: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    real = attack.invert_batch
    calls: list[list[str]] = []

    def interrupt_second(ckpt, targets, method, settings, device=None, on_iteration=None):  # type: ignore[no-untyped-def]
        calls.append([t.tag for t in targets])
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C inside the second batch's optimisation
        return real(ckpt, targets, method, settings, device, on_iteration)

    monkeypatch.setattr(attack, "invert_batch", interrupt_second)
    out = tmp_path / "inv"
    with pytest.raises(attack.InversionInterrupted, match="2 of 4 inversion captures finished"):
        attack.run_inversion(two_rounds, out, every=True, settings=FAST, batch_captures=2)
    assert len(calls) == 2
    kept = sorted(p.stem for p in (out / "parts").glob("*.safetensors"))
    assert kept == sorted(calls[0])
    assert not (out / "metrics.json").exists() and not (out / "reconstructions.safetensors").exists()

    calls.clear()
    monkeypatch.setattr(attack, "invert_batch", lambda *a, **k: (calls.append([t.tag for t in a[1]]), real(*a, **k))[1])
    report = attack.run_inversion(two_rounds, out, every=True, settings=FAST, batch_captures=2)
    assert calls == [[t for t in sorted_tags(report) if t not in kept]]  # the finished batch was reused
    assert report["summary"]["targets"] == 4 and report["summary"]["batching"]["vectorised_targets"] == 4


def sorted_tags(report: dict) -> list[str]:  # type: ignore[type-arg]
    return [attack.Target(t["round"], t["client"], t["kind"]).tag for t in report["targets"]]


def test_one_progress_bar_for_the_command(two_rounds: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flsec.inversion import methods

    bars: list[object] = []
    real_tqdm = attack.tqdm

    def recording(*args, **kwargs):  # type: ignore[no-untyped-def]
        bar = real_tqdm(*args, **kwargs)
        if not kwargs.get("disable"):
            bars.append(bar)
        return bar

    monkeypatch.setattr(attack, "tqdm", recording)
    monkeypatch.setattr(methods, "tqdm", recording)
    for batch in (1, 3):
        bars.clear()
        attack.run_inversion(two_rounds, tmp_path / f"b{batch}", every=True, settings=replace(FAST, progress=True),
                             batch_captures=batch)
        (bar,) = bars
        assert bar.total == 4 and bar.n == 4  # type: ignore[attr-defined]
        assert "best_psnr" in bar.postfix  # type: ignore[attr-defined]


def test_out_is_write_locked(trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "inv"
    with locked_dir(out), pytest.raises(CheckpointError, match="in use by another flsec process"):
        attack.run_inversion(trained_run, out, settings=FAST)
    assert not out.exists()  # nothing was written (the holder made the directory and removed it again)
    attack.run_inversion(trained_run, out, settings=FAST)  # released: the next run proceeds
    assert (out / "metrics.json").is_file()


def test_batch_captures_validation() -> None:
    assert build_config({}).inversion.batch_captures == 1  # the reference unless asked
    with pytest.raises(ConfigError, match="batch_captures"):
        build_config({"inversion": {"batch_captures": 0}})
