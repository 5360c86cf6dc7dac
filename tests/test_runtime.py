"""Where a run executes: device and precision resolution, threads, meta.json, CPU tensors on disk,
``--device``, and (with a GPU) CPU/GPU agreement."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from flsec.aggregation import AGGREGATORS
from flsec.cli import _with_device
from flsec.config import RuntimeConfig, load_config
from flsec.errors import ConfigError
from flsec.fl.checkpoint import load_checkpoint
from flsec.fl.engines import train
from flsec.fl.evaluate import backdoor_asr, label_flip_asr, main_accuracy
from flsec.fl.federation import Federation
from flsec.fl.server import Server
from flsec.runtime import Runtime, autocast_dtype, resolve_device
from tests.conftest import small_config

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a CUDA device")


def test_cpu_resolves_and_precisions_map_to_autocast_dtypes() -> None:
    cpu = resolve_device("cpu")
    assert cpu == torch.device("cpu")
    assert autocast_dtype(cpu, "fp32") is None and autocast_dtype(cpu, "bf16") is torch.bfloat16
    with pytest.raises(ConfigError, match=r"^runtime.precision: 'fp16' needs a GPU device; allowed on CPU: fp32, bf16$"):
        autocast_dtype(cpu, "fp16")
    with pytest.raises(ConfigError, match="runtime.device: unknown 'tpu'"):
        resolve_device("tpu")


@no_cuda
def test_missing_cuda_is_a_clear_error_and_auto_falls_back_to_cpu() -> None:
    with pytest.raises(ConfigError, match=r"^runtime.device: 'cuda:0' requested but no CUDA device is available"):
        resolve_device("cuda:0")
    if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        assert resolve_device("auto") == torch.device("cpu")


def test_runtime_from_config_sets_threads_and_validates_precision() -> None:
    before = torch.get_num_threads()
    try:
        rt = Runtime.from_config(RuntimeConfig(device="cpu", threads=1, precision="bf16"))
        assert (rt.threads, torch.get_num_threads(), rt.precision) == (1, 1, "bf16")
        assert rt.describe() == {"device": "cpu", "precision": "bf16", "threads": 1, "memory_format": "contiguous",
                                 "torch": torch.__version__}
        kept = Runtime.from_config(RuntimeConfig(device="cpu"))
        assert kept.threads == 1  # threads = None keeps the current count
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ConfigError, match="runtime.precision: 'fp16' needs a GPU"):
        Runtime.from_config(RuntimeConfig(device="cpu", precision="fp16"))
    with pytest.raises(ConfigError, match=r"runtime.device: unknown device 'gpu'; allowed: auto, cpu, cuda, cuda:N, mps"):
        small_config(runtime={"device": "gpu"})


def test_checking_a_config_leaves_the_thread_count_alone() -> None:
    """``flsec check`` builds the server (which applies ``runtime.threads``) but must not change the process."""
    from flsec.fl.server import describe

    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    d = describe(small_config(runtime={"threads": other}))
    assert d["clients"] > 0
    assert torch.get_num_threads() == before


def test_meta_records_runtime_and_every_tensor_file_is_cpu(trained_run: Path) -> None:
    meta = json.loads((trained_run / "meta.json").read_text())
    assert meta["runtime"] == {"device": "cpu", "precision": "fp32", "threads": torch.get_num_threads(),
                               "memory_format": "contiguous", "torch": torch.__version__, "client_engine": "sequential"}
    files = sorted(rel for rel in meta["files"] if rel.endswith(".safetensors"))
    assert any(rel.startswith("updates/") for rel in files) and any(rel.endswith("model.safetensors") for rel in files)
    for rel in files:
        with safe_open(str(trained_run / rel), framework="pt", device="cpu") as fh:
            assert all(fh.get_tensor(k).device.type == "cpu" for k in fh.keys())  # noqa: SIM118


def test_cached_evaluation_equals_the_metric_functions(trained_run: Path) -> None:
    ckpt = load_checkpoint(trained_run)
    fed = Federation.from_config(ckpt.config)
    model = ckpt.build_model()
    x, y, a = fed.data.x_test, fed.data.y_test, ckpt.config.attack
    got = fed.evaluate(model)
    assert got == {"ma": main_accuracy(model, x, y), "asr": backdoor_asr(model, x, y, fed.trigger, a.target_label)}
    assert got["ma"] == pytest.approx(ckpt.history[-1]["ma"], abs=1e-6)
    assert fed.test_set(torch.device("cpu"))[0] is fed.test_set(torch.device("cpu"))[0]  # moved once
    flip = Federation.from_config(small_config(attack={"kind": "label_flip", "boost": False}))
    assert flip.evaluate(model)["asr"] == label_flip_asr(model, x, y, 7, 0)


def test_round_timings_split_the_round(tmp_path: Path) -> None:
    server = Server(small_config(training={"rounds": 2}), tmp_path / "r")
    from flsec.fl.engines import SequentialClients

    engine = SequentialClients(server.fed)
    for r in server.rounds:
        server.finish_round(r, engine.run(server.begin_round(r)))
    assert len(server.timings) == 2
    for t in server.timings:
        assert set(t) == {"local_training", "attack", "aggregation", "evaluation", "capture_and_save"}
        assert min(t.values()) >= 0 and t["attack"] > 0 and t["local_training"] > t["attack"]


def test_device_option_is_a_runtime_override(tmp_path: Path) -> None:
    assert load_config(None, _with_device(["training.rounds=2"], "cpu")).runtime.device == "cpu"
    assert load_config(None, _with_device(None, None)).runtime.device == "auto"
    if torch.cuda.is_available():
        return
    out = tmp_path / "r"
    proc = subprocess.run([sys.executable, "-m", "flsec.cli", "train", "--out", str(out), "--device", "cuda", "-q"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and not out.exists()
    assert proc.stderr.strip().splitlines() == [
        "error: runtime.device: 'cuda' requested but no CUDA device is available; allowed here: auto, cpu"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("engine", ["sequential", "vectorised"])
def test_cuda_run_agrees_with_cpu_and_loads_on_cpu(tmp_path: Path, engine: str) -> None:
    sections = {"training": {"rounds": 2}, "capture": {"rounds": "all"}}
    cpu = train(small_config(**sections, runtime={"device": "cpu"}), tmp_path / "cpu", progress=False)
    gpu = train(small_config(**sections, runtime={"device": "cuda", "client_engine": engine}), tmp_path / "gpu",
                progress=False)
    assert gpu.meta["runtime"]["device"].startswith("cuda") and gpu.meta["runtime"]["client_engine"] == engine
    w_cpu, w_gpu = cpu.weights(), gpu.weights()
    assert all(v.device.type == "cpu" for v in w_gpu.values())
    for k in w_cpu:
        assert float((w_cpu[k] - w_gpu[k]).norm()) <= 1e-3 * max(float(w_cpu[k].norm()), 1.0), k
    for hc, hg in zip(cpu.history, gpu.history, strict=True):
        assert hg["ma"] == pytest.approx(hc["ma"], abs=0.02) and hg["asr"] == pytest.approx(hc["asr"], abs=0.05)
    sent, _ = gpu.capture(1, 0)
    ref, _ = cpu.capture(1, 0)
    assert sent["gradient_b1"].device.type == "cpu"
    assert torch.allclose(sent["gradient_b1"], ref["gradient_b1"], rtol=1e-3, atol=1e-5)
    model = gpu.build_model()  # a GPU run loads on a CPU-only machine
    assert next(model.parameters()).device.type == "cpu"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rule", AGGREGATORS.names())
def test_every_aggregator_runs_in_a_cuda_round(tmp_path: Path, rule: str) -> None:
    cfg = small_config(training={"rounds": 2, "num_clients": 8}, aggregation={"name": rule},
                       runtime={"device": "cuda"})
    ckpt = train(cfg, tmp_path / rule, progress=False)
    assert len(ckpt.history) == 2 and 0 <= ckpt.history[-1]["ma"] <= 1
