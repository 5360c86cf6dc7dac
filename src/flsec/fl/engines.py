"""Client engines: how the clients of a round are run in this process (a registry).

An engine turns the round's :class:`~flsec.fl.rounds.ClientTask`\\ s into replies. ``sequential``
runs :func:`~flsec.fl.rounds.run_client` one client after another on one scratch model; it is the
reference every other engine must agree with.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from flsec.fl.federation import Federation
from flsec.fl.rounds import ClientReply, ClientTask, run_client
from flsec.registry import Registry


class ClientEngine(Protocol):
    def run(self, tasks: Sequence[ClientTask]) -> list[ClientReply]: ...


CLIENT_ENGINES: Registry[Callable[[Federation], ClientEngine]] = Registry("client engine")


@CLIENT_ENGINES.register("sequential")
class SequentialClients:
    """One client after another, each starting from the global weights on a shared scratch model."""

    def __init__(self, fed: Federation) -> None:
        self.fed = fed
        self.model = fed.new_model()

    def run(self, tasks: Sequence[ClientTask]) -> list[ClientReply]:
        return [run_client(self.fed, self.model, t) for t in tasks]
