"""A curious server inverting captured client gradients/updates from a checkpoint (no training).

Only what the server legitimately holds is used to attack: the global weights it sent in that
round, the tensor the client sent back and the client's declared local hyper-parameters. The
``evaluation_only`` ground truth is opened afterwards, to score the result.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from flsec.attacks.backdoor import make_trigger
from flsec.errors import ConfigError, FlsecError
from flsec.fl.checkpoint import Checkpoint, load_checkpoint, read_tensor_metadata, read_tensors
from flsec.inversion.cases import Case, GradientCase, UpdateCase
from flsec.inversion.images import save_grid, save_png
from flsec.inversion.labels import infer_labels
from flsec.inversion.methods import METHODS, InversionSettings
from flsec.inversion.metrics import score
from flsec.io import write_json, write_tensors

MAX_UPDATE_IMAGES = 64


@dataclass(frozen=True)
class Target:
    round: int
    client: int
    kind: str  # "gradient_b<B>" or "update"

    @property
    def tag(self) -> str:
        return f"r{self.round}_c{self.client}_{self.kind}"


def part_path(out: Path, target: Target) -> Path:
    """Where a finished capture's reconstruction is kept (resume cache, report figures)."""
    return out / "parts" / f"{target.tag}.safetensors"


def available_targets(ckpt: Checkpoint) -> list[Target]:
    return [Target(c["round"], c["client"], kind) for c in ckpt.captures() for kind in c["tensors"]]


def select_targets(ckpt: Checkpoint, round_: int | None, client: int | None, kind: str | None,
                   every: bool) -> list[Target]:
    """The captures to invert. Default: the last captured round, its first client, the smallest
    gradient batch (or the update if no gradient was captured); ``every`` keeps all matches."""
    targets = available_targets(ckpt)
    if not targets:
        raise FlsecError(f"{ckpt.root}: the checkpoint holds no captured updates or gradients (see [capture])")
    have = sorted({t.kind for t in targets})
    if kind is not None and kind not in have:
        raise ConfigError(f"--target: '{kind}' was not captured; allowed: {', '.join(have)}")
    pool = [t for t in targets if (round_ is None or t.round == round_) and (client is None or t.client == client)
            and (kind is None or t.kind == kind)]
    if not pool:
        listed = ", ".join(sorted({f"round {t.round} client {t.client}" for t in targets}))
        raise ConfigError(f"--round/--client: no capture matches; captured: {listed}")
    if every:
        if kind is None and any(t.kind != "update" for t in pool):
            pool = [t for t in pool if t.kind != "update"]  # gradients are what can be inverted at scale
        return pool
    last_round = max(t.round for t in pool) if round_ is None else round_
    pool = [t for t in pool if t.round == last_round]
    first_client = min(t.client for t in pool)
    pool = [t for t in pool if t.client == first_client]

    def rank(t: Target) -> tuple[int, int]:
        return (1, 0) if t.kind == "update" else (0, int(t.kind.removeprefix("gradient_b")))

    return [min(pool, key=rank)]


def build_case(ckpt: Checkpoint, target: Target) -> tuple[Case, torch.nn.Module]:
    model = ckpt.build_model(ckpt.round_model_weights(target.round))
    tensors, meta = ckpt.capture(target.round, target.client)
    observed = tensors[target.kind]
    if target.kind == "update":
        if meta["num_samples"] > MAX_UPDATE_IMAGES:
            raise FlsecError(
                f"--target update: client {target.client} trained on {meta['num_samples']} images; replaying "
                f"more than {MAX_UPDATE_IMAGES} is impractical; invert a captured gradient (--target gradient_b<B>, "
                f"captured with capture.gradient_batch_sizes) instead"
            )
        case: Case = UpdateCase(model, observed, meta["num_samples"], meta["epochs"], meta["batch_size"],
                                meta["lr"], meta["momentum"], meta["weight_decay"])
    else:
        case = GradientCase(model, observed, int(target.kind.removeprefix("gradient_b")))
    return case, model


def invert_one(ckpt: Checkpoint, target: Target, method: str, settings: InversionSettings) -> dict[str, Any]:
    """Reconstruct one capture; returns images, labels and scores."""
    invert = METHODS.get(method)
    case, model = build_case(ckpt, target)
    malicious = sorted(ckpt.meta.get("malicious_ids", []))
    observed_norm = float(case.observed.norm())
    if not (math.isfinite(observed_norm) and observed_norm > 0.0):
        # A sample the model fits perfectly (e.g. a triggered input of a saturated backdoor) has a
        # cross-entropy gradient of exactly zero in float32: it carries no information to invert.
        return {"target": target, "images": None, "labels": None, "truth": None,
                "metrics": {"uninformative": True, "observed_norm": observed_norm, "psnr": [], "seconds": 0.0,
                            "interrupted": False, "malicious_client": target.client in malicious}}
    spec = ckpt.input_spec()
    shape = (case.num_images, spec.channels, spec.height, spec.width)
    labels = infer_labels(model, case.output_bias_gradient().detach(), case.num_images, shape[1:])
    t0 = time.perf_counter()
    out = invert(case, labels, shape, settings)
    seconds = time.perf_counter() - t0
    prefix = f"{target.kind}/"
    truth = ckpt.truth(target.round, target.client)
    true_x, true_y = truth[prefix + "images"], truth[prefix + "labels"]
    poisoned = truth.get(prefix + "poisoned")
    trigger = make_trigger(ckpt.config.attack.trigger, spec.height, spec.width)
    if target.client in malicious:
        trigger = trigger.part(malicious.index(target.client), ckpt.config.attack.trigger.dba_parts)
    metrics = score(out.images, true_x, labels, true_y, poisoned, trigger.mask)
    order = torch.tensor(metrics["order"])
    return {"target": target, "images": out.images[order], "labels": labels[order], "truth": true_x,
            "metrics": {**metrics, "loss": out.loss, "restart_losses": out.restart_losses,
                        "iterations_done": out.iterations_done, "interrupted": out.interrupted,
                        "seconds": seconds, "seconds_per_image": seconds / case.num_images,
                        "true_labels": true_y.tolist(), "inferred_labels": labels[order].tolist(),
                        "malicious_client": target.client in malicious, "observed_norm": observed_norm,
                        "poisoned": [] if poisoned is None else poisoned.tolist()}}


