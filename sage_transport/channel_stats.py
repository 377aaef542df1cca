"""A channel's counters as snapshots: :class:`ChannelStatistics`, :class:`PeerStatistics` and histograms."""

from __future__ import annotations

import msgspec

from .channel_core import (
    ChannelCore,
)
from .telemetry.core import HistogramSnapshot


class ChannelStatistics(msgspec.Struct, frozen=True):
    """A snapshot of a channel's counters (plain integers updated on the hot path)."""

    name: str
    peers: list[str]
    transfers_sending: int
    transfers_receiving: int
    transfers_completed: int
    transfers_failed: int
    chunks_sent: int
    chunks_received: int
    bytes_sent: int
    bytes_received: int
    retries: int
    checksum_failures: int
    duplicates: int
    inflight_chunks: int
    queued_chunks: int
    handshake_failures: int
    transfers_refused: int
    chunks_placed: int = 0  # of chunks_sent: written straight into a same-host peer's memory (CMA)
    placement_failures: int = 0
    inflight_bytes: int = 0  # sent and not yet acknowledged
    failures_by_kind: dict[str, int] = {}  # failed transfers by exception type
    stale_messages: int = 0  # ignored: a NACK about an attempt already superseded, or one never sent
    protocol_errors: int = 0  # sessions ended because the peer broke the protocol (typed refusals)
    internal_errors: int = 0  # sessions ended by an unexpected exception here (a bug: should stay 0)
    untrusted_refusals: int = 0  # pulls, pushes and windows refused: the peer is neither token-proven nor attested
    connections_refused: int = 0  # closed at once: too many handshakes pending on a listener
    holds_received: int = 0  # Hold messages from receivers ranking us among their senders (fan-in priority)
    holds_sent: int = 0  # Hold messages this side sent its senders (holds and releases)


class PeerStatistics(msgspec.Struct, frozen=True):
    """Chunks and bytes exchanged with one peer, and how its chunks travel."""

    peer: str
    chunks_sent: int
    bytes_sent: int
    chunks_received: int
    bytes_received: int
    transfers_sending: int
    transfers_receiving: int
    placement: str
    transport: str


class StatisticsView(ChannelCore):
    """Snapshots of the channel's counters."""

    def statistics(self) -> ChannelStatistics:
        c = self._counters
        sched = self._scheduler.statistics()
        return ChannelStatistics(
            name=self.name,
            peers=self.peers,
            transfers_sending=len(self._outgoing),
            transfers_receiving=sum(len(s.incoming) for s in self._sessions.values()),
            transfers_completed=c["transfers_completed"] + c["transfers_received"],
            transfers_failed=c["transfers_failed"],
            chunks_sent=c["chunks_sent"],
            chunks_received=c["chunks_received"],
            bytes_sent=c["bytes_sent"],
            bytes_received=c["bytes_received"],
            retries=c["retries"] + c["resends_after_timeout"],
            checksum_failures=c["checksum_failures"],
            duplicates=c["duplicates"],
            stale_messages=c["stale_messages"],
            protocol_errors=c["protocol_errors"],
            internal_errors=c["internal_errors"],
            untrusted_refusals=c["untrusted_refusals"],
            connections_refused=c["connections_refused"],
            holds_received=c["holds_received"],
            holds_sent=self._fan_in.holds_sent,
            inflight_chunks=sched.inflight,
            queued_chunks=sched.queued_chunks,
            handshake_failures=c["handshake_failures"],
            transfers_refused=c["transfers_refused"],
            chunks_placed=c["chunks_placed"],
            placement_failures=c["placement_failures"],
            inflight_bytes=sum(max(0, out.bytes_sent - out.bytes_verified) for out in self._outgoing.values()),
            failures_by_kind=dict(self._failures),
        )

    def peer_statistics(self) -> list[PeerStatistics]:
        """Per connected peer: chunks and bytes each way, transfers in progress, placement and transport."""
        out = []
        for peer, session in self._sessions.items():
            c = session.counters
            out.append(
                PeerStatistics(
                    peer=peer, chunks_sent=c["chunks_sent"], bytes_sent=c["bytes_sent"], chunks_received=c["chunks_received"],
                    bytes_received=c["bytes_received"], transfers_sending=len(session.outgoing),
                    transfers_receiving=len(session.incoming), placement=session.placement_kind, transport=self.transport.name,
                )
            )  # fmt: skip
        return out

    def histograms(self) -> dict[str, HistogramSnapshot]:
        """``chunk_latency_seconds`` (send start to acknowledgement) and transfer durations (``sent``,
        ``received``), kept while ``config.telemetry`` is on."""
        return {
            "chunk_latency_seconds": self._chunk_latency.snapshot(),
            "transfer_sent_seconds": self._transfer_seconds["sent"].snapshot(),
            "transfer_received_seconds": self._transfer_seconds["received"].snapshot(),
        }
