"""Shared fixtures: small digits experiments (no download, seconds on 2 cores)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import settings

from flsec.config import ExperimentConfig, build_config

# Property tests draw the same examples on every run (a CI failure reproduces locally).
settings.register_profile("flsec", derandomize=True, print_blob=True)
settings.load_profile("flsec")

TEST_THREADS = 2
torch.set_num_threads(TEST_THREADS)


@pytest.fixture(autouse=True)
def _same_threads_in_every_test() -> None:
    """Every test starts on the same intra-op thread count.

    The count changes how float sums are split, so a test that compares a run with one it makes itself (a sweep
    cell against ``flsec train``, a meta record against ``torch.get_num_threads()``) needs it fixed; a library
    that resets the OpenMP pool (or a test that forgot to restore it) must not leak into the next test.
    """
    if torch.get_num_threads() != TEST_THREADS:
        torch.set_num_threads(TEST_THREADS)


def small_config(**sections: dict) -> ExperimentConfig:
    base: dict = {
        "seed": 1,
        "data": {"name": "digits", "partition": "iid"},
        "model": {"name": "digits_cnn"},
        "training": {"num_clients": 6, "rounds": 4, "local_epochs": 1, "batch_size": 16, "lr": 0.05},
        "attack": {"kind": "backdoor", "num_malicious": 1, "boost": True, "trigger": {"offset": 0}},
        "capture": {"rounds": "last", "clients": "malicious", "gradient_batch_sizes": [1]},
        # Phase 3 sized for tests: Neural Cleanse and the synthesised carriers in seconds.
        "unlearning": {"reverse_steps": 60, "synthetic": {"per_class": 3, "steps": 40}},
        "runtime": {"device": "cpu"},  # tests run on the CPU even where a GPU exists (the cuda tests ask for it)
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return build_config(base)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small backdoored digits run shared by the read-only tests."""
    from flsec.fl.engines import train

    out = tmp_path_factory.mktemp("runs") / "digits"
    train(small_config(), out, progress=False)
    return out
