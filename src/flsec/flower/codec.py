"""flsec's round contract as Flower messages: a :class:`ClientTask` out, a :class:`ClientReply` back.

Tensors travel in ArrayRecords (exact: the bytes of the float32/int64/uint8 arrays), scalars in a
ConfigRecord / MetricRecord, the experiment config as its JSON dump (the ClientApp rebuilds the same
:class:`~flsec.fl.federation.Federation` from it).
"""

from __future__ import annotations

import json

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from flsec.fl.rounds import CaptureRecord, ClientReply, ClientTask

GLOBAL, TASK, UPDATE, METRICS, SENT, TRUTH, META = (
    "flsec.global", "flsec.task", "flsec.update", "metrics", "flsec.capture.sent", "flsec.capture.truth",
    "flsec.capture.meta")
KNOWLEDGE = "flsec.knowledge"  # ClientTask.knowledge: what the server tells an attacking client


def _arrays(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v.detach().cpu().numpy())) for k, v in tensors.items()})


def _tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(a.numpy(), copy=True)) for k, a in record.items()}


def global_record(weights: torch.Tensor) -> ArrayRecord:
    """The round's global weights (one flat vector), shared by every message of the round."""
    return _arrays({"flat": weights})


def encode_task(task: ClientTask, weights: ArrayRecord, config_json: str) -> RecordDict:
    content = RecordDict({
        GLOBAL: weights,
        TASK: ConfigRecord({"client": task.client, "round": task.round, "num-selected": task.num_selected,
                            "attackers-in-round": task.attackers_in_round, "capture": task.capture,
                            "config": config_json}),
    })
    if task.knowledge:
        content[KNOWLEDGE] = _arrays(dict(task.knowledge))
    return content


def decode_task(content: RecordDict) -> tuple[ClientTask, str]:
    t = content.config_records[TASK]
    weights = _tensors(content.array_records[GLOBAL])["flat"]
    knowledge = _tensors(content.array_records[KNOWLEDGE]) if KNOWLEDGE in content.array_records else {}
    task = ClientTask(int(t["client"]), int(t["round"]), weights, int(t["num-selected"]),
                      int(t["attackers-in-round"]), capture=bool(t["capture"]), knowledge=knowledge)
    return task, str(t["config"])


def encode_reply(reply: ClientReply, seconds: float = 0.0) -> RecordDict:
    """``seconds``: how long the client's work took in the worker (for the engine's timing split only)."""
    content = RecordDict({
        UPDATE: _arrays({"flat": reply.update}),
        METRICS: MetricRecord({"client": reply.client, "num-examples": reply.num_samples, "loss": float(reply.loss),
                               "steps": reply.steps, "seconds": float(seconds)}),
    })
    if reply.capture is not None:
        content[SENT] = _arrays(reply.capture.sent)
        content[TRUTH] = _arrays(reply.capture.truth)
        content[META] = ConfigRecord({"json": json.dumps(reply.capture.meta)})
    return content


def reply_seconds(content: RecordDict) -> float:
    return float(content.metric_records[METRICS].get("seconds", 0.0))


def decode_reply(content: RecordDict) -> ClientReply:
    m = content.metric_records[METRICS]
    capture = None
    if META in content.config_records:
        capture = CaptureRecord(_tensors(content.array_records[SENT]), _tensors(content.array_records[TRUTH]),
                                json.loads(str(content.config_records[META]["json"])))
    return ClientReply(int(m["client"]), _tensors(content.array_records[UPDATE])["flat"], int(m["num-examples"]),
                       float(m["loss"]), int(m["steps"]), capture)
