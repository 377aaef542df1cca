"""Fault injection for the mock transport: rules that drop, delay, duplicate, corrupt, stall or kill."""

from __future__ import annotations

import enum
import random
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["FaultAction", "FaultInjector", "FaultRule"]


class FaultAction(enum.Enum):
    """What happens to a matching frame."""

    DROP = "drop"  # the frame vanishes; the sender is not told
    DELAY = "delay"  # the frame arrives ``delay_s`` later (later frames queue behind it)
    DUPLICATE = "duplicate"  # the frame arrives twice
    CORRUPT = "corrupt"  # one payload byte is flipped (the sender's memory is untouched)
    STALL = "stall"  # the link stops for ``delay_s`` (0: until ``MockNetwork.resume``)
    KILL = "kill"  # the sending endpoint dies at this frame: every connection of it breaks


@dataclass
class FaultRule:
    """Fire ``action`` on frames from ``src`` to ``dst`` (``None``: any) after skipping ``after`` matching
    frames, at most ``times`` times (``None``: unlimited), each with ``probability``. ``payload_only``
    restricts it to frames carrying a payload; ``match(header)`` narrows further."""

    action: FaultAction
    src: str | None = None
    dst: str | None = None
    after: int = 0
    times: int | None = 1
    probability: float = 1.0
    payload_only: bool = True
    delay_s: float = 0.0
    match: Callable[[bytes], bool] | None = None
    seen: int = 0
    fired: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability={self.probability!r} must be within 0..1")
        if self.delay_s < 0:
            raise ValueError(f"delay_s={self.delay_s!r} must not be negative")


class FaultInjector:
    """The rules of one :class:`~sage_transport.transports.mock.MockNetwork`; seeded, so runs repeat."""

    def __init__(self, seed: int = 0) -> None:
        self.rules: list[FaultRule] = []
        self._rng = random.Random(seed)

    def add(self, rule: FaultRule) -> FaultRule:
        self.rules.append(rule)
        return rule

    def inject(self, action: FaultAction | str, **options: object) -> FaultRule:
        """Shorthand: ``inject("corrupt", times=2)``."""
        return self.add(FaultRule(FaultAction(action), **options))  # type: ignore[arg-type]

    def clear(self) -> None:
        self.rules.clear()

    def randint(self, upper: int) -> int:
        return self._rng.randrange(upper)

    def decide(self, src: str, dst: str, header: bytes, has_payload: bool) -> list[FaultRule]:
        """Rules that fire for this frame (each counted)."""
        fired: list[FaultRule] = []
        for rule in self.rules:
            if rule.times is not None and rule.fired >= rule.times:
                continue
            if (rule.src is not None and rule.src != src) or (rule.dst is not None and rule.dst != dst):
                continue
            if (rule.payload_only and not has_payload) or (rule.match is not None and not rule.match(header)):
                continue
            rule.seen += 1
            if rule.seen <= rule.after:
                continue
            if rule.probability < 1.0 and self._rng.random() >= rule.probability:
                continue
            rule.fired += 1
            fired.append(rule)
        return fired
