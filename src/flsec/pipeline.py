"""``flsec run``: the three phases in one run directory, each resumable, then the HTML report.

    <out>/train/     checkpoint (phase 1; resumed round by round)
    <out>/invert/    reconstructions and metrics (phase 2; finished targets are cached in parts/)
    <out>/unlearn/   verification, repaired checkpoint, metrics (phase 3)
    <out>/report.html
"""

from __future__ import annotations

from pathlib import Path

from flsec.config import ExperimentConfig
from flsec.fl.server import train
from flsec.inversion.attack import run_inversion
from flsec.inversion.methods import InversionSettings
from flsec.lock import locked_dir
from flsec.report.html import write_report
from flsec.unlearning.run import run_unlearning, settings_from


def run_pipeline(config: ExperimentConfig, out: Path, progress: bool = True) -> Path:
    out = Path(out)
    with locked_dir(out):
        return _run_phases(config, out, progress)


def _run_phases(config: ExperimentConfig, out: Path, progress: bool) -> Path:
    train_dir, inv_dir, unl_dir = out / "train", out / "invert", out / "unlearn"
    train(config, train_dir, resume=(train_dir / "meta.json").exists(), progress=progress)

    inv = config.inversion
    settings = InversionSettings(inv.iterations, inv.restarts, inv.lr, inv.tv_weight, config.seed, progress)
    report = run_inversion(train_dir, inv_dir, kind=inv.target, method=inv.method, every=True, settings=settings)
    if report["summary"]["interrupted"]:
        raise KeyboardInterrupt

    if not (unl_dir / "metrics.json").exists():
        run_unlearning(train_dir, inv_dir, unl_dir, settings_from(config.unlearning, config.seed, progress),
                       baselines=config.unlearning.baselines, progress=progress)
    return write_report(out)
