"""flsec on Flower: the simulation engine reproduces the in-process run; the strategy and attacker
adapters compute what flsec computes (needs the flower extra: ``make test-flower``)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")
pytest.importorskip("ray")

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict
from flwr.client import NumPyClient

from flsec.aggregation import AggregatorParams, build_aggregator
from flsec.attacks.backdoor import make_trigger, num_poisoned, stamp
from flsec.config import TriggerConfig, load_config
from flsec.fl.engines import train
from flsec.fl.rounds import ClientTask, run_client
from flsec.fl.server import Server
from flsec.flower import RobustStrategy, attacker, client_train
from flsec.flower.codec import decode_reply, decode_task, encode_reply, encode_task, global_record
from flsec.flower.engine import FlowerRunError, collect_replies
from tests.conftest import small_config

ROOT = Path(__file__).resolve().parents[1]


# --- the engine -------------------------------------------------------------------------------


def test_flower_engine_reproduces_the_inprocess_run(tmp_path: Path) -> None:
    """configs/digits.toml for 3 rounds: same MA/ASR history and global weights (1e-5) in-process and on
    Flower's simulation engine, the same run-directory files and captures, and `flsec invert` reads both."""
    from flsec.inversion.attack import run_inversion
    from flsec.inversion.methods import InversionSettings

    cfg = load_config(ROOT / "configs" / "digits.toml", ["training.rounds=3"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ClientApps run with runtime.flower.client_cpus = 1 thread each
    try:
        ref = train(cfg, tmp_path / "inprocess", progress=False)
    finally:
        torch.set_num_threads(threads)
    flower_cfg = load_config(ROOT / "configs" / "digits.toml",
                             ["training.rounds=3", 'runtime.engine="flower"', "runtime.flower.ray_num_cpus=2",
                              "runtime.flower.num_supernodes=4"])
    fl = train(flower_cfg, tmp_path / "flower", progress=False)

    assert len(fl.history) == 3 and fl.complete
    for a, b in zip(ref.history, fl.history, strict=True):
        assert (a["round"], a["ma"], a["asr"], a["selected"], a["attackers"]) == \
               (b["round"], b["ma"], b["asr"], b["selected"], b["attackers"])
        assert np.allclose(a["weights"], b["weights"], atol=1e-5)
    wa, wb = ref.weights(), fl.weights()
    assert wa.keys() == wb.keys()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-5
    assert sorted(ref.meta["files"]) == sorted(fl.meta["files"])
    assert [(c["round"], c["client"], c["boost_factor"]) for c in ref.captures()] == \
           [(c["round"], c["client"], c["boost_factor"]) for c in fl.captures()] == [(3, 0, 10.0)]
    sent_a, _ = ref.capture(3, 0)
    sent_b, _ = fl.capture(3, 0)
    assert all(torch.allclose(sent_a[k], sent_b[k], atol=1e-5) for k in sent_a)
    assert torch.equal(ref.truth(3, 0)["gradient_b4/images"], fl.truth(3, 0)["gradient_b4/images"])
    assert fl.meta["config"]["runtime"]["engine"] == "flower"

    settings = InversionSettings(iterations=3, progress=False)
    inv = [run_inversion(d, tmp_path / f"inv-{d.name}", kind="gradient_b1", settings=settings)["summary"]
           for d in (tmp_path / "inprocess", tmp_path / "flower")]
    assert inv[0]["images"] == inv[1]["images"] == 1
    assert inv[0]["mean_psnr"] == pytest.approx(inv[1]["mean_psnr"], abs=1e-3)


def test_messages_carry_tasks_and_replies_exactly(tmp_path: Path) -> None:
    cfg = small_config(capture={"rounds": "all", "gradient_batch_sizes": [1, 2]})
    server = Server(cfg, tmp_path / "r")
    task = server.begin_round(1)[0]
    assert task.client == 0 and task.capture
    config_json = cfg.model_dump_json()
    back, cfg_back = decode_task(encode_task(task, global_record(task.global_weights), config_json))
    assert cfg_back == config_json and torch.equal(back.global_weights, task.global_weights)
    assert (back.client, back.round, back.num_selected, back.attackers_in_round, back.capture) == \
           (task.client, task.round, task.num_selected, task.attackers_in_round, task.capture)
    reply = run_client(server.fed, server.fed.new_model(), task)
    got = decode_reply(encode_reply(reply))
    assert torch.equal(got.update, reply.update) and (got.client, got.num_samples, got.steps) == (0, reply.num_samples,
                                                                                                   reply.steps)
    assert got.loss == reply.loss and got.capture is not None and reply.capture is not None
    assert got.capture.meta == reply.capture.meta
    for part in ("sent", "truth"):
        a, b = getattr(reply.capture, part), getattr(got.capture, part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def _reply(node: int, content: RecordDict, error: bool = False) -> Message:
    meta = Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0, reply_to_message_id="",
                    group_id="1", created_at=time.time(), ttl=60.0, message_type="train")
    if error:
        from flwr.app import Error

        return Message(error=Error(code=0, reason="boom"), metadata=meta)
    return Message(content=content, metadata=meta)


def test_failed_or_missing_clients_stop_the_round_with_one_line() -> None:
    tasks = [ClientTask(c, 1, torch.zeros(2), 2, 0) for c in (3, 5)]
    with pytest.raises(FlowerRunError, match="a ClientApp failed in round 1: boom"):
        collect_replies(1, tasks, [_reply(7, RecordDict(), error=True)], 10.0)
    with pytest.raises(FlowerRunError, match=r"runtime\.flower\.round_timeout: no reply from clients \[3, 5\]"):
        collect_replies(1, tasks, [], 10.0)


# --- RobustStrategy ---------------------------------------------------------------------------


@pytest.fixture()
def server_identity():  # type: ignore[no-untyped-def]
    """What a ServerApp run sets before a strategy may create messages (run, task and node ids)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


class _Grid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


def _record(flat: np.ndarray) -> ArrayRecord:
    """A two-layer 'model': w1 (3 x 2), b1 (3), w2 (2 x 3), b2 (2) and an integer counter."""
    parts, shapes, out, o = {}, {"w1": (3, 2), "b1": (3,), "w2": (2, 3), "b2": (2,)}, {}, 0
    for k, s in shapes.items():
        n = int(np.prod(s))
        parts[k] = flat[o:o + n].reshape(s).astype(np.float32)
        o += n
    out = {k: Array(v) for k, v in parts.items()}
    out["steps"] = Array(np.array([7], dtype=np.int64))
    return ArrayRecord(out)


def _round(strategy: RobustStrategy, r: int, global_flat: np.ndarray, updates: np.ndarray,
           n: list[int]) -> tuple[ArrayRecord, list[Message]]:
    nodes = [101, 57, 3003, 12, 999][: len(updates)]
    msgs = list(strategy.configure_train(r, _record(global_flat), ConfigRecord(), _Grid(nodes)))
    assert all(m.content["config"]["num-selected"] == len(nodes) for m in msgs)
    replies = [_reply(node, RecordDict({"arrays": _record(global_flat + u),
                                        "metrics": MetricRecord({"num-examples": k, "loss": 1.0})}))
               for node, u, k in zip(nodes, updates, n, strict=True)]
    arrays, metrics = strategy.aggregate_train(r, list(reversed(replies)))
    assert arrays is not None and metrics is not None
    return arrays, replies


@pytest.mark.parametrize("rule", ["fedavg", "krum", "multi_krum", "trimmed_mean", "median", "foolsgold", "fl_defender"])
@pytest.mark.usefixtures("server_identity")
def test_robust_strategy_applies_the_flsec_rule(rule: str) -> None:
    """Two rounds (stateful rules keep per-node history): the new global is w + server_lr * rule(U)
    with the rows in node-id order, the integer array is left alone."""
    rng = np.random.default_rng(0)
    d = 6 + 3 + 6 + 2
    strategy = RobustStrategy(rule, f=1, server_lr=0.5, fraction_train=1.0, min_train_nodes=5, min_available_nodes=5)
    reference = build_aggregator(rule, AggregatorParams(f=1, output_layer=slice(9, 17)))
    g = rng.normal(size=d)
    n = [10, 20, 30, 40, 50]
    for r in (1, 2):
        updates = rng.normal(size=(5, d)).astype(np.float32)
        updates[0] *= 8.0  # one outlier
        arrays, _ = _round(strategy, r, g, updates, n)
        order = np.argsort([101, 57, 3003, 12, 999])
        res = reference(torch.tensor(updates[order]), torch.tensor(n, dtype=torch.float32)[order],
                        sorted([101, 57, 3003, 12, 999]))
        expected = torch.tensor(g, dtype=torch.float32) + 0.5 * res.update
        got = torch.cat([torch.from_numpy(arrays[k].numpy().reshape(-1)) for k in ("w1", "b1", "w2", "b2")])
        # U is formed from float32 arrays in the messages, so allow float32 rounding of (g + u) - g.
        assert torch.allclose(got, expected, atol=1e-5), rule
        assert arrays["steps"].numpy().tolist() == [7]
        assert strategy.last_weights == pytest.approx(dict(zip(sorted([101, 57, 3003, 12, 999]), res.weights.tolist(),
                                                               strict=True)), abs=1e-6)
        g = got.double().numpy()
    if rule == "krum":
        assert strategy.last_weights[101] == 0.0  # the boosted outlier is never Krum's choice


@pytest.mark.usefixtures("server_identity")
def test_robust_strategy_fedavg_equals_flowers_fedavg() -> None:
    from flwr.serverapp.strategy import FedAvg

    rng = np.random.default_rng(1)
    g = rng.normal(size=17)
    updates = rng.normal(size=(3, 17)).astype(np.float32)
    ours, replies = _round(RobustStrategy("fedavg", min_train_nodes=3, min_available_nodes=3), 1, g, updates, [1, 2, 5])
    theirs, _ = FedAvg().aggregate_train(1, replies)
    assert theirs is not None
    for k in ("w1", "b1", "w2", "b2"):
        assert np.allclose(ours[k].numpy(), theirs[k].numpy(), atol=1e-6)


@pytest.mark.usefixtures("server_identity")
def test_robust_strategy_refuses_unknown_rules_and_layers() -> None:
    from flsec.errors import ConfigError

    with pytest.raises(ConfigError, match="aggregator: unknown 'geomed'; allowed: bulyan, fedavg, fl_defender"):
        RobustStrategy("geomed")
    s = RobustStrategy("fl_defender", output_layer=["w1", "w2"], min_train_nodes=3, min_available_nodes=3)
    with pytest.raises(ConfigError, match="output_layer: the arrays must be adjacent"):
        _round(s, 1, np.zeros(17), np.ones((3, 17), dtype=np.float32), [1, 1, 1])


# --- attacker ---------------------------------------------------------------------------------


class _Linear(NumPyClient):
    """A client that trains w (10 x 64) by one SGD pass of softmax regression over its loader, and
    records every batch it saw."""

    def __init__(self, partition: int) -> None:
        g = torch.Generator().manual_seed(partition)
        self.x = torch.rand(20, 1, 8, 8, generator=g) * 0.5
        self.y = torch.randint(1, 10, (20,), generator=g)
        self.trainloader = [(self.x[i:i + 5], self.y[i:i + 5]) for i in range(0, 20, 5)]
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def fit(self, parameters, config):  # type: ignore[no-untyped-def]
        w = torch.tensor(parameters[0], requires_grad=True)
        for xb, yb in self.trainloader:
            self.seen.append((xb, yb))
            loss = torch.nn.functional.cross_entropy(xb.flatten(1) @ w.T, yb)
            (grad,) = torch.autograd.grad(loss, w)
            w = (w - 0.1 * grad).detach().requires_grad_(True)
        return [w.detach().numpy(), parameters[1]], 20, {"loss": float(loss.detach())}


def _context(partition: int) -> Context:
    return Context(run_id=1, node_id=partition + 100, node_config={"partition-id": partition, "num-partitions": 3},
                   state=RecordDict(), run_config={})


def test_attacker_poisons_batches_and_boosts_like_flsec() -> None:
    attack = {"kind": "backdoor", "num_malicious": 1, "boost": True, "boost_factor": 4.0, "target_label": 0,
              "poison_fraction": 0.4, "trigger": {"offset": 0}}
    clients: dict[int, _Linear] = {}

    def client_fn(context: Context) -> NumPyClient:
        p = int(context.node_config["partition-id"])
        clients[p] = _Linear(p)
        return clients[p]

    wrapped = attacker(client_fn, attack=attack, seed=3)
    params = [np.zeros((10, 64), dtype=np.float32), np.array([1, 2], dtype=np.int64)]
    config = {"server-round": 2}
    honest = wrapped(_context(1))
    assert isinstance(honest, _Linear)  # honest SuperNodes get their own client back
    honest_new, _, m_honest = honest.fit(params, config)
    assert list(m_honest) == ["loss"] and all(torch.equal(yb, clients[1].y[i * 5:i * 5 + 5])
                                                      for i, (_, yb) in enumerate(clients[1].seen))
    bad = wrapped(_context(0))
    new, n, metrics = bad.fit(params, config)
    assert n == 20 and list(metrics) == ["loss"] and bad.attacked and bad.gamma == 4.0
    assert isinstance(clients[0].trainloader, list)  # the loader is restored after fit
    trig = make_trigger(TriggerConfig(offset=0), 8, 8)
    for i, (xb, yb) in enumerate(clients[0].seen):
        x0, y0 = clients[0].x[i * 5:i * 5 + 5], clients[0].y[i * 5:i * 5 + 5]
        poisoned = (yb != y0) | (xb != x0).flatten(1).any(dim=1)
        assert int(poisoned.sum()) == num_poisoned(5, 0.4) == 2
        assert torch.equal(xb[poisoned], stamp(x0[poisoned], trig)) and bool((yb[poisoned] == 0).all())
        assert torch.equal(xb[~poisoned], x0[~poisoned]) and torch.equal(yb[~poisoned], y0[~poisoned])
    # The boosted reply is w + 4 * (w_poisoned - w): re-run the same poisoned fit unboosted to compare.
    plain = attacker(client_fn, attack={**attack, "boost": False}, seed=3)(_context(0))
    plain_new, _, _ = plain.fit(params, config)
    assert np.allclose(new[0], 4.0 * plain_new[0], atol=1e-6) and new[1].tolist() == [1, 2]
    assert not np.allclose(plain_new[0], honest_new[0])


def test_attacker_default_boost_needs_the_round_size_and_rounds_are_respected() -> None:
    from flsec.errors import ConfigError

    wrapped = attacker(lambda c: _Linear(0), attack={"kind": "backdoor", "num_malicious": 1, "boost": True,
                                                     "rounds": [2]})
    params = [np.zeros((10, 64), dtype=np.float32), np.array([0])]
    with pytest.raises(ConfigError, match="attack.boost_factor: required unless the strategy sends 'num-selected'"):
        wrapped(_context(0)).fit(params, {"server-round": 2})
    client = wrapped(_context(0))
    client.fit(params, {"server-round": 2, "num-selected": 5, "server-lr": 0.5})
    assert client.attacked and client.gamma == 10.0
    client.fit(params, {"server-round": 1, "num-selected": 5})
    assert not client.attacked and client.gamma == 1.0
    with pytest.raises(ConfigError, match="attack.num_malicious: must be >= 1"):
        attacker(lambda c: _Linear(0), attack={"kind": "backdoor"})


def test_client_train_speaks_the_message_api() -> None:
    handler = client_train(attacker(lambda c: _Linear(int(c.node_config["partition-id"])),
                                    attack={"kind": "label_flip", "num_malicious": 1, "source_label": 3}))
    record = ArrayRecord({"w": Array(np.zeros((10, 64), dtype=np.float32)), "k": Array(np.array([5]))})
    meta = Metadata(run_id=1, message_id="x", src_node_id=0, dst_node_id=100, reply_to_message_id="", group_id="1",
                    created_at=time.time(), ttl=60.0, message_type="train")
    msg = Message(content=RecordDict({"arrays": record, "config": ConfigRecord({"server-round": 1})}), metadata=meta)
    reply = handler(msg, _context(0))
    assert list(reply.content["arrays"].keys()) == ["w", "k"]
    assert dict(reply.content["metrics"]).keys() == {"loss", "num-examples"}
    assert reply.content["metrics"]["num-examples"] == 20
    assert reply.metadata.src_node_id == 100
    assert json.dumps(reply.content["arrays"]["k"].numpy().tolist()) == "[5]"


def test_label_flip_relabels_only_the_source_class_in_tuples_and_dicts() -> None:
    from flsec.config import AttackConfig
    from flsec.flower.attacker import FlowerAttack, PoisonedBatches

    spec = FlowerAttack(AttackConfig(kind="label_flip", num_malicious=1, source_label=3, target_label=0))
    x, y = torch.rand(6, 1, 4, 4), torch.tensor([3, 1, 3, 2, 0, 3])
    flipped = torch.tensor([0, 1, 0, 2, 0, 0])
    (xb, yb), = list(PoisonedBatches([(x, y)], spec, 0, torch.Generator()))
    assert torch.equal(xb, x) and torch.equal(yb, flipped)
    (d,) = list(PoisonedBatches([{"img": x, "label": y, "id": 7}], spec, 0, torch.Generator()))
    assert torch.equal(d["img"], x) and torch.equal(d["label"], flipped) and d["id"] == 7
