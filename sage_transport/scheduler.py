"""The scheduler: which chunk goes next, as a synchronous state machine with no I/O.

Per peer, transfers wait in three priority classes (decode-critical > normal > bulk), first come first
served within a class. A transfer offers resends first, then its next eligible chunk: in a progressive
transfer only chunks of layers marked ready are eligible, the lowest ready layer first. A chunk is
*in flight* from :meth:`Scheduler.next_for` until :meth:`ack` (or a resend request); each peer may have
``window`` chunks in flight and the whole scheduler ``max_inflight``. A transfer whose chunks are smaller on the
wire than stored (quantised) is added with ``cost`` < 1: each of its chunks takes that share of a window slot,
so the window keeps the same bytes on the wire in flight (and a decode-critical chunk waits behind no more of
them). The async channel asks, sends, and reports back; tests drive this class directly.
"""

from __future__ import annotations

import collections
import enum
import heapq
from collections.abc import Hashable, Sequence

import msgspec

from .plan import Priority

__all__ = ["AckOutcome", "Scheduler", "SchedulerStatistics"]


class AckOutcome(enum.Enum):
    ACCEPTED = "accepted"  # first acknowledgement of an in-flight chunk
    COMPLETE = "complete"  # ... and it was the transfer's last one
    DUPLICATE = "duplicate"  # already acknowledged, or for an unknown transfer: ignore


class SchedulerStatistics(msgspec.Struct, frozen=True):
    transfers: int
    inflight: int
    inflight_by_peer: dict[str, int]
    queued_chunks: int


class _Entry:
    __slots__ = (
        "acked",
        "acked_count",
        "cost",
        "cursor",
        "inflight",
        "key",
        "layer_cursor",
        "layer_ranges",
        "num_chunks",
        "peer",
        "priority",
        "ready_heap",
        "ready_layers",
        "resend",
    )  # fmt: skip

    def __init__(
        self, key: Hashable, peer: str, priority: Priority, num_chunks: int, layer_ranges: Sequence[tuple[int, int]] | None
    ) -> None:
        self.key = key
        self.peer = peer
        self.priority = priority
        self.num_chunks = num_chunks
        self.cursor = 0
        self.layer_ranges = layer_ranges
        self.layer_cursor: list[int] | None = [start for start, _ in layer_ranges] if layer_ranges is not None else None
        self.ready_heap: list[int] = []
        self.ready_layers: set[int] = set()
        self.resend: collections.deque[int] = collections.deque()
        self.acked = bytearray(num_chunks)
        self.acked_count = 0
        self.inflight: set[int] = set()
        self.cost = _UNIT  # window units one chunk in flight takes

    def take(self) -> int | None:
        while self.resend:
            seq = self.resend.popleft()
            if not self.acked[seq] and seq not in self.inflight:
                return seq
        if self.layer_ranges is None:
            if self.cursor < self.num_chunks:
                self.cursor += 1
                return self.cursor - 1
            return None
        heap, cursor = self.ready_heap, self.layer_cursor
        assert cursor is not None
        while heap:
            layer = heap[0]
            if cursor[layer] < self.layer_ranges[layer][1]:
                cursor[layer] += 1
                return cursor[layer] - 1
            heapq.heappop(heap)
        return None

    def queued(self) -> int:
        if self.layer_ranges is None:
            return self.num_chunks - self.cursor + len(self.resend)
        assert self.layer_cursor is not None
        return sum(stop - cur for cur, (_, stop) in zip(self.layer_cursor, self.layer_ranges)) + len(self.resend)


_UNIT = 1024  # window units per slot: a chunk's cost is a whole number of them, so counting never drifts


