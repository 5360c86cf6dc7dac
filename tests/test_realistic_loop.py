"""The loop on what a server really sees: suspects chosen without ground truth, phase 2 inverting
the most suspicious captures, phase 3 on every kind of carrier, and proof that nothing of phases
2-3 depends on who the attackers are."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from flsec.config import build_config
from flsec.errors import ConfigError
from flsec.fl.checkpoint import load_checkpoint, read_tensor_metadata, read_tensors
from flsec.fl.engines import train
from flsec.fl.federation import Federation, take_root_data
from flsec.inversion.attack import Target, prioritised, run_inversion, select_targets
from flsec.io import sha256_file, write_json, write_tensors
from flsec.pipeline import inversion_settings
from flsec.unlearning.carriers import build_carriers, root_set
from flsec.unlearning.finetune import FinetuneSettings, corrective_unlearning
from flsec.unlearning.run import run_unlearning, settings_from
from flsec.unlearning.synthesis import SynthesisSettings, synthesise
from flsec.unlearning.trigger import target_candidates
from flsec.unlearning.verify import TriggerEstimate
from tests.conftest import small_config

REALISTIC = {"capture": {"mode": "realistic", "rounds": "all", "clients": "suspects", "gradient_batch_sizes": []},
             "inversion": {"iterations": 30, "max_captures": 2, "max_images": 8},
             "unlearning": {"steps": 40}}


def realistic_config(**sections: dict):  # type: ignore[no-untyped-def]
    merged = {k: dict(v) for k, v in REALISTIC.items()}
    for key, value in sections.items():
        merged[key] = {**merged.get(key, {}), **value}
    return small_config(**merged)


@pytest.fixture(scope="module")
def realistic_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("realistic") / "train"
    train(realistic_config(), out, progress=False)
    return out


def _invert(run: Path, out: Path) -> Path:
    cfg = load_checkpoint(run).config
    run_inversion(run, out, every=True, settings=inversion_settings(cfg.inversion, cfg.seed, False),
                  max_captures=cfg.inversion.max_captures)
    return out


@pytest.fixture(scope="module")
def inverted(realistic_run: Path) -> Path:
    """Phase 2 of ``realistic_run``: its two captures to invert first."""
    return _invert(realistic_run, realistic_run.parent / "invert")


def test_realistic_mode_refuses_ground_truth_capture() -> None:
    with pytest.raises(ConfigError, match="capture.clients: 'malicious' chooses by the ground truth"):
        realistic_config(capture={"clients": "malicious"})
    assert realistic_config().capture.clients == "suspects"
    assert build_config({"capture": {"mode": "realistic"}}).capture.clients == "suspects"
    assert build_config({}).capture.clients == "malicious"  # the cooperative (seed's) default is unchanged


def test_server_keeps_only_suspects_and_scores_its_detector(realistic_run: Path) -> None:
    ckpt = load_checkpoint(realistic_run)
    for rec in ckpt.history:
        assert set(rec["suspects"]) <= set(rec["selected"]) and rec["detector"] == "norm_cosine"
        assert len(rec["suspicion"]) == len(rec["selected"])
        hits = set(rec["suspects"]) & set(rec["attackers"])
        if rec["suspects"]:
            assert rec["suspects_precision"] == pytest.approx(len(hits) / len(rec["suspects"]))
    captured = {(c["round"], c["client"]) for c in ckpt.captures()}
    assert captured == {(rec["round"], c) for rec in ckpt.history for c in rec["suspects"]}
    # The boosted attacker (x n / attackers) is an outlier in norm in the rounds before the backdoor saturates.
    assert any(0 in rec["suspects"] for rec in ckpt.history)
    for c in ckpt.captures():
        score = ckpt.history[c["round"] - 1]["suspicion"][ckpt.history[c["round"] - 1]["selected"].index(c["client"])]
        assert c["suspected"] is True and c["suspicion"] == pytest.approx(score, abs=1e-5)


def test_phase_2_takes_each_suspects_first_update_first() -> None:
    """Known answer: one update per suspect, earliest first (ties by the detector's score), before any
    suspect's second update; the kept targets come back in (round, client) order."""
    caps = [(2, 0, 3.6), (3, 0, 5.2), (3, 1, 4.8), (5, 1, 5.0), (7, 4, 5.1), (7, 2, 6.0)]
    ckpt = SimpleNamespace(captures=lambda: [{"round": r, "client": c, "suspicion": s} for r, c, s in caps])
    targets = [Target(r, c, "update") for r, c, _ in caps]
    pick = lambda n: [(t.round, t.client) for t in prioritised(ckpt, targets, n)]  # noqa: E731
    assert pick(2) == [(2, 0), (3, 1)]
    assert pick(3) == [(2, 0), (3, 1), (7, 2)]  # at round 7, client 2 is the more suspicious
    assert pick(5) == [(2, 0), (3, 0), (3, 1), (7, 2), (7, 4)]
    assert pick(None) == sorted((r, c) for r, c, _ in caps)


def test_phase_2_selection_on_a_run(realistic_run: Path) -> None:
    ckpt = load_checkpoint(realistic_run)
    every = select_targets(ckpt, None, None, None, True)
    top = select_targets(ckpt, None, None, None, True, limit=2)
    assert len(every) == len(ckpt.captures()) and len(top) == min(2, len(every))
    first = min(c["round"] for c in ckpt.captures())
    assert min(t.round for t in top) == first and top == sorted(top, key=lambda t: (t.round, t.client))


def _shuffled_copy(run: Path, out: Path, new_ids: list[int]) -> Path:
    """The run directory as it would be had other clients been the attackers: every ground-truth
    field (the manifest's ids, the config's, each capture's flags) rewritten, hashes renewed."""
    shutil.copytree(run, out)
    meta = json.loads((out / "meta.json").read_text())
    meta["malicious_ids"] = new_ids
    meta["config"]["attack"]["malicious_ids"] = new_ids
    for c in meta["captures"]:
        c["malicious"] = c["attacking"] = c["client"] in new_ids
        rel = f"updates/round_{c['round']}/client_{c['client']}.safetensors"
        path = out / rel
        md = {k: json.loads(v) for k, v in read_tensor_metadata(path).items()}
        md["malicious"] = md["attacking"] = c["malicious"]
        tensors = read_tensors(path)
        path.unlink()
        write_tensors(path, tensors, {k: json.dumps(v) for k, v in md.items()})
        meta["files"][rel] = sha256_file(path)
    from flsec.fl.checkpoint import manifest_digest

    meta["manifest_sha256"] = manifest_digest(meta)
    (out / "meta.json").unlink()
    write_json(out / "meta.json", meta)
    return out


def test_phases_2_and_3_never_read_who_attacked(realistic_run: Path, inverted: Path, tmp_path: Path) -> None:
    """Shuffle the attackers' ids everywhere in the run directory: the reconstructions, the
    verification's decisions and the repaired model are the same; only the evaluation may differ."""
    shuffled = _shuffled_copy(realistic_run, tmp_path / "shuffled", [3])
    assert load_checkpoint(shuffled).meta["malicious_ids"] == [3]
    cfg = load_checkpoint(realistic_run).config
    outs = []
    for run, inv in ((realistic_run, inverted), (shuffled, _invert(shuffled, tmp_path / "inv_b"))):
        unl = tmp_path / f"unl_{inv.name}"
        res = run_unlearning(run, inv, unl, settings_from(cfg.unlearning, cfg.seed, False), baselines=False,
                             progress=False, carriers="synthetic")
        outs.append((read_tensors(inv / "reconstructions.safetensors"), res,
                     load_checkpoint(unl / "checkpoint").weights()))
    (rec_a, res_a, w_a), (rec_b, res_b, w_b) = outs
    assert all(torch.equal(rec_a[k], rec_b[k]) for k in rec_a)
    decided = ("suspected_target", "trigger_source", "backdoor_found", "mask_pixels")
    assert {k: res_a["verification"].get(k) for k in decided} == {k: res_b["verification"].get(k) for k in decided}
    assert res_a["unlearned"] == res_b["unlearned"] and res_a["defender_holds"] == res_b["defender_holds"]
    assert all(torch.equal(w_a[k], w_b[k]) for k in w_a)


@pytest.mark.parametrize("kind", ["reconstructions", "root", "synthetic"])
def test_each_carrier_mode_unlearns_and_says_what_the_defender_held(realistic_run: Path, inverted: Path,
                                                                    tmp_path: Path, kind: str) -> None:
    cfg = load_checkpoint(realistic_run).config
    res = run_unlearning(realistic_run, inverted, tmp_path / "unl", settings_from(cfg.unlearning, cfg.seed, False),
                         baselines=False, progress=False, carriers=kind)
    held = res["defender_holdings"]
    assert res["carriers"] == kind and held["carriers"]["kind"] == kind
    assert held["clean_images"] == (cfg.unlearning.root_size if kind == "root" else 0)
    assert held["carriers"]["images"] == {"root": cfg.unlearning.root_size, "synthetic": 30}.get(kind, 16)
    assert "suspected" in held["captures_chosen"] and set(held["inverted_clients"]) <= {0, 1, 2, 3, 4, 5}
    if res["unlearned"]:
        assert res["after"]["asr"] <= res["before"]["asr"]


def test_root_carriers_are_fltrusts_root_set() -> None:
    cfg = small_config(aggregation={"name": "fltrust", "root_size": 40}, unlearning={"root_size": 40})
    fed = Federation.from_config(cfg)
    x, y = root_set(cfg, 40)
    assert fed.root is not None and torch.equal(x, fed.root[0]) and torch.equal(y, fed.root[1])
    # Nested draws: a smaller root set is part of a larger one.
    small_x, _ = root_set(cfg, 10)
    assert all(any(torch.equal(a, b) for b in x) for a in small_x)
    _, (rx, _) = take_root_data(Federation.from_config(small_config()).data, 40, cfg.seed)
    assert torch.equal(rx, x)


def test_synthetic_carriers_are_seeded_images_the_model_assigns_to_their_class(trained_run: Path) -> None:
    model = load_checkpoint(trained_run).build_model()
    s = SynthesisSettings(per_class=4, steps=150, seed=3)
    x, y = synthesise(model, (1, 8, 8), 10, s)
    assert x.shape == (40, 1, 8, 8) and float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert float((y == torch.arange(10).repeat_interleave(4)).float().mean()) >= 0.9
    x2, y2 = synthesise(model, (1, 8, 8), 10, s)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert all(p.requires_grad for p in model.parameters())  # the model is handed back trainable
    smooth, _ = synthesise(model, (1, 8, 8), 10, SynthesisSettings(per_class=4, steps=150, seed=3, tv_weight=5.0))
    tv = lambda t: float((t[..., 1:] - t[..., :-1]).abs().mean() + (t[..., 1:, :] - t[..., :-1, :]).abs().mean())  # noqa: E731
    assert tv(smooth) < tv(x)


def test_feature_statistics_term_matches_batch_norm_running_statistics() -> None:
    """DeepInversion eq. 4: with BatchNorm, the synthesised batch's statistics move to the running ones
    (here those of dark "training" images, u^4 for u uniform: mean intensity 0.2)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4, momentum=1.0),
                                torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 3))
    bn = model[1]
    with torch.no_grad():
        model.train()(torch.rand(256, 1, 8, 8) ** 4)
    model.eval()

    def gap(x: torch.Tensor) -> float:
        with torch.no_grad():
            h = model[0](x)
            return float((h.mean(dim=(0, 2, 3)) - bn.running_mean).norm()
                         + (h.var(dim=(0, 2, 3), unbiased=False) - bn.running_var).norm())

    without, _ = synthesise(model, (1, 8, 8), 3, SynthesisSettings(per_class=4, steps=200, bn_weight=0.0))
    with_bn, _ = synthesise(model, (1, 8, 8), 3, SynthesisSettings(per_class=4, steps=200, bn_weight=1.0))
    assert gap(with_bn) < 0.5 * gap(without)
    assert abs(float(with_bn.mean()) - 0.2) < abs(float(without.mean()) - 0.2)


def test_target_candidates_known_answers() -> None:
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 0, 1, 1, 3, 4, 5, 5, 7, 8, 9])  # 7 of 16 are 0: 4.4x uniform
    assert target_candidates(labels, 10, None) == [0]
    assert target_candidates(labels, 10, 3) == [3, 0]
    assert target_candidates(torch.arange(10), 10, None) == []  # nothing over-represented


def test_distillation_term_keeps_the_clean_outputs(trained_run: Path) -> None:
    """The retention term distils the pre-unlearning model on untriggered carriers: with it, the
    student's clean outputs stay closer to the teacher's (KL), whatever the carriers."""
    ckpt = load_checkpoint(trained_run)
    model = ckpt.build_model()
    fed = Federation.from_config(ckpt.config)
    carriers, _ = synthesise(model, (1, 8, 8), 10, SynthesisSettings(per_class=3, steps=60))
    t = fed.trigger
    est = TriggerEstimate(t.mask, t.pattern.expand_as(carriers[0]).clone(), carriers.mean(dim=0), t.mask[0].float())
    x_test = fed.data.x_test[:300]

    def kl(weight: float) -> float:
        student = corrective_unlearning(model, carriers, est, FinetuneSettings(steps=80, lr=0.05, retention_weight=weight,
                                                                               progress=False))
        with torch.no_grad():
            return float(F.kl_div(F.log_softmax(student(x_test), 1), F.softmax(model(x_test), 1), reduction="batchmean"))

    assert kl(5.0) < kl(0.0)


def test_carriers_from_config(realistic_run: Path) -> None:
    ckpt = load_checkpoint(realistic_run)
    model = ckpt.build_model()
    recon = torch.rand(5, 1, 8, 8)
    c = build_carriers("reconstructions", ckpt.config, model, recon, torch.zeros(5, dtype=torch.long))
    assert c.images is recon and c.clean_images == 0
    with pytest.raises(ValueError, match="unlearning.carriers: unknown 'x'"):
        build_carriers("x", ckpt.config, model, recon, torch.zeros(5, dtype=torch.long))


def test_root_labels_turn_both_terms_into_cross_entropy() -> None:
    """``unlearning.root_labels = "true"``: one step of corrective unlearning is one SGD step on
    [CE(f(stamp(x)), y) + lambda * CE(f(x), y)] / (1 + lambda) with the root set's own labels
    (Neural Cleanse's unlearning step), not on the teacher's outputs."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    x = torch.rand(6, 1, 4, 4)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, :2, :2] = True
    est = TriggerEstimate(mask, torch.ones(1, 4, 4), torch.zeros(1, 4, 4), mask[0].float())
    s = FinetuneSettings(steps=1, batch_size=4, lr=0.5, retention_weight=2.0, noise=0.0, seed=3, progress=False)
    student = corrective_unlearning(model, x, est, s, labels=y)

    idx = torch.randint(0, len(x), (s.batch_size,), generator=torch.Generator().manual_seed(s.seed))
    xb, yb = est.remove(x)[idx], y[idx]
    ref = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    ref.load_state_dict(model.state_dict())
    loss = (F.cross_entropy(ref(est.stamp(xb)), yb) + 2.0 * F.cross_entropy(ref(xb), yb)) / 3.0
    loss.backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= s.lr * p.grad
    for a, b in zip(student.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    distilled = corrective_unlearning(model, x, est, s)
    assert not torch.allclose(distilled[1].weight, student[1].weight, atol=1e-4)
