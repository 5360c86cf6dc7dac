"""Command line: ``flsec train | invert | unlearn | run | demo | sweep | report | verify``.

A user error (bad config, option or input file) prints one line (``error: ...``) and exits with
code 2; an I/O failure (read-only or full disk, ...) prints one line and exits with code 1; Ctrl-C
says what was kept and the exact command that continues, and exits with code 130.
"""

from __future__ import annotations

import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer

from flsec.errors import FlsecError

try:  # Typer >= 0.2x vendors Click: its usage errors derive from TyperException
    from typer import TyperException as UsageErrors
except ImportError:  # pragma: no cover - older Typer on Click
    from click import ClickException as UsageErrors

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Federated-learning security research: train under attack, invert, unlearn.")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="experiment TOML file")]


@app.callback()
def _root(
    plugin: Annotated[list[str] | None, typer.Option(
        "--plugin", help="import this module first (it registers plug-ins); never taken from a run directory")] = None,
) -> None:
    """Federated-learning security research: train under attack, invert, unlearn."""
    from flsec.registry import import_plugins

    import_plugins(plugin or [])


SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="override, e.g. training.rounds=5")]
EngineOpt = Annotated[str | None, typer.Option(
    "--engine", help="runtime.engine: inprocess or flower (needs the flower extra)")]


def _with_engine(set_: list[str] | None, engine: str | None) -> list[str]:
    """``--engine X`` is ``--set runtime.engine="X"`` (validated with the rest of the config)."""
    return [*(set_ or []), *([f'runtime.engine="{engine}"'] if engine is not None else [])]


