"""Batched inversion (``--batch-captures``): every vectorised step is the one-by-one step and the
results carry the same labels and statuses; it falls back where it cannot vectorise and says so,
shows one progress bar, keeps finished batches on Ctrl-C and resumes; ``--out`` is write-locked."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from flsec.config import build_config
from flsec.errors import CheckpointError, ConfigError
from flsec.fl.checkpoint import Checkpoint, load_checkpoint
from flsec.inversion import attack
from flsec.inversion.batched import batch_blocker, geiping_batched, objective_gradients
from flsec.inversion.cases import GradientCase, cosine_distance
from flsec.inversion.methods import Box, InversionSettings, geiping
from flsec.inversion.metrics import total_variation
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


def _gradient_targets(ckpt: Checkpoint) -> list[attack.Target]:
    targets = [t for t in attack.available_targets(ckpt) if t.kind == "gradient_b1"]
    assert sorted({t.round for t in targets}) == [3, 4] and len(targets) == 4
    w3, w4 = (ckpt.round_model_weights(r) for r in (3, 4))
    assert any(not torch.equal(w3[k], w4[k]) for k in w3)  # the batch really spans two models
    return targets


@pytest.mark.parametrize("space", ["pixel", "normalised"])
def test_every_batched_step_is_the_one_by_one_step(two_rounds: Path, space: str) -> None:
    """What vectorising promises, on any CPU: at the same images, each capture's objective and its
    gradient are those of its own optimisation, up to float rounding (a wrong weight, label or
    gradient in the stack would be off by the order of the values themselves)."""
    ckpt = load_checkpoint(two_rounds)
    spec = ckpt.input_spec()
    cases, labels = [], []
    for target in _gradient_targets(ckpt):
        case, model = attack.build_case(ckpt, target)
        labels.append(attack.infer_labels(case, model, spec, FAST)[0])
        cases.append(case)
    box = Box.for_space(space, spec.channels, (spec.mean, spec.std), torch.device("cpu"))
    step = objective_gradients(cases, labels, box, tv_weight=1e-3)
    g = torch.Generator().manual_seed(7)
    for init in ("uniform", "normal"):
        z = torch.stack([box.initial((1, spec.channels, spec.height, spec.width), init, g) for _ in cases])
        dz, rec = step(z)
        for k, (case, y) in enumerate(zip(cases, labels, strict=True)):
            zk = z[k].clone().requires_grad_(True)
            ref = cosine_distance(case.simulate(box.pixels(zk), y), case.observed)
            (ref_dz,) = torch.autograd.grad(ref + 1e-3 * total_variation(zk), [zk])
            assert float(rec[k]) == pytest.approx(float(ref.detach()), rel=1e-4, abs=1e-7)
            scale = float(ref_dz.abs().max())
            assert scale > 0 and float((dz[k] - ref_dz).abs().max()) <= 1e-3 * scale
            clear = ref_dz.abs() > 1e-2 * scale  # signed Adam's step: the same wherever the sign is not a rounding
            assert torch.equal(dz[k].sign()[clear], ref_dz.sign()[clear])


def test_batched_inversion_across_rounds_gives_what_one_by_one_gives(two_rounds: Path) -> None:
    """The same labels, statuses and iteration counts, and real reconstructions either way. Not the same
    pixels: Adam on the gradient's sign turns a rounding difference in a near-zero coordinate into a
    full step, so which minimum a 200-step run reaches depends on the CPU's kernels (on an AVX-512
    Xeon one capture's batched and one-by-one PSNRs differ by 5.6 dB; see flsec.inversion.batched)."""
    ckpt = load_checkpoint(two_rounds)
    targets = _gradient_targets(ckpt)
    settings = InversionSettings(iterations=100, restarts=2, tv_weight=1e-3, progress=False)
    results, blocked = attack.invert_batch(ckpt, targets, "geiping", settings)
    assert blocked == {} and [r["target"] for r in results] == targets
    psnrs = []
    for res in results:
        ref = attack.invert_one(ckpt, res["target"], "geiping", settings)
        assert res["metrics"]["batch"]["vectorised"] and res["metrics"]["batch"]["size"] == 4
        assert torch.equal(res["labels"], ref["labels"])
        assert res["metrics"]["status"] == ref["metrics"]["status"] == "ok"
        assert res["metrics"]["iterations_done"] == ref["metrics"]["iterations_done"] == 200
        assert res["metrics"]["label_accuracy"] == ref["metrics"]["label_accuracy"]
        for r in (res, ref):
            assert len(r["metrics"]["restart_losses"]) == 2 and all(0 <= v < 1 for v in r["metrics"]["restart_losses"])
            assert r["images"].shape == (1, 1, 8, 8) and 0 <= float(r["images"].min()) <= float(r["images"].max()) <= 1
        psnrs += [*res["metrics"]["psnr"], *ref["metrics"]["psnr"]]
    assert min(psnrs) > 12  # and they are reconstructions, not noise


def test_geiping_batched_starts_where_geiping_starts_on_normalised_space() -> None:
    """The full functions in the authors' setting (normalised space, normal init), with different
    weights per case: the same seeded start and the same objective there; then both optimise."""
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
    first = InversionSettings(iterations=1, space="normalised", init="normal", progress=False)
    batched = geiping_batched(cases, labels, (2, 1, 8, 8), first, stats=(spec.mean, spec.std))
    for case, y, out in zip(cases, labels, batched, strict=True):
        ref = geiping(case, y, (2, 1, 8, 8), first, stats=(spec.mean, spec.std))
        assert torch.allclose(out.images, ref.images, rtol=0, atol=1e-6)
        assert out.loss == pytest.approx(ref.loss, rel=1e-4)
    s = InversionSettings(iterations=60, space="normalised", init="normal", progress=False)
    for start, out in zip(batched, geiping_batched(cases, labels, (2, 1, 8, 8), s, stats=(spec.mean, spec.std)),
                          strict=True):
        assert out.loss < start.loss and out.iterations_done == 60
        assert float(out.images.min()) >= 0.0 and float(out.images.max()) <= 1.0


def test_run_inversion_batches_and_states_fallbacks(two_rounds: Path, tmp_path: Path) -> None:
    report = attack.run_inversion(two_rounds, tmp_path / "b", every=True, settings=FAST, batch_captures=3)
    assert [r["batch"]["size"] for r in report["targets"]] == [3, 3, 3, 1]  # the fourth is alone: the reference path
    assert report["summary"]["batching"] == {"batch_captures": 3, "vectorised_targets": 3, "one_by_one_targets": 1,
                                             "fallbacks": {}}
    one = attack.run_inversion(two_rounds, tmp_path / "one", every=True, settings=FAST, batch_captures=1)
    assert one["summary"]["batching"]["one_by_one_targets"] == 4
    for batched, alone in zip(report["targets"], one["targets"], strict=True):  # not the pixels: see above
        assert (batched["status"], batched["label_accuracy"], len(batched["psnr"])) == \
               (alone["status"], alone["label_accuracy"], len(alone["psnr"]))

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
