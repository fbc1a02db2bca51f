"""What a dispatcher moves between ranks, counted from the sizes it really used (lesson 02).

Every parallel dispatcher keeps a `Traffic` record of its last forward pass, phase by phase
(e.g. "dispatch", "combine", "counts"): bytes sent, received, and of those sent, how many were
useful, i.e. rows another rank really needed. `lab.dispatcher_costs.measure_traffic` reads it for the lessons.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PhaseBytes:
    """Bytes one rank sent to and received from other ranks in one phase of one forward pass."""

    sent: int = 0
    received: int = 0
    useful: int = 0  # of `sent`: rows another rank really needed (no padding, nothing discarded)


@dataclass
class Traffic:
    """What a dispatcher moved in its last forward pass, counted from the sizes it really used.

    Backward sends the row gradients back through the mirror-image collectives: the combine
    phase's amount again, and the dispatch phase's rows when the input needs a gradient (in the layer's dtype even
    where the dispatch went in FP8, lesson 12); the sizes, counts and expert ids are not exchanged again (lesson 10's
    routing weights are: their gradients go back the way they came)."""

    phases: dict = field(default_factory=dict)  # name -> PhaseBytes

    def add(self, phase: str, sent: int, received: int, useful: int) -> None:
        p = self.phases.setdefault(phase, PhaseBytes())
        p.sent += int(sent)
        p.received += int(received)
        p.useful += int(useful)

    @property
    def sent(self) -> int:
        return sum(p.sent for p in self.phases.values())

    @property
    def useful(self) -> int:
        return sum(p.useful for p in self.phases.values())
