"""Each attack's defining property, and its maths against a small numpy transcription of the paper."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from flsec.attacks.base import PREVIOUS_GLOBAL_UPDATE
from flsec.attacks.constrain_scale import anomaly_evasion_objective, bounded_scale, model_distance
from flsec.attacks.durability import durability
from flsec.attacks.edge_case import rarity_scores, select_tail
from flsec.attacks.neurotoxin import neurotoxin_mask
from flsec.attacks.pgd import project_l2, project_linf
from flsec.fl.engines import train
from flsec.fl.rounds import ClientTask, run_client
from flsec.fl.server import Server
from tests.conftest import small_config

# --- numpy transcriptions of the papers' pseudo-code -------------------------------------------


def np_project_l2(d: np.ndarray, eps: float) -> np.ndarray:
    """Wang et al. 2020 (PGD): if ||w - w_g|| > eps: w <- w_g + eps (w - w_g) / ||w - w_g||."""
    n = np.linalg.norm(d)
    return d if n <= eps else eps * d / n


def np_neurotoxin_keep(g: np.ndarray, ratio_kept: float) -> np.ndarray:
    """The authors' code: topk(-|g|, int(d * ratio)) are the coordinates kept (gradmask_ratio)."""
    keep = np.zeros(g.size, dtype=bool)
    keep[np.argsort(np.abs(g), kind="stable")[: int(g.size * ratio_kept)]] = True
    return keep


def np_knn_rarity(ref: np.ndarray, qry: np.ndarray, k: int, comps: int) -> tuple[np.ndarray, np.ndarray]:
    """PCA by SVD of the centred reference, then brute-force mean distance to the k nearest."""
    mu = ref.mean(axis=0)
    _, _, vt = np.linalg.svd(ref - mu, full_matrices=False)
    r, q = (ref - mu) @ vt[:comps].T, (qry - mu) @ vt[:comps].T
    drr = np.linalg.norm(r[:, None] - r[None], axis=-1)
    np.fill_diagonal(drr, np.inf)
    dqr = np.linalg.norm(q[:, None] - r[None], axis=-1)
    return np.sort(drr, axis=1)[:, :k].mean(axis=1), np.sort(dqr, axis=1)[:, :k].mean(axis=1)


def test_projections_match_the_papers_pseudo_code() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        d, eps = rng.normal(size=50), float(rng.uniform(0.1, 10))
        ours = project_l2(torch.from_numpy(d), eps).numpy()
        assert np.allclose(ours, np_project_l2(d, eps))
        assert np.linalg.norm(ours) <= eps + 1e-9
        assert np.allclose(project_linf(torch.from_numpy(d), eps).numpy(), np.clip(d, -eps, eps))


def test_neurotoxin_mask_matches_the_authors_topk() -> None:
    rng = np.random.default_rng(1)
    for top in (0.01, 0.05, 0.3):
        g = rng.normal(size=1000)
        ours = neurotoxin_mask(torch.from_numpy(g), top).numpy()
        assert np.array_equal(ours, np_neurotoxin_keep(g, 1 - top))
        assert (~ours).sum() == round(1000 * top)
        assert np.abs(g[~ours]).min() > np.abs(g[ours]).max()  # exactly the largest are excluded


def test_anomaly_objective_and_bounded_scaling() -> None:
    ce, dist = torch.tensor(2.0), torch.tensor(5.0)
    assert float(anomaly_evasion_objective(ce, dist, 0.9)) == pytest.approx(0.9 * 2 + 0.1 * 5)
    assert bounded_scale(10.0, 2.0, 5.0) == pytest.approx(2.5)  # gamma = S / ||X - G||
    assert bounded_scale(10.0, 0.1, 5.0) == 10.0 and bounded_scale(10.0, 2.0, None) == 10.0
    model = torch.nn.Linear(3, 2)
    start = [p.detach().clone() for p in model.parameters()]
    d = model_distance(model, start)
    d.backward()  # the distance is differentiable at X = G (zero gradient, no NaN)
    assert float(d.detach()) == 0.0 and all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())


