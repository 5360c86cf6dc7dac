"""Client engines: the vectorised engine gives the sequential (reference) engine's replies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from flsec.errors import ConfigError
from flsec.fl.client import LocalSpec, TrainingHooks, client_batches, local_train_on
from flsec.fl.engines import CLIENT_ENGINES, choose_engine, train
from flsec.fl.federation import Federation
from flsec.fl.params import get_flat, set_flat
from flsec.fl.server import Server
from flsec.fl.vectorised import train_clients, unsupported_reason
from tests.conftest import small_config


def _uneven_config(**runtime: object):
    """Dirichlet shards (unequal sizes and step counts), momentum, weight decay, 2 epochs, a boosted
    backdoor attacker, captures of every client, and chunks smaller than the round."""
    return small_config(
        data={"partition": "dirichlet", "alpha": 0.5, "train_size": 600},
        training={"num_clients": 7, "local_epochs": 2, "batch_size": 16, "momentum": 0.9, "weight_decay": 1e-3},
        capture={"rounds": "all", "clients": "all"},
        runtime={"client_chunk": 3, **runtime},
    )


def test_vectorised_replies_equal_sequential_on_digits(tmp_path: Path) -> None:
    server = Server(_uneven_config(), tmp_path / "r")
    tasks = server.begin_round(1)
    steps = {server.fed.local_spec.steps(len(server.fed.shards[t.client])) for t in tasks}
    assert len(steps) >= 3  # clients really differ in step count (and in last-batch size)
    seq = CLIENT_ENGINES.get("sequential")(server.fed).run(tasks)
    vec = CLIENT_ENGINES.get("vectorised")(server.fed).run(tasks)
    assert [r.client for r in vec] == [t.client for t in tasks]
    for a, b in zip(seq, vec, strict=True):
        assert (a.num_samples, a.steps) == (b.num_samples, b.steps)
        assert torch.allclose(a.update, b.update, rtol=0, atol=1e-5), (a.client, (a.update - b.update).abs().max())
        assert a.loss == pytest.approx(b.loss, abs=1e-5)
        assert a.capture is not None and b.capture is not None and a.capture.meta == b.capture.meta
        assert sorted(a.capture.sent) == sorted(b.capture.sent) == ["gradient_b1", "update"]
        assert torch.equal(a.capture.sent["gradient_b1"], b.capture.sent["gradient_b1"])
        assert all(torch.equal(a.capture.truth[k], b.capture.truth[k]) for k in a.capture.truth)
    attacker = next(r for r in seq if r.client == 0)
    assert attacker.capture is not None and attacker.capture.meta["boost_factor"] == pytest.approx(7.0)


def test_train_clients_handles_unequal_batches_and_step_counts() -> None:
    """Against local_train_on client by client: a client smaller than one batch, one whose last batch
    is short, one with one batch per epoch; the stack drops clients as they finish."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4))
    spec = LocalSpec(epochs=3, batch_size=5, lr=0.1, momentum=0.8, weight_decay=0.01)
    sizes = [3, 12, 5, 1, 7]
    data = [(torch.rand(n, 1, 6, 6), torch.randint(0, 4, (n,))) for n in sizes]
    starts = torch.stack([get_flat(model) + 0.01 * i for i in range(len(sizes))])
    streams = [client_batches(x, y, spec, torch.Generator().manual_seed(i)) for i, (x, y) in enumerate(data)]
    got = train_clients(model, starts, streams, [spec.steps(n) for n in sizes], spec)
    for i, (x, y) in enumerate(data):
        ref_model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4))
        set_flat(ref_model, starts[i])
        ref = local_train_on(ref_model, client_batches(x, y, spec, torch.Generator().manual_seed(i)), spec)
        assert got[i].steps == ref.steps == spec.steps(sizes[i])
        assert torch.allclose(got[i].update, ref.update, rtol=0, atol=1e-6), i
        assert got[i].loss == pytest.approx(ref.loss, abs=1e-6)
    assert torch.equal(starts[0], get_flat(model) + 0.0)  # the template model is left untouched


