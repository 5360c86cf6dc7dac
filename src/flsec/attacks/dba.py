"""Distributed backdoor attack (DBA, Xie et al. 2020, "DBA: Distributed Backdoor Attacks against
Federated Learning", Sec. 3).

The global trigger is split into local parts and every attacker poisons its batches with its own part
only; the federation is then attacked with the assembled global trigger. Following the paper's
evaluation, each round records the ASR of the global trigger (``asr``) and of every local part
(``asr_parts``). Parts are contiguous bands of the trigger's rows, one per attacker unless
``attack.trigger.dba_parts`` says otherwise (the paper's MNIST parts are four 1x4 bars of a 2x2
layout; a 4-row trigger gives four 1-row bars here).
"""

from __future__ import annotations

from flsec.attacks.data_poisoning import BackdoorAttack
from flsec.attacks.registry import ATTACKS


@ATTACKS.register("dba")
class DistributedBackdoor(BackdoorAttack):
    name = "dba"

    def num_parts(self) -> int:
        parts = self.config.attack.trigger.dba_parts
        return parts if parts > 1 else max(1, len(self.malicious))
