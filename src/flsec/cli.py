"""Command line: ``flsec train | invert | unlearn | run | demo``.

User errors print one line (``error: ...``) and exit with code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from flsec.errors import FlsecError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Federated-learning security research: train under attack, invert, unlearn.")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="experiment TOML file")]


@app.callback()
def _root() -> None:
    """Federated-learning security research: train under attack, invert, unlearn."""


SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="override, e.g. training.rounds=5")]


@app.command()
def train(
    out: Annotated[Path, typer.Option("--out", "-o", help="run directory to write")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue an interrupted run in --out")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
) -> None:
    """Phase 1: federated training under attack; writes a checkpoint directory."""
    from flsec.config import load_config
    from flsec.fl.server import train as run_training

    cfg = load_config(config, set_)
    ckpt = run_training(cfg, out, resume=resume, progress=not quiet)
    m = ckpt.history[-1]
    typer.echo(f"round {m['round']}: MA {m['ma']:.4f}  ASR {m['asr']:.4f}  -> {out}")


@app.command()
def invert(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="run directory written by `flsec train`")],
    out: Annotated[Path, typer.Option("--out", "-o", help="where reconstructed_images/ and metrics.json go")] = Path(
        "inversion"),
    round_: Annotated[int | None, typer.Option("--round", min=1, help="captured round (default: the last)")] = None,
    client: Annotated[int | None, typer.Option("--client", min=0, help="captured client (default: the first)")] = None,
    target: Annotated[str | None, typer.Option("--target", help="gradient_b<B> or update (default: smallest batch)")] = None,
    every: Annotated[bool, typer.Option("--all", help="invert every capture matching --round/--client/--target")] = False,
    method: Annotated[str, typer.Option("--method", help="inversion method: geiping or dlg")] = "geiping",
    iterations: Annotated[int, typer.Option("--iterations", min=1, help="optimisation steps per restart")] = 2000,
    restarts: Annotated[int, typer.Option("--restarts", min=1, help="random restarts (best kept)")] = 1,
    lr: Annotated[float, typer.Option("--lr", min=1e-12, help="step size")] = 0.1,
    tv: Annotated[float, typer.Option("--tv", min=0.0, help="total-variation weight")] = 1e-4,
    seed: Annotated[int, typer.Option("--seed", help="seed of the random initialisations")] = 0,
    max_images: Annotated[int, typer.Option("--max-images", min=1, help="most images reconstructed from one "
                                            "update (a larger update is inverted into this many)")] = 16,
    labels: Annotated[str, typer.Option("--labels", help="label strategy: llg or bias-corrected")] = "llg",
    boost: Annotated[str, typer.Option("--boost-correction", help="norm (undo an estimated boost) or none")] = "norm",
    space: Annotated[str, typer.Option("--space", help="pixel or normalised (the authors' code)")] = "pixel",
    init: Annotated[str, typer.Option("--init", help="uniform or normal")] = "uniform",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
) -> None:
    """Phase 2: reconstruct the images behind captured client gradients/updates (Ctrl-C stops; re-run resumes)."""
    from flsec.errors import ConfigError
    from flsec.inversion.attack import run_inversion
    from flsec.inversion.methods import METHODS, InversionSettings

    if method not in METHODS:
        raise ConfigError(f"--method: unknown '{method}'; allowed: {', '.join(METHODS.names())}")
    try:
        settings = InversionSettings(iterations, restarts, lr, tv, seed, progress=not quiet, space=space, init=init,
                                     max_images=max_images, label_strategy=labels, boost_correction=boost)
    except ValueError as exc:
        flag = {"space": "--space", "init": "--init", "label_strategy": "--labels",
                "boost_correction": "--boost-correction", "max_images": "--max-images"}
        name = str(exc).split(":", 1)[0]
        raise ConfigError(f"{flag.get(name, name)}:{str(exc).split(':', 1)[1]}") from None
    report = run_inversion(checkpoint, out, round_=round_, client=client, kind=target, method=method,
                           every=every, settings=settings)
    s = report["summary"]
    trig = s["mean_trigger_correlation"]
    p = s["psnr_stats"]
    of = f" of {s['true_images']}" if s["surrogate_targets"] else ""
    typer.echo(f"{s['images']}{of} images: PSNR mean {p['mean']:.2f} / median {p['median']:.2f} / best "
               f"{p['best']:.2f} dB  SSIM {s['mean_ssim']:.3f}  labels {100 * s['label_accuracy']:.0f}%"
               + (f"  trigger corr {trig:.2f}" if trig is not None else "")
               + f"  ({s['seconds_per_image']:.1f} s/image) -> {out / 'reconstructed_images'}")
    if s["surrogate_targets"]:
        typer.echo(f"{s['surrogate_targets']} update(s) cover more images than --max-images {max_images}: each was "
                   f"inverted into {max_images} images (a surrogate replay), scored against their best-matching "
                   "true images")
    if s["uninformative_targets"]:
        typer.echo(f"skipped {s['uninformative_targets']} capture(s) whose gradient is exactly zero (samples the model "
                   "already fits perfectly carry no information); see metrics.json")
    if s["non_finite_targets"] or s["diverged_targets"]:
        typer.echo(f"skipped {s['non_finite_targets']} capture(s) holding NaN/Inf values and "
                   f"{s['diverged_targets']} whose inversion objective never became finite; see metrics.json")


@app.command()
def unlearn(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="run directory written by `flsec train`")],
    images: Annotated[Path, typer.Option("--images", help="the `flsec invert` output folder (reconstructions.safetensors), "
                                         "or a folder of PNGs such as its reconstructed_images/")],
    out: Annotated[Path, typer.Option("--out", "-o", help="where the repaired checkpoint and metrics go")],
    steps: Annotated[int | None, typer.Option("--steps", min=1, help="fine-tuning steps (default: config)")] = None,
    lr: Annotated[float | None, typer.Option("--lr", min=1e-12, help="fine-tuning step size (default: config)")] = None,
    baselines: Annotated[bool, typer.Option("--baselines/--no-baselines", help="run the two baselines")] = True,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
) -> None:
    """Phase 3: verify the backdoor from reconstructions, unlearn it, compare with baselines."""
    from dataclasses import replace

    from flsec.fl.checkpoint import load_checkpoint
    from flsec.unlearning.run import run_unlearning, settings_from

    cfg = load_checkpoint(checkpoint).config
    settings = settings_from(cfg.unlearning, cfg.seed, not quiet)
    settings = replace(settings, steps=steps or settings.steps, lr=lr or settings.lr)
    res = run_unlearning(checkpoint, images, out, settings, baselines=baselines, progress=not quiet,
                         retrain=cfg.unlearning.retrain_baseline)
    _print_unlearning(res)


def _print_unlearning(res: dict) -> None:
    v = res["verification"]
    if "suspected_target" in v:
        typer.echo(f"verification: backdoor {'found' if v['backdoor_found'] else 'not confirmed'}, suspected target "
                   f"{v['suspected_target']}, {v['suspects']}/{v['reconstructions']} suspects, "
                   f"trigger-mask IoU "
                   + ("n/a" if v.get("mask_iou_with_true_trigger") is None else f"{v['mask_iou_with_true_trigger']:.2f}"))
    else:
        typer.echo(f"verification: no backdoor found in {v['reconstructions']} reconstructions ({v['reason']}); "
                   "model left unchanged")
    rows = [("before", res["before"]), ("after unlearning", res["after"])]
    rows += [(k.replace("_", " "), res[k]) for k in ("baseline_finetune", "baseline_retrain") if k in res]
    for name, m in rows:
        typer.echo(f"  {name:20s} MA {100 * m['ma']:6.2f}%  ASR {100 * m['asr']:6.2f}%")


@app.command()
def run(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="run directory (re-run to resume)")] = Path("runs/run"),
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")] = False,
) -> None:
    """All three phases in one run directory, then report.html. Re-running resumes unfinished phases."""
    from flsec.config import load_config
    from flsec.pipeline import run_pipeline

    report = run_pipeline(load_config(config, set_), out, progress=not quiet)
    _print_run(out, report)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="run directory")] = Path("runs/demo"),
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")] = False,
) -> None:
    """`flsec run` on the embedded digits default (no download)."""
    from importlib.resources import as_file, files

    from flsec.config import build_config, read_toml
    from flsec.pipeline import run_pipeline

    with as_file(files("flsec") / "configs" / "demo.toml") as path:
        cfg = build_config(read_toml(Path(path)))
    report = run_pipeline(cfg, out, progress=not quiet)
    _print_run(out, report)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="a `flsec run` directory (train/, invert/, unlearn/)")],
) -> None:
    """Rebuild report.html of a run directory from its finished phases."""
    from flsec.errors import ConfigError
    from flsec.report.html import write_report

    if not (run_dir / "train" / "meta.json").exists():
        raise ConfigError(f"run_dir: {run_dir} holds no train/meta.json; pass a directory written by `flsec run`")
    typer.echo(f"report: {write_report(run_dir).resolve()}")


def _print_run(out: Path, report: Path) -> None:
    import json

    m = json.loads((out / "unlearn" / "metrics.json").read_text())
    inv = json.loads((out / "invert" / "metrics.json").read_text())["summary"]
    typer.echo(f"inversion: {inv['images']} images, PSNR {inv['mean_psnr']:.2f} dB, labels "
               f"{100 * inv['label_accuracy']:.0f}%")
    _print_unlearning(m)
    typer.echo(f"report: {report.resolve()}")


def main() -> None:
    try:
        app()
    except FlsecError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt as exc:
        typer.echo(str(exc) if str(exc) else
                   "interrupted; finished rounds/phases are saved, re-run with --resume to continue", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
