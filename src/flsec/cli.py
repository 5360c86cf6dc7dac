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


def main() -> None:
    try:
        app()
    except FlsecError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted; finished rounds/phases are saved, re-run with --resume to continue", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
