"""A sweep's outputs: ``results.csv`` (one row per run), ``summary.md`` (mean +/- std over seeds per
cell), ``heatmap_asr.png`` / ``heatmap_ma.png`` and ``index.html`` linking every run.

Run directories are read with :func:`~flsec.fl.checkpoint.load_checkpoint` (hashes verified, no pickle);
every path written into the index is relative to the sweep directory and escaped by Jinja2.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flsec.attacks.durability import durability
from flsec.errors import CheckpointError
from flsec.fl.checkpoint import load_checkpoint
from flsec.io import write_bytes, write_text
from flsec.sweep.grid import Axis, Cell
from flsec.sweep.runs import Run, SweepResult, run_status

FIXED = ["cell", "seed", "status", "rounds", "ma", "asr", "asr_max", "last_attack_round", "asr_at_stop",
         "lifespan", "seconds", "run_dir"]


def run_row(run: Run, out: Path, axes: Sequence[Axis]) -> dict[str, Any]:
    """One run's row: its cell, seed and axis labels, and, when finished, its final metrics."""
    row: dict[str, Any] = {"cell": run.cell.id, "seed": run.seed, "status": run_status(run.dir),
                           "run_dir": run.dir.relative_to(out).as_posix()}
    row.update({a.key: lab for a, lab in zip(axes, run.cell.labels, strict=True)})
    if row["status"] != "complete":
        return row
    try:
        ckpt = load_checkpoint(run.dir)
    except CheckpointError as exc:
        return {**row, "status": f"unreadable: {exc}"}
    hist = ckpt.history
    last = hist[-1]
    dur = durability(hist)
    row.update({"rounds": last["round"], "ma": last["ma"], "asr": last["asr"],
                "asr_max": max(float(h["asr"]) for h in hist), "last_attack_round": dur["last_attack_round"],
                "asr_at_stop": dur["asr_at_stop"], "lifespan": dur["lifespan"],
                "seconds": round(sum(ckpt.meta.get("seconds_per_round", [])), 2)})
    skip = {"round", "ma", "asr", "train_loss", "selected", "attackers", "weights", "update_norms",
            "rounds_since_attack"}
    for key, value in last.items():
        if key not in skip:
            row[key] = json.dumps(value) if isinstance(value, list) else value
    return row


def csv_text(rows: list[dict[str, Any]], axes: Sequence[Axis]) -> str:
    extra = sorted({k for r in rows for k in r} - set(FIXED) - {a.key for a in axes})
    columns = ["cell", "seed", *[a.key for a in axes], *[c for c in FIXED if c not in ("cell", "seed")], *extra]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in columns})
    return buf.getvalue()


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof = 1; None for a single value)."""
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if arr.size == 0:
        return float("nan"), None
    return float(arr.mean()), (float(arr.std(ddof=1)) if arr.size > 1 else None)


def pct(stat: tuple[float, float | None]) -> str:
    mean, std = stat
    if math.isnan(mean):
        return "-"
    return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "")


def cell_stats(cells: Sequence[Cell], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per cell: finished seeds and mean/std of the final MA, ASR and ASR when the attack stopped."""
    out = []
    for cell in cells:
        done = [r for r in rows if r["cell"] == cell.id and r["status"] == "complete"]
        stopped = [r for r in done if r.get("last_attack_round") is not None and r["last_attack_round"] < r["rounds"]]
        out.append({
            "cell": cell, "runs": len(done), "ma": mean_std([r["ma"] for r in done]),
            "asr": mean_std([r["asr"] for r in done]),
            "asr_at_stop": mean_std([r["asr_at_stop"] for r in stopped]) if stopped else None,
            "lifespan": mean_std([float(r["lifespan"]) for r in stopped]) if stopped else None,
        })
    return out


