"""One self-contained HTML file for a ``flsec run`` directory."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

import torch

from flsec.attacks.backdoor import make_trigger
from flsec.fl.checkpoint import load_checkpoint, read_tensors
from flsec.inversion.attack import Target, part_path
from flsec.io import write_text
from flsec.report import plots

_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;
color:#222}h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}img{max-width:100%}
.note{color:#555;font-size:.9em}.ok{color:#2a7d2a}.bad{color:#b22}"""


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _pct(x: float | None) -> str:
    return "n/a" if x is None or x != x else f"{100 * x:.2f}%"


def write_report(run_dir: Path) -> Path:
    """Build ``run_dir/report.html`` from the train/, invert/ and unlearn/ phase folders."""
    run_dir = Path(run_dir)
    ckpt = load_checkpoint(run_dir / "train")
    cfg = ckpt.config
    parts = [f"<h1>flsec run: {html.escape(cfg.name)}</h1>"]
    last = ckpt.history[-1]
    parts.append("<h2>Setting</h2>" + _table(["", "value"], [
        ["dataset", f"{cfg.data.name} ({cfg.data.partition}"
                    f"{', alpha ' + str(cfg.data.alpha) if cfg.data.partition == 'dirichlet' else ''})"],
        ["model", cfg.model.name],
        ["clients / per round / rounds", f"{cfg.training.num_clients} / {cfg.clients_per_round} / {cfg.training.rounds}"],
        ["attack", f"{cfg.attack.kind}, attackers {ckpt.meta.get('malicious_ids')}, target {cfg.attack.target_label}"
                   f"{', boosted' if cfg.attack.boost else ''}"],
        ["defense (aggregation rule)", f"{cfg.aggregation.name} (f = {cfg.assumed_attackers})"],
        ["final MA / ASR", f"{_pct(last['ma'])} / {_pct(last['asr'])}"],
        ["seed", cfg.seed],
    ]))
    parts.append("<h2>Phase 1: training under attack</h2>")
    parts.append(_img(plots.rounds_plot(ckpt.history), "MA and ASR per round"))
    parts.append(_img(plots.weights_plot(ckpt.history), "aggregation weight of attackers per round"))

    inv_metrics = run_dir / "invert" / "metrics.json"
    if inv_metrics.is_file():
        inv = json.loads(inv_metrics.read_text())
        s = inv["summary"]
        parts.append("<h2>Phase 2: gradient inversion</h2>")
        parts.append(_table(["images", "mean PSNR", "mean SSIM", "label accuracy", "trigger corr. (poisoned)", "s / image"],
                            [[s["images"], f"{s['mean_psnr']:.2f} dB", f"{s['mean_ssim']:.3f}", _pct(s["label_accuracy"]),
                              "n/a" if s["mean_trigger_correlation"] is None else f"{s['mean_trigger_correlation']:.2f}",
                              f"{s['seconds_per_image']:.1f}"]]))
        truths, recons, captions = [], [], []
        ordered = sorted(inv["targets"], key=lambda t: (not t["malicious_client"], -t["round"], t["client"]))
        for t in ordered:
            part = part_path(run_dir / "invert", Target(t["round"], t["client"], t["kind"]))
            if part.is_file():
                p = read_tensors(part)
                for i in range(len(p["images"])):
                    truths.append(p["truth"][i])
                    recons.append(p["images"][i])
                    flag = " (attacker)" if t["malicious_client"] else ""
                    captions.append(f"r{t['round']} c{t['client']}{flag}\n{t['psnr'][i]:.1f} dB")
        if truths:
            parts.append(_img(plots.reconstruction_grid(torch.stack(truths), torch.stack(recons), captions),
                              "truth vs reconstruction"))
        parts.append(f"<p class='note'>{s['images']} reconstructions by {html.escape(inv['method'])}; "
                     "scores use the evaluation-only ground truth, which the attack never reads."
                     + (f" {s['uninformative_targets']} capture(s) were skipped: their gradient is exactly zero, because "
                        "the model already fits those samples perfectly (a saturated backdoor does this to triggered "
                        "inputs), so they carry nothing to invert." if s.get("uninformative_targets") else "")
                     + "</p>")

    unl_metrics = run_dir / "unlearn" / "metrics.json"
    if unl_metrics.is_file():
        u = json.loads(unl_metrics.read_text())
        v = u["verification"]
        parts.append("<h2>Phase 3: verification and unlearning</h2>")
        found = "<span class='ok'>found</span>" if v["backdoor_found"] else "<span class='bad'>not confirmed</span>"
        if "suspected_target" not in v:
            parts.append(f"<p>No backdoor found in {v['reconstructions']} reconstructions ({html.escape(v['reason'])}); "
                         "the model was left unchanged.</p>")
        else:
            parts.append(f"<p>Backdoor {found}: suspected target {v['suspected_target']} (true {v['true_target']}); "
                     f"{v['suspects']} of {v['reconstructions']} reconstructions are suspects. With the estimated "
                     f"trigger removed, {_pct(v['suspects_predicted_target_trigger_removed'])} of them stay the target; "
                     f"stamped on the other reconstructions, the estimated trigger flips "
                     f"{_pct(v['clean_reconstructions_flipped_by_estimated_trigger'])} to the target. "
                         f"Mask IoU with the true trigger: {v['mask_iou_with_true_trigger']:.2f}.</p>")
        trig = _trigger_figure(run_dir, cfg)
        if trig:
            parts.append(trig)
        rows = [("before", u["before"]), ("after unlearning", u["after"])]
        if "baseline_finetune" in u:
            rows.append((f"fine-tune on {u['baseline_finetune']['clean_images']} clean", u["baseline_finetune"]))
        if "baseline_retrain" in u:
            rows.append(("retrain w/o attackers", u["baseline_retrain"]))
        parts.append(_img(plots.before_after_plot(rows), "MA and ASR before and after"))
        parts.append(_table(["model", "MA", "ASR"], [[n, _pct(m["ma"]), _pct(m["asr"])] for n, m in rows]))
        parts.append(f"<p class='note'>The defender holds {html.escape(u['defender_holds'])}. Unlearning: "
                     f"{u['settings']['steps']} steps, batch {u['settings']['batch_size']}, lr {u['settings']['lr']}; "
                     "baselines use the same budget.</p>")

    doc = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>flsec report: "
           f"{html.escape(cfg.name)}</title><style>{_CSS}</style></head><body>{''.join(parts)}</body></html>\n")
    out = run_dir / "report.html"
    write_text(out, doc)
    return out


def _trigger_figure(run_dir: Path, cfg: Any) -> str | None:
    path = run_dir / "unlearn" / "trigger_estimate.safetensors"
    if not path.is_file():
        return None
    t = read_tensors(path)
    h, w = t["mask"].shape[-2:]
    true = make_trigger(cfg.attack.trigger, h, w)
    c = t["pattern"].shape[0]
    return _img(plots.trigger_plot(t["heatmap"].numpy(), t["mask"][0].float().numpy(), t["pattern"],
                                   true.pattern.expand(c, h, w)), "trigger estimate")