def run_inversion(checkpoint: Path, out: Path, *, round_: int | None = None, client: int | None = None,
                  kind: str | None = None, method: str = "geiping", every: bool = False,
                  settings: InversionSettings | None = None) -> dict[str, Any]:
    """Invert the selected captures of a checkpoint and write ``out/reconstructed_images/`` (PNGs and
    grids), ``out/reconstructions.safetensors`` and ``out/metrics.json`` (written last)."""
    settings = settings or InversionSettings()
    METHODS.get(method)
    ckpt = load_checkpoint(checkpoint)
    targets = select_targets(ckpt, round_, client, kind, every)
    images_dir = out / "reconstructed_images"
    results, all_images, all_labels, sources = [], [], [], []
    key = json.dumps({"method": method, **asdict(settings), "progress": None}, sort_keys=True)
    for target in targets:
        res = _cached(out, target, key)
        if res is None:
            res = invert_one(ckpt, target, method, settings)
            if res["images"] is None:
                results.append({**asdict(target), **res["metrics"]})
                continue
            if not res["metrics"]["interrupted"]:
                _cache(out, target, key, res)
        for i, img in enumerate(res["images"]):
            save_png(images_dir / f"{target.tag}_{i}.png", img)
        save_grid(images_dir / f"{target.tag}_grid.png", [res["truth"], res["images"]])
        all_images.append(res["images"])
        all_labels.append(res["labels"])
        sources += [[target.round, target.client, i] for i in range(len(res["labels"]))]
        results.append({**asdict(target), **res["metrics"]})
        if res["metrics"]["interrupted"]:
            break
    if not all_images:
        raise FlsecError(
            f"checkpoint: every selected capture ({len(results)}) is an all-zero gradient, so there is nothing to "
            "invert; capture earlier rounds (capture.rounds) where the model does not yet fit those samples"
        )
    write_tensors(out / "reconstructions.safetensors",
                  {"images": torch.cat(all_images), "labels": torch.cat(all_labels).long(),
                   "sources": torch.tensor(sources, dtype=torch.long)},
                  {"checkpoint": str(checkpoint), "method": method})
    summary = _summarise(results)
    report = {"checkpoint": str(checkpoint), "method": method, "settings": asdict(settings), "summary": summary,
              "targets": results, "note": "scores use the evaluation_only ground truth; the attack did not"}
    write_json(out / "metrics.json", report)
    return report


def _cache(out: Path, target: Target, key: str, res: dict[str, Any]) -> None:
    write_tensors(part_path(out, target),
                  {"images": res["images"], "labels": res["labels"].long(), "truth": res["truth"]},
                  {"key": key, "metrics": json.dumps(res["metrics"])})


def _cached(out: Path, target: Target, key: str) -> dict[str, Any] | None:
    """A finished target of an earlier, interrupted run with the same settings."""
    path = part_path(out, target)
    if not path.is_file():
        return None
    meta = read_tensor_metadata(path)
    if meta.get("key") != key:
        return None
    t = read_tensors(path)
    return {"target": target, "images": t["images"], "labels": t["labels"], "truth": t["truth"],
            "metrics": json.loads(meta["metrics"])}


def _summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    def mean(key: str, rows: list[dict[str, Any]]) -> float | None:
        vals = [r[key] for r in rows if r.get(key) is not None]
        return float(sum(vals) / len(vals)) if vals else None

    n_images = sum(len(r["psnr"]) for r in results)
    return {"targets": len(results), "images": n_images, "mean_psnr": mean("mean_psnr", results),
            "mean_ssim": mean("mean_ssim", results), "label_accuracy": mean("label_accuracy", results),
            "mean_trigger_correlation": mean("mean_trigger_correlation", results),
            "seconds_per_image": sum(r["seconds"] for r in results) / max(n_images, 1),
            "uninformative_targets": sum(bool(r.get("uninformative")) for r in results),
            "interrupted": any(r["interrupted"] for r in results)}


def read_reconstructions(path: Path) -> dict[str, torch.Tensor]:
    """Reconstructions written by :func:`run_inversion` (``path`` is the folder or the file)."""
    path = Path(path)
    candidates = [path, path / "reconstructions.safetensors", path.parent / "reconstructions.safetensors"]
    for c in candidates:
        if c.is_file() and c.suffix == ".safetensors":
            return read_tensors(c)
    raise FlsecError(f"--images: no reconstructions.safetensors in or beside {path}; run `flsec invert` first")


__all__ = ["Target", "available_targets", "invert_one", "part_path", "read_reconstructions", "run_inversion",
           "select_targets"]