def summary_markdown(result: SweepResult, stats: list[dict[str, Any]]) -> str:
    durable = any(s["asr_at_stop"] is not None for s in stats)
    head = [a.key for a in result.axes] + ["seeds", "MA %", "ASR %"]
    if durable:
        head += ["ASR % at attack stop", "lifespan (rounds)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in stats:
        cells = [*s["cell"].labels, str(s["runs"]), pct(s["ma"]), pct(s["asr"])]
        if durable:
            life = s["lifespan"]
            cells += [pct(s["asr_at_stop"]) if s["asr_at_stop"] else "-",
                      (f"{life[0]:.1f}" + (f" ± {life[1]:.1f}" if life[1] is not None else "")) if life else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    total = len(result.runs)
    finished = sum(s["runs"] for s in stats)
    note = (f"\n\nFinal-round MA and ASR in %, mean ± sample std over seeds {result.seeds} "
            f"({finished} of {total} runs finished). ")
    if durable:
        note += ("'At attack stop': ASR in the last round any attacker attacked; lifespan: rounds after it "
                 "with ASR >= 50%.")
    return "# Sweep summary\n\n" + "\n".join(lines) + note + "\n"


def heatmap_layout(axes: Sequence[Axis]) -> tuple[list[str], list[str], list[tuple[str, ...]]]:
    """Rows are the first axis's labels, columns every combination of the other axes' labels."""
    rows = list(axes[0].labels)
    combos = list(itertools.product(*(a.labels for a in axes[1:]))) if len(axes) > 1 else [()]
    cols = [" / ".join(c) for c in combos] if len(axes) > 1 else [""]
    return rows, cols, combos


def heatmap_png(axes: Sequence[Axis], values: dict[tuple[str, ...], float], label: str, cmap: str = "Reds") -> bytes:
    """A heatmap of one value in [0, 1] per cell (keyed by the cell's labels), shown in %."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols, combos = heatmap_layout(axes)
    grid = np.full((len(rows), len(cols)), np.nan)
    for labels, value in values.items():
        grid[rows.index(labels[0]), combos.index(tuple(labels[1:]))] = value
    fig, ax = plt.subplots(figsize=(max(4.0, 0.55 * len(cols) + 3.0), max(2.0, 0.42 * len(rows) + 1.8)))
    im = ax.imshow(100 * grid, cmap=cmap, vmin=0, vmax=100, aspect="auto")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_ylabel(axes[0].key)
    if len(axes) > 1:
        ax.set_xlabel(" / ".join(a.key for a in axes[1:]))
    for i, j in itertools.product(range(len(rows)), range(len(cols))):
        if not np.isnan(grid[i, j]):
            ax.text(j, i, f"{100 * grid[i, j]:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if grid[i, j] > 0.6 else "black")
    fig.colorbar(im, ax=ax, label=label)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


INDEX = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>flsec sweep: {{ title }}</title>
<style>body{font-family:sans-serif;margin:2em;max-width:80em}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}th{background:#f4f4f4}img{max-width:100%}</style>
</head><body>
<h1>Sweep: {{ title }}</h1>
<p>{{ cells|length }} cells &times; {{ seeds|length }} seeds ({{ seeds|join(", ") }}); {{ finished }} of {{ total }}
runs finished. Tables: <a href="results.csv">results.csv</a>, <a href="summary.md">summary.md</a>.</p>
<h2>Final ASR</h2><img src="heatmap_asr.png" alt="heatmap of the final ASR per cell">
<h2>Final MA</h2><img src="heatmap_ma.png" alt="heatmap of the final MA per cell">
<h2>Cells</h2>
<table><tr>{% for a in axes %}<th>{{ a }}</th>{% endfor %}<th>MA %</th><th>ASR %</th><th>runs</th></tr>
{% for c in cells %}<tr>{% for lab in c.labels %}<td>{{ lab }}</td>{% endfor %}<td>{{ c.ma }}</td><td>{{ c.asr }}</td>
<td>{% for r in c.runs %}<a href="{{ r.href }}">seed {{ r.seed }}</a>{{ "" if r.complete else " (" ~ r.status ~ ")" }}
{% endfor %}</td></tr>
{% endfor %}</table>
</body></html>
"""


def index_html(result: SweepResult, stats: list[dict[str, Any]], rows: list[dict[str, Any]], title: str) -> str:
    """The sweep's index page (Jinja2, autoescaped): heatmaps and one link per run, to its
    ``report.html`` when the run has one, otherwise to its ``history.jsonl``."""
    from jinja2 import Environment

    env = Environment(autoescape=True)
    cells = []
    for s in stats:
        runs = []
        for r in (r for r in rows if r["cell"] == s["cell"].id):
            target = "report.html" if (result.out / r["run_dir"] / "report.html").is_file() else "history.jsonl"
            runs.append({"seed": r["seed"], "href": f"{r['run_dir']}/{target}", "status": r["status"],
                         "complete": r["status"] == "complete"})
        cells.append({"labels": s["cell"].labels, "ma": pct(s["ma"]), "asr": pct(s["asr"]), "runs": runs})
    finished = sum(r["status"] == "complete" for r in rows)
    return env.from_string(INDEX).render(title=title, axes=[a.key for a in result.axes], cells=cells,
                                         seeds=result.seeds, finished=finished, total=len(rows))


def write_outputs(result: SweepResult) -> None:
    out = result.out
    rows = [run_row(run, out, result.axes) for run in result.runs]
    stats = cell_stats(result.cells, rows)
    write_text(out / "results.csv", csv_text(rows, result.axes))
    write_text(out / "summary.md", summary_markdown(result, stats))
    for metric, cmap in (("asr", "Reds"), ("ma", "Blues")):
        values = {st["cell"].labels: st[metric][0] for st in stats if st["runs"]}
        write_bytes(out / f"heatmap_{metric}.png", heatmap_png(result.axes, values, f"final {metric.upper()} %", cmap))
    write_text(out / "index.html", index_html(result, stats, rows, result.name))
