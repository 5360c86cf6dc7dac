"""Reproduce FL-Defender's MNIST experiments (Jebreel & Domingo-Ferrer 2023, KBS 260:110178) with
every flsec aggregation rule, under label flipping and under the paper's backdoor.

The setting is the authors' (najeebjebreel/FL-Defender, ``Experiments_MNIST_nonIID_BA.ipynb``,
``environment_federated.py``, ``sampling.py``, ``models.py``):

* MNIST, 20 peers, all selected every round, 100 rounds, Dirichlet(alpha = 1) label split
  ("MILD_NON_IID"); 4 of the 20 peers attack in every round (attackers_ratio 0.2);
* the paper's CNN (conv 10@5x5 - pool - conv 20@5x5 + Dropout2d - pool - fc 50 + dropout - fc 10),
  flsec's model ``fl_defender_cnn``;
* local training: 3 epochs, batch 64, SGD lr 0.01, momentum 0.9, weight decay 5e-4;
* label flipping: attackers relabel every source-class (9) sample as the target class (0);
  attack success = share of source-class test images classified as the target;
* backdoor: in every local batch of an attacker, copies of the batch's source-class (9) images get
  the 3x3 white square in the bottom-right corner and the target label (0) and are *appended* to
  the batch (no boosting); attack success = share of source-class test images that, stamped, are
  classified as the target;
* reported numbers are those of the average of the last 10 global models (the authors' code
  evaluates that average after the last round); the last round's model is reported too.

Everything the authors' code does differently from flsec's defaults is set in the config files
(``configs/fl_defender_{label_flip,backdoor}.toml``) or defined below (the backdoor and its metric).

    .venv/bin/python benchmarks/reproduce_fl_defender.py                       # the paper's setting
    .venv/bin/python benchmarks/reproduce_fl_defender.py --rounds 30 --train-size 12000 --threads 2

``--rounds`` / ``--train-size`` scale the run down (stated in the results file); with neither, the
config files' full setting runs unchanged (e.g. on a GPU with ``--set runtime.device="cuda"``).
Results go to ``benchmarks/results/fl_defender_reproduction.{md,json}``; finished cells are kept
in the .json and skipped on a re-run with the same settings, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import random
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from flsec.attacks.backdoor import Trigger, stamp
from flsec.config import ExperimentConfig, load_config
from flsec.fl.engines import CLIENT_ENGINES
from flsec.fl.evaluate import predict
from flsec.fl.federation import Federation
from flsec.fl.params import derive_seed, get_flat, set_flat
from flsec.fl.server import Server
from flsec.io import write_json, write_text
from provenance import cpu_name, default_data_dir, git_commit

ROOT = Path(__file__).resolve().parents[1]
ATTACKS = {"label_flip": ROOT / "configs" / "fl_defender_label_flip.toml",
           "backdoor": ROOT / "configs" / "fl_defender_backdoor.toml"}
RULES = ["fedavg", "median", "trimmed_mean", "multi_krum", "foolsgold", "fl_defender",
         "bulyan", "norm_clip", "flame", "fltrust"]
BASELINE = "fedavg (no attack)"
ATTACKER_DRAW = 6  # purpose key of the attacker draw (distinct from flsec's round purposes)

# The paper's MNIST non-IID backdoor results with K' = 4 attackers of 20 (accuracy on all classes,
# ASR), read off the bar chart "Robustness to backdoor attacks" (figures/BA_results.PNG in the
# authors' repository): bars at ~99% accuracy everywhere; ASR ~100% for FedAvg, Median, TMean and
# MKrum, ~0% for FoolsGold and FL-Defender and without attack. The paper has no MNIST
# label-flipping experiment (its label-flipping table covers CIFAR-10 and IMDB only).
PAPER = {
    "backdoor": {BASELINE: (99, 0), "fedavg": (99, 100), "median": (99, 99), "trimmed_mean": (99, 99),
                 "multi_krum": (99, 99), "foolsgold": (99, 0), "fl_defender": (99, 0)},
    "label_flip": {},
}
# Mean aggregation time per round (s) for the MNIST CNN in the paper's runtime figure
# (figures/runtime.PNG): computed on the CPU (the authors' code moves local models to the CPU).
PAPER_SECONDS = {"fedavg": 0.0091, "median": 0.1110, "trimmed_mean": 0.0895, "multi_krum": 0.0297,
                 "foolsgold": 0.0137, "fl_defender": 0.0114}


def append_triggered_sources(x: torch.Tensor, y: torch.Tensor, g: torch.Generator, trigger: Trigger,
                             source: int, target: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's backdoor batch: the batch plus stamped copies of its source-class images, relabelled."""
    del g
    keep = y == source
    return torch.cat([x, stamp(x[keep], trigger)]), torch.cat([y, torch.full((int(keep.sum()),), target)])


