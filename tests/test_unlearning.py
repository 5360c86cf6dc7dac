"""Phase 3 on digits: verification finds the trigger, unlearning lowers ASR, phases resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flsec.attacks.backdoor import make_trigger, stamp
from flsec.data import load_dataset
from flsec.fl.checkpoint import load_checkpoint
from flsec.io import write_tensors
from flsec.unlearning.finetune import FinetuneSettings
from flsec.unlearning.run import run_unlearning
from flsec.unlearning.verify import mask_iou, verify
from tests.conftest import small_config


def _reconstructions(folder: Path, poisoned: int = 4, clean: int = 16) -> torch.Tensor:
    """Stand-ins for perfect reconstructions: digits, ``poisoned`` of them stamped and relabelled 0."""
    d = load_dataset("digits")
    trig = make_trigger(small_config().attack.trigger, 8, 8)
    keep = d.y_test != 0
    x = d.x_test[keep][: poisoned + clean].clone()
    y = d.y_test[keep][: poisoned + clean].clone()
    x[:poisoned] = stamp(x[:poisoned], trig)
    y[:poisoned] = 0
    write_tensors(folder / "reconstructions.safetensors",
                  {"images": x, "labels": y, "sources": torch.zeros(len(y), 3, dtype=torch.long)})
    return x


def test_verification_finds_target_and_trigger(trained_run: Path, tmp_path: Path) -> None:
    ckpt = load_checkpoint(trained_run)
    model = ckpt.build_model()
    x = _reconstructions(tmp_path)
    ver = verify(model, x, torch.zeros(len(x), dtype=torch.long))
    assert ver.target == 0
    assert ver.suspects[:4].sum() >= 3 and ver.suspects[4:].sum() <= 1
    true_mask = make_trigger(ckpt.config.attack.trigger, 8, 8).mask
    assert ver.estimate is not None and mask_iou(ver.estimate.mask, true_mask) >= 0.5
    assert ver.report["suspects_predicted_target_trigger_removed"] < 0.5


def test_unlearning_lowers_asr_and_writes_repaired_checkpoint(trained_run: Path, tmp_path: Path) -> None:
    _reconstructions(tmp_path / "inv")
    res = run_unlearning(trained_run, tmp_path / "inv", tmp_path / "out",
                         FinetuneSettings(steps=150, progress=False), baselines=True, progress=False)
    assert res["before"]["asr"] > 0.6
    assert res["after"]["asr"] < res["before"]["asr"] - 0.4
    assert res["after"]["ma"] > res["before"]["ma"] - 0.1  # an 8x8 image loses 14% of its pixels to the trigger
    assert res["baseline_finetune"]["clean_images"] == 100  # the root set (unlearning.root_size)
    assert res["baseline_retrain"]["asr"] < 0.3 and res["baseline_retrain"]["excluded"] == [0]  # no attackers
    assert res["baseline_neural_cleanse"]["carriers"] == "synthetic"  # the model alone: no reconstructions
    assert res["baseline_retrain_suspects"]["excluded"] == [0]  # the stand-ins' sources name client 0
    repaired = load_checkpoint(tmp_path / "out" / "checkpoint")
    assert repaired.meta["unlearning"]["after"] == res["after"]
    assert repaired.history[-1]["phase"] == "unlearning"
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["after"] == res["after"]
    assert (tmp_path / "out" / "trigger_estimate.png").is_file()


def _pipeline_config():  # type: ignore[no-untyped-def]
    return small_config(training={"rounds": 4}, capture={"rounds": [3, 4], "clients": "all", "gradient_batch_sizes": [1]},
                        inversion={"iterations": 200, "batch_captures": 1},  # one by one: invert_one is counted
                        unlearning={"steps": 40, "baselines": False})


def test_pipeline_resumes_each_phase(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import flsec.inversion.attack as attack
    import flsec.pipeline as pipeline

    cfg = _pipeline_config()
    out = tmp_path / "run"
    calls: list[str] = []
    real_invert_one = attack.invert_one

    def counting(ckpt, target, method, settings, device=None):  # type: ignore[no-untyped-def]
        calls.append(target.tag)
        if len(calls) == 3 and not getattr(counting, "resumed", False):
            raise KeyboardInterrupt  # stop inside phase 2, after two finished targets
        return real_invert_one(ckpt, target, method, settings, device)

    monkeypatch.setattr(attack, "invert_one", counting)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_pipeline(cfg, out, progress=False)
    assert load_checkpoint(out / "train").complete
    train_meta = (out / "train" / "meta.json").read_bytes()
    assert len(list((out / "invert" / "parts").glob("*.safetensors"))) == 2
    assert not (out / "invert" / "metrics.json").exists()

    # Re-run, but stop in phase 3: training is reused and the two finished targets are not redone.
    counting.resumed = True  # type: ignore[attr-defined]
    calls.clear()

    def stop_unlearning(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run_unlearning", stop_unlearning)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_pipeline(cfg, out, progress=False)
    assert (out / "train" / "meta.json").read_bytes() == train_meta
    assert len(calls) == 12 - 2
    assert (out / "invert" / "metrics.json").is_file()

    # Final re-run: phases 1 and 2 are reused, phase 3 and the report complete.
    monkeypatch.undo()
    calls.clear()
    monkeypatch.setattr(attack, "invert_one", counting)
    report = pipeline.run_pipeline(cfg, out, progress=False)
    assert calls == []
    assert (out / "unlearn" / "metrics.json").is_file()
    page = report.read_text()
    assert page.count("data:image/png;base64,") >= 4  # rounds, weights, reconstructions, before/after
    for heading in ("Phase 1", "Phase 2", "Phase 3"):
        assert heading in page

    # `flsec report` rebuilds the same page from the finished phases; a non-run directory is refused.
    report.unlink()
    proc = subprocess.run([sys.executable, "-m", "flsec.cli", "report", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert report.read_text() == page
    proc = subprocess.run([sys.executable, "-m", "flsec.cli", "report", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "run_dir:" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
