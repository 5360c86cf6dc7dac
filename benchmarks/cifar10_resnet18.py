"""ResNet-18 on the CIFAR-10 subset through all three phases, on a CPU: train under a boosted backdoor,
invert the suspects' FedAvg updates (the realistic path) and a batch-1 gradient capture, verify and unlearn.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/cifar10_resnet18.py [--set key=value ...]

What runs (each a `flsec` command in a subprocess, so the numbers are what a user gets):

1. ``flsec run`` on ``configs/cifar10_resnet18_cpu.toml`` with, before the user's ``--set`` overrides,
   ``capture.mode = "cooperative"``, ``capture.gradient_batch_sizes = [1]`` and ``inversion.target =
   "update"``: training is unchanged by this (the extra FedSGD gradient of one batch-1 sample of the
   captured client is computed on the global model with its own seed stream), phase 2 inverts only the
   FedAvg updates the server kept (those of the clients its detector suspected: what a real server
   holds), and phase 3 reads the target from those reconstructions and unlearns on the config's
   carriers (synthetic: no clean data).
2. ``flsec invert --target gradient_b1 --all`` on the same checkpoint with the config's inversion
   settings: the batch-1 capture, the easy case, for comparison.

The work folder is keyed by the config file's text and the overrides, so a re-run with the same ones resumes (``flsec run
--resume``: finished phases are kept) and different ones never mix. Phase seconds are wall-clock, taken
when each phase's folder appears (polled every 2 s); CPU seconds are the children's. Writes
``benchmarks/results/cifar10_resnet18.md`` (or ``--out``); its last line is
``final: MA <x>% ASR before <y>% after <z>% inversion <p> dB``: MA and ASR of the trained global model
before unlearning, ASR after unlearning, and the mean PSNR of the realistic update inversion.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from flsec.config import load_config
from flsec.errors import ConfigError
from flsec.io import write_text
from provenance import cpu_name, default_data_dir, git_commit
from run_summary import curve, inversion_numbers, pct, read_history, read_json

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "cifar10_resnet18_cpu.toml"
VERIFICATION_KEYS = ("trigger_source", "backdoor_found", "suspected_target", "true_target", "mask_pixels",
                     "mask_iou_with_true_trigger", "mask_iou_status", "reason", "reconstructions")
BENCH_DEFAULTS = ['capture.mode="cooperative"', "capture.gradient_batch_sizes=[1]", 'inversion.target="update"']


def flsec_command(*args: str) -> list[str]:
    """``flsec ARGS`` with this interpreter (no reliance on PATH)."""
    return [sys.executable, "-c", "import sys; from flsec.cli import main; sys.argv[0] = 'flsec'; main()", *args]


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def process_cpu(pid: int) -> float | None:
    """CPU seconds (user + system) a running process has used so far (Linux /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def run_phases(cmd: list[str], run_dir: Path) -> dict[str, dict[str, float | None]]:
    """Run ``flsec run``; each phase's wall and CPU seconds, split where invert/ and unlearn/ appear."""
    t0, c0 = time.perf_counter(), children_cpu()
    marks: dict[str, tuple[float, float | None]] = {}
    proc = subprocess.Popen(cmd, cwd=ROOT)
    while proc.poll() is None:
        for phase in ("invert", "unlearn"):
            if phase not in marks and (run_dir / phase).exists():
                marks[phase] = (time.perf_counter() - t0, process_cpu(proc.pid))
        time.sleep(2)
    if proc.returncode != 0:
        raise SystemExit(f"flsec run failed with exit code {proc.returncode}: {shlex.join(cmd)}")
    end = (time.perf_counter() - t0, children_cpu() - c0)
    start: tuple[float, float | None] = (0.0, 0.0)
    train_end = marks.get("invert", start)
    invert_end = marks.get("unlearn", train_end)

    def span(a: tuple[float, float | None], b: tuple[float, float | None]) -> dict[str, float | None]:
        cpu = None if a[1] is None or b[1] is None else b[1] - a[1]
        return {"wall": b[0] - a[0], "cpu": cpu}

    return {"train": span(start, train_end), "invert_update": span(train_end, invert_end),
            "unlearn": span(invert_end, end)}


def _before_attack(history: list[dict[str, Any]], attack_rounds: list[int]) -> list[str]:
    """A line on the MA the federation reached before its first attack round (and at best)."""
    first = min(attack_rounds) if attack_rounds else None
    clean = [h for h in history if first is None or h["round"] < first]
    if not clean:
        return []
    best = max(clean, key=lambda h: h["ma"])
    return [f"MA before the first attack round: {pct(clean[-1]['ma'])} (round {clean[-1]['round']}); best "
            f"{pct(best['ma'])} (round {best['round']}).", ""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=CONFIG)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override passed to flsec (after the benchmark's own), e.g. unlearning.steps=100")
    ap.add_argument("--data-dir", default=str(default_data_dir()))
    ap.add_argument("--threads", type=int, default=1, help="runtime.threads")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_cifar10_resnet18")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cifar10_resnet18.md")
    args = ap.parse_args()

    sets = [f"data.data_dir={json.dumps(args.data_dir)}", f"runtime.threads={args.threads}", *BENCH_DEFAULTS,
            *args.overrides]
    try:
        cfg = load_config(args.config, sets)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    key = hashlib.sha256(json.dumps([args.config.read_text(encoding="utf-8"), *sets]).encode()).hexdigest()[:10]
    work = args.work / key
    run_dir = work / "run"
    set_args = [a for s in sets for a in ("--set", s)]
    command = shlex.join(["python", "benchmarks/cifar10_resnet18.py", *sys.argv[1:]])
    load_before = os.getloadavg()
    print(f"work folder {work}", flush=True)

    run_cmd = flsec_command("run", "--config", str(args.config), *set_args, "--out", str(run_dir),
                            *(["--resume"] if (run_dir / "train" / "meta.json").exists() else []))
    seconds = run_phases(run_cmd, run_dir)

    inv = cfg.inversion
    b1_dir = work / "invert_b1"
    b1: dict[str, Any] | None = None
    if 1 in cfg.capture.gradient_batch_sizes and cfg.capture.mode == "cooperative":
        t0, c0 = time.perf_counter(), children_cpu()
        subprocess.run(flsec_command(
            "invert", "--checkpoint", str(run_dir / "train"), "--target", "gradient_b1", "--all", "--method", inv.method,
            "--iterations", str(inv.iterations), "--restarts", str(inv.restarts), "--lr", str(inv.lr),
            "--tv", str(inv.tv_weight), "--seed", str(cfg.seed), "--labels", inv.label_strategy,
            "--space", inv.space, "--init", inv.init, "--out", str(b1_dir)), cwd=ROOT, check=True)
        seconds["invert_b1"] = {"wall": time.perf_counter() - t0, "cpu": children_cpu() - c0}
        b1 = inversion_numbers(read_json(b1_dir / "metrics.json"))

    history = read_history(run_dir / "train")
    update = inversion_numbers(read_json(run_dir / "invert" / "metrics.json"))
    unlearn = read_json(run_dir / "unlearn" / "metrics.json")
    text = render(cfg, command, sets, work, history, update, b1, unlearn, seconds, load_before, os.getloadavg())
    write_text(args.out, text)
    print(text)


def _psnr(inv: dict[str, Any] | None) -> str:
    if inv is None or inv["mean_psnr"] is None:
        return "n/a"
    return f"{inv['mean_psnr']:.2f}"


def _inversion_rows(name: str, inv: dict[str, Any] | None) -> list[str]:
    if inv is None:
        return [f"| {name} | not run | | | | |"]
    s = inv["summary"]
    stats = {k: v for k, v in (s.get("psnr_stats") or {}).items() if v is not None}
    return [f"| {name} | {s.get('targets')} capture(s), {s.get('images')} images | {_psnr(inv)} dB "
            f"(median {stats.get('median', float('nan')):.2f}, best {stats.get('best', float('nan')):.2f}) | "
            f"{s.get('mean_ssim') if s.get('mean_ssim') is None else round(s['mean_ssim'], 3)} | "
            f"{pct(s.get('label_accuracy'))} | "
            f"{'n/a' if s.get('mean_trigger_correlation') is None else round(s['mean_trigger_correlation'], 3)} |"]


def render(cfg: Any, command: str, sets: list[str], work: Path, history: list[dict[str, Any]],
           update: dict[str, Any] | None, b1: dict[str, Any] | None, unlearn: dict[str, Any] | None,
           seconds: dict[str, dict[str, float | None]], load_before: tuple[float, ...],
           load_after: tuple[float, ...]) -> str:
    t, a, d = cfg.training, cfg.attack, cfg.data
    width = cfg.model.width or 64
    per_client = f"{(d.train_size or 4000) // t.num_clients}"
    attack_rounds = a.rounds or "every round"
    lines = [
        "# ResNet-18 on CIFAR-10 through all three phases (CPU)", "",
        f"Command: `{command}`  ",
        f"Commit {git_commit(mark_dirty=True)}; machine: {cpu_name()}, {os.cpu_count()} cores, no GPU; "
        f"{cfg.runtime.threads} torch thread(s); load average (1 min) {load_before[0]:.2f} at the start, "
        f"{load_after[0]:.2f} at the end (a shared machine: wall-clock seconds include waiting for a core; CPU "
        f"seconds do not). Work folder `{work.relative_to(ROOT) if work.is_relative_to(ROOT) else work}`.", "",
        f"Overrides given to `flsec` (the benchmark's, then the command's): `{' '.join(sets)}`.", "",
        "## Setting", "",
        f"CIFAR-10 subset (/work/shared/data: the first 4,000 training / 1,000 test images of the official "
        f"files), {t.num_clients} {d.partition} clients (~{per_client} images each), ResNet-18 (GroupNorm, CIFAR "
        f"stem) at width {width} ({'the standard net' if width == 64 else f'base channels {width} instead of 64'}), "
        f"FedAvg `{cfg.aggregation.name}`, {t.rounds} rounds of {t.local_epochs} local epoch(s) (batch "
        f"{t.batch_size}, lr {t.lr}, momentum {t.momentum}, weight decay {t.weight_decay}, augmentation: crop "
        f"padding {t.augment_crop}, flip {t.augment_flip}). Attack `{a.kind}`: {a.num_malicious} attacker(s), "
        f"rounds {attack_rounds}, poison fraction {a.poison_fraction}, boost {a.boost}, trigger "
        f"{a.trigger.pattern} {a.trigger.size}x{a.trigger.size} -> class {a.target_label}. Capture "
        f"`{cfg.capture.mode}`, rounds {cfg.capture.rounds}, clients {cfg.capture.clients}. Inversion "
        f"`{cfg.inversion.method}`, {cfg.inversion.iterations} iterations, TV {cfg.inversion.tv_weight}, at most "
        f"{cfg.inversion.max_images} images per update. Unlearning: {cfg.unlearning.steps} steps, trigger source "
        f"`{cfg.unlearning.trigger_source}`, carriers `{cfg.carriers}`, baselines {cfg.unlearning.baselines}. "
        f"Seed {cfg.seed}.", "",
        "## Phase 1: training under the backdoor", "",
        f"MA after rounds 1-{len(history)}: {curve(history, 'ma')}.  ",
        f"ASR after rounds 1-{len(history)}: {curve(history, 'asr')}.", "",
        *_before_attack(history, a.rounds or []),
        "## Phase 2: inversion", "",
        "| capture | size | mean PSNR | SSIM | label accuracy | trigger correlation |", "|---|---|---|---|---|---|",
        *_inversion_rows("suspects' FedAvg updates (realistic)", update),
        *_inversion_rows("batch-1 FedSGD gradient (cooperative)", b1), "",
        "## Phase 3: verification and unlearning", ""]
    before = after = None
    if unlearn is None:
        lines.append("Not finished.")
    else:
        ver = unlearn.get("verification", {})
        before, after = unlearn["before"], unlearn["after"]
        shown = {k: ver[k] for k in VERIFICATION_KEYS if k in ver}
        lines += [f"Verification: {json.dumps(shown)}.  ",
                  f"Unlearned: {unlearn.get('unlearned')}; defender holds: {unlearn.get('defender_holds')}.", "",
                  "| model | MA | ASR |", "|---|---|---|",
                  f"| after training (before unlearning) | {pct(before.get('ma'))} | {pct(before.get('asr'))} |",
                  f"| after unlearning | {pct(after.get('ma'))} | {pct(after.get('asr'))} |"]
        if "baseline_finetune" in unlearn:
            bf = unlearn["baseline_finetune"]
            lines.append(f"| baseline: plain fine-tuning on {bf.get('clean_images')} clean images | {pct(bf.get('ma'))} | "
                         f"{pct(bf.get('asr'))} |")
        if "baseline_retrain" in unlearn:
            br = unlearn["baseline_retrain"]
            lines.append(f"| baseline: retraining without the attackers | {pct(br.get('ma'))} | {pct(br.get('asr'))} |")
    def cpu(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.0f}"

    lines += ["", "## Seconds", "",
              "Wall-clock and CPU seconds of each phase (CPU: the `flsec` process's own, read from /proc when the "
              "phase's folder appears; a resumed run counts only what it did itself).", "",
              "| phase | wall seconds | CPU seconds |", "|---|---|---|",
              *[f"| {k} | {v['wall']:.0f} | {cpu(v['cpu'])} |" for k, v in seconds.items()],
              f"| total | {sum(v['wall'] or 0 for v in seconds.values()):.0f} | "
              f"{cpu(sum(v['cpu'] for v in seconds.values() if v['cpu'] is not None))} |", "",
              "The last line: MA and ASR of the trained global model before unlearning, ASR after unlearning, mean "
              "PSNR of the realistic update inversion.", ""]
    ma = "n/a" if before is None else f"{100 * before['ma']:.1f}"
    asr_b = "n/a" if before is None else f"{100 * before['asr']:.1f}"
    asr_a = "n/a" if after is None else f"{100 * after['asr']:.1f}"
    lines.append(f"final: MA {ma}% ASR before {asr_b}% after {asr_a}% inversion {_psnr(update)} dB")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
