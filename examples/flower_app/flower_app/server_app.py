"""ServerApp: Flower's strategy loop with an flsec aggregation rule, central MA / ASR evaluation."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from flower_app.task import Net, digits
from flsec.attacks.backdoor import make_trigger
from flsec.config import TriggerConfig
from flsec.fl.evaluate import backdoor_asr, main_accuracy
from flsec.flower import RobustStrategy

app = ServerApp()


def needed_nodes(aggregator: str, f: int) -> int:
    """The fewest clients per round the rule accepts (Krum: 2f + 3; median, trimmed mean: 2f + 1)."""
    return {"krum": 2 * f + 3, "multi_krum": 2 * f + 3, "median": 2 * f + 1, "trimmed_mean": 2 * f + 1}.get(aggregator, 2)


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    aggregator, f = str(cfg["aggregator"]), int(cfg["f"])
    need = needed_nodes(aggregator, f)
    deadline = time.monotonic() + 120
    while len(list(grid.get_node_ids())) < need:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{aggregator} with f={f} needs {need} SuperNodes, {len(list(grid.get_node_ids()))} "
                               f"connected; in simulation: flwr run . --federation-config \"num-supernodes={need + 2}\"")
        time.sleep(0.5)

    _, _, x_test, y_test = digits()
    trigger = make_trigger(TriggerConfig(offset=0), 8, 8)
    model = Net()
    history: list[dict[str, float]] = []

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        m = {"ma": main_accuracy(model, x_test, y_test),
             "asr": backdoor_asr(model, x_test, y_test, trigger, int(cfg["target-label"]))}
        if server_round > 0:
            history.append({"round": server_round, **m})
        return MetricRecord(m)

    torch.manual_seed(int(cfg["seed"]))
    strategy = RobustStrategy(aggregator, f=f, fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=need,
                              min_available_nodes=need)
    result = strategy.start(grid, ArrayRecord(Net().state_dict()), num_rounds=int(cfg["num-server-rounds"]),
                            train_config=ConfigRecord(), evaluate_fn=evaluate)
    del result
    if str(cfg["result-path"]):
        out = Path(str(cfg["result-path"]))
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"aggregator": aggregator, "rounds": history,
                                   "last_weights": {str(k): v for k, v in strategy.last_weights.items()}}, indent=1))
        tmp.replace(out)
