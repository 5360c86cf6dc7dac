"""Crash consistency: `flsec train` killed with SIGKILL anywhere, then resumed, ends bit-identical
to an uninterrupted run; Ctrl-C says what was kept and how to continue."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flsec.fl.checkpoint import load_checkpoint

CONFIG = """
seed = 3
[data]
name = "digits"
train_size = 600
test_size = 200
[model]
name = "digits_cnn"
[training]
num_clients = 4
rounds = 4
batch_size = 32
[attack]
kind = "backdoor"
num_malicious = 1
boost = true
[attack.trigger]
offset = 0
[aggregation]
name = "foolsgold"
[capture]
rounds = "all"
clients = "malicious"
gradient_batch_sizes = [1]
"""

# Kill points in the order a resumed run reaches them; each entry is one process killed there.
# Counts are per process, so e.g. "commit:meta:2" in a process that resumes after round 1 kills it
# just after it committed round 2.
KILLS = [
    "atomic:before_rename:1",  # the very first file (round 0's state) written, not renamed: no meta.json yet
    "commit:meta:1",           # round 0 committed, links and clean-up not done
    "capture:1",               # round 1: a captured update written, its ground truth not
    "commit:state:1",          # round 1: state written, model and history not
    "commit:history:1",        # round 1: model and history written, manifest not (the old unresumable point)
    "commit:aliases:1",        # round 1 committed, old round folder not yet removed
    "round:before_commit:1",   # round 2 computed, nothing of it committed
    "commit:model:2",          # round 3: partial commit
]


def _train(config: Path, out: Path, fault: str | None, resume: bool) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("FLSEC_FAULT", None)
    if fault:
        env["FLSEC_FAULT"] = fault
    cmd = [sys.executable, "-m", "flsec.cli", "train", "--config", str(config), "--out", str(out), "-q"]
    return subprocess.run(cmd + (["--resume"] if resume else []), env=env, capture_output=True, text=True, timeout=300)


def _snapshot(run: Path) -> dict[str, object]:
    meta = json.loads((run / "meta.json").read_text())
    return {"files": meta["files"], "history": (run / "history.jsonl").read_bytes(),
            "model": (run / "model.safetensors").read_bytes()}


@pytest.mark.crash
def test_sigkill_anywhere_then_resume_is_bit_identical(tmp_path: Path) -> None:
    _kill_resume_compare(tmp_path, KILLS)


def test_sigkill_mid_commit_then_resume_is_bit_identical(tmp_path: Path) -> None:
    """The campaign's two most telling kills (a round's files written but not committed; a round computed
    but nothing of it written), quick enough for every `make test`."""
    _kill_resume_compare(tmp_path, ["commit:history:2", "round:before_commit:1"])


def _kill_resume_compare(tmp_path: Path, kills: list[str]) -> None:
    config = tmp_path / "c.toml"
    config.write_text(CONFIG)
    ref = _train(config, tmp_path / "ref", None, resume=False)
    assert ref.returncode == 0, ref.stderr

    out = tmp_path / "killed"
    for i, fault in enumerate(kills):
        proc = _train(config, out, fault, resume=i > 0)
        assert proc.returncode == -9, (fault, proc.returncode, proc.stderr[-2000:])
    final = _train(config, out, None, resume=True)
    assert final.returncode == 0, final.stderr

    assert _snapshot(out) == _snapshot(tmp_path / "ref")
    ckpt = load_checkpoint(out)
    assert ckpt.complete and [h["round"] for h in ckpt.history] == [1, 2, 3, 4]
    leftovers = [p for p in out.rglob("*") if p.name.endswith(".tmp") or (p.parent.name == "rounds" and p.name != "round_4")]
    assert leftovers == []


def test_ctrl_c_says_what_was_kept_and_how_to_continue(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(CONFIG)
    out = tmp_path / "run"
    proc = _train(config, out, "round:before_commit:3:INT", resume=False)
    assert proc.returncode == 130
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "rounds 1-2 of 4 are saved" in lines[0]
    command = lines[0].split("continue with: ", 1)[1]
    assert command.endswith("--resume") and str(out) in command
    assert load_checkpoint(out, require_complete=False).round == 2


@pytest.mark.parametrize("fault", ["commit:history:2", "commit:meta:2"])
def test_killed_run_is_still_a_valid_checkpoint(tmp_path: Path, fault: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(CONFIG)
    out = tmp_path / "run"
    assert _train(config, out, fault, resume=False).returncode == -9
    ckpt = load_checkpoint(out, require_complete=False)  # every listed file verifies
    assert ckpt.round == (0 if fault == "commit:history:2" else 1)  # the 2nd commit of a run is round 1
    assert len(ckpt.history) == ckpt.round
