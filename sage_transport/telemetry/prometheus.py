"""A Prometheus collector that reads channels', collective backends' and the process Telemetry's statistics at
scrape time. Nothing is registered globally: put it in your own ``CollectorRegistry`` (the
:class:`~sage_transport.telemetry.server.TelemetryServer` does), or in the default one if your application wants.

Metric names are ``sage_transport_*`` with their unit; counters end in ``_total``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from .core import HistogramSnapshot, Telemetry

if TYPE_CHECKING:
    from ..channel import KVTransferChannel
    from ..collectives.base import CommBackend

__all__ = ["METRIC_NAMES", "SageCollector"]

#: Every metric family the collector yields (the dashboard and tests use this list).
METRIC_NAMES = (
    "sage_transport_transfers_total",
    "sage_transport_chunks_total",
    "sage_transport_bytes_total",
    "sage_transport_chunks_placed_total",
    "sage_transport_retries_total",
    "sage_transport_checksum_failures_total",
    "sage_transport_duplicate_chunks_total",
    "sage_transport_stale_messages_total",
    "sage_transport_failures_total",
    "sage_transport_inflight_chunks",
    "sage_transport_inflight_bytes",
    "sage_transport_queued_chunks",
    "sage_transport_chunk_latency_seconds",
    "sage_transport_transfer_duration_seconds",
    "sage_transport_config_chunk_size_bytes",
    "sage_transport_config_window_chunks",
    "sage_transport_config_max_inflight_chunks",
    "sage_transport_config_lanes",
    "sage_transport_peer_info",
    "sage_transport_steps_total",
    "sage_transport_step_seconds_total",
    "sage_transport_step_comm_seconds_total",
    "sage_transport_step_comm_share_ratio",
    "sage_transport_comm_seconds_total",
    "sage_transport_collective_ops_total",
    "sage_transport_collective_bytes_total",
    "sage_transport_collective_failures_total",
    "sage_transport_fusion_hits_total",
    "sage_transport_fusion_buckets_total",
    "sage_transport_fusion_enabled",
    "sage_transport_fusion_bucket_bytes",
    "sage_transport_overlap_limit",
    "sage_transport_overlap_waits_total",
    "sage_transport_collective_poisoned",
)


def _histogram(family: HistogramMetricFamily, labels: list[str], snap: HistogramSnapshot) -> None:
    buckets = []
    running = 0
    for bound, n in zip(snap.bounds, snap.counts):
        running += n
        buckets.append((repr(bound), running))
    buckets.append(("+Inf", snap.count))
    family.add_metric(labels, buckets, snap.sum)


class SageCollector:
    """Yields sage_transport metrics from the sources added to it (``add_channel``, ``add_comm``)."""

    def __init__(
        self,
        channels: Iterable[KVTransferChannel] = (),
        comm: Iterable[CommBackend] = (),
        telemetry: Telemetry | None = None,
    ) -> None:
        self.channels: list[KVTransferChannel] = list(channels)
        self.comm: list[CommBackend] = list(comm)
        self.telemetry = telemetry

    def add_channel(self, channel: KVTransferChannel) -> None:
        self.channels.append(channel)

    def add_comm(self, backend: CommBackend) -> None:
        self.comm.append(backend)

    def describe(self) -> list[Metric]:
        return []  # families are built at scrape time; describing them would cost a full collect

    def collect(self) -> Iterator[Metric]:
        yield from self._channel_metrics()
        yield from self._comm_metrics()
        yield from self._step_metrics()

    # ---- channels ---------------------------------------------------------------------------------------

    def _channel_metrics(self) -> Iterator[Metric]:
        transfers = CounterMetricFamily("sage_transport_transfers", "Transfers finished", labels=["channel", "outcome"])
        chunks = CounterMetricFamily("sage_transport_chunks", "Chunks moved, per peer", labels=["channel", "peer", "direction"])
        data = CounterMetricFamily("sage_transport_bytes", "Bytes moved, per peer", labels=["channel", "peer", "direction"])
        placed = CounterMetricFamily(
            "sage_transport_chunks_placed", "Chunks written straight into a same-host peer", labels=["channel"]
        )
        retries = CounterMetricFamily("sage_transport_retries", "Chunks sent again (checksum or timeout)", labels=["channel"])
        bad = CounterMetricFamily("sage_transport_checksum_failures", "Chunks that failed their checksum", labels=["channel"])
        dups = CounterMetricFamily(
            "sage_transport_duplicate_chunks", "Copies of chunks already verified, dropped", labels=["channel"]
        )
        stale = CounterMetricFamily(
            "sage_transport_stale_messages", "NACKs about a superseded copy or the same copy twice, ignored", labels=["channel"]
        )
        failures = CounterMetricFamily("sage_transport_failures", "Failed transfers by kind", labels=["channel", "kind"])
        inflight = GaugeMetricFamily("sage_transport_inflight_chunks", "Chunks sent and not yet acknowledged", labels=["channel"])
        inflight_b = GaugeMetricFamily("sage_transport_inflight_bytes", "Bytes sent and not yet acknowledged", labels=["channel"])
        queued = GaugeMetricFamily("sage_transport_queued_chunks", "Chunks waiting to be sent", labels=["channel"])
        latency = HistogramMetricFamily(
            "sage_transport_chunk_latency_seconds", "Send start to acknowledgement, per chunk", labels=["channel"]
        )
        duration = HistogramMetricFamily(
            "sage_transport_transfer_duration_seconds",
            "Transfer submit (or announcement) to completion",
            labels=["channel", "direction"],
        )
        chunk_size = GaugeMetricFamily("sage_transport_config_chunk_size_bytes", "Configured chunk size", labels=["channel"])
        window = GaugeMetricFamily(
            "sage_transport_config_window_chunks", "Per-peer window of unacknowledged chunks", labels=["channel"]
        )
        max_inflight = GaugeMetricFamily(
            "sage_transport_config_max_inflight_chunks", "Channel-wide in-flight limit", labels=["channel"]
        )
        lanes = GaugeMetricFamily("sage_transport_config_lanes", "Chunk sends in flight per peer", labels=["channel"])
        info = GaugeMetricFamily(
            "sage_transport_peer_info",
            "Connected peers and how chunks travel",
            labels=["channel", "peer", "transport", "placement"],
        )
        for channel in self.channels:
            name = channel.name
            stats = channel.statistics()
            transfers.add_metric([name, "completed"], stats.transfers_completed)
            transfers.add_metric([name, "failed"], stats.transfers_failed)
            for peer in channel.peer_statistics():
                chunks.add_metric([name, peer.peer, "sent"], peer.chunks_sent)
                chunks.add_metric([name, peer.peer, "received"], peer.chunks_received)
                data.add_metric([name, peer.peer, "sent"], peer.bytes_sent)
                data.add_metric([name, peer.peer, "received"], peer.bytes_received)
                info.add_metric([name, peer.peer, peer.transport, peer.placement], 1)
            placed.add_metric([name], stats.chunks_placed)
            retries.add_metric([name], stats.retries)
            bad.add_metric([name], stats.checksum_failures)
            dups.add_metric([name], stats.duplicates)
            stale.add_metric([name], stats.stale_messages)
            for kind, n in stats.failures_by_kind.items():
                failures.add_metric([name, kind], n)
            inflight.add_metric([name], stats.inflight_chunks)
            inflight_b.add_metric([name], stats.inflight_bytes)
            queued.add_metric([name], stats.queued_chunks)
            hists = channel.histograms()
            _histogram(latency, [name], hists["chunk_latency_seconds"])
            _histogram(duration, [name, "sent"], hists["transfer_sent_seconds"])
            _histogram(duration, [name, "received"], hists["transfer_received_seconds"])
            config = channel.config
            chunk_size.add_metric([name], config.chunk_size)
            window.add_metric([name], config.peer_window)
            max_inflight.add_metric([name], config.max_inflight)
            lanes.add_metric([name], config.send_lanes)
        yield from (
            transfers,
            chunks,
            data,
            placed,
            retries,
            bad,
            dups,
            stale,
            failures,
            inflight,
            inflight_b,
            queued,
            latency,
            duration,
        )
        yield from (chunk_size, window, max_inflight, lanes, info)

    # ---- collectives ------------------------------------------------------------------------------------

    def _comm_metrics(self) -> Iterator[Metric]:
        labels = ["backend", "rank"]
        ops = CounterMetricFamily("sage_transport_collective_ops", "Collective ops completed", labels=[*labels, "op"])
        data = CounterMetricFamily("sage_transport_collective_bytes", "Bytes of collective ops", labels=[*labels, "op"])
        failures = CounterMetricFamily(
            "sage_transport_collective_failures", "Collective failures (each poisons the group)", labels=labels
        )
        hits = CounterMetricFamily("sage_transport_fusion_hits", "Tensors all-reduced inside a fused bucket", labels=labels)
        buckets = CounterMetricFamily("sage_transport_fusion_buckets", "Fused buckets sent", labels=labels)
        enabled = GaugeMetricFamily("sage_transport_fusion_enabled", "Fusion on (1) or off (0)", labels=labels)
        bucket_bytes = GaugeMetricFamily("sage_transport_fusion_bucket_bytes", "Fusion bucket threshold", labels=labels)
        limit = GaugeMetricFamily("sage_transport_overlap_limit", "Communication ops allowed in flight", labels=labels)
        waits = CounterMetricFamily("sage_transport_overlap_waits", "Ops that waited for an overlap slot", labels=labels)
        poisoned = GaugeMetricFamily("sage_transport_collective_poisoned", "The group failed and awaits rebuild", labels=labels)
        for backend in self.comm:
            stats = backend.get_stats()
            key = [stats.backend, str(stats.rank)]
            for op, n in stats.ops.items():
                ops.add_metric([*key, op], n)
            for op, n in stats.bytes.items():
                data.add_metric([*key, op], n)
            failures.add_metric(key, stats.failures)
            hits.add_metric(key, stats.fusion.hits)
            buckets.add_metric(key, stats.fusion.buckets)
            policy = backend.fusion_policy
            enabled.add_metric(key, 1 if policy.enabled else 0)
            bucket_bytes.add_metric(key, policy.bucket_bytes)
            limit.add_metric(key, stats.overlap.limit)
            waits.add_metric(key, stats.overlap.waited)
            poisoned.add_metric(key, 1 if stats.poisoned else 0)
        yield from (ops, data, failures, hits, buckets, enabled, bucket_bytes, limit, waits, poisoned)

    # ---- steps ------------------------------------------------------------------------------------------

    def _step_metrics(self) -> Iterator[Metric]:
        telemetry = self._telemetry()
        stats = telemetry.statistics() if telemetry is not None else None
        steps = CounterMetricFamily("sage_transport_steps", "Engine steps marked with Telemetry.step()")
        step_s = CounterMetricFamily("sage_transport_step_seconds", "Time inside marked steps")
        comm_in_steps = CounterMetricFamily("sage_transport_step_comm_seconds", "Time inside steps with communication in flight")
        share = GaugeMetricFamily("sage_transport_step_comm_share_ratio", "Communication share of the last step")
        comm = CounterMetricFamily("sage_transport_comm_seconds", "Time with any communication in flight")
        if stats is not None:
            steps.add_metric([], stats.steps)
            step_s.add_metric([], stats.step_seconds)
            comm_in_steps.add_metric([], stats.step_comm_seconds)
            share.add_metric([], stats.last_step_comm_share)
            comm.add_metric([], stats.comm_seconds)
        yield from (steps, step_s, comm_in_steps, share, comm)

    def _telemetry(self) -> Telemetry | None:
        if self.telemetry is not None:
            return self.telemetry
        if self.channels:
            return self.channels[0].telemetry
        if self.comm:
            return self.comm[0].telemetry
        return None


def families(collector: SageCollector) -> dict[str, Any]:
    """``{family name: [(labels, value), ...]}`` of one collect (tests and the summary use it)."""
    out: dict[str, Any] = {}
    for family in collector.collect():
        out[family.name] = [(s.labels, s.value) for s in family.samples]
    return out