def test_rarity_scores_match_brute_force_and_pick_the_outliers() -> None:
    rng = np.random.default_rng(2)
    ref = np.concatenate([rng.normal(size=(60, 10)), 8.0 * rng.normal(size=(4, 10))])  # 4 scattered far points
    qry = np.concatenate([rng.normal(size=(5, 10)), 8.0 * rng.normal(size=(2, 10))])
    ours_r, ours_q = rarity_scores(ref, qry, neighbours=3, components=6)
    ref_r, ref_q = np_knn_rarity(ref, qry, 3, 6)
    assert np.allclose(ours_r, ref_r, rtol=1e-6) and np.allclose(ours_q, ref_q, rtol=1e-6)
    assert sorted(select_tail(ours_r, 4 / 64).tolist()) == [60, 61, 62, 63]


# --- defining properties on digits -------------------------------------------------------------


def attacker_reply(tmp_path: Path, round_: int = 1, knowledge: dict | None = None, **attack: object):
    cfg = small_config(attack={"boost": False, **attack}, capture={"rounds": "all"})
    server = Server(cfg, tmp_path / "r")
    task = next(t for t in server.begin_round(round_) if t.client == 0)
    if knowledge is not None:
        task = ClientTask(task.client, task.round, task.global_weights, task.num_selected,
                          task.attackers_in_round, True, knowledge)
    return server, task, run_client(server.fed, server.fed.new_model(), task)


@pytest.mark.parametrize("pgd", [{"eps": 0.3}, {"eps": 0.3, "project_every": 4}, {"eps": 0.01, "norm": "linf"}])
def test_pgd_update_stays_inside_the_ball(tmp_path: Path, pgd: dict) -> None:
    _, _, reply = attacker_reply(tmp_path, kind="pgd", pgd=pgd, local_epochs=3)
    norm = float(torch.linalg.vector_norm(reply.update, ord=2 if pgd.get("norm", "l2") == "l2" else float("inf")))
    assert norm <= pgd["eps"] * (1 + 1e-5)
    assert norm >= 0.99 * pgd["eps"]  # three epochs of backdoor training push it to the boundary
    assert reply.capture.meta["attack_eps"] == pytest.approx(pgd["eps"])


def test_pgd_without_eps_sends_an_update_the_size_of_its_honest_one(tmp_path: Path) -> None:
    _, _, reply = attacker_reply(tmp_path, kind="pgd", local_epochs=3)
    eps = reply.capture.meta["attack_eps"]
    honest = small_config(attack={"kind": "none", "num_malicious": 0, "boost": False})
    plain = Server(honest, tmp_path / "honest")
    honest_reply = run_client(plain.fed, plain.fed.new_model(), plain.begin_round(1)[0])
    assert float(reply.update.norm()) <= eps * (1 + 1e-5)
    assert 0.5 * float(honest_reply.update.norm()) < eps < 2.0 * float(honest_reply.update.norm())
    _, _, half = attacker_reply(tmp_path / "half", kind="pgd", local_epochs=3, pgd={"eps_factor": 0.5})
    assert half.capture.meta["attack_eps"] == pytest.approx(0.5 * eps)  # same honest reference, half the radius


