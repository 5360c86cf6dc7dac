"""Geiping et al. 2020, Table 1, the cell "LeNet (Zhu), untrained, CIFAR-10, ours": 18.00 +/- 3.33 dB.

Batch 1, the untrained sigmoid LeNet of Zhu et al. (``lenet_zhu``: U(-0.5, 0.5) weights), the
gradient of one CIFAR-10 test image, inverted with Inverting Gradients as the authors' code runs it
(cosine similarity, signed Adam, lr 0.1 with step decay at 3/8, 5/8, 7/8, box constraint,
optimisation in the normalised input space from N(0, 1), TV weight 0.01, 1 restart, 4,800
iterations), label from iDLG. A fresh random network per image (their ``construct_model`` draws a
new model seed per run); PSNR on [0, 1] pixels.

    .venv/bin/python benchmarks/geiping_table1.py [--data-dir ../shared/data] [--images 12]
        [--iterations 4800] [--device auto]

Writes benchmarks/results/geiping_table1.md, .json and .png. Images are the first of the CIFAR-10
test split (the subset in ../shared/data holds the first 1,000).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from flsec.data import load_dataset
from flsec.fl.client import batch_gradient
from flsec.inversion.cases import GradientCase
from flsec.inversion.labels import idlg_label
from flsec.inversion.methods import InversionSettings, geiping
from flsec.inversion.metrics import psnr, ssim
from flsec.inversion.records import write_strict_json as write_json
from flsec.io import write_text, write_with
from flsec.models import InputSpec, build_model
from flsec.runtime import resolve_device
from provenance import git_commit

ROOT = Path(__file__).resolve().parents[1]
PAPER = {"mean": 18.00, "std": 3.33, "iterations": 4800, "tv": 0.01, "images": 100}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--images", type=int, default=12)
    ap.add_argument("--iterations", type=int, default=PAPER["iterations"])
    ap.add_argument("--tv", type=float, default=PAPER["tv"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "geiping_table1"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    d = load_dataset("cifar10", Path(args.data_dir))
    spec = InputSpec(3, 32, 32, 10, d.mean, d.std)
    rows, truths, recons = [], [], []
    t_all = time.perf_counter()
    for i in range(args.images):
        x, y = d.x_test[i : i + 1].to(device), d.y_test[i : i + 1].to(device)
        model = build_model("lenet_zhu", spec, seed=i).to(device)
        case = GradientCase(model, batch_gradient(model, x, y), 1)
        label = torch.tensor([idlg_label(case.output_bias_gradient())], device=device)
        settings = InversionSettings(iterations=args.iterations, restarts=1, lr=0.1, tv_weight=args.tv, seed=i,
                                     progress=False, space="normalised", init="normal")
        t0 = time.perf_counter()
        out = geiping(case, label, (1, 3, 32, 32), settings, stats=(d.mean, d.std))
        seconds = time.perf_counter() - t0
        rec = out.images.detach().cpu()
        p, s = float(psnr(rec, x.cpu())[0]), float(ssim(rec, x.cpu())[0])
        rows.append({"image": i, "label": int(y), "idlg_label": int(label), "psnr": p, "ssim": s,
                     "loss": out.loss, "seconds": seconds})
        truths.append(x.cpu()[0])
        recons.append(rec[0])
        print(f"image {i:3d}: PSNR {p:6.2f} dB  SSIM {s:.3f}  label {int(label)}/{int(y)}  ({seconds:.0f} s)", flush=True)
    total = time.perf_counter() - t_all
    ps = [r["psnr"] for r in rows]
    mean, std = statistics.fmean(ps), statistics.pstdev(ps)
    machine = f"{platform.machine()} {platform.system()}, device {device}, {torch.get_num_threads()} torch thread(s)"
    reduced = "" if args.iterations == PAPER["iterations"] else (
        f" **Reduced setting: {args.iterations} iterations instead of {PAPER['iterations']}.**")
    lines = [
        "# Geiping et al. 2020, Table 1: LeNet (Zhu), untrained, CIFAR-10, batch 1",
        "",
        "| | images | iterations | TV | PSNR (dB), mean +/- std | SSIM (mean) | labels (iDLG) |",
        "|---|---|---|---|---|---|---|",
        f"| Geiping et al. 2020, Table 1 | {PAPER['images']} | {PAPER['iterations']} | {PAPER['tv']} | "
        f"{PAPER['mean']:.2f} +/- {PAPER['std']:.2f} | - | given |",
        f"| flsec `geiping` (this run) | {len(rows)} | {args.iterations} | {args.tv} | {mean:.2f} +/- {std:.2f} | "
        f"{statistics.fmean(r['ssim'] for r in rows):.3f} | "
        f"{100 * sum(r['label'] == r['idlg_label'] for r in rows) / len(rows):.0f}% |",
        "",
        f"Per image (median {statistics.median(ps):.2f}, best {max(ps):.2f}, worst {min(ps):.2f} dB): "
        + ", ".join(f"{p:.1f}" for p in ps) + ".",
        "",
        "Setting: the authors' code path (inversefed `GradientReconstructor`): cosine similarity of the "
        "gradient, signed Adam, lr 0.1 with x0.1 decay at 3/8, 5/8, 7/8 of the iterations, boxed, "
        "optimisation in the normalised input space from N(0, 1), 1 restart; a fresh `lenet_zhu` per image "
        "(seed = image index; U(-0.5, 0.5) weights as in Zhu et al.'s code); the first "
        f"{len(rows)} CIFAR-10 test images; PSNR on [0, 1] pixels (the paper averages per-channel PSNRs "
        "of normalised images, equal up to the channels' std differences)." + reduced,
        "",
        f"Command: `.venv/bin/python benchmarks/geiping_table1.py --images {args.images} --iterations "
        f"{args.iterations} --device {args.device} --threads {args.threads}`; commit {git_commit()}; {machine}; "
        f"wall time {total:.0f} s ({total / len(rows):.0f} s per image).",
        "",
        "![truth (top) and reconstruction (bottom)](geiping_table1.png)",
    ]
    out = Path(args.out)
    write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    write_json(out.with_suffix(".json"), {"paper": PAPER, "mean": mean, "std": std, "rows": rows,
                                          "iterations": args.iterations, "tv": args.tv, "device": str(device),
                                          "threads": torch.get_num_threads(), "commit": git_commit(), "seconds": total})
    fig, axes = plt.subplots(2, len(rows), figsize=(1.3 * len(rows), 3.0))
    for j, (t, r, row) in enumerate(zip(truths, recons, rows, strict=True)):
        for ax, img in ((axes[0, j], t), (axes[1, j], r)):
            ax.imshow(img.clamp(0, 1).permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
        axes[1, j].set_xlabel(f"{row['psnr']:.1f} dB", fontsize=8)
    fig.suptitle(f"LeNet (Zhu), untrained: {mean:.2f} +/- {std:.2f} dB (paper {PAPER['mean']} +/- {PAPER['std']})",
                 fontsize=9)
    fig.tight_layout()
    write_with(out.with_suffix(".png"), lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
