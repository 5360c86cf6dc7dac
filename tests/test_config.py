from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flsec.config import apply_overrides, load_config
from flsec.errors import ConfigError


def test_defaults_are_valid() -> None:
    cfg = load_config(None)
    assert cfg.data.name == "digits" and cfg.aggregation.name == "fedavg"


def test_set_parses_toml_values() -> None:
    out = apply_overrides({}, ["training.rounds=7", "attack.boost=true", "capture.clients=[1, 2]", "name=x y"])
    assert out == {"training": {"rounds": 7}, "attack": {"boost": True}, "capture": {"clients": [1, 2]}, "name": "x y"}


def test_unknown_key_names_allowed_keys() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["training.roundz=3"])
    msg = str(exc.value)
    assert "training.roundz" in msg and "rounds" in msg and "\n" not in msg


def test_unknown_aggregator_lists_registered_rules() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["aggregation.name=zeno"])
    msg = str(exc.value)
    assert "aggregation.name" in msg
    for rule in ("fedavg", "krum", "multi_krum", "trimmed_mean", "median", "foolsgold", "fl_defender"):
        assert rule in msg


def test_literal_error_lists_allowed_values() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["data.partition=shards"])
    assert "data.partition" in str(exc.value) and "'iid'" in str(exc.value) and "'dirichlet'" in str(exc.value)


def test_cross_field_checks() -> None:
    with pytest.raises(ConfigError, match=r"attack.num_malicious: 20 exceeds training.num_clients = 10"):
        load_config(None, ["attack.kind=\"backdoor\"", "attack.num_malicious=20"])
    with pytest.raises(ConfigError, match="attack.num_malicious: must be >= 1"):
        load_config(None, ["attack.kind=\"backdoor\""])
    with pytest.raises(ConfigError, match=r"capture.rounds: 99 is not in 1..10"):
        load_config(None, ["capture.rounds=[99]"])


def test_cli_bad_value_exits_2_with_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "flsec.cli", "train", "--out", str(tmp_path / "r"), "--set", "training.lr=-1"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: training.lr")
    assert not (tmp_path / "r").exists()


def test_cli_missing_config_file(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "flsec.cli", "train", "--out", str(tmp_path / "r"),
                           "--config", str(tmp_path / "nope.toml")], capture_output=True, text=True)
    assert proc.returncode == 2 and "--config: file not found" in proc.stderr


def test_shipped_configs_validate() -> None:
    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.glob("*.toml"))
    assert files
    for f in files:
        load_config(f)


@pytest.mark.parametrize("name", ["demo.toml", "demo_cooperative.toml"])
def test_packaged_demo_config_is_the_one_in_configs(name: str) -> None:
    """`flsec demo` reads the packaged copies; configs/demo*.toml are what users read and edit."""
    root = Path(__file__).resolve().parents[1]
    assert (root / "src" / "flsec" / "configs" / name).read_bytes() == (root / "configs" / name).read_bytes()