DeviceOpt = Annotated[str | None, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps (runtime.device)")]


def _with_device(overrides: list[str] | None, device: str | None) -> list[str]:
    """``--device X`` is ``--set runtime.device="X"`` (validated the same way)."""
    return [*(overrides or []), *([f'runtime.device="{device}"'] if device is not None else [])]


@app.command()
def train(
    out: Annotated[Path, typer.Option("--out", "-o", help="run directory to write")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue an interrupted run in --out")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
    engine: EngineOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Phase 1: federated training under attack; writes a checkpoint directory."""
    from flsec.config import load_config
    from flsec.fl.engines import train as run_training
    from flsec.fl.server import fmt_rate

    cfg = load_config(config, _with_engine(_with_device(set_, device), engine))
    ckpt = run_training(cfg, out, resume=resume, progress=not quiet)
    m = ckpt.history[-1]
    typer.echo(f"round {m['round']}: MA {m['ma']:.4f}  ASR {fmt_rate(m['asr'], 4)}  -> {out}")


@app.command()
def check(
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Validate an experiment (config, data, partition, model, attackers, aggregator) without training;
    writes nothing."""
    from flsec.config import load_config
    from flsec.fl.server import describe

    d = describe(load_config(config, set_))
    typer.echo(f"ok: {d['dataset']} {d['train_images']}/{d['test_images']} images {'x'.join(map(str, d['image']))}, "
               f"{d['model']} ({d['parameters']:,} parameters), {d['clients']} clients ({d['client_images'][0]}-"
               f"{d['client_images'][1]} images each, {d['clients_per_round']} per round), {d['rounds']} rounds, attack "
               f"{d['attack']} by {d['attackers']}, aggregation {d['aggregation']}")


@app.command()
def verify(
    run_dir: Annotated[Path, typer.Argument(help="a run directory written by `flsec train` (or its checkpoint/)")],
) -> None:
    """Verify a run directory someone else made before using it: manifest, hashes, paths and every tensor."""
    from flsec.fl.checkpoint import verify_run

    s = verify_run(run_dir)
    typer.echo(f"ok: {s['status']} run, round {s['round']} of {s['rounds']}, {s['files']} files verified, "
               f"{s['captures']} captures; MA {s['ma']}  ASR {s['asr']}")


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
    lr: Annotated[float, typer.Option("--lr", help="step size (> 0)")] = 0.1,
    tv: Annotated[float, typer.Option("--tv", help="total-variation weight (>= 0)")] = 1e-4,
    seed: Annotated[int, typer.Option("--seed", help="seed of the random initialisations")] = 0,
    max_images: Annotated[int, typer.Option("--max-images", min=1, help="most images reconstructed from one "
                                            "update (a larger update is inverted into this many)")] = 16,
    labels: Annotated[str, typer.Option("--labels", help="label strategy: llg or bias-corrected")] = "llg",
    boost: Annotated[str, typer.Option("--boost-correction", help="norm (undo an estimated boost) or none")] = "norm",
    space: Annotated[str, typer.Option("--space", help="pixel or normalised (the authors' code)")] = "pixel",
    init: Annotated[str, typer.Option("--init", help="uniform or normal")] = "uniform",
    batch_captures: Annotated[int, typer.Option("--batch-captures", min=1, help="gradient captures inverted at once "
                                                "in one vectorised optimisation (1: one by one)")] = 1,
    max_captures: Annotated[int | None, typer.Option("--max-captures", min=1, help="with --all: only this many, the "
                                                     "clients the server found most suspicious first")] = None,
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
                "boost_correction": "--boost-correction", "max_images": "--max-images", "lr": "--lr",
                "tv_weight": "--tv", "iterations": "--iterations", "restarts": "--restarts"}
        name = str(exc).split(":", 1)[0]
        raise ConfigError(f"{flag.get(name, name)}:{str(exc).split(':', 1)[1]}") from None
    report = run_inversion(checkpoint, out, round_=round_, client=client, kind=target, method=method,
                           every=every, settings=settings, batch_captures=batch_captures, max_captures=max_captures)
    s = report["summary"]
    trig = s["mean_trigger_correlation"]
    p = s["psnr_stats"]
    of = f" of {s['true_images']}" if s["surrogate_targets"] else ""
    typer.echo(f"{s['images']}{of} images: PSNR mean {p['mean']:.2f} / median {p['median']:.2f} / best "
               f"{p['best']:.2f} dB  SSIM {s['mean_ssim']:.3f}  labels {100 * s['label_accuracy']:.0f}%"
               + (f"  trigger corr {trig:.2f}" if trig is not None else "")
               + f"  ({s['seconds_per_image']:.1f} s/image) -> {out / 'reconstructed_images'}")
    bt = s["batching"]
    if bt["fallbacks"]:
        typer.echo(f"{bt['vectorised_targets']} capture(s) vectorised, {bt['one_by_one_targets']} one by one: "
                   + "; ".join(f"{n} x {why}" for why, n in bt["fallbacks"].items()))
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
    carriers: Annotated[str | None, typer.Option("--carriers", help="reconstructions, root (a clean root set the "
                                                 "server holds) or synthetic (from the model alone); default: "
                                                 "the run's unlearning.carriers")] = None,
    root_labels: Annotated[str | None, typer.Option("--root-labels", help="with root carriers: model (distil the "
                                                    "model's outputs) or true (the root set's labels); default: the "
                                                    "run's unlearning.root_labels")] = None,
    baselines: Annotated[bool, typer.Option("--baselines/--no-baselines", help="run the baselines")] = True,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
) -> None:
    """Phase 3: verify the backdoor from reconstructions, unlearn it, compare with baselines."""
    import math
    from dataclasses import replace

    from flsec.errors import ConfigError
    from flsec.fl.checkpoint import load_checkpoint
    from flsec.unlearning.carriers import CARRIERS
    from flsec.unlearning.run import run_unlearning, settings_from

    if carriers is not None and carriers not in CARRIERS:
        raise ConfigError(f"--carriers: unknown '{carriers}'; allowed: {', '.join(CARRIERS)}")
    if root_labels is not None and root_labels not in ("model", "true"):
        raise ConfigError(f"--root-labels: unknown '{root_labels}'; allowed: model, true")
    if lr is not None and not math.isfinite(lr):
        raise ConfigError(f"--lr: must be a finite number > 0, got {lr}")
    cfg = load_checkpoint(checkpoint).config
    settings = settings_from(cfg.unlearning, cfg.seed, not quiet)
    settings = replace(settings, steps=steps or settings.steps, lr=lr or settings.lr)
    res = run_unlearning(checkpoint, images, out, settings, baselines=baselines, progress=not quiet,
                         retrain=cfg.unlearning.retrain_baseline, carriers=carriers, root_labels=root_labels)
    _print_unlearning(res)


def _print_unlearning(res: dict) -> None:
    v = res["verification"]
    held = res.get("defender_holdings", {})
    if held.get("carriers"):
        typer.echo(f"defender held: {res.get('defender_holds')}")
    if ("suspected_target" in v and v.get("backdoor_found", True) is not False) or res.get("unlearned"):
        iou = v.get("mask_iou_with_true_trigger")
        typer.echo(f"verification: backdoor {'found' if v.get('backdoor_found') else 'not confirmed'} "
                   f"({v.get('trigger_source', 'verification')}), suspected target {v.get('suspected_target')}, "
                   + (f"{v['suspects']}/{v['reconstructions']} suspects, " if v.get("suspects") is not None else "")
                   + "trigger-mask IoU " + ("n/a" if iou is None else f"{iou:.2f}"))
    else:
        typer.echo(f"verification: no backdoor found in {v['reconstructions']} reconstructions ({v.get('reason')}); "
                   "model left unchanged")
    rows = [("before", res["before"]), ("after unlearning", res["after"])]
    names = {"baseline_neural_cleanse": "NC, model alone", "baseline_finetune": "fine-tune on root",
             "baseline_retrain_suspects": "retrain w/o suspects", "baseline_retrain": "retrain w/o attackers"}
    rows += [(names[k], res[k]) for k in names if k in res]
    for name, m in rows:
        typer.echo(f"  {name:22s} MA {100 * m['ma']:6.2f}%  ASR {100 * m['asr']:6.2f}%")


@app.command()
def run(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="run directory")] = Path("runs/run"),
    resume: Annotated[bool, typer.Option("--resume", help="continue an interrupted run in --out")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")] = False,
    engine: EngineOpt = None,
    device: DeviceOpt = None,
) -> None:
    """All three phases in one run directory, then report.html. --resume continues unfinished phases
    (finished ones are never redone)."""
    from flsec.config import load_config
    from flsec.errors import CheckpointError
    from flsec.pipeline import run_pipeline

    cfg = load_config(config, _with_engine(_with_device(set_, device), engine))
    if not resume and (out / "train" / "meta.json").exists():
        raise CheckpointError(f"--out: {out} already holds a run; pass --resume to continue it or choose a new --out")
    report = run_pipeline(cfg, out, progress=not quiet)
    _print_run(out, report)


