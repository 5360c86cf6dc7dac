"""training.lr_decay: round r trains with lr * lr_decay^(r - 1), in both client engines and in what a capture records."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from flsec.errors import ConfigError
from flsec.fl.checkpoint import load_checkpoint
from flsec.fl.engines import CLIENT_ENGINES, train
from flsec.fl.federation import Federation
from flsec.fl.server import Server
from tests.conftest import small_config
from tests.test_engines import _uneven_config


def test_round_spec_decays_the_learning_rate() -> None:
    fed = Federation.from_config(small_config(training={"lr": 0.08, "lr_decay": 0.5}))
    assert [fed.round_spec(r).lr for r in (1, 2, 3)] == [0.08, 0.04, 0.02]
    assert fed.local_spec == fed.round_spec(1)
    assert fed.client_spec(3, 3).lr == 0.02  # an honest client
    assert fed.client_spec(0, 3).lr == 0.02  # the attacker without attack.lr follows the schedule
    own = Federation.from_config(small_config(training={"lr": 0.08, "lr_decay": 0.5}, attack={"lr": 0.1}))
    assert own.client_spec(0, 3).lr == 0.1 and own.client_spec(3, 3).lr == 0.02
    assert Federation.from_config(small_config()).round_spec(7) == Federation.from_config(small_config()).local_spec


def test_vectorised_engine_uses_the_rounds_learning_rate(tmp_path: Path) -> None:
    cfg = _uneven_config()
    decayed = cfg.model_copy(update={"training": cfg.training.model_copy(update={"lr_decay": 0.5})})
    server = Server(decayed, tmp_path / "r")
    tasks = [dataclasses.replace(t, round=3) for t in server.begin_round(1)]
    seq = CLIENT_ENGINES.get("sequential")(server.fed).run(tasks)
    vec = CLIENT_ENGINES.get("vectorised")(server.fed).run(tasks)
    first = CLIENT_ENGINES.get("sequential")(server.fed).run([dataclasses.replace(t, round=1) for t in tasks])
    for a, b, c in zip(seq, vec, first, strict=True):
        assert torch.allclose(a.update, b.update, rtol=0, atol=1e-5), (a.client, (a.update - b.update).abs().max())
        assert not torch.allclose(a.update, c.update, rtol=0, atol=1e-4)  # round 3 trains at a quarter of the lr
        assert a.capture is not None and a.capture.meta["lr"] == pytest.approx(decayed.training.lr / 4)


def test_captures_record_each_rounds_learning_rate(tmp_path: Path) -> None:
    cfg = small_config(training={"rounds": 3, "lr": 0.08, "lr_decay": 0.5}, capture={"rounds": "all"})
    ckpt = load_checkpoint(train(cfg, tmp_path / "r", progress=False).root)
    assert [ckpt.capture(r, 0)[1]["lr"] for r in (1, 2, 3)] == pytest.approx([0.08, 0.04, 0.02])


def test_lr_decay_is_refused_with_a_root_data_rule() -> None:
    cfg = small_config(training={"lr_decay": 0.9}, aggregation={"name": "fltrust", "root_size": 50})
    with pytest.raises(ConfigError, match=r"^training.lr_decay: must be 1 with aggregation.name = 'fltrust'"):
        Federation.from_config(cfg)
    with pytest.raises(ConfigError, match=r"training.lr_decay"):
        small_config(training={"lr_decay": 1.5})