class PaperFederation(Federation):
    """flsec's federation with FL-Defender's backdoor and attack-success metric. The per-round
    curve is measured on the first ``curve_images`` test images (cheap); the reported numbers on
    the whole test set (:meth:`evaluate_all`)."""

    curve_images: int | None = None

    def transform(self, client: int, round_: int):  # type: ignore[no-untyped-def]
        a = self.config.attack
        if a.kind != "backdoor" or not self.attacking(client, round_):
            return None
        return partial(append_triggered_sources, trigger=self.trigger, source=a.source_label, target=a.target_label)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        n = self.curve_images
        return self.evaluate_all(model, slice(0, n))

    def evaluate_all(self, model: nn.Module, images: slice = slice(None)) -> dict[str, float]:
        a = self.config.attack
        x, y = self.data.x_test[images], self.data.y_test[images]
        src = y == a.source_label
        pred_src = predict(model, x[src])
        out = {"ma": float((predict(model, x) == y).float().mean()),
               "source_acc": float((pred_src == a.source_label).float().mean())}
        if a.kind == "backdoor":
            out["asr"] = float((predict(model, stamp(x[src], self.trigger)) == a.target_label).float().mean())
        else:
            out["asr"] = float((pred_src == a.target_label).float().mean())
        return out


def authors_split(labels: np.ndarray, num_peers: int, alpha: float, seed: int, attackers_ratio: float,
                  source: int) -> tuple[list[np.ndarray], list[int]]:
    """The authors' partition and attacker draw, replayed from their seed (``sampling.py``,
    ``sample_dirichlet``; ``environment_federated.py``, ``FL.__init__``): Python's ``random`` and
    NumPy's legacy global generator seeded with ``seed``; per class 0..9 in turn, the class's indices
    (in dataset order) shuffled with ``random.shuffle`` and the peers' shares drawn with
    ``np.random.dirichlet``, ``round(share x class size)`` indices each, taken in order (what rounding
    leaves over is dropped); then the peers shuffled with ``random.shuffle`` and the first
    ``int(attackers_ratio x #peers holding the source class)`` of them holding source samples attack.
    On the full MNIST training split in file order this is the authors' exact split (it assumes, as
    their code does, that nothing else draws from these generators in between)."""
    py = random.Random(seed)
    legacy = np.random.RandomState(seed)
    held: list[list[int]] = [[] for _ in range(num_peers)]
    for n in range(int(labels.max()) + 1):
        idx = [int(i) for i in np.flatnonzero(labels == n)]
        py.shuffle(idx)
        shares = len(idx) * legacy.dirichlet(np.array(num_peers * [alpha]))
        for peer in range(num_peers):
            take = round(float(shares[peer]))  # Python round, as the authors: half to even
            held[peer] += idx[:take]
            idx = idx[take:]
    shards = [np.sort(np.array(h, dtype=np.int64)) for h in held]
    has_source = [bool((labels[s] == source).any()) for s in shards]
    m = int(attackers_ratio * sum(has_source))
    order = list(range(num_peers))
    py.shuffle(order)
    attackers = [p for p in order if has_source[p]][:m]
    return shards, sorted(attackers)


