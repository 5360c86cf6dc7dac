"""``flsec run``: the three phases in one run directory, each resumable, then the HTML report.

    <out>/train/     checkpoint (phase 1; resumed round by round)
    <out>/invert/    reconstructions and metrics (phase 2; finished targets are cached in parts/)
    <out>/unlearn/   verification, repaired checkpoint, metrics (phase 3)
    <out>/report.html
"""

from __future__ import annotations

from pathlib import Path

import torch

from flsec.config import ExperimentConfig, InversionConfig
from flsec.fl.engines import train
from flsec.inversion.attack import run_inversion
from flsec.inversion.methods import InversionSettings
from flsec.lock import locked_dir
from flsec.report.html import write_report
from flsec.runtime import resolve_device
from flsec.unlearning.run import run_unlearning, settings_from


def inversion_settings(inv: InversionConfig, seed: int, progress: bool) -> InversionSettings:
    return InversionSettings(inv.iterations, inv.restarts, inv.lr, inv.tv_weight, seed, progress, space=inv.space,
                             init=inv.init, max_images=inv.max_images, surrogate_steps=inv.surrogate_steps,
                             label_strategy=inv.label_strategy,
                             boost_correction=inv.boost_correction)


def run_pipeline(config: ExperimentConfig, out: Path, progress: bool = True,
                 device: torch.device | None = None) -> Path:
    """Train (phase 1), invert every capture (phase 2) and unlearn from the reconstructions (phase 3).

    Ctrl-C in phase 2 raises :class:`~flsec.inversion.attack.InversionInterrupted` after keeping the
    finished captures; a re-run resumes every phase where it stopped."""
    out = Path(out)
    with locked_dir(out):
        return _run_phases(config, out, progress, device or resolve_device(config.runtime.device))


def _run_phases(config: ExperimentConfig, out: Path, progress: bool, device: torch.device) -> Path:
    train_dir, inv_dir, unl_dir = out / "train", out / "invert", out / "unlearn"
    train(config, train_dir, resume=(train_dir / "meta.json").exists(), progress=progress)

    inv = config.inversion
    run_inversion(train_dir, inv_dir, kind=inv.target, method=inv.method, every=True,
                  settings=inversion_settings(inv, config.seed, progress), device=device,
                  batch_captures=inv.batch_captures, max_captures=inv.max_captures)

    if not (unl_dir / "metrics.json").exists():
        run_unlearning(train_dir, inv_dir, unl_dir, settings_from(config.unlearning, config.seed, progress),
                       baselines=config.unlearning.baselines, progress=progress, device=device,
                       retrain=config.unlearning.retrain_baseline)
    return write_report(out)
