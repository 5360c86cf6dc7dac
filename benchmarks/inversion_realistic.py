"""How much of a client's data leaks from the FedAvg update a server really receives?

A client with N MNIST images trains T local steps of full-batch SGD (lr 0.05, momentum 0.9: the
local optimiser of configs/mnist_realistic.toml; full batches as in Geiping et al. 2020, Sec. 6,
``loss_steps``) from the round's global model and sends its update, boosted x10 or not. The server
inverts it with ``geiping`` (an update over more than ``--max-images`` images is inverted into that
many candidates by a surrogate replay), infers the label counts from the output bias (llg, after undoing the estimated
boost) and is scored with Hungarian-matched PSNR/SSIM (distribution over the reconstructed images).

One factor at a time around the baseline (MNIST CNN, round 1 = the untrained global model, N = 16,
T = 5, not boosted): N in {1, 4, 16, 64}, T in {1, 5, 20}, late round (the global model after
20 rounds of configs/mnist_realistic.toml), boosted x10, LeNet-5 instead of the MNIST CNN.

    .venv/bin/python benchmarks/inversion_realistic.py --data-dir ../shared/data [--iterations 300]
        [--trials 2] [--late-checkpoint runs/mnist_realistic/train]

Writes benchmarks/results/inversion_realistic.md, .json and .png.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from flsec.config import load_config
from flsec.data import load_dataset
from flsec.fl.checkpoint import load_checkpoint
from flsec.fl.client import LocalSpec, local_train
from flsec.fl.params import generator
from flsec.inversion.attack import attack_case
from flsec.inversion.cases import UpdateCase
from flsec.inversion.labels import counts_to_labels
from flsec.inversion.methods import InversionSettings
from flsec.inversion.metrics import distribution, score
from flsec.inversion.records import write_strict_json as write_json
from flsec.io import write_text, write_with
from flsec.models import InputSpec, build_model
from provenance import git_commit

ROOT = Path(__file__).resolve().parents[1]
LR, MOMENTUM, BOOST = 0.05, 0.9, 10.0
BASE = {"model": "mnist_cnn", "round": "early", "images": 16, "steps": 5, "boost": False}
IMAGES = [1, 4, 16, 64]
AXES: list[tuple[str, list[Any]]] = [("images", IMAGES), ("steps", [1, 5, 20]),
                                     ("round", ["early", "late"]), ("boost", [False, True]),
                                     ("model", ["mnist_cnn", "lenet"])]


def conditions() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for key, values in AXES:
        for v in values:
            c = {**BASE, key: v}
            if c not in out:
                out.append(c)
    return out


def label(c: dict[str, Any]) -> str:
    return (f"{c['model']}, {c['round']} round, N={c['images']}, T={c['steps']}"
            + (", boosted x10" if c["boost"] else ""))


def local_update(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> torch.Tensor:
    """What a client sends: T full-batch SGD steps from the global model (flsec's client code)."""
    local = copy.deepcopy(model)
    spec = LocalSpec(epochs=steps, batch_size=len(y), lr=LR, momentum=MOMENTUM)
    return local_train(local, x, y, spec, torch.Generator().manual_seed(0)).update


def run_one(c: dict[str, Any], trial: int, data: Any, spec: InputSpec, late: dict[str, torch.Tensor] | None,
            settings: InversionSettings) -> dict[str, Any]:
    model = build_model(c["model"], spec, seed=0)
    if c["round"] == "late":
        assert late is not None
        model.load_state_dict(late)
    model.eval()
    n = c["images"]
    pick = torch.randperm(len(data.y_train), generator=generator(trial, n, 17))
    x, y = data.x_train[pick[:n]], data.y_train[pick[:n]]
    update = local_update(model, x, y, c["steps"]) * (BOOST if c["boost"] else 1.0)
    # The rest of the round: three honest clients of the same size, for the server's norm-ratio estimate.
    others = [local_update(model, data.x_train[pick[n * (j + 1): n * (j + 2)]],
                           data.y_train[pick[n * (j + 1): n * (j + 2)]], c["steps"]).norm() for j in range(3)]
    norm_est = float(update.norm()) / float(statistics.median(float(o) for o in others))
    case = UpdateCase(copy.deepcopy(model), update, n, c["steps"], n, LR, MOMENTUM, 0.0,
                      images=min(n, settings.max_images))
    att = attack_case(case, model, spec, "geiping", settings, norm_est)
    row: dict[str, Any] = {**c, "trial": trial, "reconstructed": case.num_images, "update_norm": float(update.norm())}
    if att is None:
        return {**row, "status": "diverged"}
    images, cand, counts, out, boost = att
    m = score(images, x, counts_to_labels(counts), y, candidate_labels=cand)
    return {**row, "status": "ok", "psnr": m["psnr"], "ssim": m["ssim"], "psnr_stats": m["psnr_stats"],
            "mean_ssim": m["mean_ssim"], "label_accuracy": m["label_accuracy"],
            "matched_label_accuracy": m["matched_label_accuracy"], "boost_estimates": boost, "seconds": out.seconds,
            "loss": out.loss}


def _mean(values: list[float | None]) -> float | None:
    v = [x for x in values if x is not None]
    return statistics.fmean(v) if v else None


def summarise(rows: list[dict[str, Any]], c: dict[str, Any]) -> dict[str, Any]:
    sel = [r for r in rows if all(r[k] == v for k, v in c.items()) and r["status"] == "ok"]
    psnrs = [p for r in sel for p in r["psnr"]]
    return {**c, "trials": len(sel), "reconstructed": sel[0]["reconstructed"] if sel else 0,
            "psnr": distribution(psnrs), "ssim": statistics.fmean(s for r in sel for s in r["ssim"]) if sel else None,
            "label_accuracy": statistics.fmean(r["label_accuracy"] for r in sel) if sel else None,
            "norm_estimate": _mean([r["boost_estimates"]["norm_estimate"] for r in sel]),
            "replay_estimate": _mean([r["boost_estimates"]["replay_estimate"] for r in sel]),
            "seconds": statistics.fmean(r["seconds"] for r in sel) if sel else None}


def finding(summary: list[dict[str, Any]], threshold: float = 18.0) -> list[str]:
    """The result in words, computed from the table (recognisable = median PSNR >= threshold dB)."""
    def get(**kv: Any) -> dict[str, Any]:
        return next(s for s in summary if all(s[k] == v for k, v in {**BASE, **kv}.items()))

    out = []
    by_n = [(n, get(images=n)["psnr"]["median"]) for n in IMAGES]
    ok = [n for n, med in by_n if med is not None and med >= threshold]
    med_txt = ", ".join(f"N={n}: {m:.1f}" for n, m in by_n if m is not None)
    if ok:
        out.append(f"Local images (T=5, untrained model): the median reconstruction is recognisable "
                   f"(>= {threshold:.0f} dB) up to N = {max(ok)} images and not beyond ({med_txt} dB median).")
    else:
        out.append(f"Local images (T=5, untrained model): no N gives a median reconstruction of {threshold:.0f} dB "
                   f"or more ({med_txt} dB median).")
    by_t = [(t, get(steps=t)["psnr"]["median"]) for t in (1, 5, 20)]
    out.append("Local steps (N=16): median PSNR " + ", ".join(f"T={t}: {m:.1f}" for t, m in by_t if m is not None)
               + " dB.")
    e, late = get(round="early")["psnr"], get(round="late")["psnr"]
    out.append(f"Round: early {e['median']:.1f} dB median (best {e['best']:.1f}) vs late (trained, backdoored model) "
               f"{late['median']:.1f} (best {late['best']:.1f}).")
    b = get(boost=True)
    out.append(f"Boosting x10 changes what is reconstructed little (median {b['psnr']['median']:.1f} vs "
               f"{e['median']:.1f} dB: the cosine objective ignores scale); the server estimates the factor as "
               f"{b['norm_estimate']:.1f} from the norms and {b['replay_estimate']:.1f} from the replay (true 10), "
               f"label accuracy {100 * b['label_accuracy']:.0f}% vs {100 * get()['label_accuracy']:.0f}% unboosted.")
    le = get(model="lenet")["psnr"]
    out.append(f"Model: LeNet-5 (tanh) {le['median']:.1f} dB median vs MNIST CNN {e['median']:.1f}.")
    return out


def plot(summary: list[dict[str, Any]], path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, key, values in ((axes[0], "images", IMAGES), (axes[1], "steps", [1, 5, 20])):
        rows = [next(s for s in summary if all(s[k] == v for k, v in {**BASE, key: val}.items())) for val in values]
        for stat, style in (("mean", "o-"), ("median", "s--"), ("best", "^:")):
            ax.plot(values, [r["psnr"][stat] for r in rows], style, label=stat)
        ax.set_xscale("log", base=2)
        ax.set_xticks(values, [str(v) for v in values])
        ax.set_xlabel("local images N (T = 5)" if key == "images" else "local steps T (N = 16)")
        ax.set_ylabel("PSNR (dB), Hungarian-matched")
        ax.axhline(18, color="grey", lw=0.6)
        ax.legend(fontsize=8)
    names = [("early", {"round": "early"}), ("late", {"round": "late"}), ("boost x10", {"boost": True}),
             ("LeNet-5", {"model": "lenet"})]
    rows = [next(s for s in summary if all(s[k] == v for k, v in {**BASE, **kv}.items())) for _, kv in names]
    xs = range(len(names))
    axes[2].bar([i - 0.2 for i in xs], [r["psnr"]["median"] for r in rows], 0.4, label="median")
    axes[2].bar([i + 0.2 for i in xs], [r["psnr"]["best"] for r in rows], 0.4, label="best")
    axes[2].set_xticks(list(xs), [n for n, _ in names])
    axes[2].set_ylabel("PSNR (dB)")
    axes[2].set_title("N = 16, T = 5", fontsize=9)
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--max-images", type=int, default=16)
    ap.add_argument("--tv", type=float, default=1e-2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--late-checkpoint", default=str(ROOT / "runs" / "mnist_realistic" / "train"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "inversion_realistic"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset("mnist", Path(args.data_dir))
    spec = InputSpec(1, 28, 28, 10, data.mean, data.std)
    late_path = Path(args.late_checkpoint)
    if not (late_path / "meta.json").is_file():
        from flsec.fl.engines import train

        cfg = load_config(ROOT / "configs" / "mnist_realistic.toml", [f'data.data_dir="{args.data_dir}"'])
        train(cfg, late_path, progress=False)
    late_ckpt = load_checkpoint(late_path)
    late = late_ckpt.weights()
    settings = InversionSettings(iterations=args.iterations, tv_weight=args.tv, max_images=args.max_images,
                                 progress=False)
    rows = []
    t0 = time.perf_counter()
    for c in conditions():
        for trial in range(args.trials):
            r = run_one(c, trial, data, spec, late if c["model"] == "mnist_cnn" else None, settings)
            rows.append(r)
            if r["status"] != "ok":
                print(f"{label(c)} trial {trial}: {r['status']}", flush=True)
                continue
            ps, b = r["psnr_stats"], r["boost_estimates"]
            print(f"{label(c)} trial {trial}: PSNR mean {ps['mean']:.2f} median {ps['median']:.2f} best "
                  f"{ps['best']:.2f}, labels {r['label_accuracy']:.2f}, boost est {b['norm_estimate']:.2f} / "
                  f"{b['replay_estimate']}, {r['seconds']:.0f} s", flush=True)
    total = time.perf_counter() - t0
    summary = [summarise(rows, c) for c in conditions()]
    lines = ["# Gradient inversion of real FedAvg updates (MNIST)", "",
             "| condition | reconstructed / N | PSNR mean | median | best | SSIM | label acc. | boost est. norm / replay "
             "| s / inversion |", "|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        p = s["psnr"]
        lines.append(f"| {label(s)} | {s['reconstructed']} / {s['images']} | {p['mean']:.2f} | {p['median']:.2f} | "
                     f"{p['best']:.2f} | {s['ssim']:.3f} | {100 * s['label_accuracy']:.0f}% | "
                     f"{s['norm_estimate']:.2f} / {s['replay_estimate']:.2f} | {s['seconds']:.0f} |")
    lines += ["", "**Finding.** " + " ".join(finding(summary)), "",
              f"Setting: one factor at a time around {label(BASE)}; each client trains T full-batch SGD steps "
              f"(lr {LR}, momentum {MOMENTUM}) from the global model on N random MNIST training images and sends the "
              f"update (x{BOOST:g} when boosted); 'early' is round 1 (the untrained global model), 'late' the global "
              f"model after {late_ckpt.round} rounds of configs/mnist_realistic.toml (boosted backdoor, MA "
              f"{100 * late_ckpt.history[-1]['ma']:.1f}%). Inversion: `geiping`, {args.iterations} iterations "
              f"(**reduced**: Geiping et al. run 4,800-24,000), 1 restart, TV {args.tv:g}, labels by llg from the "
              f"output bias after dividing by the norm-ratio boost estimate (median of 3 honest clients of the same "
              f"size) when it exceeds 3; updates over more than {args.max_images} images are inverted into "
              f"{args.max_images} candidates (surrogate replay), scored against their Hungarian-matched true images. "
              f"PSNR statistics pool the reconstructed images of {args.trials} clients (trials) per condition; label "
              "accuracy is the share of the N true labels recovered as counts.", "",
              f"Command: `.venv/bin/python benchmarks/inversion_realistic.py --data-dir {args.data_dir} --iterations "
              f"{args.iterations} --trials {args.trials} --threads {args.threads}`; commit {git_commit()}; "
              f"{platform.machine()} {platform.system()}, CPU, {torch.get_num_threads()} torch thread(s) on a shared "
              f"2-core machine; wall time {total / 60:.1f} min. Seeds: images of trial t drawn with "
              "derive_seed(t, N, 17), model seed 0, inversion seed 0.", "",
              "![PSNR vs local images, local steps, round, boost and model](inversion_realistic.png)"]
    out = Path(args.out)
    write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    write_json(out.with_suffix(".json"), {"base": BASE, "iterations": args.iterations, "trials": args.trials,
                                          "summary": summary, "rows": rows, "commit": git_commit(), "seconds": total})
    plot(summary, out.with_suffix(".png"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
