"""Phase 3 hardening: what `flsec unlearn` accepts as reconstructions, what it refuses to write,
and what it says the defender held."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flsec.data import load_dataset
from flsec.errors import FlsecError
from flsec.inversion.images import save_png
from flsec.inversion.reconstructions import read_reconstructions
from flsec.io import write_bytes, write_json, write_tensors
from flsec.unlearning import run as unlearning_run
from flsec.unlearning.finetune import FinetuneSettings

SHAPE = (1, 8, 8)


def _strict(path: Path) -> dict:
    def refuse(token: str) -> float:
        raise AssertionError(f"non-standard JSON token {token} in {path}")

    return json.loads(path.read_text(), parse_constant=refuse)


def _digits(n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    d = load_dataset("digits")
    return d.x_test[:n].clone(), d.y_test[:n].clone()


def _unlearn_cli(run: Path, images: Path, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flsec.cli", "unlearn", "--checkpoint", str(run), "--images",
                           str(images), "--out", str(out), "--steps", "5", "--no-baselines", "-q"],
                          capture_output=True, text=True)


def test_nan_reconstructions_are_refused_with_one_line(trained_run: Path, tmp_path: Path) -> None:
    """Old behaviour: a NaN-weight "repaired" checkpoint was written and the command exited 0."""
    x, y = _digits()
    x[2, 0, 3, 3] = float("nan")
    write_tensors(tmp_path / "inv" / "reconstructions.safetensors", {"images": x, "labels": y})
    proc = _unlearn_cli(trained_run, tmp_path / "inv", tmp_path / "out")
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "NaN" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("tensors", "needle"), [
    ({"images": torch.rand(4, 1, 8, 8)}, "lacks the 'images' and 'labels'"),
    ({"images": torch.rand(4, 8, 8), "labels": torch.zeros(4, dtype=torch.long)}, "N x C x H x W"),
    ({"images": torch.rand(4, 1, 8, 8), "labels": torch.zeros(4)}, "'labels' must be 4 integers"),
    ({"images": torch.rand(4, 1, 8, 8), "labels": torch.zeros(3, dtype=torch.long)}, "'labels' must be 4 integers"),
    ({"images": torch.rand(4, 1, 8, 8), "labels": torch.full((4,), 10, dtype=torch.long)}, "labels must be in 0..9"),
    ({"images": torch.rand(4, 1, 8, 8) * 3, "labels": torch.zeros(4, dtype=torch.long)}, "must lie in [0, 1]"),
    ({"images": torch.rand(4, 3, 8, 8), "labels": torch.zeros(4, dtype=torch.long)}, "they come from another run"),
    ({"images": torch.full((4, 1, 8, 8), float("inf")), "labels": torch.zeros(4, dtype=torch.long)}, "NaN or Inf"),
])
def test_malformed_reconstructions_give_one_clear_error(tmp_path: Path, tensors: dict, needle: str) -> None:
    write_tensors(tmp_path / "reconstructions.safetensors", tensors)
    with pytest.raises(FlsecError) as err:
        read_reconstructions(tmp_path, SHAPE, 10)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_garbage_reconstructions_file_gives_one_line_exit_2(trained_run: Path, tmp_path: Path) -> None:
    write_bytes(tmp_path / "inv" / "reconstructions.safetensors", b"\x80\x04 not safetensors")
    proc = _unlearn_cli(trained_run, tmp_path / "inv", tmp_path / "out")
    assert proc.returncode == 2 and "--images:" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_a_folder_of_pngs_is_read_with_labels_from_metrics(tmp_path: Path) -> None:
    """`--images reconstructed_images/` reads the PNGs (a user may have deleted some), labels from
    the metrics.json `flsec invert` wrote beside them."""
    x, _ = _digits(3)
    folder = tmp_path / "inv" / "reconstructed_images"
    for i in range(3):
        save_png(folder / f"r4_c0_update_{i}.png", x[i])
    save_png(folder / "r4_c0_update_grid.png", x[0])  # grids are skipped
    write_json(tmp_path / "inv" / "metrics.json",
               {"targets": [{"round": 4, "client": 0, "kind": "update", "candidate_labels": [7, 0, 3]}]})
    (folder / "r4_c0_update_1.png").unlink()  # the user dropped one image
    rec = read_reconstructions(folder, SHAPE, 10)
    assert rec["labels"].tolist() == [7, 3] and rec["sources"].tolist() == [[4, 0, 0], [4, 0, 2]]
    assert torch.allclose(rec["images"], x[[0, 2]], atol=0.5 / 255 + 1e-6)  # 8-bit PNGs

    save_png(tmp_path / "own" / "mine_label5.png", x[1])  # a file-name rule, no metrics.json needed
    assert read_reconstructions(tmp_path / "own", SHAPE, 10)["labels"].tolist() == [5]
    save_png(tmp_path / "own" / "unnamed.png", x[1])
    with pytest.raises(FlsecError, match="no label for .*unnamed.png"):
        read_reconstructions(tmp_path / "own", SHAPE, 10)


def test_nan_weights_after_unlearning_are_not_written(trained_run: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.test_unlearning import _reconstructions

    _reconstructions(tmp_path / "inv")

    def diverge(model, images, estimate, s, labels=None):  # type: ignore[no-untyped-def]
        import copy

        broken = copy.deepcopy(model)
        with torch.no_grad():
            next(broken.parameters()).fill_(float("nan"))
        return broken

    monkeypatch.setattr(unlearning_run, "corrective_unlearning", diverge)
    with pytest.raises(FlsecError, match="NaN/Inf"):
        unlearning_run.run_unlearning(trained_run, tmp_path / "inv", tmp_path / "out",
                                      FinetuneSettings(steps=2, progress=False), baselines=False, progress=False)
    assert not (tmp_path / "out" / "checkpoint").exists() and not (tmp_path / "out" / "metrics.json").exists()


def test_no_trigger_found_gives_null_iou_with_status_and_defender_holdings(trained_run: Path, tmp_path: Path) -> None:
    x, y = _digits(12)
    sources = torch.tensor([[1, 3, i] for i in range(8)] + [[2, 4, i] for i in range(4)])
    write_tensors(tmp_path / "inv" / "reconstructions.safetensors", {"images": x, "labels": y, "sources": sources})
    write_json(tmp_path / "inv" / "metrics.json", {"targets": [
        {"round": 1, "client": 3, "kind": "update", "status": "ok", "num_samples": 300, "surrogate": True},
        {"round": 2, "client": 4, "kind": "update", "status": "ok", "num_samples": 4, "surrogate": False}]})
    res = unlearning_run.run_unlearning(trained_run, tmp_path / "inv", tmp_path / "out",
                                        FinetuneSettings(steps=2, progress=False), baselines=False, progress=False,
                                        trigger_source="verification")
    saved = _strict(tmp_path / "out" / "metrics.json")
    v = saved["verification"]
    assert not res["unlearned"] and v["mask_iou_with_true_trigger"] is None and v["mask_iou_status"] != "ok"
    held = saved["defender_holdings"]
    assert held["reconstructions"] == 12 and held["clean_images"] == 0 and held["estimated_trigger"] is None
    assert [(c["round"], c["client"], c["reconstructions"], c["images_in_update"]) for c in held["captures"]] == [
        (1, 3, 8, 300), (2, 4, 4, 4)]


def nc_anomaly_index(l1: list[float]) -> list[float]:
    """Neural Cleanse's mad_outlier_detection.py: consistency constant 1.4826, deviation over MAD."""
    import numpy as np

    arr = np.asarray(l1)
    median = np.median(arr)
    mad = 1.4826 * np.median(np.abs(arr - median))
    return list(np.abs(arr - median) / mad)


