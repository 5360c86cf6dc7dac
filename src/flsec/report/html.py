"""One self-contained HTML file for a ``flsec run`` directory, rendered by a Jinja2 template.

Everything the page shows comes from files of the run directory, which may have been made by
someone else: the template autoescapes every value (no field of a ``metrics.json`` can inject
markup or script), figures are embedded as base64 PNGs, and a missing or malformed metrics file
gives one line naming the file instead of a traceback.
"""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path
from typing import Any

import torch
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from flsec.aggregation import describe
from flsec.attacks.backdoor import make_trigger
from flsec.attacks.durability import durability
from flsec.errors import FlsecError
from flsec.fl.checkpoint import Checkpoint, load_checkpoint, read_tensors
from flsec.inversion.attack import Target, part_path
from flsec.io import write_text
from flsec.report import plots

_ENV = Environment(loader=PackageLoader("flsec", "report/templates"), autoescape=select_autoescape(default=True),
                   undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)


class ReportError(FlsecError):
    """A phase's output in the run directory is missing fields or malformed."""


def _figure(png: bytes, alt: str) -> dict[str, str]:
    return {"png": base64.b64encode(png).decode("ascii"), "alt": alt}


def _pct(x: Any) -> str:
    return "n/a" if not isinstance(x, int | float) or isinstance(x, bool) or not math.isfinite(x) else f"{100 * x:.2f}%"


def _num(x: Any, fmt: str, unit: str = "") -> str:
    return "n/a" if not isinstance(x, int | float) or isinstance(x, bool) or not math.isfinite(x) else f"{x:{fmt}}{unit}"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a JSON object")
    return data


def _get(data: dict[str, Any], key: str, path: Path, kind: type | tuple[type, ...] = object) -> Any:
    if key not in data:
        raise ReportError(f"{path}: missing field '{key}'")
    value = data[key]
    if not isinstance(value, kind):
        raise ReportError(f"{path}: field '{key}' has the wrong type ({type(value).__name__})")
    return value


def _setting(ckpt: Checkpoint) -> list[list[Any]]:
    cfg, last = ckpt.config, ckpt.history[-1]
    alpha = f", alpha {cfg.data.alpha}" if cfg.data.partition == "dirichlet" else ""
    return [
        ["dataset", f"{cfg.data.name} ({cfg.data.partition}{alpha})"],
        ["model", cfg.model.name],
        ["clients / per round / rounds", f"{cfg.training.num_clients} / {cfg.clients_per_round} / {cfg.training.rounds}"],
        ["attack", f"{cfg.attack.kind}, attackers {ckpt.meta.get('malicious_ids')}, target {cfg.attack.target_label}"
                   f"{', boosted' if cfg.attack.boost else ''}"],
        ["defense (aggregation rule)", f"{cfg.aggregation.name} (f = {cfg.assumed_attackers})"],
        ["final MA / ASR", f"{_pct(last['ma'])} / {_pct(last['asr'])}"],
        ["seed", cfg.seed],
    ]


def _detection_note(history: list[dict[str, Any]]) -> str | None:
    """What the server's suspect detector decided over the run, scored against the true attackers."""
    rounds = [h for h in history if isinstance(h.get("suspects"), list)]
    if not rounds:
        return None
    flagged = sum(len(h["suspects"]) for h in rounds)
    hits = sum(len(set(h["suspects"]) & set(h.get("attackers") or [])) for h in rounds)
    attacks = sum(len(h.get("attackers") or []) for h in rounds)
    precision = f"{100 * hits / flagged:.0f}%" if flagged else "n/a"
    recall = f"{100 * hits / attacks:.0f}%" if attacks else "n/a"
    return (f"Suspects ({rounds[-1].get('detector')} detector, from the updates alone): {flagged} flagged in "
            f"{len(rounds)} rounds; precision {precision}, recall {recall} against the true attackers of each round "
            "(evaluation only).")


def _training_notes(history: list[dict[str, Any]]) -> list[str]:
    """What the per-round records say beyond the curves: the server's suspects, the backdoor's
    durability after the attack stopped (:func:`flsec.attacks.durability.durability`) and the ASR of
    each DBA trigger part."""
    notes = [n for n in [_detection_note(history)] if n]
    d = durability(history)
    if d["last_attack_round"] is not None and d["asr_after"]:
        life = (f"at least {d['lifespan']} round(s), until the run ended" if d["censored"]
                else f"{d['lifespan']} round(s)")
        notes.append(f"Durability: the attackers stopped after round {d['last_attack_round']} with ASR "
                     f"{_pct(d['asr_at_stop'])}; {len(d['asr_after'])} round(s) later it is {_pct(d['asr_after'][-1])}. "
                     f"It stayed at or above {_pct(d['threshold'])} for {life}.")
    parts = history[-1].get("asr_parts") if history else None
    if isinstance(parts, list) and parts:
        notes.append(f"Distributed trigger: ASR with the global trigger {_pct(history[-1].get('asr'))}; with each "
                     f"attacker's local part alone {', '.join(_pct(p) for p in parts)}.")
    return notes


