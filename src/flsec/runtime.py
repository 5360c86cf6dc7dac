"""Where and how a run executes: device, CPU threads and arithmetic precision.

Changing these never changes *what* is computed, only where and at which float rounding. Results are
bit-reproducible for a fixed device, thread count, precision and client engine; nothing is promised
across CPU and GPU or across thread counts (reductions are summed in a different order).
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from flsec.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("fp32", "bf16", "fp16")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; an explicit device that is not present is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"runtime.device: '{name}' requested but no CUDA device is available; allowed here: auto, cpu")
        device = torch.device(name)
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(f"runtime.device: '{name}' does not exist; allowed here: auto, cpu, cuda, "
                              + ", ".join(f"cuda:{i}" for i in range(count)))
        return device
    if name == "mps":
        if not _mps_available():
            raise ConfigError("runtime.device: 'mps' requested but no MPS device is available; allowed here: auto, cpu")
        return torch.device("mps")
    raise ConfigError(f"runtime.device: unknown '{name}'; allowed: {', '.join(DEVICES)}")


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device`` (None for fp32); fp16 needs a GPU.

    fp16 is used without loss scaling (a skipped step would differ per client and per engine), so
    very small gradients can underflow; bf16 has fp32's exponent range and is the safer choice."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device.type == "cpu":
            raise ConfigError("runtime.precision: 'fp16' needs a GPU device; allowed on CPU: fp32, bf16")
        return torch.float16
    raise ConfigError(f"runtime.precision: unknown '{precision}'; allowed: {', '.join(PRECISIONS)}")


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """``torch.autocast`` for reduced precision; a no-op at fp32."""
    dtype = autocast_dtype(device, precision)
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op thread count (None keeps the current one); returns the count in use."""
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


class _RuntimeFields(Protocol):
    device: str
    threads: int | None
    precision: str
    memory_format: str


@dataclass(frozen=True)
class Runtime:
    """A resolved ``[runtime]`` section: the device tensors live on, the autocast precision of forward
    passes, and the CPU thread count in use."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"
    threads: int = field(default_factory=torch.get_num_threads)
    memory_format: str = "contiguous"

    @classmethod
    def from_config(cls, cfg: _RuntimeFields) -> Runtime:
        """Resolve the device, check the precision is possible on it, and set the thread count.

        On CUDA, cuDNN is told to pick deterministic kernels (and not to auto-tune), so that a run is
        repeatable on the same GPU, driver and library versions.
        """
        device = resolve_device(cfg.device)
        autocast_dtype(device, cfg.precision)
        threads = set_threads(cfg.threads)
        if device.type == "cuda":
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        return cls(device, cfg.precision, threads, cfg.memory_format)

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        return autocast(self.device, self.precision)

    def place(self, model: nn.Module) -> nn.Module:
        """``model`` moved to the device, in the memory format (in place; returned for chaining)."""
        model.to(self.device)
        if self.memory_format == "channels_last":
            model.to(memory_format=torch.channels_last)
        return model

    def describe(self) -> dict[str, Any]:
        """What meta.json records about where a run was computed."""
        info: dict[str, Any] = {"device": str(self.device), "precision": self.precision, "threads": self.threads,
                                "memory_format": self.memory_format, "torch": torch.__version__}
        if self.device.type == "cuda":
            info["device_name"] = torch.cuda.get_device_name(self.device)
            info["cuda"] = torch.version.cuda
            info["cudnn"] = torch.backends.cudnn.version()
        return info


class Stopwatch:
    """Seconds spent per named activity, summed until popped (e.g. ``attack`` time inside a round)."""

    def __init__(self) -> None:
        self.totals: defaultdict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def time(self, key: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.totals[key] += time.perf_counter() - t0

    def pop(self, key: str) -> float:
        return self.totals.pop(key, 0.0)
