"""The flower engine's config and the base install's independence from Flower (no flwr needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flsec.config import load_config
from flsec.errors import ConfigError
from tests.conftest import small_config

ROOT = Path(__file__).resolve().parents[1]


def test_engine_is_validated_with_the_allowed_values() -> None:
    with pytest.raises(ConfigError, match=r"runtime\.engine: .*'inprocess'.*'flower'"):
        load_config(None, ['runtime.engine="ray"'])
    with pytest.raises(ConfigError, match=r"runtime\.flower\.client_cpus"):
        load_config(None, ["runtime.flower.client_cpus=0"])
    with pytest.raises(ConfigError, match=r"runtime\.flower\.bogus: unknown key; allowed keys: num_supernodes"):
        load_config(None, ["runtime.flower.bogus=1"])
    cfg = load_config(None, ['runtime.engine="flower"', "runtime.flower.num_supernodes=3",
                             'runtime.flower.ray_address="auto"', "runtime.flower.client_gpus=0.25"])
    assert cfg.runtime.engine == "flower" and cfg.runtime.flower.num_supernodes == 3
    assert cfg.runtime.flower.ray_address == "auto" and cfg.runtime.flower.client_gpus == 0.25
    assert load_config(None).runtime.engine == "inprocess"


def test_cli_engine_option_sets_runtime_engine(tmp_path: Path) -> None:
    from flsec.cli import _with_engine

    assert _with_engine(["training.rounds=1"], "flower") == ["training.rounds=1", 'runtime.engine="flower"']
    assert _with_engine(None, None) == []
    out = subprocess.run([sys.executable, "-m", "flsec.cli", "train", "--engine", "spark", "--out", str(tmp_path / "r")],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "runtime.engine" in out.stderr and "'flower'" in out.stderr


def test_import_flsec_does_not_import_flower() -> None:
    code = ("import sys, flsec, flsec.cli, flsec.config, flsec.fl.server, flsec.pipeline; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('flwr', 'ray')); print(bad); assert not bad")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def test_flower_engine_without_flwr_says_how_to_install(tmp_path: Path) -> None:
    """With flwr unimportable, `runtime.engine = "flower"` stops with the install command, writing nothing."""
    code = ("import sys; sys.modules['flwr'] = None\n"
            "from pathlib import Path\n"
            "from flsec.errors import FlsecError\n"
            "from flsec.fl.engines import train\n"
            "from tests.conftest import small_config\n"
            "try:\n"
            f"    train(small_config(runtime={{'engine': 'flower'}}), Path({str(tmp_path / 'r')!r}), progress=False)\n"
            "except FlsecError as e:\n"
            "    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert 'ERR flsec.flower needs Flower: pip install "flsec[flower]"' in out.stdout, out.stderr
    assert not (tmp_path / "r").exists()


def test_runtime_section_does_not_change_training_fields() -> None:
    """A run started in-process may be resumed on Flower and back: the engine is not part of the experiment."""
    from flsec.fl.server import training_fields

    a = small_config().model_dump(mode="json")
    b = small_config(runtime={"engine": "flower", "flower": {"num_supernodes": 2}}).model_dump(mode="json")
    assert training_fields(a) == training_fields(b)
