"""``runtime.engine = "flower"``: an flsec run as a Flower ServerApp + ClientApp on the simulation engine.

The ServerApp drives flsec's :class:`~flsec.fl.server.Server` (``begin_round`` -> one TRAIN message per
selected client -> ``finish_round`` with the decoded replies), the ClientApp
(:mod:`flsec.flower.clientapp`) calls :func:`~flsec.fl.rounds.run_client`. Selection, seeds, aggregation
in client-id order, evaluation, captures and the run directory are therefore those of the in-process
engine; only where the clients run changes. Client ``c`` is sent to the ``c mod num_supernodes``-th node
(in node-id order).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, MessageType
from flwr.serverapp import Grid, ServerApp
from tqdm.auto import tqdm

from flsec.config import ExperimentConfig
from flsec.errors import FlsecError
from flsec.fl.checkpoint import Checkpoint
from flsec.fl.rounds import ClientReply, ClientTask
from flsec.fl.server import RoundCallback, Server, fmt_rate
from flsec.flower.clientapp import app as client_app
from flsec.flower.codec import decode_reply, encode_task, global_record, reply_seconds


class FlowerRunError(FlsecError):
    """A ClientApp failed or did not answer in time."""


@dataclass
class FlowerStats:
    """Wall-clock of a Flower run, from the call: ``first_round_end_s`` (Ray, its actors and their
    federations are up once round 1 is back), each round's seconds (``round_s``, messages out to commit),
    the summed seconds the round's ClientApps spent on their work (``client_s``) and ``total_s``."""

    first_round_end_s: float = 0.0
    round_s: list[float] = field(default_factory=list)
    client_s: list[float] = field(default_factory=list)
    total_s: float = 0.0


def client_config_json(config: ExperimentConfig) -> str:
    """The config as the ClientApps receive it: ``data.data_dir`` made absolute (Ray workers may run
    elsewhere than this process's working directory); nothing that changes what is computed."""
    cfg = config.model_copy(deep=True)
    if cfg.data.data_dir is not None:
        cfg.data.data_dir = str(Path(cfg.data.data_dir).expanduser().resolve())
    return cfg.model_dump_json()


def backend_config(config: ExperimentConfig) -> dict[str, Any]:
    """Flower's ``backend_config`` for the Ray backend: resources per ClientApp and ``ray.init`` arguments."""
    fl = config.runtime.flower
    init_args: dict[str, Any] = {"logging_level": "ERROR", "log_to_driver": True}
    if fl.ray_address is not None:
        init_args["address"] = fl.ray_address
    if fl.ray_num_cpus is not None:
        init_args["num_cpus"] = fl.ray_num_cpus
    return {"client_resources": {"num_cpus": fl.client_cpus, "num_gpus": fl.client_gpus}, "init_args": init_args}


def collect_replies(round_: int, tasks: Sequence[ClientTask], replies: Sequence[Message],
                    timeout: float) -> list[ClientReply]:
    """Decode a round's replies; a failed or missing client stops the run with a one-line error."""
    out: list[ClientReply] = []
    for msg in replies:
        if msg.has_error():
            raise FlowerRunError(f"flower: a ClientApp failed in round {round_}: {msg.error.reason}")
        out.append(decode_reply(msg.content))
    missing = sorted({t.client for t in tasks} - {rep.client for rep in out})
    if missing:
        raise FlowerRunError(f"runtime.flower.round_timeout: no reply from clients {missing} in round {round_} "
                             f"within {timeout:g} s; raise it or check the Ray workers")
    return out


class FlowerDriver:
    """The ServerApp's main loop around an flsec :class:`Server`."""

    def __init__(self, server: Server, progress: bool = True, on_round_end: RoundCallback | None = None) -> None:
        self.server = server
        self.progress = progress
        self.on_round_end = on_round_end
        self.config_json = client_config_json(server.config)
        self.stats = FlowerStats()
        self._t0 = time.perf_counter()
        self.app = ServerApp()
        self.app.main()(self.main)

    def num_supernodes(self) -> int:
        fl = self.server.config.runtime.flower
        return fl.num_supernodes or self.server.config.training.num_clients

    def wait_for_nodes(self, grid: Grid, timeout: float = 600.0) -> list[int]:
        want, deadline = self.num_supernodes(), time.monotonic() + timeout
        while True:
            nodes = sorted(grid.get_node_ids())
            if len(nodes) >= want:
                return nodes[:want]
            if time.monotonic() > deadline:
                raise FlowerRunError(f"runtime.flower.num_supernodes: {len(nodes)} of {want} nodes connected")
            time.sleep(0.1)

    def main(self, grid: Grid, context: Context) -> None:
        del context
        nodes = self.wait_for_nodes(grid)
        server, cfg = self.server, self.server.config
        timeout = cfg.runtime.flower.round_timeout
        bar = tqdm(server.rounds, initial=server.start_round - 1, total=cfg.training.rounds,
                   desc=f"train {cfg.aggregation.name} (flower)", disable=not self.progress, unit="round",
                   dynamic_ncols=True)
        for r in bar:
            t = time.perf_counter()
            tasks = server.begin_round(r)
            weights = global_record(tasks[0].global_weights)
            messages = [Message(encode_task(task, weights, self.config_json), dst_node_id=nodes[task.client % len(nodes)],
                                message_type=MessageType.TRAIN, group_id=str(r)) for task in tasks]
            answers = list(grid.send_and_receive(messages, timeout=timeout))
            replies = collect_replies(r, tasks, answers, timeout)
            record = server.finish_round(r, replies)
            self.stats.round_s.append(time.perf_counter() - t)
            self.stats.client_s.append(sum(reply_seconds(m.content) for m in answers))
            if not self.stats.first_round_end_s:
                self.stats.first_round_end_s = time.perf_counter() - self._t0
            bar.set_postfix(ma=f"{record['ma']:.3f}", asr=fmt_rate(record["asr"]))
            if self.on_round_end is not None:
                self.on_round_end(r, record)
        bar.close()


def run_flower(server: Server, progress: bool = True, on_round_end: RoundCallback | None = None,
               verbose: bool = False) -> FlowerStats:
    """Run the server's remaining rounds on Flower's simulation engine; returns the wall-clock split."""
    from flwr.simulation import run_simulation

    driver = FlowerDriver(server, progress, on_round_end)
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    if not verbose:
        flwr_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"ray\..*")  # accelerator env-var notice
            run_simulation(server_app=driver.app, client_app=client_app, num_supernodes=driver.num_supernodes(),
                           backend_config=backend_config(server.config), verbose_logging=verbose)
    except RuntimeError as exc:
        cause = exc.__cause__
        if isinstance(cause, FlsecError):
            raise cause from None
        raise
    finally:
        flwr_logger.setLevel(level)
    driver.stats.total_s = time.perf_counter() - driver._t0
    if len(driver.stats.round_s) != len(server.rounds):
        raise FlowerRunError(f"flower: the simulation stopped after {len(driver.stats.round_s)} of "
                             f"{len(server.rounds)} rounds")
    return driver.stats


def train_on_flower(config: ExperimentConfig, out: Path, resume: bool = False, progress: bool = True,
                    on_round_end: RoundCallback | None = None) -> Checkpoint:
    """:func:`flsec.fl.engines.train` with the clients on Flower's simulation engine (same run directory)."""
    server = Server(config, Path(out), resume)
    if server.finished is not None:
        return server.finished
    run_flower(server, progress, on_round_end)
    return server.checkpoint()
