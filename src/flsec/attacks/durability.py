"""Durability of a backdoor: how long it survives after the attackers stop (Zhang et al. 2022, Sec. 4,
"lifespan": the rounds after the last attack during which the backdoor accuracy stays above a threshold).

Works on the per-round records of ``history.jsonl`` (fields ``round``, ``asr``, ``attackers``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def last_attack_round(history: Sequence[dict[str, Any]]) -> int | None:
    """The last round in which at least one attacker attacked (None if none did)."""
    rounds = [int(h["round"]) for h in history if h.get("attackers")]
    return max(rounds) if rounds else None


def rounds_since_attack(history: Sequence[dict[str, Any]]) -> int | None:
    """Rounds between the last record and the last attack round (0: attacked in the last record)."""
    last = last_attack_round(history)
    return None if last is None or not history else int(history[-1]["round"]) - last


def durability(history: Sequence[dict[str, Any]], threshold: float = 0.5) -> dict[str, Any]:
    """ASR when the attack stops and after it.

    ``asr_after[i]`` is the ASR i + 1 rounds after the last attack round; ``lifespan`` counts the rounds
    after the stop until the ASR first falls below ``threshold`` (``censored``: it never did before the
    run ended, so the true lifespan is at least that).
    """
    last = last_attack_round(history)
    if last is None:
        return {"last_attack_round": None, "asr_at_stop": None, "asr_after": [], "lifespan": None,
                "censored": False, "threshold": threshold}
    at_stop = next(h["asr"] for h in history if int(h["round"]) == last)
    after = [h["asr"] for h in history if int(h["round"]) > last]
    below = next((i for i, a in enumerate(after) if a is None or not a >= threshold), None)
    lifespan = len(after) if below is None else below
    return {"last_attack_round": last, "asr_at_stop": at_stop, "asr_after": after, "lifespan": lifespan,
            "censored": below is None, "threshold": threshold}