def _defense(name: str) -> str:
    """The run's aggregation rule in one sentence with its paper; a rule the registry does not know
    (a run directory written with a plug-in that is not loaded) is named only."""
    try:
        return describe(name)
    except FlsecError:
        return f"{name}: not a registered aggregation rule in this installation (no description)."


def _inversion(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "invert" / "metrics.json"
    if not path.is_file():
        return None
    inv = _read_json(path)
    s = _get(inv, "summary", path, dict)
    targets = _get(inv, "targets", path, list)
    rows = [[s.get("images"), _num(s.get("mean_psnr"), ".2f", " dB"), _num(s.get("mean_ssim"), ".3f"),
             _pct(s.get("label_accuracy")), _num(s.get("mean_trigger_correlation"), ".2f"),
             _num(s.get("seconds_per_image"), ".1f")]]
    truths, recons, captions = [], [], []
    valid = [t for t in targets if isinstance(t, dict) and all(isinstance(t.get(k), int) for k in ("round", "client"))
             and isinstance(t.get("kind"), str)]
    for t in sorted(valid, key=lambda t: (not t.get("malicious_client"), -t["round"], t["client"])):
        part = part_path(run_dir / "invert", Target(t["round"], t["client"], t["kind"]))
        if not part.is_file():
            continue
        p = read_tensors(part)
        psnrs = t.get("psnr") if isinstance(t.get("psnr"), list) else []
        for i in range(min(len(p["images"]), len(p["truth"]))):
            flag = " (attacker)" if t.get("malicious_client") else ""
            caption = f"r{t['round']} c{t['client']}{flag}"
            if i < len(psnrs):
                caption += "\n" + _num(psnrs[i], ".1f", " dB")
            truths.append(p["truth"][i])
            recons.append(p["images"][i])
            captions.append(caption)
    figures = [_figure(plots.reconstruction_grid(torch.stack(truths), torch.stack(recons), captions),
                       "truth vs reconstruction")] if truths else []
    notes = [f"{s.get('images')} reconstructions by {inv.get('method')}; scores use the evaluation-only ground truth, "
             "which the attack never reads."]
    if s.get("uninformative_targets"):
        notes.append(f"{s['uninformative_targets']} capture(s) were skipped: their gradient is exactly zero, because the "
                     "model already fits those samples perfectly (a saturated backdoor does this to triggered inputs), "
                     "so they carry nothing to invert.")
    return {"header": ["images", "mean PSNR", "mean SSIM", "label accuracy", "trigger corr. (poisoned)", "s / image"],
            "rows": rows, "figures": figures, "notes": notes}


def _unlearning(run_dir: Path, cfg: Any) -> dict[str, Any] | None:
    path = run_dir / "unlearn" / "metrics.json"
    if not path.is_file():
        return None
    u = _read_json(path)
    v = _get(u, "verification", path, dict)
    out: dict[str, Any] = {"reconstructions": v.get("reconstructions"), "found": None, "reason": v.get("reason", ""),
                           "summary": "", "figures": [], "notes": []}
    if "suspected_target" in v and v.get("trigger_source") == "guided_neural_cleanse":
        rev = v.get("reverse_engineering") or {}
        out["found"] = bool(v.get("backdoor_found"))
        out["summary"] = (
            f"suspected target {v.get('suspected_target')} (true {v.get('true_target')}). The reconstructions show "
            f"no trigger themselves ({v.get('suspects') or 0} of {v.get('reconstructions')} carry a universal one), but "
            f"their labels point at {rev.get('candidates')}; Neural Cleanse reversed on the carriers for those "
            f"classes found a trigger for class {v.get('suspected_target')} at most {rev.get('ratio')} times the "
            f"smallest of its reference classes' masks. Stamped on the clean reconstructions it flips "
            f"{_pct(v.get('clean_reconstructions_flipped_by_estimated_trigger'))} and on the carriers "
            f"{_pct(v.get('carriers_flipped_by_estimated_trigger'))} to the target. Mask IoU with the true trigger: "
            f"{_num(v.get('mask_iou_with_true_trigger'), '.2f')}.")
    elif "suspected_target" in v:
        flipped = _pct(v.get("clean_reconstructions_flipped_by_estimated_trigger"))
        out["found"] = bool(v.get("backdoor_found"))
        out["summary"] = (
            f"suspected target {v.get('suspected_target')} (true {v.get('true_target')}); {v.get('suspects')} of "
            f"{v.get('reconstructions')} reconstructions are suspects. With the estimated trigger removed, "
            f"{_pct(v.get('suspects_predicted_target_trigger_removed'))} of them stay the target; stamped on the other "
            f"reconstructions, the estimated trigger flips {flipped} to the target. Mask IoU with the true trigger: "
            f"{_num(v.get('mask_iou_with_true_trigger'), '.2f')}.")
    trig = _trigger_figure(run_dir, cfg)
    if trig is not None:
        out["figures"].append(trig)
    rows = [("before", _get(u, "before", path, dict)),
            (f"after unlearning ({u.get('carriers', 'reconstructions')} carriers)", _get(u, "after", path, dict))]
    if isinstance(u.get("baseline_neural_cleanse"), dict):
        rows.append((f"Neural Cleanse on the model alone ({u['baseline_neural_cleanse'].get('carriers')} carriers)",
                     u["baseline_neural_cleanse"]))
    if isinstance(u.get("baseline_finetune"), dict):
        rows.append((f"fine-tune on {u['baseline_finetune'].get('clean_images')} clean root images",
                     u["baseline_finetune"]))
    if isinstance(u.get("baseline_retrain_suspects"), dict):
        rows.append((f"retrain without the inverted suspects {u['baseline_retrain_suspects'].get('excluded')}",
                     u["baseline_retrain_suspects"]))
    if isinstance(u.get("baseline_retrain"), dict):
        rows.append(("retrain without the attackers (oracle)", u["baseline_retrain"]))
    numeric = [(n, {k: m.get(k) if isinstance(m.get(k), int | float) else math.nan for k in ("ma", "asr")})
               for n, m in rows]
    out["figures"].append(_figure(plots.before_after_plot(numeric), "MA and ASR before and after"))
    out["rows"] = [[n, _pct(m.get("ma")), _pct(m.get("asr"))] for n, m in rows]
    s = u.get("settings") if isinstance(u.get("settings"), dict) else {}
    out["notes"].append(f"The defender holds {u.get('defender_holds')}. Unlearning: {s.get('steps')} steps, batch "
                        f"{s.get('batch_size')}, lr {s.get('lr')}, distillation weight {s.get('retention_weight')}; "
                        "the baselines use the same steps.")
    return out


def render_report(run_dir: Path) -> str:
    """The report page of a ``flsec run`` directory, as a string."""
    run_dir = Path(run_dir)
    ckpt = load_checkpoint(run_dir / "train")
    cfg = ckpt.config
    training = {"figures": [_figure(plots.rounds_plot(ckpt.history), "MA and ASR per round"),
                            _figure(plots.weights_plot(ckpt.history), "aggregation weight of attackers per round")],
                "notes": _training_notes(ckpt.history)}
    context = {"name": cfg.name, "setting": _setting(ckpt), "defense": _defense(cfg.aggregation.name), "training": training,
               "inversion": _inversion(run_dir), "unlearning": _unlearning(run_dir, cfg)}
    return _ENV.get_template("report.html.j2").render(**context)


def write_report(run_dir: Path) -> Path:
    """Build ``run_dir/report.html`` from the train/, invert/ and unlearn/ phase folders."""
    out = Path(run_dir) / "report.html"
    write_text(out, render_report(run_dir))
    return out


def _trigger_figure(run_dir: Path, cfg: Any) -> dict[str, str] | None:
    path = run_dir / "unlearn" / "trigger_estimate.safetensors"
    if not path.is_file():
        return None
    t = read_tensors(path)
    if not {"mask", "pattern", "heatmap"} <= set(t) or t["mask"].ndim != 3 or t["pattern"].ndim != 3:
        raise ReportError(f"{path}: expected tensors mask, pattern and heatmap of C x H x W images")
    h, w = t["mask"].shape[-2:]
    true = make_trigger(cfg.attack.trigger, h, w)
    c = t["pattern"].shape[0]
    return _figure(plots.trigger_plot(t["heatmap"].numpy(), t["mask"][0].float().numpy(), t["pattern"],
                                      true.pattern.expand(c, h, w)), "trigger estimate")
