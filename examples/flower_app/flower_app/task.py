"""Data and model: scikit-learn's 8x8 digits split into IID partitions, a small CNN, SGD training."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


@lru_cache(maxsize=1)
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): images N x 1 x 8 x 8 in [0, 1], a fixed 80/20 split."""
    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(d.target, dtype=torch.long)
    order = torch.from_numpy(np.random.default_rng(0).permutation(len(y)))
    cut = int(0.8 * len(y))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def partition(partition_id: int, num_partitions: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y, _, _ = digits()
    idx = torch.arange(partition_id, len(y), num_partitions)
    return x[idx], y[idx]


def train(model: nn.Module, loader: object, epochs: int, lr: float) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    total, steps = 0.0, 0
    for _ in range(epochs):
        for xb, yb in loader:  # type: ignore[attr-defined]
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            total, steps = total + float(loss.detach()), steps + 1
    return total / max(steps, 1)


def get_weights(model: nn.Module) -> list[np.ndarray]:
    return [v.detach().cpu().numpy() for v in model.state_dict().values()]


def set_weights(model: nn.Module, weights: list[np.ndarray]) -> None:
    model.load_state_dict({k: torch.from_numpy(np.array(w)) for k, w in zip(model.state_dict(), weights, strict=True)})
