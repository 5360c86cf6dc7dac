"""Fault injection for crash-consistency tests: signal the process at a named point.

``FLSEC_FAULT=<point>[:<n>[:<signal>]]`` makes the process send itself ``signal`` (default
``KILL``) the ``n``-th time (default 1, counted in this process) it reaches
:func:`fault_point` ``(<point>)``. With ``KILL`` nothing is flushed and no handler runs, exactly
like ``kill -9`` or a power cut after the last completed write; ``INT`` is a Ctrl-C at that point.
Unset (the normal case) a fault point costs one dictionary lookup.

Points: ``atomic:before_rename`` (a file fully written under its temporary name), ``capture``
(after each captured tensor file), ``round:before_commit``, ``commit:state``, ``commit:model``,
``commit:history`` (a round's files written, manifest not yet), ``commit:meta`` (just committed),
``commit:aliases``, ``invert:capture`` (after each finished inversion capture is cached).
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "FLSEC_FAULT"
_hits: Counter[str] = Counter()


def parse(spec: str, name: str) -> tuple[int, str] | None:
    """(n, signal name) when ``spec`` targets point ``name``, else None."""
    if spec == name:
        return 1, "KILL"
    if not spec.startswith(name + ":"):
        return None
    nth, _, sig = spec[len(name) + 1:].partition(":")
    if not nth.isdigit():
        return None
    return int(nth), sig or "KILL"


def fault_point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    target = parse(spec, name)
    if target is None:
        return
    _hits[name] += 1
    if _hits[name] == target[0]:
        if target[1] == "INT":  # Ctrl-C exactly here (a signal would be handled at some later bytecode)
            raise KeyboardInterrupt
        os.kill(os.getpid(), getattr(signal, f"SIG{target[1]}"))