@app.command()
def demo(
    out: Annotated[Path | None, typer.Option("--out", "-o", help="run directory (default runs/demo, or "
                                             "runs/demo-cooperative)")] = None,
    realistic: Annotated[bool, typer.Option("--realistic/--cooperative", help="what the server sees: real FedAvg "
                                            "updates, suspects chosen by the server (default), or the seed's "
                                            "cooperative batch-1 gradients of every client")] = True,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")] = False,
) -> None:
    """`flsec run` on the embedded digits default (no download); re-running it reuses finished phases."""
    from importlib.resources import as_file, files

    from flsec.config import build_config, read_toml
    from flsec.pipeline import run_pipeline

    out = out or Path("runs/demo" if realistic else "runs/demo-cooperative")
    with as_file(files("flsec") / "configs" / ("demo.toml" if realistic else "demo_cooperative.toml")) as path:
        cfg = build_config(read_toml(Path(path)))
    report = run_pipeline(cfg, out, progress=not quiet)
    _print_run(out, report)


@app.command()
def sweep(
    grid: Annotated[Path, typer.Option("--grid", "-g", help="TOML file: [grid] of quoted dotted config paths -> lists")],
    out: Annotated[Path, typer.Option("--out", "-o", help="sweep directory (re-run to resume)")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="seeds per cell: config seed, seed + 1, ...")] = 1,
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=1, help="runs trained in parallel processes")] = 1,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="CPU threads in all (default: every core), "
                                                "split between the jobs")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
) -> None:
    """Train every cell of a grid for several seeds; results.csv, summary.md, heatmaps and index.html."""
    from flsec.config import apply_overrides, load_grid, read_toml
    from flsec.errors import FlsecError
    from flsec.sweep import run_sweep

    base = apply_overrides(read_toml(config) if config is not None else {}, set_ or [])
    first = int(base.get("seed", 0)) if isinstance(base.get("seed", 0), int) else 0
    result = run_sweep(base, load_grid(grid), list(range(first, first + seeds)), out, jobs=jobs, threads=threads,
                       progress=not quiet)
    typer.echo(f"{len(result.runs)} runs in {len(result.cells)} cells: {result.trained} trained, {result.skipped} "
               f"already finished, {len(result.failed)} failed -> {(out / 'index.html').resolve()}")
    if result.failed:
        run, message = result.failed[0]
        raise FlsecError(f"{len(result.failed)} run(s) failed; first: {run.cell.id} seed {run.seed}: {message}")


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