def with_paper_attackers(cfg: ExperimentConfig, split: str = "authors") -> tuple[ExperimentConfig, PaperFederation]:
    """``split = "authors"``: the authors' partition and attackers (:func:`authors_split`);
    ``"flsec"``: flsec's Dirichlet partition, and the attackers drawn as the authors do (the first
    ``num_malicious`` peers holding source-class samples in a seeded random order of the peers)."""
    fed = PaperFederation.from_config(cfg)
    if split == "authors":
        labels = fed.data.y_train.numpy()
        ratio = cfg.attack.num_malicious / cfg.training.num_clients
        shards, ids = authors_split(labels, cfg.training.num_clients, cfg.data.alpha, cfg.seed, ratio,
                                    cfg.attack.source_label)
        fed = dataclasses.replace(fed, shards=shards)
        if cfg.attack.kind == "none":
            return cfg, fed
        if len(ids) != cfg.attack.num_malicious:
            raise SystemExit(f"the authors' draw gives {len(ids)} attackers; {cfg.attack.num_malicious} asked")
        cfg = cfg.model_copy(update={"attack": cfg.attack.model_copy(update={"malicious_ids": ids})})
        return cfg, dataclasses.replace(fed, config=cfg, malicious=frozenset(ids))
    if split != "flsec":
        raise SystemExit(f"--split: unknown '{split}'; allowed: authors, flsec")
    if cfg.attack.kind == "none":
        return cfg, fed
    holds = [bool((fed.data.y_train[torch.from_numpy(s)] == cfg.attack.source_label).any()) for s in fed.shards]
    order = np.random.default_rng(derive_seed(cfg.seed, ATTACKER_DRAW)).permutation(cfg.training.num_clients)
    ids = sorted(int(p) for p in [p for p in order if holds[p]][: cfg.attack.num_malicious])
    if len(ids) < cfg.attack.num_malicious:
        raise SystemExit(f"only {len(ids)} peers hold source-class samples; {cfg.attack.num_malicious} attackers asked")
    cfg = cfg.model_copy(update={"attack": cfg.attack.model_copy(update={"malicious_ids": ids})})
    return cfg, dataclasses.replace(fed, config=cfg, malicious=frozenset(ids))


def run_cell(cfg: ExperimentConfig, cell_seed: int, curve_images: int | None = None, threads: int | None = None,
             average_last: int = 10, split: str = "authors") -> dict[str, Any]:
    """Train one (attack, rule) cell; evaluate the last round's model and the average of the last
    ``average_last`` global models (the authors' reported model) on the whole test set."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(cell_seed)  # dropout draws from torch's global generator
    cfg, fed = with_paper_attackers(cfg, split)
    fed.curve_images = curve_images
    rounds = cfg.training.rounds
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(cfg, Path(tmp) / "run", federation=fed)
        clients = CLIENT_ENGINES.get(cfg.runtime.client_engine)(fed)
        tail = torch.zeros_like(get_flat(server.model), dtype=torch.float64)
        n_tail = 0
        bar = tqdm(server.rounds, desc=f"{cfg.attack.kind}/{cfg.aggregation.name}", unit="round", leave=False,
                   disable=None)
        for r in bar:
            record = server.finish_round(r, clients.run(server.begin_round(r)))
            bar.set_postfix(ma=f"{record['ma']:.3f}", asr=f"{record['asr']:.3f}")
            if r > rounds - average_last:
                tail += get_flat(server.model).double()
                n_tail += 1
        last = fed.evaluate_all(server.model)
        set_flat(server.model, (tail / n_tail).float())
        averaged = fed.evaluate_all(server.model)
        aggregation = [t["aggregation"] for t in server.timings]
        history = server.history
    return {
        "ma": averaged["ma"], "asr": averaged["asr"], "source_acc": averaged["source_acc"],
        "last_round": last, "seconds": round(time.perf_counter() - t0, 1),
        "aggregation_seconds_per_round": sum(aggregation) / len(aggregation),
        "asr_per_round": [h["asr"] for h in history], "ma_per_round": [h["ma"] for h in history],
        "median_update_norm_per_round": [round(float(np.median(h["update_norms"])), 4) for h in history],
        "notes": sorted({n for h in history for n in h.get("notes", [])}),
        "attackers": sorted(fed.malicious),
    }


def cfg_attack(cfg: ExperimentConfig) -> str:
    """The attack a cell's config file is named after (the no-attack baseline uses the backdoor file)."""
    return cfg.attack.kind if cfg.attack.kind in ATTACKS else "backdoor"


def cell_config(attack: str, rule: str, args: argparse.Namespace) -> ExperimentConfig:
    sets = [f"data.data_dir={json.dumps(args.data_dir)}", f"aggregation.name={json.dumps(rule)}", *args.set]
    if args.rounds is not None:
        sets.append(f"training.rounds={args.rounds}")
    if args.train_size is not None:
        sets.append(f"data.train_size={args.train_size}")
    if rule == BASELINE:
        sets[1] = 'aggregation.name="fedavg"'
        sets += ['attack.kind="none"', "attack.num_malicious=0"]
    return load_config(ATTACKS[attack], sets)


def pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def write_report(out: Path, saved: dict[str, Any]) -> None:
    s = saved["settings"]
    lines = ["# FL-Defender reproduction (MNIST, 20 peers, 4 attackers, Dirichlet alpha = 1)", "",
             f"Command: `{s['command']}`"
             + (" (run before `--split` existed; today's equivalent adds `--split flsec`)"
                if s.get("split") == "flsec" and "--split" not in s["command"] else "") + "  ",
             f"git commit {s['commit']}, seed {s['seed']}, "
             f"{s['threads']} torch thread(s), {s['machine']}.", "",
             f"Setting as run: {s['rounds']} rounds (paper 100), {s['train_size']} MNIST training images "
             f"(paper 60,000), {s['test_size']} test images (paper 10,000); partition and attackers: "
             + ("the authors' seeded draw, replayed (`--split authors`)" if s.get("split") == "authors" else
                "flsec's Dirichlet(1) partition, attackers drawn as the authors do (`--split flsec`)")
             + "; everything else as the paper (see the setting below).", ""]
    baseline = saved["results"].get("no_attack", {})
    for attack in ATTACKS:
        cells = {**baseline, **saved["results"].get(attack, {})}
        if not saved["results"].get(attack):
            continue
        title = {"label_flip": "Label flipping 9 -> 0", "backdoor": "Backdoor (3x3 square, source 9 -> target 0)"}
        lines += [f"## {title[attack]}", "",
                  "| rule | MA % (ours) | MA % (paper) | ASR % (ours) | ASR % (paper) | source-class acc % | "
                  "last-round MA / ASR % | agg. s/round (ours / paper) |",
                  "|---|---|---|---|---|---|---|---|"]
        for rule in [BASELINE, *RULES]:
            c = cells.get(rule)
            if c is None:
                continue
            paper = PAPER[attack].get(rule)
            paper_ma, paper_asr = (f"≈{paper[0]}", f"≈{paper[1]}") if paper else ("—", "—")
            sec = PAPER_SECONDS.get(rule.split(" ")[0]) if rule != BASELINE else None
            lines.append(
                f"| {rule} | {pct(c['ma'])} | {paper_ma} | {pct(c['asr'])} | {paper_asr} | {pct(c['source_acc'])} | "
                f"{pct(c['last_round']['ma'])} / {pct(c['last_round']['asr'])} | "
                f"{c['aggregation_seconds_per_round']:.4f} / {sec if sec is not None else '—'} |")
        lines.append("")
    lines.append(SETTING)
    text = "\n".join(lines) + "\n"
    md = out.with_suffix(".md")
    if md.exists() and GAP_MARK in md.read_text():  # the written analysis of the gap is kept
        text += "\n" + GAP_MARK + md.read_text().split(GAP_MARK, 1)[1]
    write_text(md, text)


