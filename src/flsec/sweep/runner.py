"""Running a sweep: every (cell, seed) is an ordinary run directory, trained by ``flsec.fl.engines.train``.

Finished runs are skipped and interrupted ones resumed, so a killed sweep continues where it stopped.
With ``jobs > 1`` runs go to that many worker processes (spawned, so no thread pool is inherited), the
CPU threads split evenly between them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from flsec.config import SweepGrid
from flsec.errors import FlsecError
from flsec.io import write_json
from flsec.sweep.grid import apply_cell, expand, with_seed
from flsec.sweep.outputs import write_outputs
from flsec.sweep.runs import Run, SweepResult, run_dir, run_status


def threads_per_job(jobs: int, threads: int | None) -> int:
    """CPU threads each of ``jobs`` parallel runs gets out of ``threads`` (default: every core)."""
    total = threads or os.cpu_count() or 1
    return max(1, total // jobs)


def train_one(config: dict[str, Any], path: str, threads: int) -> str:
    """Train (or resume) one run directory with ``threads`` CPU threads; the unit a worker executes."""
    from flsec.config import build_config
    from flsec.fl.engines import train

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cfg = build_config(config)
        train(cfg, Path(path), resume=(Path(path) / "meta.json").exists(), progress=False)
    finally:
        torch.set_num_threads(previous)
    return path


def _config_for(base: dict[str, Any], run: Run, threads: int) -> dict[str, Any]:
    data = with_seed(apply_cell(base, run.cell.overrides), run.seed)
    return {**data, "runtime": {**data.get("runtime", {}), "threads": threads}}


def _error(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, FlsecError) else text


def execute(base: dict[str, Any], runs: list[Run], jobs: int, threads: int, progress: bool,
            on_done: Callable[[Run], None] | None = None) -> list[tuple[Run, str]]:
    """Train ``runs``; returns the failures (run, one-line error). Ctrl-C stops, keeping finished rounds."""
    failed: list[tuple[Run, str]] = []
    bar = tqdm(total=len(runs), desc="sweep", unit="run", disable=not progress, dynamic_ncols=True)
    try:
        if jobs == 1:
            for run in runs:
                try:
                    train_one(_config_for(base, run, threads), str(run.dir), threads)
                    if on_done is not None:
                        on_done(run)
                except Exception as exc:  # one failed run must not stop the others
                    failed.append((run, _error(exc)))
                    bar.write(f"failed: {run.cell.id} seed {run.seed}: {failed[-1][1]}")
                bar.update()
            return failed
        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
            pending: dict[Future[str], Run] = {}
            queue = list(runs)
            try:
                while queue or pending:
                    while queue and len(pending) < jobs:
                        run = queue.pop(0)
                        pending[pool.submit(train_one, _config_for(base, run, threads), str(run.dir), threads)] = run
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        run = pending.pop(fut)
                        exc = fut.exception()
                        if exc is None:
                            if on_done is not None:
                                on_done(run)
                        elif isinstance(exc, KeyboardInterrupt):
                            raise exc
                        else:
                            failed.append((run, _error(exc)))
                            bar.write(f"failed: {run.cell.id} seed {run.seed}: {failed[-1][1]}")
                        bar.update()
            except KeyboardInterrupt:
                for fut in pending:
                    fut.cancel()
                raise
        return failed
    finally:
        bar.close()


def run_sweep(base: dict[str, Any], grid: SweepGrid, seeds: list[int], out: Path, jobs: int = 1,
              threads: int | None = None, progress: bool = True,
              on_done: Callable[[Run], None] | None = None, train: bool = True) -> SweepResult:
    """Expand the grid, train what is not finished yet, and write the sweep's tables, heatmaps and index.

    ``train=False`` trains nothing: it only rewrites the outputs from the runs finished so far."""
    if jobs < 1:
        raise FlsecError(f"--jobs: must be >= 1, got {jobs}")
    if not seeds:
        raise FlsecError("--seeds: must be >= 1")
    axes, cells = expand(base, grid, seeds)
    out = Path(out)
    runs = [Run(cell, s, run_dir(out, cell, s)) for s in seeds for cell in cells]  # whole seeds first
    write_json(out / "sweep.json", {
        "format": "flsec-sweep/1", "base": base, "grid": grid.model_dump(mode="json"), "seeds": seeds,
        "cells": [{"id": c.id, "labels": list(c.labels), "overrides": [list(kv) for kv in c.overrides]} for c in cells],
    })
    unfinished = [r for r in runs if run_status(r.dir) != "complete"]
    todo = unfinished if train else []
    result = SweepResult(out, axes, cells, seeds, runs, name=str(base.get("name", out.name)),
                         skipped=len(runs) - len(unfinished))
    try:
        result.failed = execute(base, todo, min(jobs, max(1, len(todo))), threads_per_job(jobs, threads),
                                progress, on_done)
    finally:
        result.trained = sum(run_status(r.dir) == "complete" for r in todo)
        write_outputs(result)
    return result
