"""Where and how a run executes: device, CPU threads and arithmetic precision.

Changing these never changes *what* is computed, only where and at which float rounding. Results are
bit-reproducible for a fixed device, thread count and precision; nothing is promised across CPU and GPU
or across thread counts (reductions are summed in a different order).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

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
        return torch.device(name)
    if name == "mps":
        if not _mps_available():
            raise ConfigError("runtime.device: 'mps' requested but no MPS device is available; allowed here: auto, cpu")
        return torch.device("mps")
    raise ConfigError(f"runtime.device: unknown '{name}'; allowed: {', '.join(DEVICES)}")


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device`` (None for fp32); fp16 needs a GPU."""
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