def test_clients_with_training_hooks_run_sequentially(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Undo(TrainingHooks):
        def begin(self, model: nn.Module) -> None:
            self.start = get_flat(model)

        def after_step(self, model: nn.Module) -> None:
            set_flat(model, self.start)

    monkeypatch.setattr(Federation, "training_hooks", lambda self, c, r, knowledge=None: Undo() if c == 2 else None)
    server = Server(_uneven_config(), tmp_path / "r")
    tasks = server.begin_round(1)[:3]
    seq = CLIENT_ENGINES.get("sequential")(server.fed).run(tasks)
    vec = CLIENT_ENGINES.get("vectorised")(server.fed).run(tasks)
    assert [r.client for r in vec] == [0, 1, 2]
    for a, b in zip(seq, vec, strict=True):
        if a.client == 2:
            assert torch.count_nonzero(b.update) == 0 and torch.equal(a.update, b.update)
        else:
            assert torch.count_nonzero(b.update) > 0 and torch.allclose(a.update, b.update, rtol=0, atol=1e-5)


def test_vectorised_training_run_matches_sequential_run(tmp_path: Path) -> None:
    sections = {"data": {"train_size": 600}, "training": {"rounds": 2, "batch_size": 8}}
    seq = train(small_config(**sections), tmp_path / "seq", progress=False)
    vec = train(small_config(**sections, runtime={"client_engine": "vectorised"}), tmp_path / "vec", progress=False)
    w_seq, w_vec = seq.weights(), vec.weights()
    assert all(torch.allclose(w_seq[k], w_vec[k], rtol=0, atol=1e-4) for k in w_seq)
    assert [h["ma"] for h in vec.history] == pytest.approx([h["ma"] for h in seq.history], abs=0.01)
    assert json.loads((tmp_path / "vec" / "meta.json").read_text())["runtime"]["client_engine"] == "vectorised"


def test_bf16_autocast_changes_one_step_at_bf16_rounding_only() -> None:
    """One SGD step of three clients: bf16 autocast moves the update by about bf16's resolution (so it
    is active, and not broken), in both engines; at fp32 the engines agree to float32 rounding."""
    from flsec.models import InputSpec, build_model

    model = build_model("digits_cnn", InputSpec(1, 8, 8, 10, (0.3,), (0.4,)), 0)
    spec = LocalSpec(epochs=1, batch_size=32, lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(3, 32, 1, 8, 8, generator=g), torch.randint(0, 10, (3, 32), generator=g)
    start = get_flat(model)

    def sequential(precision: str, i: int) -> torch.Tensor:
        set_flat(model, start)
        return local_train_on(model, client_batches(x[i], y[i], spec, torch.Generator().manual_seed(i)), spec,
                              precision=precision).update

    def vectorised(precision: str) -> list[torch.Tensor]:
        streams = [client_batches(x[i], y[i], spec, torch.Generator().manual_seed(i)) for i in range(3)]
        return [r.update for r in train_clients(model, start.expand(3, -1), streams, [1, 1, 1], spec, precision)]

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / a.norm())

    vec32, vec16 = vectorised("fp32"), vectorised("bf16")
    for i in range(3):
        s32, s16 = sequential("fp32", i), sequential("bf16", i)
        assert 1e-3 < rel(s32, s16) < 0.1 and 1e-3 < rel(vec32[i], vec16[i]) < 0.1
        assert rel(s16, vec16[i]) < 0.1 and rel(s32, vec32[i]) < 1e-5


def test_auto_picks_by_device_and_model(monkeypatch: pytest.MonkeyPatch) -> None:
    from flsec.runtime import Runtime

    fed = Federation.from_config(small_config(training={"batch_size": 4}))
    assert choose_engine(fed) == "sequential"  # on a CPU, at any batch size
    assert CLIENT_ENGINES.get("auto")(fed).name == "sequential"
    monkeypatch.setattr(fed, "runtime", Runtime(torch.device("cuda")))  # choose_engine only reads the device type
    assert choose_engine(fed) == "vectorised"
    single = Federation.from_config(small_config(training={"client_fraction": 0.1}))
    monkeypatch.setattr(single, "runtime", Runtime(torch.device("cuda")))
    assert choose_engine(single) == "sequential"

    def bn_model(*args: object) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.BatchNorm1d(64), nn.Linear(64, 10))

    monkeypatch.setattr("flsec.fl.engines.build_model", bn_model)
    assert choose_engine(fed) == "sequential"
    monkeypatch.setattr(Federation, "new_model", bn_model)
    with pytest.raises(ConfigError, match=r"runtime.client_engine: 'vectorised' cannot train .*batch-norm"):
        CLIENT_ENGINES.get("vectorised")(fed)


def test_unsupported_reason() -> None:
    assert unsupported_reason(nn.Sequential(nn.Linear(2, 2))) is None
    assert "dropout" in str(unsupported_reason(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))))
    assert "batch-norm" in str(unsupported_reason(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))))


def test_channels_last_keeps_its_layout_and_gives_the_same_updates(tmp_path: Path) -> None:
    server = Server(_uneven_config(memory_format="channels_last"), tmp_path / "r")
    tasks = server.begin_round(1)[:3]
    engine = CLIENT_ENGINES.get("sequential")(server.fed)
    conv = next(p for p in engine.model.parameters() if p.ndim == 4 and p.shape[1] > 1)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    last = engine.run(tasks)
    assert conv.is_contiguous(memory_format=torch.channels_last)  # set_flat copies in place, keeping the layout
    plain = CLIENT_ENGINES.get("sequential")(Federation.from_config(_uneven_config())).run(tasks)
    for a, b in zip(plain, last, strict=True):
        assert torch.allclose(a.update, b.update, rtol=0, atol=1e-5)
