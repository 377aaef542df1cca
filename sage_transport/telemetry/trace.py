"""Chunk traces in the Chrome / Perfetto trace-event format (``migrate --trace PATH``).

A :class:`ChunkTracer` set on a channel records, per chunk: *queued* (the transfer was submitted), *sent* (the
send started and ended, or a direct write into the peer's memory was started), *acked* (the sender learned it was
verified) on the sending side; *received* and *verified* on the receiving side. The records are plain tuples,
appended only when a tracer is set. :func:`chrome_trace` turns the records of one or more processes into one
trace: a process per side, a thread per peer, spans for "queued", "sending", "in flight" and "verify".
Timestamps are ``time.perf_counter()`` (CLOCK_MONOTONIC): comparable between processes of one host.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["ChunkTracer", "chrome_trace"]


class ChunkTracer:
    """Records chunk events of one process. ``events`` are ``(kind, peer, transfer_id, seq, t0, t1)``."""

    def __init__(self, side: str = "") -> None:
        self.side = side or f"pid {os.getpid()}"
        self.pid = os.getpid()
        self.events: list[tuple[str, str, str, int, float, float]] = []

    def queued(self, peer: str, transfer_id: str, chunks: int, t: float) -> None:
        self.events.append(("queued", peer, transfer_id, chunks, t, t))

    def sent(self, peer: str, transfer_id: str, seq: int, t0: float, t1: float) -> None:
        self.events.append(("sent", peer, transfer_id, seq, t0, t1))

    def acked(self, peer: str, transfer_id: str, seq: int, t: float) -> None:
        self.events.append(("acked", peer, transfer_id, seq, t, t))

    def received(self, peer: str, transfer_id: str, seq: int, t0: float, t1: float) -> None:
        """The payload arrived at ``t0``; it was verified (and placed) at ``t1``."""
        self.events.append(("received", peer, transfer_id, seq, t0, t1))

    def export(self) -> dict[str, Any]:
        """A JSON-ready record of this process's events (to ship to the process that writes the trace)."""
        return {"side": self.side, "pid": self.pid, "events": [list(e) for e in self.events]}


def chrome_trace(processes: list[dict[str, Any]]) -> dict[str, Any]:
    """One Chrome trace from :meth:`ChunkTracer.export` records of several processes."""
    origin = min((e[4] for p in processes for e in p["events"]), default=0.0)
    trace: list[dict[str, Any]] = []
    for proc in processes:
        _Process(proc, origin, trace).emit()
    return {"traceEvents": trace, "displayTimeUnit": "ms"}


class _Process:
    """The trace events of one process: a thread per peer, spans per chunk."""

    def __init__(self, proc: dict[str, Any], origin: float, out: list[dict[str, Any]]) -> None:
        self.proc, self.origin, self.out = proc, origin, out
        self.pid = proc["pid"]
        self.threads: dict[str, int] = {}

    def us(self, t: float) -> float:
        return round((t - self.origin) * 1e6, 3)

    def tid(self, peer: str) -> int:
        if peer not in self.threads:
            self.threads[peer] = len(self.threads) + 1
            name = {"name": f"peer {peer}"}
            self.out.append({"ph": "M", "name": "thread_name", "pid": self.pid, "tid": self.threads[peer], "args": name})
        return self.threads[peer]

    def span(self, name: str, peer: str, t0: float, t1: float, args: dict[str, Any]) -> None:
        start = self.us(t0)
        self.out.append(
            {
                "ph": "X",
                "name": name,
                "pid": self.pid,
                "tid": self.tid(peer),
                "ts": start,
                "dur": max(0.0, self.us(t1) - start),
                "args": args,
            }
        )

    def emit(self) -> None:
        self.out.append({"ph": "M", "name": "process_name", "pid": self.pid, "args": {"name": self.proc["side"]}})
        submitted: dict[str, float] = {}
        sent_end: dict[tuple[str, int], float] = {}
        for kind, peer, transfer_id, seq, t0, t1 in self.proc["events"]:
            args = {"transfer": transfer_id, "chunk": seq}
            if kind == "queued":
                submitted[transfer_id] = t0
                name = f"submit {transfer_id} ({seq} chunks)"
                self.out.append({"ph": "i", "s": "t", "name": name, "pid": self.pid, "tid": self.tid(peer), "ts": self.us(t0)})
            elif kind == "sent":
                start = submitted.get(transfer_id)
                if start is not None and t0 > start:
                    self.span("queued", peer, start, t0, args)
                self.span("sending", peer, t0, t1, args)
                sent_end[(transfer_id, seq)] = t1
            elif kind == "acked" and (transfer_id, seq) in sent_end:
                self.span("in flight", peer, sent_end[(transfer_id, seq)], t0, args)
            elif kind == "received":
                self.span("verify", peer, t0, t1, args)
