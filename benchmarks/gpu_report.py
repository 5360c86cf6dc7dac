"""benchmarks/gpu_check.sh's two Python parts: ``--env`` records the machine (device name, torch / CUDA /
cuDNN versions, driver, commit) as JSON; ``--work`` turns the steps' outputs into benchmarks/results/gpu.md.

Every number in the report is read from a file a step wrote; a step that failed or was skipped is shown
with its exit status and the end of its output, never filled in.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from flsec.io import write_json, write_text
from provenance import cpu_name, git_commit
from run_summary import curve, inversion_numbers, pct, read_history, read_json

STEPS = [("env", "machine"), ("cuda_tests", "`cuda`-marked tests"), ("throughput", "throughput benchmark"),
         ("engines", "vectorised vs sequential engine (ResNet-18 config, one round)"),
         ("inversion_batched", "batched inversion"), ("resnet18", "ResNet-18 config, `flsec run`, a few rounds"),
         ("resnet18_cpu_config", "ResNet-18 CPU config, `flsec train`")]


def environment(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"commit": git_commit(mark_dirty=True), "torch": torch.__version__,
                            "cuda_build": torch.version.cuda, "python": platform.python_version(), "cpu": cpu_name(),
                            "requested_device": device, "cuda_available": torch.cuda.is_available(),
                            "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", cudnn=torch.backends.cudnn.version(),
                    gpu_count=torch.cuda.device_count())
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30, check=True).stdout.strip()
            info["nvidia_smi"] = smi
        except (OSError, subprocess.SubprocessError):
            info["nvidia_smi"] = None
    return info


def _read(path: Path) -> str | None:
    return path.read_text(encoding="utf-8", errors="replace").strip() if path.is_file() else None


def _tail(path: Path, lines: int = 8) -> str:
    text = _read(path) or ""
    return "\n".join(text.replace("\r", "\n").splitlines()[-lines:])


def _demote(markdown: str) -> str:
    """A result file embedded under a level-3 heading: its headings two levels down."""
    return "\n".join("##" + line if line.startswith("#") else line for line in markdown.splitlines())


def report(work: Path, command: str, dry_run: bool) -> str:
    env = read_json(work / "env.json") or {}
    lines = ["# GPU verification (benchmarks/gpu_check.sh)", ""]
    if dry_run:
        lines += ["**Dry run on the CPU at toy sizes** (`GPU_CHECK_DRY_RUN=1`): it checks that every step runs; "
                  "its numbers say nothing about a GPU.", ""]
    lines += [f"Command: `{command}`", "",
              f"Commit {env.get('commit', '?')}, {env.get('date_utc', '?')} UTC. Device: "
              f"{env.get('gpu') or 'no CUDA device'}"
              + (f" ({env.get('gpu_memory_gib')} GiB, compute capability {env.get('capability')}, "
                 f"{env.get('gpu_count')} visible)" if env.get("gpu") else "")
              + f"; nvidia-smi: {env.get('nvidia_smi') or 'n/a'}. torch {env.get('torch', '?')}, CUDA build "
              f"{env.get('cuda_build') or 'none'}, cuDNN {env.get('cudnn') or 'n/a'}, Python {env.get('python', '?')}, "
              f"host CPU {env.get('cpu', '?')}.", "",
              "| step | what | exit | seconds (limit) |", "|---|---|---|---|"]
    for name, what in STEPS:
        rc = _read(work / f"{name}.rc") or "not run"
        secs = _read(work / f"{name}.seconds") or "-"
        limit = _read(work / f"{name}.limit") or "-"
        lines.append(f"| {name} | {what} | {rc} | {secs} ({limit}) |")
    lines.append("")

    lines += ["## `cuda`-marked tests", "", "```", _tail(work / "cuda_tests.log", 6), "```", ""]

    lines += ["## Throughput (benchmarks/throughput.py)", ""]
    throughput = _read(work / "throughput.md")
    lines += [_demote(throughput) if throughput else "no result:\n```\n" + _tail(work / "throughput.log") + "\n```", ""]

    lines += ["## Vectorised vs sequential client engine", ""]
    rows = [json.loads(line) for line in (_read(work / "engines.log") or "").splitlines() if line.startswith("{")]
    engines = [r for r in rows if "engine" in r]
    comparison = next((r for r in rows if "comparison" in r), None)
    if engines and comparison:
        lines += ["| engine | device | clients | images | seconds | images/s |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['engine']} | {r['device']} | {r['clients']} | {r['images']} | {r['seconds']:.3f} | "
                  f"{r['images_per_second']:.0f} |" for r in engines]
        lines += ["", f"Largest update difference (max |vectorised - sequential| over the update's L2 norm, worst "
                      f"client): {comparison['max_abs_update_diff_over_norm']:.2e}; largest loss difference "
                      f"{comparison['max_loss_diff']:.2e}; vectorised / sequential images/s "
                      f"{comparison['speedup']:.2f}x. Config `{_read(work / 'engines.cmd')}`.", ""]
    else:
        lines += ["no result:", "```", _tail(work / "engines.log"), "```", ""]

    lines += ["## Batched inversion (benchmarks/inversion_batched.py)", ""]
    inversion = _read(work / "inversion_batched.md")
    lines += [inversion if inversion else "no result:\n```\n" + _tail(work / "inversion_batched.log") + "\n```", ""]

    lines += ["## ResNet-18 config (configs/cifar10_resnet18.toml), a few rounds through all three phases", "",
              f"`{_read(work / 'resnet18.cmd')}`", ""]
    history = read_history(work / "resnet18" / "train")
    if history:
        lines += [f"MA after rounds 1-{len(history)}: {curve(history, 'ma')}; ASR: {curve(history, 'asr')}."]
        inv = inversion_numbers(read_json(work / "resnet18" / "invert" / "metrics.json"))
        if inv:
            psnr = inv["mean_psnr"]
            lines.append(f"Inversion: {inv['images']} images, mean PSNR "
                         f"{'n/a' if psnr is None else f'{psnr:.2f} dB'}, seconds per image "
                         f"{inv['summary'].get('seconds_per_image', float('nan')):.2f}.")
        unl = read_json(work / "resnet18" / "unlearn" / "metrics.json")
        if unl:
            lines.append(f"Unlearning: unlearned {unl.get('unlearned')}; MA {pct(unl['before'].get('ma'))} -> "
                         f"{pct(unl['after'].get('ma'))}, ASR {pct(unl['before'].get('asr'))} -> "
                         f"{pct(unl['after'].get('asr'))}.")
        lines.append("")
    lines += ["```", _tail(work / "resnet18.log"), "```", ""]

    lines += ["## ResNet-18 CPU config (configs/cifar10_resnet18_cpu.toml) on the GPU", "",
              f"`{_read(work / 'resnet18_cpu_config.cmd')}`", ""]
    history = read_history(work / "resnet18_cpu_config")
    if history:
        lines += [f"MA after rounds 1-{len(history)}: {curve(history, 'ma')}; ASR: {curve(history, 'asr')}.", ""]
    lines += ["```", _tail(work / "resnet18_cpu_config.log"), "```", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--env", type=Path, help="write the machine description here and stop")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--work", type=Path, help="gpu_check.sh's scratch folder")
    ap.add_argument("--out", type=Path, help="the report to write")
    ap.add_argument("--command", default="bash benchmarks/gpu_check.sh")
    ap.add_argument("--dry-run", default="0")
    args = ap.parse_args()
    if args.env is not None:
        info = environment(args.device)
        write_json(args.env, info)
        print(json.dumps(info))
        return
    if args.work is None or args.out is None:
        ap.error("--work and --out are needed (or --env)")
    write_text(args.out, report(args.work, args.command, args.dry_run == "1") + "\n")


if __name__ == "__main__":
    main()
