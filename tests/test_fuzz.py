"""Fuzzing the two inputs a user hands flsec: experiment settings and run directories.

Whatever the input, the command either succeeds or stops with exit code 2 (1 for an I/O fault) and
exactly one line on stderr naming the field or file; never a traceback, never a half-written file.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from flsec import cli
from flsec.config import ExperimentConfig

from .test_checkpoint import resign

BASE = """
[data]
name = "digits"
download = false
[training]
num_clients = 4
rounds = 2
"""
NAMES = ["digits", "mnist", "fedavg", "krum", "median", "geiping", "dlg", "digits_cnn", "mnist_cnn", "lenet", "last",
         "all", "malicious", "iid", "dirichlet", "backdoor", "label_flip", "none", "cpu", "fp32", "fp16", "sequential"]
FIELD = re.compile(r"(--config|--set|\b(data|model|training|attack|aggregation|capture|inversion|unlearning|runtime)"
                   r"\.[a-z_.]+|\bseed\b|\bname\b|\bplugins\b)")


def leaf_keys(model: type[BaseModel] = ExperimentConfig, prefix: str = "") -> list[str]:
    keys = []
    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += leaf_keys(ann, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


# Never let a fuzzed config reach the network or another machine's files.
KEYS = [k for k in leaf_keys() if k not in ("data.download", "data.data_dir", "plugins")]


def toml_literal(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_literal(x) for x in v) + "]"
    return str(v)


VALUES = st.one_of(
    st.integers(-(2**63), 2**63 - 1), st.integers(-3, 70), st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-2, 2), st.booleans(), st.text(max_size=10), st.sampled_from(NAMES),
    st.lists(st.integers(-2, 30), max_size=4),
)


def run(argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["flsec", *argv])
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean_failure(code: int, err: str, names: re.Pattern[str] | str) -> None:
    assert "Traceback" not in err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(names, lines[0]), lines[0]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(KEYS), value=VALUES)
def test_any_config_value_passes_or_fails_in_one_line(key: str, value: Any, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "c.toml"
    config.write_text(BASE)
    code, out, err = run(["check", "--config", str(config), "--set", f"{key}={toml_literal(value)}"], capsys, monkeypatch)
    assert "Traceback" not in err
    if code == 0:
        assert out.startswith("ok: ") and err.strip() == ""
    else:
        assert_clean_failure(code, err, FIELD)


@pytest.mark.parametrize(("setting", "named"), [
    ("training.rounds=true", "training.rounds"), ("training.rounds=2.0", "training.rounds"), ("seed=-1", "seed"),
    ("seed=1e20", "seed"), ('model.name="mnist_cnn"', "model.name"), ("aggregation.foolsgold_kappa=nan", "kappa"),
    ("data.alpha=0", "data.alpha"), ("training.lr=inf", "training.lr"),
    ("training.num_clients=100000", "training.num_clients"),
])
def test_known_bad_values(setting: str, named: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                          monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "c.toml"
    config.write_text(BASE + "\n[aggregation]\nname = \"fedavg\"\n[attack]\nkind = \"none\"\n")
    base = ["--set", "data.partition=\"dirichlet\""] if setting.startswith("data.alpha") else []
    code, _, err = run(["check", "--config", str(config), *base, "--set", setting], capsys, monkeypatch)
    assert_clean_failure(code, err, re.escape(named))


def test_non_utf8_config(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "c.toml"
    config.write_bytes(b'name = "caf\xe9"\n')
    code, _, err = run(["check", "--config", str(config)], capsys, monkeypatch)
    assert_clean_failure(code, err, "--config: .* not UTF-8")


def test_io_faults_are_one_line_exit_1(trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import os

    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "out" / "x.tmp"))

    monkeypatch.setattr(os, "replace", full)
    code, _, err = run(["train", "--set", "training.rounds=1", "--out", str(tmp_path / "out"), "-q"], capsys, monkeypatch)
    assert code == 1 and "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert line.startswith("error: ") and "No space left on device" in line and "x.tmp" in line
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file() and p.name != ".lock"]


MUTATIONS = st.sampled_from(["truncate", "flip", "garbage", "field", "empty"])
JSON_VALUES = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(-1e300, 1e300),
                                     st.text(max_size=8)),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                       max_size=3), max_leaves=6)


def _listed(run_dir: Path) -> list[str]:
    return ["meta.json", *sorted(json.loads((run_dir / "meta.json").read_text())["files"])]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), mutation=MUTATIONS)
def test_any_damaged_run_directory_is_refused_in_one_line(trained_run: Path, data: st.DataObject, mutation: str,
                                                          capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        shutil.copytree(trained_run, run_dir)
        target = data.draw(st.sampled_from(_listed(run_dir)), label="file")
        path = run_dir / target
        raw = path.read_bytes()
        resigned = False
        if mutation == "truncate":
            path.write_bytes(raw[: data.draw(st.integers(0, max(0, len(raw) - 1)), label="cut")])
        elif mutation == "flip":
            i = data.draw(st.integers(0, len(raw) - 1), label="byte")
            path.write_bytes(raw[:i] + bytes([raw[i] ^ data.draw(st.integers(1, 255))]) + raw[i + 1:])
        elif mutation == "garbage":
            path.write_bytes(data.draw(st.binary(max_size=200), label="bytes"))
        elif mutation == "empty":
            path.write_bytes(b"")
        else:  # a hostile but self-consistent manifest: any field set to any JSON value, hashes recomputed
            meta = json.loads((run_dir / "meta.json").read_text())
            key = data.draw(st.sampled_from(sorted(meta)), label="field")
            value = data.draw(JSON_VALUES, label="value")
            if isinstance(meta[key], dict) and meta[key] and data.draw(st.booleans(), label="nested"):
                sub = data.draw(st.sampled_from(sorted(meta[key])), label="subfield")
                resign(run_dir, lambda m: m[key].__setitem__(sub, value))
            else:
                resign(run_dir, lambda m: m.__setitem__(key, value))
            resigned = True
        before = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))
        code, out, err = run(["verify", str(run_dir)], capsys, monkeypatch)
        assert "Traceback" not in err
        if code == 0:
            assert resigned or path.read_bytes() == raw, (target, mutation)  # damage is never accepted silently
            assert out.startswith("ok: ")
        else:
            assert_clean_failure(code, err, re.escape(str(run_dir)))
        assert sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")) == before  # nothing written
