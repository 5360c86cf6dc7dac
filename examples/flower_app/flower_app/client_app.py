"""ClientApp: a plain NumPyClient; flsec.flower.attacker makes the first num-malicious SuperNodes attack."""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Context, Message
from flwr.client import NumPyClient
from flwr.clientapp import ClientApp
from torch.utils.data import DataLoader, TensorDataset

from flower_app.task import Net, get_weights, partition, set_weights
from flower_app.task import train as train_model
from flsec.flower import attacker, client_train


class DigitsClient(NumPyClient):
    """A standard NumPyClient; ``trainloader`` is the attribute flsec's attacker wraps."""

    def __init__(self, partition_id: int, num_partitions: int, config: dict[str, Any]) -> None:
        x, y = partition(partition_id, num_partitions)
        self.trainloader = DataLoader(TensorDataset(x, y), batch_size=int(config["batch-size"]), shuffle=True)
        self.config = config
        self.model = Net()

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        set_weights(self.model, parameters)
        loss = train_model(self.model, self.trainloader, int(self.config["local-epochs"]), float(self.config["lr"]))
        return get_weights(self.model), len(self.trainloader.dataset), {"train-loss": loss}


def client_fn(context: Context) -> NumPyClient:
    return DigitsClient(int(context.node_config["partition-id"]), int(context.node_config["num-partitions"]),
                        dict(context.run_config))


def attack_config(run_config: dict[str, Any]) -> dict[str, Any]:
    """flsec's [attack] section from the run config."""
    kind = str(run_config["attack-kind"])
    return {"kind": kind, "num_malicious": int(run_config["num-malicious"]) if kind != "none" else 0,
            "boost": bool(run_config["boost"]), "poison_fraction": float(run_config["poison-fraction"]),
            "target_label": int(run_config["target-label"]), "trigger": {"offset": 0}}


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    wrapped = attacker(client_fn, attack=attack_config(dict(context.run_config)), seed=int(context.run_config["seed"]))
    return client_train(wrapped)(msg, context)