class Scheduler:
    """Priority queues with a per-peer window and a global in-flight limit."""

    def __init__(self, *, window: int, max_inflight: int) -> None:
        if window < 1 or max_inflight < 1:
            raise ValueError(f"window={window} and max_inflight={max_inflight} must be at least 1")
        self.window = window
        self.max_inflight = max_inflight
        self._entries: dict[Hashable, _Entry] = {}
        self._queues: dict[str, tuple[list[_Entry], list[_Entry], list[_Entry]]] = {}
        self._peer_inflight: collections.Counter[str] = collections.Counter()
        self._peer_load: collections.Counter[str] = collections.Counter()  # window units in flight
        self._peer_widths: dict[str, int] = {}  # window multipliers (peers written by direct placement)
        self._held: dict[str, int] = {}  # per peer: priority classes its receiver holds (bit p: class p)
        self._inflight = 0

    def widen(self, peer: str, factor: int = 1) -> None:
        """``peer``'s window is ``factor`` times ``window`` from now on (1: back to normal). For a peer whose
        chunks are written straight into its memory: nothing is staged for them, and a window of a few
        placement jobs would leave the copying threads waiting on acknowledgements."""
        if factor <= 1:
            self._peer_widths.pop(peer, None)
        else:
            self._peer_widths[peer] = factor

    def hold(self, peer: str, classes: int) -> None:
        """Start no chunk of the classes whose bits are set in ``classes`` for ``peer`` (0: release them). Chunks
        already in flight go on; the held ones wait in their queues, as if the window were full for them."""
        if classes:
            self._held[peer] = classes
        else:
            self._held.pop(peer, None)

    def held(self, peer: str) -> int:
        """The classes held for ``peer`` (bit p: class p)."""
        return self._held.get(peer, 0)

    def set_limits(self, *, window: int, max_inflight: int) -> None:
        """Change the per-peer window and the in-flight limit (live: the next ``next_chunk`` follows them)."""
        if window < 1 or max_inflight < 1:
            raise ValueError(f"window={window} and max_inflight={max_inflight} must be at least 1")
        self.window = window
        self.max_inflight = max_inflight

    def add(
        self,
        key: Hashable,
        peer: str,
        num_chunks: int,
        *,
        priority: Priority = Priority.NORMAL,
        layer_ranges: Sequence[tuple[int, int]] | None = None,
        cost: float = 1.0,
    ) -> None:
        """Queue a transfer. ``layer_ranges`` (``[start, stop)`` chunks per layer) makes it progressive:
        nothing is eligible until :meth:`mark_layer_ready`. ``cost`` (0..1]: the window slot share one of its
        chunks takes (wire bytes / stored bytes)."""
        if key in self._entries:
            raise KeyError(f"transfer {key!r} is already scheduled")
        if not 0 < cost <= 1:
            raise ValueError(f"cost={cost} must be in (0, 1]")
        entry = _Entry(key, peer, Priority(priority), num_chunks, layer_ranges)
        entry.cost = max(1, round(cost * _UNIT))
        self._entries[key] = entry
        self._queues.setdefault(peer, ([], [], []))[entry.priority].append(entry)

    def mark_layer_ready(self, key: Hashable, layer: int) -> bool:
        """Make a progressive transfer's ``layer`` eligible. False if unknown, not progressive or already ready."""
        entry = self._entries.get(key)
        if entry is None or entry.layer_ranges is None or layer in entry.ready_layers:
            return False
        if not 0 <= layer < len(entry.layer_ranges):
            raise IndexError(f"layer {layer} is outside 0..{len(entry.layer_ranges) - 1}")
        entry.ready_layers.add(layer)
        heapq.heappush(entry.ready_heap, layer)
        return True

    def next_for(self, peer: str) -> tuple[Hashable, int] | None:
        """The next chunk to send to ``peer`` (now in flight), or None if the window is full or nothing is eligible."""
        if self._inflight >= self.max_inflight or self._peer_load[peer] >= self.window * self._peer_widths.get(peer, 1) * _UNIT:
            return None
        queues = self._queues.get(peer)
        if queues is None:
            return None
        held = self._held.get(peer, 0)
        for priority, queue in enumerate(queues):
            if held >> priority & 1:
                continue
            for entry in queue:
                seq = entry.take()
                if seq is not None:
                    entry.inflight.add(seq)
                    self._peer_inflight[peer] += 1
                    self._peer_load[peer] += entry.cost
                    self._inflight += 1
                    return entry.key, seq
        return None

    def ack(self, key: Hashable, seq: int) -> AckOutcome:
        """The receiver verified chunk ``seq``: its window slot is free."""
        entry = self._entries.get(key)
        if entry is None or not 0 <= seq < entry.num_chunks or entry.acked[seq]:
            return AckOutcome.DUPLICATE
        self._release(entry, seq)
        entry.acked[seq] = 1
        entry.acked_count += 1
        return AckOutcome.COMPLETE if entry.acked_count == entry.num_chunks else AckOutcome.ACCEPTED

    def resend(self, key: Hashable, seq: int) -> bool:
        """Chunk ``seq`` must go again (bad checksum, lost): it leaves flight and goes to the front."""
        entry = self._entries.get(key)
        if entry is None or not 0 <= seq < entry.num_chunks or entry.acked[seq]:
            return False
        self._release(entry, seq)
        entry.resend.append(seq)
        return True

    def is_inflight(self, key: Hashable, seq: int) -> bool:
        """Whether chunk ``seq`` of ``key`` is in flight (picked, not yet acknowledged nor given back)."""
        entry = self._entries.get(key)
        return entry is not None and seq in entry.inflight

    def resend_inflight(self, peer: str) -> int:
        """Every chunk in flight to ``peer`` goes again (its acknowledgements are overdue). Returns how many."""
        count = 0
        for queue in self._queues.get(peer, ((), (), ())):
            for entry in queue:
                for seq in sorted(entry.inflight):
                    self._release(entry, seq)
                    entry.resend.append(seq)
                    count += 1
        return count

    def remove(self, key: Hashable) -> int:
        """Forget a transfer (done, failed or cancelled), freeing its window slots. Returns slots freed."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return 0
        freed = len(entry.inflight)
        for seq in list(entry.inflight):
            self._release(entry, seq)
        queues = self._queues[entry.peer]
        queues[entry.priority].remove(entry)
        if not any(queues):
            del self._queues[entry.peer]
            self._peer_inflight.pop(entry.peer, None)
            self._peer_load.pop(entry.peer, None)
        return freed

    def _release(self, entry: _Entry, seq: int) -> None:
        if seq in entry.inflight:
            entry.inflight.discard(seq)
            self._peer_inflight[entry.peer] -= 1
            self._peer_load[entry.peer] -= entry.cost
            self._inflight -= 1

    def inflight(self, peer: str | None = None) -> int:
        return self._inflight if peer is None else self._peer_inflight[peer]

    def has_work(self, peer: str) -> bool:
        return peer in self._queues

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def statistics(self) -> SchedulerStatistics:
        return SchedulerStatistics(
            transfers=len(self._entries),
            inflight=self._inflight,
            inflight_by_peer={p: n for p, n in self._peer_inflight.items() if n},
            queued_chunks=sum(e.queued() for e in self._entries.values()),
        )
