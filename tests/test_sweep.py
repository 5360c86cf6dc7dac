"""flsec sweep: grid expansion, resumable runs, results.csv / summary.md / heatmaps / index.html."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flsec.config import SweepGrid, load_grid
from flsec.errors import ConfigError
from flsec.fl.engines import train
from flsec.sweep import expand, run_sweep
from flsec.sweep.grid import apply_cell
from flsec.sweep.runner import run_status, threads_per_job

BASE = {"name": "tiny", "seed": 3, "data": {"name": "digits"}, "model": {"name": "digits_cnn"},
        "training": {"num_clients": 4, "rounds": 1, "batch_size": 32},
        "attack": {"kind": "backdoor", "num_malicious": 1, "boost": True, "trigger": {"offset": 0}},
        "capture": {"gradient_batch_sizes": [], "updates": False}}


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(("text", "message"), [
    ("[grid]\n", "grid: the [grid] table is empty"),
    ('[grid]\n"training.rounds" = []\n', "grid.training.rounds: needs at least one value"),
    ('[grid]\n"training.rounds" = [1, 1]\n', "values must be distinct"),
    ('[grid]\nseed = [1, 2]\n', "use --seeds"),
    ('[grid]\n"training.rounds" = [1, 2]\n[labels]\n"training.rounds" = ["one"]\n', "1 labels for 2 values"),
    ('[grid]\n"training.rounds" = [1]\n[other]\nx = 1\n', "unknown table 'other'"),
    ('[grid]\n"training.rounds" = 3\n', "grid.training.rounds"),
])
def test_bad_grid_files_are_one_line_config_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_grid(write(tmp_path / "g.toml", text))
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_grid_is_the_cartesian_product_and_tables_merge_into_sections() -> None:
    grid = SweepGrid(grid={"aggregation.name": ["fedavg", "median"],
                           "attack": [{"kind": "pgd", "pgd": {"eps": 0.5}}, {"kind": "dba"}],
                           "attack.num_malicious": [1, 2]},
                     labels={"attack": ["pgd", "dba"]})
    axes, cells = expand(BASE, grid, [0, 1])
    assert [a.labels for a in axes] == [("fedavg", "median"), ("pgd", "dba"), ("1", "2")]
    assert len(cells) == 8 and len({c.id for c in cells}) == 8
    first = cells[1].config(BASE, 5)
    assert cells[1].labels == ("fedavg", "pgd", "2")
    assert (first.seed, first.aggregation.name, first.attack.kind, first.attack.pgd.eps, first.attack.num_malicious) == (
        5, "fedavg", "pgd", 0.5, 2)
    assert first.attack.boost is True and first.attack.trigger.offset == 0  # the table merged, the rest kept
    _, again = expand(BASE, grid, [7])
    assert [c.id for c in again] == [c.id for c in cells]  # ids do not depend on the seed
    _, other_base = expand({**BASE, "training": {**BASE["training"], "rounds": 3}}, grid, [0])
    assert not {c.id for c in other_base} & {c.id for c in cells}  # another base never reuses a run


def test_bad_cell_value_names_the_cell_and_the_field() -> None:
    grid = SweepGrid(grid={"aggregation.name": ["fedavg", "nope"]})
    with pytest.raises(ConfigError, match=r"grid cell \(aggregation.name = nope\): aggregation.name: unknown aggregator"):
        expand(BASE, grid, [0])


def test_threads_are_split_between_jobs() -> None:
    assert threads_per_job(3, 8) == 2 and threads_per_job(4, 2) == 1 and threads_per_job(1, 6) == 6


def test_sweep_runs_resumes_and_aggregates(tmp_path: Path) -> None:
    grid = SweepGrid(grid={"aggregation.name": ["fedavg", "median"], "attack.boost": [True]},
                     labels={"attack.boost": ["<b>boosted</b>"]})
    out = tmp_path / "sweep"

    def stop_after_first(_run: object) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(BASE, grid, [3, 4], out, jobs=1, progress=False, on_done=stop_after_first)
    statuses = sorted(run_status(p) for p in (out / "runs").glob("*/seed_*"))
    assert statuses == ["complete"]  # killed after one run; the others never started
    # train=False trains nothing and reports what is finished (the rest as missing)
    report = run_sweep(BASE, grid, [3, 4], out, jobs=1, progress=False, train=False)
    assert (report.skipped, report.trained, report.failed) == (1, 0, [])
    assert sorted(run_status(p) for p in (out / "runs").glob("*/seed_*")) == ["complete"]
    assert sorted(r["status"] for r in csv.DictReader((out / "results.csv").open())) == [
        "complete", "missing", "missing", "missing"]
    result = run_sweep(BASE, grid, [3, 4], out, jobs=2, threads=2, progress=False)
    assert (result.skipped, result.trained, result.failed) == (1, 3, [])
    again = run_sweep(BASE, grid, [3, 4], out, jobs=2, progress=False)
    assert (again.skipped, again.trained) == (4, 0)

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 4 and {r["status"] for r in rows} == {"complete"}
    for r in rows:
        hist = [json.loads(line) for line in (out / r["run_dir"] / "history.jsonl").read_text().splitlines()]
        assert float(r["ma"]) == hist[-1]["ma"] and float(r["asr"]) == hist[-1]["asr"]
        assert r["aggregation.name"] in ("fedavg", "median") and r["attack.boost"] == "<b>boosted</b>"
    fedavg = [float(r["asr"]) for r in rows if r["aggregation.name"] == "fedavg"]
    summary = (out / "summary.md").read_text()
    assert f"{100 * np.mean(fedavg):.1f} ± {100 * np.std(fedavg, ddof=1):.1f}" in summary
    for png in ("heatmap_asr.png", "heatmap_ma.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (out / "index.html").read_text()
    assert "&lt;b&gt;boosted&lt;/b&gt;" in html and "<b>boosted" not in html  # autoescaped
    for r in rows:
        assert f'href="{r["run_dir"]}/history.jsonl"' in html

    # a sweep never changes how a single run works: a cell equals `flsec train` on its config
    cell = result.cells[0]
    ref = train(cell.config(BASE, 3), tmp_path / "single", progress=False)
    assert (out / "runs" / cell.id / "seed_3" / "history.jsonl").read_bytes() == (
        tmp_path / "single" / "history.jsonl").read_bytes()
    assert ref.complete


def test_cli_sweep_bad_grid_exits_2(tmp_path: Path) -> None:
    grid = write(tmp_path / "g.toml", '[grid]\n"aggregation.name" = ["nope"]\n')
    proc = subprocess.run([sys.executable, "-m", "flsec.cli", "sweep", "--grid", str(grid), "--out",
                           str(tmp_path / "s")], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "grid cell (aggregation.name = nope)" in lines[0]
    assert not (tmp_path / "s").exists()


def test_apply_cell_puts_specific_paths_after_tables() -> None:
    out = apply_cell({"attack": {"kind": "none"}}, (("attack.num_malicious", 2), ("attack", {"kind": "pgd"})))
    assert out["attack"] == {"kind": "pgd", "num_malicious": 2}