def test_neurotoxin_update_is_zero_outside_the_chosen_coordinates(tmp_path: Path) -> None:
    cfg = small_config()
    d = sum(p.numel() for p in Server(cfg, tmp_path / "probe").model.parameters())
    previous = torch.randn(d, generator=torch.Generator().manual_seed(0))
    _, _, reply = attacker_reply(tmp_path, 2, {PREVIOUS_GLOBAL_UPDATE: previous}, kind="neurotoxin",
                                 neurotoxin={"top_fraction": 0.2})
    keep = neurotoxin_mask(previous, 0.2)
    assert torch.count_nonzero(reply.update[~keep]) == 0
    assert torch.count_nonzero(reply.update[keep]) > 0.5 * int(keep.sum())
    assert reply.capture.meta["attack_mask_estimate"] == "previous_update"
    # weight decay would move frozen coordinates; the hook holds them, and boosting keeps the zeros
    _, _, boosted = attacker_reply(tmp_path / "wd", 2, {PREVIOUS_GLOBAL_UPDATE: previous}, kind="neurotoxin",
                                   neurotoxin={"top_fraction": 0.2}, boost=True)
    assert torch.count_nonzero(boosted.update[~keep]) == 0


def test_server_hands_neurotoxin_the_previous_global_update_and_keeps_it_across_resume(tmp_path: Path) -> None:
    cfg = small_config(training={"rounds": 3, "client_fraction": 0.5}, attack={"kind": "neurotoxin", "boost": True},
                       capture={"rounds": "all", "gradient_batch_sizes": []})
    server = Server(cfg, tmp_path / "manual")
    t1 = server.begin_round(1)
    assert all(not t.knowledge for t in t1)  # nothing to know before the first aggregation
    server.finish_round(1, [run_client(server.fed, server.fed.new_model(), t) for t in t1])
    g1 = torch.nn.utils.parameters_to_vector(server.model.parameters()).detach()
    t2 = server.begin_round(2)
    attackers = [t for t in t2 if server.fed.attacking(t.client, 2)]
    for t in t2:
        if t in attackers:
            assert torch.allclose(t.knowledge[PREVIOUS_GLOBAL_UPDATE], g1 - t1[0].global_weights)
        else:
            assert not t.knowledge  # honest clients are told nothing
    full = train(cfg, tmp_path / "full", progress=False)

    def stop_after_two(r: int, _: dict) -> None:
        if r == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", progress=False, on_round_end=stop_after_two)
    resumed = train(cfg, tmp_path / "cut", resume=True, progress=False)
    assert resumed.history == full.history  # round 3 saw the same previous update after the resume
    assert (tmp_path / "cut" / "model.safetensors").read_bytes() == (tmp_path / "full" / "model.safetensors").read_bytes()


def test_constrain_and_scale_replaces_the_global_model_in_one_round(tmp_path: Path) -> None:
    """Single shot in the last round under FedAvg (Bagdasaryan et al. 2020): ASR >= 90% right after it."""
    cfg = small_config(training={"num_clients": 10, "rounds": 4},
                       attack={"kind": "constrain_scale", "boost": False, "rounds": [4], "local_epochs": 5},
                       capture={"rounds": [4], "gradient_batch_sizes": []})
    ckpt = train(cfg, tmp_path / "r", progress=False)
    before, after = ckpt.history[2], ckpt.history[3]
    assert before["attackers"] == [] and before["asr"] < 0.05
    assert after["attackers"] == [0] and after["asr"] >= 0.9 and after["ma"] > 0.7
    _, meta = ckpt.capture(4, 0)
    assert meta["boost_factor"] == pytest.approx(10.0) and meta["attack_alpha"] == 0.9  # gamma = n / eta


def test_constrain_term_pulls_the_attacker_towards_the_global_model(tmp_path: Path) -> None:
    def pre_scale_norm(alpha: float, sub: str) -> float:
        _, _, reply = attacker_reply(tmp_path / sub, kind="constrain_scale", local_epochs=3,
                                     constrain_scale={"alpha": alpha})
        return float(reply.update.norm()) / reply.capture.meta["boost_factor"]

    free, constrained = pre_scale_norm(1.0, "free"), pre_scale_norm(0.9, "constrained")
    assert constrained < 0.7 * free
    _, _, bounded = attacker_reply(tmp_path / "bounded", kind="constrain_scale", constrain_scale={"norm_bound": 0.5})
    assert float(bounded.update.norm()) == pytest.approx(0.5, rel=1e-4)  # scaled up to S exactly