def test_anomaly_index_matches_neural_cleanse() -> None:
    from flsec.unlearning.reverse import anomaly_indices

    rng = torch.Generator().manual_seed(0)
    for _ in range(5):
        l1 = (torch.rand(10, generator=rng) * 50 + 5).tolist()
        assert anomaly_indices(__import__("numpy").asarray(l1)).tolist() == pytest.approx(nc_anomaly_index(l1))


class _Planted(torch.nn.Module):
    """A linear classifier on 8x8 images with a planted backdoor: a 2x2 white patch at the
    bottom-right sends any image to class 0."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.w = torch.nn.Parameter(torch.randn(10, 64, generator=g), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = 4 * x.flatten(1) @ self.w.T
        patch = x[:, 0, 6:8, 6:8].flatten(1).sum(dim=1)
        return logits + torch.nn.functional.one_hot(torch.zeros(len(x), dtype=torch.long), 10) * 200 * (patch - 3.2)[:, None]


def test_neural_cleanse_finds_the_planted_trigger() -> None:
    from flsec.unlearning.reverse import ReverseSettings, neural_cleanse
    from flsec.unlearning.verify import mask_iou

    model = _Planted()
    g = torch.Generator().manual_seed(2)
    protos = 0.5 + 0.25 * model.w.detach().repeat_interleave(6, dim=0)  # 6 clear carriers per class
    carriers = (protos + 0.05 * torch.randn(protos.shape, generator=g)).clamp(0, 1).view(-1, 1, 8, 8)
    carriers[:, :, 6:8, 6:8] = 0.0
    res = neural_cleanse(model, carriers, 10, ReverseSettings(steps=120))
    true = torch.zeros(1, 8, 8, dtype=torch.bool)
    true[0, 6:8, 6:8] = True
    assert res.target == 0 and res.report["anomaly_index"][0] > 2
    assert res.estimate is not None and mask_iou(res.estimate.mask, true) >= 0.5
