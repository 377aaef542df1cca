"""Fan-in priority: a receiver fed by several senders ranks their chunks across senders, not only within each.

A sender's scheduler already sends its own decode-critical chunks before its bulk ones, but it cannot see the
other senders of the same receiver, whose bulk migrations share the receiver's link. So the receiver decides:
while a decode-critical transfer comes in from one peer, every other peer is told to hold its bulk class
(:class:`~sage_transport.wire.Hold`, bit ``Priority.BULK``); when no decode-critical transfer comes in any more,
the holds are released. A held sender keeps its chunks in flight, starts no new bulk chunk, and goes on with
decode-critical and normal ones. That is a credit of zero or unlimited per sender and class, granted by the
receiver: the simplest grant that lets the critical transfer have the link (``fan_in_priority=false`` turns it
off). A session that ends takes its transfers out of the count; holds never outlive the receiver's sessions. A
held transfer's own ``deadline_s`` keeps running. What a hold cannot recall is what a held sender had already
handed its transport (bench/README.md, "Fan-in priority": the bulk senders' unsent socket bytes).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from typing import TYPE_CHECKING

from .plan import Priority
from .wire import Hold

if TYPE_CHECKING:
    from .session import PeerSession

__all__ = ["BULK_HELD", "FanInArbiter"]

#: the classes held at the other senders while a decode-critical transfer comes in
BULK_HELD = 1 << Priority.BULK


class FanInArbiter:
    """Counts the decode-critical transfers coming in per session and tells the others to hold bulk meanwhile."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.holds_sent = 0  # Hold messages posted (both holds and releases)
        self._critical: collections.Counter[PeerSession] = collections.Counter()

    def opened(self, session: PeerSession, priority: int, sessions: Iterable[PeerSession]) -> None:
        if priority == Priority.DECODE_CRITICAL:
            self._critical[session] += 1
            self.refresh(sessions)

    def closed(self, session: PeerSession, priority: int, sessions: Iterable[PeerSession]) -> None:
        if priority == Priority.DECODE_CRITICAL and self._critical[session] > 0:
            self._critical[session] -= 1
            if not self._critical[session]:
                del self._critical[session]
            self.refresh(sessions)

    def refresh(self, sessions: Iterable[PeerSession]) -> None:
        """Post each session the holds it should have now (only where they change)."""
        critical = set(self._critical) if self.enabled else set()
        for session in sessions:
            wanted = BULK_HELD if critical - {session} else 0
            if session.hold_sent != wanted and not session.closed:
                session.hold_sent = wanted
                session.post(Hold(wanted))
                self.holds_sent += 1