def test_dba_poisons_with_local_parts_and_reports_global_and_local_asr(tmp_path: Path) -> None:
    cfg = small_config(training={"rounds": 3}, attack={"kind": "dba", "num_malicious": 2, "rounds": [1, 2],
                                                       "trigger": {"size": 4, "pattern": "square", "offset": 0}},
                       capture={"rounds": "all", "gradient_batch_sizes": [16]})
    ckpt = train(cfg, tmp_path / "r", progress=False)
    fed = Server(cfg, tmp_path / "probe").fed
    parts = [fed.client_trigger(c) for c in (0, 1)]
    assert not torch.any(parts[0].mask & parts[1].mask) and torch.equal(parts[0].mask | parts[1].mask, fed.trigger.mask)
    for client, part in zip((0, 1), parts, strict=True):
        truth = ckpt.truth(1, client)
        poisoned = truth["gradient_b16/poisoned"].bool()
        imgs = truth["gradient_b16/images"][poisoned]
        assert poisoned.any() and torch.all(imgs[:, :, part.mask[0]] == 1.0)
        other = parts[1 - client].mask[0]
        assert not torch.all(imgs[:, :, other] == 1.0)  # the other attacker's part is not stamped
    rec = ckpt.history
    assert all(len(h["asr_parts"]) == 2 and min(h["asr_parts"]) >= 0 for h in rec)
    assert [h["rounds_since_attack"] for h in rec] == [0, 0, 1]
    dur = durability(rec)
    assert dur["last_attack_round"] == 2 and dur["asr_after"] == [rec[2]["asr"]]


def test_sybils_share_one_poisoned_dataset(tmp_path: Path) -> None:
    cfg = small_config(training={"num_clients": 6}, attack={"kind": "sybil_label_flip", "num_malicious": 3,
                                                            "boost": False, "source_label": 7, "target_label": 1})
    server = Server(cfg, tmp_path / "r")
    fed = server.fed
    data = [fed.client_data(c, 1) for c in range(3)]
    for x, y in data[1:]:
        assert torch.equal(x, data[0][0]) and torch.equal(y, data[0][1])
    assert torch.all(data[0][1] == 1) and len(data[0][1]) == int((fed.data.y_train == 7).sum())
    assert torch.equal(data[0][0], fed.data.x_train[fed.data.y_train == 7])  # every training 7, relabelled
    _, honest_y = fed.client_data(3, 1)
    assert torch.equal(honest_y, fed.data.y_train[torch.from_numpy(fed.shards[3])])
    replies = [run_client(fed, fed.new_model(), t) for t in server.begin_round(1)]
    u = torch.nn.functional.normalize(torch.stack([r.update for r in replies]), dim=1)
    cos, off = u @ u.T, ~torch.eye(3, dtype=torch.bool)
    assert float(cos[:3, :3][off].min()) > float(cos[3:, 3:][off].max())  # sybils agree more than honest peers


def test_edge_case_tail_is_held_by_the_attackers_only(tmp_path: Path) -> None:
    cfg = small_config(training={"num_clients": 6}, attack={"kind": "edge_case", "num_malicious": 1, "boost": False,
                                                            "edge_case": {"tail_fraction": 0.1}})
    fed = Server(cfg, tmp_path / "r").fed
    attack = fed.attack
    tail = set(attack.tail_idx.tolist())
    sevens = int((fed.data.y_train == 7).sum())
    assert len(tail) == int(np.ceil(0.1 * sevens)) and all(int(fed.data.y_train[i]) == 7 for i in tail)
    for c in range(1, 6):  # honest shards lose their tail images
        x, _ = fed.client_data(c, 1)
        assert len(x) == len(set(fed.shards[c].tolist()) - tail)
    x, y = fed.client_data(0, 1)
    own = len(set(fed.shards[0].tolist()) - tail)
    assert len(y) == own + len(tail) and torch.all(y[own:] == 0)
    assert len(attack.test_tail) >= 1 and len(attack.test_typical) > len(attack.test_tail)
    assert torch.equal(x[own:], fed.data.x_train[torch.from_numpy(attack.tail_idx)])