def _option(argv: list[str], *names: str) -> str | None:
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith(name + "="):
                return arg[len(name) + 1:]
    return None


def interrupted_message(argv: list[str], detail: str = "") -> str:
    """One line for Ctrl-C: what the interrupted command kept (``detail``: what the interrupted phase
    reported, e.g. how many inversion captures it finished), and the exact command that continues."""
    return f"interrupted: {kept_message(argv, detail)}"


def kept_message(argv: list[str], detail: str = "") -> str:
    """What a command stopped part-way (Ctrl-C, a full disk) kept, and the exact command that continues."""
    command = next((a for a in argv if a in app_commands()), None)
    again = shlex.join(["flsec", *argv])
    resume = again if "--resume" in argv else f"{again} --resume"
    out = _option(argv, "--out", "-o")
    if command == "train" and out:
        kept = _committed_round(Path(out))
        return f"{kept} in {out}; continue with: {resume}"
    if command in ("run", "demo"):
        default = ("runs/demo-cooperative" if "--cooperative" in argv else "runs/demo") if command == "demo" else "runs/run"
        where = out or default
        kept = _committed_round(Path(where) / "train")
        phases = [p for p, f in (("inversion", "invert/metrics.json"), ("unlearning", "unlearn/metrics.json"))
                  if (Path(where) / f).is_file()]
        done = f"{kept}{'; finished: ' + ', '.join(phases) if phases else ''}; " + (
            detail or "finished inversion captures are cached")
        return f"{done} in {where}; continue with: {again if command == 'demo' else resume}"
    if command == "invert":
        kept = detail or f"finished captures are kept in {out or 'inversion'}/parts"
        return f"{kept}; continue with: {again}"
    return f"nothing was written under a final name; start again with: {again}"


def _committed_round(run_dir: Path) -> str:
    import json

    try:
        meta = json.loads((run_dir / "meta.json").read_text(encoding="utf-8"))
        done, total = int(meta["round"]), int(meta["rounds"])
        return f"rounds 1-{done} of {total} are saved" if done else "no round is saved yet"
    except (OSError, ValueError, KeyError, TypeError):
        return "no round is saved yet"


def app_commands() -> set[str]:
    return {c.name or c.callback.__name__ for c in app.registered_commands if c.callback is not None}


def _take_ctrl_c() -> None:
    """Make SIGINT raise KeyboardInterrupt even where the parent started flsec with it ignored (a
    shell's ``flsec train ... &``): a Ctrl-C or ``kill -INT`` then stops at a safe point and says how
    to continue, instead of being dropped."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main() -> None:
    argv = sys.argv[1:]
    _take_ctrl_c()
    try:
        code = app(standalone_mode=False)
    except FlsecError as exc:
        typer.echo(f"error: {' '.join(str(exc).split())}", err=True)
        sys.exit(2)
    except UsageErrors as exc:  # a bad option or argument, caught by Typer before any command ran
        if type(exc).__name__ == "NoArgsIsHelpError":  # plain `flsec`: the help, as Typer shows it
            exc.show()
        else:
            typer.echo(f"error: {' '.join(exc.format_message().split())}", err=True)
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("error: aborted", err=True)
        sys.exit(1)
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        writes = next((a for a in argv if a in app_commands()), None) not in ("check", "verify", None)
        kept = f"; {kept_message(argv)}" if writes else ""
        typer.echo(f"error: {where}{exc.strerror or exc}{kept}", err=True)
        sys.exit(1)
    except KeyboardInterrupt as exc:
        typer.echo(interrupted_message(argv, str(exc)), err=True)
        sys.exit(130)
    if code == 130:  # Typer's own Ctrl-C handling: no flsec command exits 130 otherwise
        typer.echo(interrupted_message(argv), err=True)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
