"""Federated training on digits: learning, attack effect, reproducibility and resume."""

from __future__ import annotations

from pathlib import Path

import pytest

from flsec.errors import CheckpointError
from flsec.fl.checkpoint import load_checkpoint
from flsec.fl.engines import train
from flsec.fl.server import select_clients
from tests.conftest import small_config


def test_run_learns_and_backdoor_succeeds(trained_run: Path) -> None:
    ckpt = load_checkpoint(trained_run)
    last = ckpt.history[-1]
    assert last["round"] == 4 and len(ckpt.history) == 4
    assert last["ma"] > 0.8
    assert last["asr"] > 0.6  # boosted backdoor through FedAvg (a clean model scores ~0.05)
    assert all(h["attackers"] == [0] for h in ckpt.history)


def test_capture_default_is_malicious_last_round(trained_run: Path) -> None:
    ckpt = load_checkpoint(trained_run)
    caps = ckpt.captures()
    assert [(c["round"], c["client"]) for c in caps] == [(4, 0)]
    tensors, meta = ckpt.capture(4, 0)
    n_params = sum(v.numel() for v in ckpt.weights().values())
    assert tensors["update"].shape == (n_params,) and tensors["gradient_b1"].shape == (n_params,)
    assert meta["malicious"] is True and meta["lr"] == 0.05 and meta["batch_size"] == 16
    assert meta["boost_factor"] == pytest.approx(6.0)  # n_selected / server_lr, one attacker
    truth = ckpt.truth(4, 0)
    assert truth["gradient_b1/images"].shape == (1, 1, 8, 8)
    assert int(truth["gradient_b1/poisoned"][0]) == 1 and int(truth["gradient_b1/labels"][0]) == 0


def test_same_seed_same_history(tmp_path: Path) -> None:
    cfg = small_config(training={"rounds": 3}, aggregation={"name": "foolsgold"})
    train(cfg, tmp_path / "a", progress=False)
    train(cfg, tmp_path / "b", progress=False)
    a = (tmp_path / "a" / "history.jsonl").read_bytes()
    assert a == (tmp_path / "b" / "history.jsonl").read_bytes()
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_other_seed_other_history(tmp_path: Path) -> None:
    train(small_config(training={"rounds": 2}), tmp_path / "a", progress=False)
    cfg = small_config(training={"rounds": 2})
    cfg.seed = 2
    train(cfg, tmp_path / "b", progress=False)
    assert (tmp_path / "a" / "history.jsonl").read_bytes() != (tmp_path / "b" / "history.jsonl").read_bytes()


@pytest.mark.parametrize("rule", ["fl_defender", "fedavg"])
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path: Path, rule: str) -> None:
    cfg = small_config(training={"rounds": 4, "client_fraction": 0.5}, aggregation={"name": rule},
                       capture={"rounds": "all", "clients": "all", "gradient_batch_sizes": []})
    full = train(cfg, tmp_path / "full", progress=False)

    def stop_after_two(r: int, _: dict) -> None:
        if r == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", progress=False, on_round_end=stop_after_two)
    partial = load_checkpoint(tmp_path / "cut", require_complete=False)
    assert partial.round == 2 and not partial.complete
    with pytest.raises(CheckpointError, match="training stopped after round 2"):
        load_checkpoint(tmp_path / "cut")
    with pytest.raises(CheckpointError, match="--resume"):
        train(cfg, tmp_path / "cut", progress=False)
    resumed = train(cfg, tmp_path / "cut", resume=True, progress=False)
    assert resumed.history == full.history
    assert (tmp_path / "cut" / "model.safetensors").read_bytes() == (tmp_path / "full" / "model.safetensors").read_bytes()
    assert len(resumed.captures()) == len(full.captures())


def test_resume_refuses_other_config(tmp_path: Path) -> None:
    train(small_config(training={"rounds": 1}), tmp_path / "r", progress=False)
    with pytest.raises(CheckpointError, match="different config"):
        train(small_config(training={"rounds": 2}), tmp_path / "r", resume=True, progress=False)


def test_resume_accepts_a_run_from_before_a_setting_existed(tmp_path: Path) -> None:
    """A run directory written before a setting was added (its config lacks the key) resumes when the
    setting's default keeps the old behaviour; a changed setting is still refused."""
    from tests.test_checkpoint import resign

    cfg = small_config(training={"rounds": 2})

    def stop_after_one(r: int, _: dict) -> None:
        if r == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "r", progress=False, on_round_end=stop_after_one)

    def older(meta: dict) -> None:
        for key in ("lr_decay", "augment_crop", "augment_flip"):
            meta["config"]["training"].pop(key)
        meta["config"]["unlearning"].pop("root_labels")

    resign(tmp_path / "r", older)
    resumed = train(cfg, tmp_path / "r", resume=True, progress=False)
    assert [h["round"] for h in resumed.history] == [1, 2]
    with pytest.raises(CheckpointError, match="different config"):
        train(small_config(training={"rounds": 2, "lr_decay": 0.5}), tmp_path / "r", resume=True, progress=False)


def test_client_selection_fraction() -> None:
    sel = select_clients(0, 3, 20, 5)
    assert len(sel) == 5 and len(set(sel)) == 5 and sel == sorted(sel)
    assert sel == select_clients(0, 3, 20, 5) and sel != select_clients(0, 4, 20, 5)


def test_robust_rule_refuses_too_few_clients(tmp_path: Path) -> None:
    from flsec.aggregation import AggregationError

    cfg = small_config(aggregation={"name": "krum", "f": 2})
    with pytest.raises(AggregationError, match="krum needs at least 7 updates"):
        train(cfg, tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()


def test_krum_resists_unboosted_backdoor_that_fedavg_does_not(tmp_path: Path) -> None:
    common = {"training": {"rounds": 6, "num_clients": 8}, "attack": {"num_malicious": 2, "boost": False},
              "capture": {"gradient_batch_sizes": []}}
    fed = train(small_config(**common), tmp_path / "fedavg", progress=False).history[-1]
    krum = train(small_config(**common, aggregation={"name": "multi_krum"}), tmp_path / "krum", progress=False).history[-1]
    assert fed["asr"] > 0.5
    assert krum["asr"] < fed["asr"] - 0.3
    assert krum["ma"] > 0.7