def test_hook_free_clients_stay_hook_free(tmp_path: Path) -> None:
    for kind in ("backdoor", "dba", "label_flip", "sybil_label_flip", "edge_case"):
        fed = Server(small_config(attack={"kind": kind, "num_malicious": 1}), tmp_path / kind).fed
        assert fed.training_hooks(0, 1) is None and fed.training_hooks(1, 1) is None
    for kind in ("pgd", "neurotoxin", "constrain_scale"):
        fed = Server(small_config(attack={"kind": kind, "num_malicious": 1, "rounds": [2]}), tmp_path / kind).fed
        assert fed.training_hooks(0, 2) is not None
        assert fed.training_hooks(0, 1) is None and fed.training_hooks(1, 2) is None  # not attacking / honest


def test_label_flip_stops_when_the_attack_stops(tmp_path: Path) -> None:
    fed = Server(small_config(attack={"kind": "label_flip", "rounds": [1]}), tmp_path / "r").fed
    y_attack, y_after = fed.client_data(0, 1)[1], fed.client_data(0, 2)[1]
    assert not torch.any(y_attack == 7) and torch.equal(y_after, fed.data.y_train[torch.from_numpy(fed.shards[0])])


def test_durability_known_answers() -> None:
    from flsec.attacks.durability import rounds_since_attack

    hist = [{"round": 1, "asr": 0.9, "attackers": [0]}, {"round": 2, "asr": 0.95, "attackers": [0, 1]},
            {"round": 3, "asr": 0.7, "attackers": []}, {"round": 4, "asr": 0.4, "attackers": []},
            {"round": 5, "asr": 0.6, "attackers": []}]
    d = durability(hist)
    assert (d["last_attack_round"], d["asr_at_stop"], d["asr_after"]) == (2, 0.95, [0.7, 0.4, 0.6])
    assert d["lifespan"] == 1 and not d["censored"]  # above 50% for one round after the stop
    assert durability(hist[:3])["lifespan"] == 1 and durability(hist[:3])["censored"]
    assert rounds_since_attack(hist) == 3 and rounds_since_attack(hist[:2]) == 0
    assert durability([{"round": 1, "asr": 0.1, "attackers": []}])["last_attack_round"] is None


def test_a_plugin_attack_with_options(tmp_path: Path) -> None:
    from pydantic import BaseModel, ConfigDict

    from flsec.attacks import ATTACKS, Attack
    from flsec.errors import ConfigError

    class NoiseOptions(BaseModel):
        model_config = ConfigDict(extra="forbid")
        scale: float = 1.0

    if "test_noise" not in ATTACKS:
        @ATTACKS.register("test_noise")
        class Noise(Attack):
            """Sends scaled noise instead of its update."""

            name = "test_noise"
            Options = NoiseOptions

            def finish_update(self, update: torch.Tensor, client: int, round_: int) -> torch.Tensor:
                g = torch.Generator().manual_seed(round_ * 100 + client)
                return self.options.scale * torch.randn(update.shape, generator=g)

    _, _, reply = attacker_reply(tmp_path / "a", kind="test_noise", options={"scale": 3.0})
    d = reply.update.numel()
    assert abs(float(reply.update.norm()) / d**0.5 - 3.0) < 0.1
    with pytest.raises(ConfigError, match=r"attack.options.scael: Extra inputs"):
        attacker_reply(tmp_path / "b", kind="test_noise", options={"scael": 3.0})
    with pytest.raises(ConfigError, match="attack 'backdoor' takes no options"):
        attacker_reply(tmp_path / "c", kind="backdoor", options={"scale": 3.0})
