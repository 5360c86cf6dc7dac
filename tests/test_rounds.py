"""The round contract shared by every engine: tasks out, replies in, in client-id order."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flsec.fl.checkpoint import load_checkpoint
from flsec.fl.client import local_train
from flsec.fl.engines import train
from flsec.fl.params import generator
from flsec.fl.rounds import LOCAL, run_client
from flsec.fl.server import Server
from tests.conftest import small_config


def test_driving_the_server_by_hand_equals_train(tmp_path: Path) -> None:
    """An engine that runs the tasks in reverse order (as remote workers may reply) gets the same run."""
    cfg = small_config(training={"rounds": 2, "client_fraction": 0.5})
    reference = train(cfg, tmp_path / "ref", progress=False)
    server = Server(cfg, tmp_path / "manual")
    scratch = server.fed.new_model()
    for r in server.rounds:
        tasks = server.begin_round(r)
        assert [t.client for t in tasks] == sorted(t.client for t in tasks) and len(tasks) == 3
        server.finish_round(r, [run_client(server.fed, scratch, t) for t in reversed(tasks)])
    manual = load_checkpoint(tmp_path / "manual")
    assert manual.history == reference.history
    assert (tmp_path / "manual" / "model.safetensors").read_bytes() == (tmp_path / "ref" / "model.safetensors").read_bytes()


def test_finish_round_refuses_missing_or_foreign_replies(tmp_path: Path) -> None:
    server = Server(small_config(training={"rounds": 1}), tmp_path / "r")
    tasks = server.begin_round(1)
    scratch = server.fed.new_model()
    replies = [run_client(server.fed, scratch, t) for t in tasks]
    with pytest.raises(RuntimeError, match="replies from"):
        server.finish_round(1, replies[1:])
    with pytest.raises(RuntimeError, match="without begin_round"):
        server.finish_round(2, replies)


def test_honest_client_reply_is_its_local_sgd_update(tmp_path: Path) -> None:
    cfg = small_config(attack={"kind": "none", "num_malicious": 0, "boost": False})
    server = Server(cfg, tmp_path / "r")
    task = server.begin_round(1)[2]
    reply = run_client(server.fed, server.fed.new_model(), task)
    model = server.fed.new_model()
    x, y = server.fed.client_data(task.client)
    expected = local_train(model, x, y, server.fed.local_spec, generator(cfg.seed, 1, task.client, LOCAL))
    assert torch.equal(reply.update, expected.update)
    assert reply.num_samples == len(y) and reply.steps == expected.steps and reply.capture is None


def test_boosted_attacker_reply_is_scaled_and_recorded(tmp_path: Path) -> None:
    cfg = small_config(capture={"rounds": "all"})
    server = Server(cfg, tmp_path / "r")
    tasks = server.begin_round(1)
    attacker = next(t for t in tasks if t.client == 0)
    assert attacker.capture and attacker.attackers_in_round == 1 and attacker.num_selected == 6
    reply = run_client(server.fed, server.fed.new_model(), attacker)
    assert reply.capture is not None and reply.capture.meta["boost_factor"] == pytest.approx(6.0)
    assert torch.equal(reply.capture.sent["update"], reply.update)
    plain = Server(small_config(capture={"rounds": "all"}, attack={"boost": False}), tmp_path / "plain")
    unboosted = run_client(plain.fed, plain.fed.new_model(), plain.begin_round(1)[0])
    assert torch.allclose(reply.update, 6.0 * unboosted.update)
    assert unboosted.capture is not None and unboosted.capture.meta["boost_factor"] == 1.0


def test_training_hooks_are_called_in_order_and_can_change_the_update() -> None:
    from flsec.fl.client import LocalSpec, TrainingHooks, client_batches, local_train_on
    from flsec.fl.params import get_flat, set_flat

    class Freeze(TrainingHooks):
        """Zero every gradient and undo every step: the update must be exactly zero."""

        def __init__(self) -> None:
            self.calls: list[str] = []

        def begin(self, model: torch.nn.Module) -> None:
            self.start = get_flat(model)
            self.calls.append("begin")

        def loss(self, model: torch.nn.Module, loss: torch.Tensor) -> torch.Tensor:
            self.calls.append("loss")
            return 0.0 * loss

        def before_step(self, model: torch.nn.Module) -> None:
            self.calls.append("before")

        def after_step(self, model: torch.nn.Module) -> None:
            set_flat(model, self.start)
            self.calls.append("after")

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x, y = torch.rand(10, 1, 2, 2), torch.randint(0, 3, (10,))
    spec = LocalSpec(epochs=1, batch_size=4, lr=0.1, momentum=0.9, weight_decay=0.01)
    hooks = Freeze()
    res = local_train_on(model, client_batches(x, y, spec, torch.Generator().manual_seed(0)), spec, hooks)
    assert res.steps == 3 and hooks.calls == ["begin"] + ["loss", "before", "after"] * 3
    assert torch.count_nonzero(res.update) == 0 and res.loss > 0
