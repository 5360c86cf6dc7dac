"""A federated-averaging loop written the way most FL research code is (FL-Defender's included).

Per peer and round: a deep copy of the global model, a ``DataLoader`` over a ``Dataset`` whose
``__getitem__`` converts and normalises one image at a time (``ToTensor`` + ``Normalize``), a fresh SGD
optimiser, local epochs; the server averages the peers' ``state_dict``\\ s weighted by sample count and
evaluates the global model on the test set through the same per-image pipeline. This is the baseline of
``benchmarks/throughput.py`` (written from that description; no code of any project is copied).

The model is flsec's McMahan et al. CNN with its built-in normalisation set to the identity, since
here the transform normalises: the network and its FLOPs are the same as in flsec.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from flsec.models import InputSpec, build_model


class PerImageDataset(Dataset):
    """uint8 images kept as numpy; each item is converted to [0, 1] and standardised on access."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean: float, std: float) -> None:
        self.images, self.labels, self.mean, self.std = images, labels, mean, std

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = torch.from_numpy(self.images[i]).float().div(255.0).unsqueeze(0)  # ToTensor
        return (x - self.mean) / self.std, int(self.labels[i])  # Normalize


@dataclass(frozen=True)
class LoopSetting:
    epochs: int = 3
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9


def make_model(height: int, width: int, num_classes: int, seed: int) -> nn.Module:
    return build_model("mnist_cnn", InputSpec(1, height, width, num_classes, (0.0,), (1.0,)), seed)


def peer_update(global_model: nn.Module, dataset: Dataset, setting: LoopSetting, seed: int) -> dict[str, torch.Tensor]:
    model = copy.deepcopy(global_model)
    model.train()
    loader = DataLoader(dataset, batch_size=setting.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.SGD(model.parameters(), lr=setting.lr, momentum=setting.momentum)
    for _ in range(setting.epochs):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return copy.deepcopy(model.state_dict())


def average_state_dicts(states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    total = float(sum(weights))
    avg = copy.deepcopy(states[0])
    for key in avg:
        avg[key] = sum(s[key] * (w / total) for s, w in zip(states, weights, strict=True))
    return avg


@torch.no_grad()
def test_accuracy(model: nn.Module, dataset: Dataset) -> float:
    model.eval()
    correct = 0
    for x, y in DataLoader(dataset, batch_size=1000):
        correct += int((model(x).argmax(1) == y).sum())
    return correct / len(dataset)  # type: ignore[arg-type]


def run_round(global_model: nn.Module, peers: Sequence[Dataset], test: Dataset, setting: LoopSetting,
              round_: int) -> tuple[float, float]:
    """One round (every peer trains, state_dict averaging, test accuracy); returns (seconds, accuracy)."""
    t0 = time.perf_counter()
    states = [peer_update(global_model, ds, setting, seed=1000 * round_ + i) for i, ds in enumerate(peers)]
    global_model.load_state_dict(average_state_dicts(states, [len(ds) for ds in peers]))  # type: ignore[arg-type]
    acc = test_accuracy(global_model, test)
    return time.perf_counter() - t0, acc
