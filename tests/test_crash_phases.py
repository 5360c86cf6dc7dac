"""Crash consistency of phases 2-3: `flsec invert --all` and `flsec run` killed with SIGKILL at
points spread over their work, then re-run, end with the same results as an uninterrupted run;
finished phases and inversion captures are never redone or lost. (Inversion runs one capture at a
time here: a resume that splits a vectorised batch reproduces the images, but a capture's loss only
to float rounding, as the batched path sums in another order.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from safetensors import safe_open

from flsec.fl.checkpoint import load_checkpoint
from flsec.inversion.attack import available_targets

CONFIG = """
seed = 5
[data]
name = "digits"
train_size = 400
test_size = 150
[model]
name = "digits_cnn"
[training]
num_clients = 4
rounds = 2
batch_size = 32
[attack]
kind = "backdoor"
num_malicious = 1
boost = true
[capture]
rounds = "all"
clients = "malicious"
gradient_batch_sizes = [1]
[inversion]
iterations = 25
batch_captures = 1  # one by one: a resume never splits a vectorised batch, so every float is reproduced
[unlearning]
steps = 10
baselines = false
retrain_baseline = false
trigger_source = "verification"
"""

TIMING = ("seconds", "per_second", "wall")


def _flsec(args: list[str], fault: str | None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("FLSEC_FAULT", None)
    if fault:
        env["FLSEC_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "flsec.cli", *args, "-q"], env=env, capture_output=True,
                          text=True, timeout=600)


def _untimed(value: Any) -> Any:
    """A metrics document without its wall-clock fields (the only thing a re-run may change)."""
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if not any(t in k for t in TIMING)}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


def _metrics(path: Path, root: Path) -> Any:
    """A metrics file with the run's own location written as ``<run>`` and without timings."""
    return _untimed(json.loads(path.read_text().replace(str(root), "<run>")))


def _tensors(path: Path, root: Path) -> dict[str, Any]:
    """Every tensor's bytes and the metadata (the run's location written as ``<run>``)."""
    with safe_open(str(path), framework="pt") as fh:
        meta = {k: v.replace(str(root), "<run>") for k, v in (fh.metadata() or {}).items()}
        return {"metadata": meta, **{k: fh.get_tensor(k).numpy().tobytes() for k in fh.keys()}}  # noqa: SIM118


def _inversion_result(out: Path, root: Path) -> dict[str, Any]:
    return {"metrics": _metrics(out / "metrics.json", root),
            "tensors": _tensors(out / "reconstructions.safetensors", root),
            "pngs": {p.name: p.read_bytes() for p in sorted((out / "reconstructed_images").rglob("*.png"))}}


def _kill_then_finish(args: list[str], kills: list[str]) -> None:
    for fault in kills:
        proc = _flsec(args, fault)
        assert proc.returncode == -9, f"{fault}: expected a SIGKILL, got {proc.returncode}: {proc.stderr[-2000:]}"
    proc = _flsec(args, None)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.crash
def test_invert_all_killed_anywhere_then_rerun_gives_the_same_reconstructions(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(CONFIG)
    run = tmp_path / "train"
    assert _flsec(["train", "--config", str(config), "--out", str(run)], None).returncode == 0
    assert len(available_targets(load_checkpoint(run))) == 4  # (gradient_b1 + update) x 2 rounds of the attacker

    def invert(out: Path) -> list[str]:
        return ["invert", "--checkpoint", str(run), "--out", str(out), "--all", "--iterations", "25",
                "--batch-captures", "1"]

    ref = _flsec(invert(tmp_path / "ref"), None)
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "killed"
    _kill_then_finish(invert(out), [
        "atomic:before_rename:1",  # the first capture computed, its cache file not renamed
        "invert:capture:1",        # one capture cached
        "atomic:before_rename:3",  # two more cached, the last one's file not renamed
        "atomic:before_rename:2",  # every capture cached; outputs half written
    ])
    assert not list(out.rglob("*.tmp*")), "leftover temporary files"
    assert _inversion_result(out, out) == _inversion_result(tmp_path / "ref", tmp_path / "ref")


@pytest.mark.crash
def test_flsec_run_killed_in_every_phase_then_resumed_gives_the_same_results(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(CONFIG)
    ref_dir, out = tmp_path / "ref", tmp_path / "killed"
    ref = _flsec(["run", "--config", str(config), "--out", str(ref_dir)], None)
    assert ref.returncode == 0, ref.stderr[-2000:]
    _kill_then_finish(["run", "--config", str(config), "--out", str(out), "--resume"], [
        "commit:meta:2",     # phase 1: round 1 committed
        "invert:capture:1",  # phase 2: training finished, one capture cached
        "commit:meta:1",     # phase 3: the repaired checkpoint committed, metrics.json not written
        "atomic:before_rename:1",
    ])
    for phase in ("train", "unlearn/checkpoint"):
        assert (out / phase / "history.jsonl").read_bytes() == (ref_dir / phase / "history.jsonl").read_bytes()
        assert (out / phase / "model.safetensors").read_bytes() == (ref_dir / phase / "model.safetensors").read_bytes()
    assert _inversion_result(out / "invert", out) == _inversion_result(ref_dir / "invert", ref_dir)
    assert _metrics(out / "unlearn" / "metrics.json", out) == _metrics(ref_dir / "unlearn" / "metrics.json", ref_dir)
    assert (out / "report.html").is_file()
