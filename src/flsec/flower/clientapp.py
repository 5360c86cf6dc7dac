"""The ClientApp of ``runtime.engine = "flower"``: one flsec client's round per TRAIN message.

Each message carries a :class:`~flsec.fl.rounds.ClientTask` and the experiment's config; the handler
rebuilds (once per worker process, cached by the config's hash) the same
:class:`~flsec.fl.federation.Federation` the server has, runs :func:`~flsec.fl.rounds.run_client` and
replies with the :class:`~flsec.fl.rounds.ClientReply`. A node may run any client: the client id is in
the task, and its data, attack and random streams follow from the config and the id alone.

The config sent by the server is trusted like a config file, including its ``plugins`` (modules it
imports): this app is for a federation simulated by one party, not for clients that distrust the server.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from torch import nn

from flsec.config import build_config
from flsec.fl.federation import Federation
from flsec.fl.rounds import run_client
from flsec.flower.codec import decode_task, encode_reply
from flsec.runtime import set_threads

app = ClientApp()


@dataclass
class _Worker:
    digest: str
    fed: Federation
    model: nn.Module


_cache: list[_Worker] = []


def worker_for(config_json: str) -> _Worker:
    """The federation and scratch model of ``config_json``, built once per process (the last one is kept)."""
    digest = hashlib.sha256(config_json.encode()).hexdigest()
    if _cache and _cache[0].digest == digest:
        return _cache[0]
    config = build_config(json.loads(config_json))
    set_threads(config.runtime.threads or max(1, int(config.runtime.flower.client_cpus)))
    fed = Federation.from_config(config)
    _cache[:] = [_Worker(digest, fed, fed.new_model())]
    return _cache[0]


@app.train()
def train(msg: Message, context: Context) -> Message:
    del context
    t = time.perf_counter()
    task, config_json = decode_task(msg.content)
    w = worker_for(config_json)
    reply = run_client(w.fed, w.model, task)
    return Message(encode_reply(reply, time.perf_counter() - t), reply_to=msg)
