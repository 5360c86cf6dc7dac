"""Failures a user meets on the command line, each as one line on stderr naming the file, field or
status at fault: exit code 2 for bad input, 1 for an I/O fault (with what was kept and the command that
continues), 130 for Ctrl-C. Never a traceback."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flsec.aggregation import AggregationError, AggregatorParams, build_aggregator
from flsec.fl.checkpoint import load_checkpoint, read_tensor_metadata, read_tensors
from flsec.io import write_tensors

from .test_checkpoint import resign
from .test_fuzz import assert_clean_failure, run

ROOT = Path(__file__).resolve().parents[1]

LONG_RUN = """
seed = 3
[data]
name = "digits"
train_size = 400
test_size = 100
[model]
name = "digits_cnn"
[training]
num_clients = 4
rounds = {rounds}
batch_size = 32
[attack]
kind = "backdoor"
num_malicious = 1
[capture]
rounds = {capture}
clients = "malicious"
gradient_batch_sizes = [1]
"""


@pytest.fixture
def run_dir(trained_run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(trained_run, dst)
    return dst


def _edit_capture(run_dir: Path, kind: str, edit: object) -> Path:
    """Rewrite one capture file of ``run_dir`` with ``edit(tensors)`` and re-sign the manifest (a hostile
    but self-consistent run directory)."""
    capture = load_checkpoint(run_dir).captures()[-1]
    folder = "updates" if kind == "updates" else "evaluation_only"
    path = run_dir / folder / f"round_{capture['round']}" / f"client_{capture['client']}.safetensors"
    tensors, meta = read_tensors(path), read_tensor_metadata(path)
    write_tensors(path, edit(tensors), meta)  # type: ignore[operator]
    resign(run_dir)
    return path


def test_a_capture_lacking_a_listed_tensor_names_it(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    path = _edit_capture(run_dir, "updates", lambda t: {k: v for k, v in t.items() if k != "gradient_b1"})
    code, _, err = run(["invert", "--checkpoint", str(run_dir), "--out", str(tmp_path / "inv"), "-q"], capsys,
                       monkeypatch)
    assert_clean_failure(code, err, re.escape(f"{path}: lacks 'gradient_b1'; meta.json lists the tensors gradient_b1"))
    assert not (tmp_path / "inv").exists()


def test_ground_truth_lacking_a_listed_tensor_names_it(run_dir: Path, capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    path = _edit_capture(run_dir, "truth", lambda t: {k: v for k, v in t.items() if k != "gradient_b1/labels"})
    code, _, err = run(["verify", str(run_dir)], capsys, monkeypatch)
    assert_clean_failure(code, err, re.escape(f"{path}: lacks 'gradient_b1/labels'; meta.json lists ground truth"))


def test_an_all_nan_gradient_is_named_as_nan_not_zero(run_dir: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    _edit_capture(run_dir, "updates", lambda t: {k: torch.full_like(v, float("nan")) for k, v in t.items()})
    code, _, err = run(["invert", "--checkpoint", str(run_dir), "--out", str(tmp_path / "inv"), "-q",
                        "--iterations", "3"], capsys, monkeypatch)
    assert_clean_failure(code, err, r"none of the 1 selected capture\(s\) could be inverted: 1 with NaN/Inf values "
                                    r"in what the client sent \(non_finite_update\)$")
    assert "zero" not in err


@pytest.mark.parametrize(("option", "value"), [("--lr", "nan"), ("--lr", "inf"), ("--lr", "0"), ("--tv", "nan"),
                                               ("--tv", "-1")])
def test_invert_refuses_non_finite_settings(trained_run: Path, tmp_path: Path, option: str, value: str,
                                            capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = run(["invert", "--checkpoint", str(trained_run), "--out", str(tmp_path / "inv"), option, value],
                       capsys, monkeypatch)
    assert_clean_failure(code, err, rf"^error: {option}: must be a finite number >=? 0, got ")
    assert not (tmp_path / "inv").exists()


def test_option_errors_are_one_line(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = run(["invert", "--checkpoint", "x", "--iterations", "0"], capsys, monkeypatch)
    assert_clean_failure(code, err, r"'--iterations'")
    code, _, err = run(["train", "--no-such-flag"], capsys, monkeypatch)
    assert_clean_failure(code, err, r"--no-such-flag")


def test_trim_beta_too_large_names_trim_beta(capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = run(["check", "--set", 'aggregation.name="trimmed_mean"', "--set", "aggregation.trim_beta=5"],
                       capsys, monkeypatch)
    assert_clean_failure(code, err, r"^error: aggregation\.trim_beta: 5 needs more than 2 x 5 = 10 updates per round, "
                                    r"got 10; allowed: 0\.\.4")
    assert "aggregation.f" not in err
    rule = build_aggregator("trimmed_mean", AggregatorParams(trim_beta=5))
    rule.validate(11)
    with pytest.raises(AggregationError, match="with f = 5, got 10; .* lower aggregation.f$"):  # f drives this one
        build_aggregator("trimmed_mean", AggregatorParams(f=5, trim_beta=2)).validate(10)
    code, out, _ = run(["check", "--set", 'aggregation.name="trimmed_mean"', "--set", "aggregation.trim_beta=4"],
                       capsys, monkeypatch)
    assert code == 0 and out.startswith("ok: ")


def _flsec(args: list[str], **kwargs: object) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("FLSEC_FAULT", None)
    return subprocess.Popen([sys.executable, "-m", "flsec.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, **kwargs)  # type: ignore[call-overload]


def test_a_full_disk_during_train_says_what_was_kept(tmp_path: Path) -> None:
    """A real failed write (the file-size limit stands in for a full disk: safetensors' own writer used to
    turn it into a traceback): one line naming the file, the rounds kept and the command that resumes."""
    config = tmp_path / "c.toml"
    config.write_text(LONG_RUN.format(rounds=4, capture="[3]"))
    out = tmp_path / "run"
    model_bytes = 38_282 * 4  # digits_cnn: the round files fit under the limit, a capture (two vectors) does not
    limit = int(1.5 * model_bytes)

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = _flsec(["train", "--config", str(config), "--out", str(out), "-q"], preexec_fn=small_files)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    (line,) = err.strip().splitlines()
    capture = out / "updates" / "round_3" / "client_0.safetensors"
    assert line.startswith(f"error: {capture}: File too large; rounds 1-2 of 4 are saved in {out}; continue with: ")
    assert line.endswith(" --resume")
    assert load_checkpoint(out, require_complete=False).round == 2
    assert not [p for p in out.rglob("*.tmp")]
    resumed = _flsec(["train", "--config", str(config), "--out", str(out), "-q", "--resume"])
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert load_checkpoint(out).round == 4


def test_ctrl_c_during_train_stops_it_even_when_started_in_the_background(tmp_path: Path) -> None:
    """A shell's ``flsec train ... &`` starts it with SIGINT ignored; ``kill -INT`` must still stop it
    with the one-line message and exit code 130."""
    config = tmp_path / "c.toml"
    config.write_text(LONG_RUN.format(rounds=200, capture='"last"'))
    out = tmp_path / "run"
    proc = _flsec(["train", "--config", str(config), "--out", str(out), "-q"],
                  preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if json.loads((out / "meta.json").read_text())["round"] >= 1:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    (line,) = err.strip().splitlines()
    kept = load_checkpoint(out, require_complete=False).round
    assert 1 <= kept < 200
    assert line.startswith(f"interrupted: rounds 1-{kept} of 200 are saved in {out}; continue with: flsec train ")
    assert line.endswith(" --resume")


@pytest.mark.parametrize(("flag", "value", "allowed"), [("--carriers", "clean", "reconstructions, root, synthetic"),
                                                         ("--root-labels", "oracle", "model, true")])
def test_unlearn_refuses_an_unknown_carrier_choice(flag: str, value: str, allowed: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = run(["unlearn", "--checkpoint", str(tmp_path / "run"), "--images", str(tmp_path / "inv"),
                        "--out", str(tmp_path / "out"), flag, value], capsys, monkeypatch)
    assert_clean_failure(code, err, rf"^error: {flag}: unknown '{value}'; allowed: {allowed}$")
    assert not (tmp_path / "out").exists()