GAP_MARK = "## Gap"
SETTING = """## The paper's setting, as extracted from the authors' code

* Data: MNIST, `sample_dirichlet(alpha=1)` ("MILD_NON_IID"): per class, peer shares ~ Dir(1 x 20),
  `round(share x class size)` images each, taken in order (a few left over by rounding are
  dropped). `--split authors` (the default) replays that seeded draw, attackers included
  (`authors_split`: on the full training split it gives the authors' peers 1, 2, 11, 19 as
  attackers; on a `--train-size` subset it runs the same algorithm on the subset); `--split flsec`
  uses flsec's Dirichlet(1) split (`data.partition = "dirichlet"`, every sample assigned, re-drawn
  until each peer holds >= 8 samples).
* Attackers: `attackers_ratio = 0.2` of the peers that hold source-class samples (all 20 here) = 4:
  the first 4 such peers in a random order of the peers; they attack in every round
  (`malicious_behavior_rate = 1`). With `--split flsec` the script draws them the same way from a
  seeded permutation.
* Label flipping: the attackers' source-class samples (9) are relabelled to the target (0); ASR =
  share of source-class test images predicted as the target (`lf_asr` from the confusion matrix).
* Backdoor: in every batch of an attacker, the batch's source-class images are copied, their
  bottom-right 3x3 pixels set to the normalised value 2.8238 (pixel 1.0) and their label to the
  target, and appended to the batch; ASR = share of the source-class test images that, stamped, are
  predicted as the target (`test_backdoor`). No boosting.
* Training: 100 rounds, all 20 peers per round, 3 local epochs, batch 64 (`drop_last=True`; flsec
  keeps the last partial batch), SGD lr 0.01, momentum 0.9, weight decay 5e-4, the authors' CNN
  (`CNNMNIST`: conv 10@5x5 - pool - conv 20@5x5 + Dropout2d - pool - fc 50 + dropout - fc 10;
  flsec's `fl_defender_cnn`).
* Defenses the paper does not evaluate run with their defaults: Bulyan f = 4, norm clipping
  M = 0.5 (about the median honest update norm of the first rounds here, no noise), FLAME
  lambda = 0.001, FLTrust with 100 root images taken out of the training split.
* Aggregation as in the authors' code: FedAvg = plain mean of the models
  (`aggregation.sample_weighted = false`); median; trimmed mean with `int(0.2 x 20) = 4` values cut
  per side; Multi-Krum with f = 4 averaging `n - f - 2 = 14` updates (the authors' Krum ranks by the
  sum of *Euclidean* (not squared) distances to its `n - f - 2` nearest including itself; flsec
  follows Blanchard et al.'s squared distances to the `n - f - 2` nearest others); FoolsGold and
  FL-Defender on the output layer's weights.
* Reported numbers: after the last round the authors average the last 10 global models and report
  that model's accuracy and ASR; the table shows that ("MA", "ASR") and the last round's model.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(default_data_dir()))
    ap.add_argument("--rounds", type=int, default=None, help="scale down (default: the config's 100)")
    ap.add_argument("--train-size", type=int, default=None, help="MNIST training images (default: all 60,000)")
    ap.add_argument("--attacks", nargs="*", default=list(ATTACKS), choices=list(ATTACKS))
    ap.add_argument("--rules", nargs="*", default=[BASELINE, *RULES])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads per job")
    ap.add_argument("--jobs", type=int, default=1, help="cells trained in parallel (processes)")
    ap.add_argument("--curve-images", type=int, default=None,
                    help="test images for the per-round curve (default: all; reported numbers always use all)")
    ap.add_argument("--set", action="append", default=[], help="extra config override, e.g. runtime.device=\"cuda\"")
    ap.add_argument("--split", default="authors", choices=["authors", "flsec"],
                    help="the authors' seeded partition and attackers (default) or flsec's Dirichlet partition")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fl_defender_reproduction"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    out = Path(args.out)
    probe = cell_config("backdoor", "fedavg", args)
    settings = {"rounds": probe.training.rounds, "train_size": probe.data.train_size or 60000,
                "test_size": probe.data.test_size or 10000, "seed": probe.seed, "extra": args.set, "split": args.split}
    saved: dict[str, Any] = {"settings": {}, "results": {}}
    if out.with_suffix(".json").exists():
        saved = json.loads(out.with_suffix(".json").read_text())
        saved["settings"].setdefault("split", "flsec")  # tables computed before --split existed
        if {k: saved["settings"].get(k) for k in settings} != settings:
            print(f"{out.with_suffix('.json')} holds another setting; starting afresh", flush=True)
            saved = {"settings": {}, "results": {}}
    for cells in saved["results"].values():  # cells saved before per-cell commits were recorded
        for cell in cells.values():
            cell.setdefault("commit", saved["settings"].get("commit", "unknown"))
    saved["settings"].update(settings)
    saved["settings"].update({
        "command": " ".join(["python", "benchmarks/reproduce_fl_defender.py", *sys.argv[1:]]),
        "commit": git_commit(), "threads": args.threads or torch.get_num_threads(), "jobs": args.jobs,
        "curve_images": args.curve_images,
        "machine": f"{cpu_name()}, {multiprocessing.cpu_count()} cores, torch {torch.__version__}",
    })
    order = [BASELINE, *RULES]
    todo = []
    for attack in args.attacks:
        for rule in args.rules:
            # Without attack the two configs are the same run: it is trained once, shown in both tables.
            key = "no_attack" if rule == BASELINE else attack
            if rule not in saved["results"].get(key, {}) and (key, rule) not in [(k, r) for k, r, _ in todo]:
                todo.append((key, rule, cell_config(attack, rule, args)))
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(run_cell, cfg, derive_seed(cfg.seed, list(ATTACKS).index(cfg_attack(cfg)),
                                                          order.index(rule)), args.curve_images, args.threads, 10,
                                 args.split): (key, rule)
                   for key, rule, cfg in todo}
        for future in as_completed(futures):
            key, rule = futures[future]
            cell = future.result()
            cell["commit"] = saved["settings"]["commit"]
            saved["results"].setdefault(key, {})[rule] = cell
            print(f"{key:10s} {rule:20s} MA {cell['ma']:.4f} ASR {cell['asr']:.4f} "
                  f"(last round {cell['last_round']['ma']:.4f} / {cell['last_round']['asr']:.4f}) "
                  f"{cell['seconds']:.0f}s", flush=True)
            write_json(out.with_suffix(".json"), saved)
            write_report(out, saved)
    write_json(out.with_suffix(".json"), saved)
    write_report(out, saved)


if __name__ == "__main__":
    main()
