"""Telemetry: histograms and step share, what channels and backends measure, the Prometheus collector, the
/metrics, /summary and /control server, chunk traces, one log line per transfer, and the dashboard's structure."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from sage_transport import KVTransportConfig, TransferPlan
from sage_transport.collectives import CommFusion, MockCommGroup
from sage_transport.errors import ConfigError, TransferAbortedError
from sage_transport.migrate import Observe, run_migration
from sage_transport.telemetry import Histogram, Telemetry, chrome_trace
from sage_transport.telemetry.prometheus import METRIC_NAMES, SageCollector, families
from sage_transport.telemetry.server import TelemetryServer

from .conftest import SMALL, channel_pair

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "control-token-1"


def test_histogram_buckets_and_quantiles() -> None:
    h = Histogram((1.0, 2.0, 4.0))
    for v in (0.5, 1.5, 1.5, 3.0, 10.0):
        h.observe(v)
    snap = h.snapshot()
    assert snap.counts == [1, 2, 1, 1] and snap.count == 5 and snap.sum == pytest.approx(16.5)
    assert 1.0 <= snap.quantile(0.5) <= 2.0
    assert Histogram().snapshot().quantile(0.99) == 0.0


def test_step_share_is_communication_time_inside_the_step_over_its_duration() -> None:
    now = [0.0]
    tel = Telemetry(clock=lambda: now[0])
    with tel.step():  # 10 s step; communication 2-5 s and 4-8 s overlap: busy 2-8 s = 6 s
        now[0] = 2.0
        tel.comm_begin()
        now[0] = 4.0
        tel.comm_begin()
        now[0] = 5.0
        tel.comm_end()
        now[0] = 8.0
        tel.comm_end()
        now[0] = 10.0
    stats = tel.statistics()
    assert stats.steps == 1 and stats.last_step_seconds == 10.0 and stats.last_step_comm_share == pytest.approx(0.6)
    with tel.step():  # communication already in flight across the boundary counts only inside
        tel.comm_begin()
        now[0] = 15.0
    tel.comm_end()
    stats = tel.statistics()
    assert stats.last_step_comm_share == pytest.approx(1.0) and stats.comm_share == pytest.approx(11 / 15)


async def test_channels_measure_per_peer_latency_and_failures() -> None:
    async with channel_pair(blocks=16) as p:
        with p.sender.telemetry.step():
            result = await p.sender.transfer(TransferPlan.for_blocks(p.peer, SMALL, range(16), range(16), transfer_id="t1"))
        peers = {s.peer: s for s in p.sender.peer_statistics()}
        assert peers[p.peer].chunks_sent == result.chunks and peers[p.peer].bytes_sent == result.bytes
        received = p.receiver.peer_statistics()[0]
        assert received.chunks_received == result.chunks and received.bytes_received == result.bytes
        hists = p.sender.histograms()
        assert hists["chunk_latency_seconds"].count == result.chunks
        assert hists["transfer_sent_seconds"].count == 1 and p.receiver.histograms()["transfer_received_seconds"].count == 1
        assert 0 < p.sender.telemetry.statistics().last_step_comm_share <= 1
        assert p.sender.statistics().inflight_bytes == 0 and p.sender.telemetry.statistics().comm_inflight == 0
        handle = p.sender.submit(TransferPlan.for_blocks(p.peer, SMALL, range(16), range(16), transfer_id="t2"))
        p.sender.cancel("t2", "testing")
        with pytest.raises(TransferAbortedError):
            await handle.wait()
        assert p.sender.statistics().failures_by_kind == {"TransferAbortedError": 1}
        assert p.sender.telemetry.statistics().comm_inflight == 0


async def test_telemetry_off_keeps_counters_but_no_histograms() -> None:
    async with channel_pair(blocks=8, config=KVTransportConfig(chunk_size=1024, telemetry=False)) as p:
        result = await p.sender.transfer(TransferPlan.for_blocks(p.peer, SMALL, range(8), range(8), transfer_id="t"))
        assert p.sender.statistics().chunks_sent == result.chunks
        assert p.sender.histograms()["chunk_latency_seconds"].count == 0


async def test_collector_yields_every_family_with_the_channels_numbers() -> None:
    async with channel_pair(blocks=8) as p:
        result = await p.sender.transfer(TransferPlan.for_blocks(p.peer, SMALL, range(8), range(8), transfer_id="t"))
        comm = MockCommGroup(1).backend(0)
        got = families(SageCollector([p.sender, p.receiver], comm=[comm]))
    assert {name.removesuffix("_total") for name in METRIC_NAMES} <= set(got) | {n.removesuffix("_total") for n in got}
    sent = {tuple(sorted(labels.items())): v for labels, v in got["sage_transport_bytes"]}
    key = (("channel", "prefill"), ("direction", "sent"), ("peer", p.peer))
    assert sent[key] == result.bytes
    latency_count = [v for labels, v in got["sage_transport_chunk_latency_seconds"] if labels.get("channel") == "prefill"]
    assert result.chunks in latency_count  # the _count sample
    assert ({"channel": "prefill"}, 1024.0) in got["sage_transport_config_chunk_size_bytes"]


# ---- the server: /metrics, /summary, /control -------------------------------------------------------------


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _post(url: str, body: Any, token: str | None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


async def test_control_endpoint_changes_a_live_channel_and_the_metrics_show_it() -> None:
    async with channel_pair(blocks=16) as p:
        comm = MockCommGroup(1).backend(0)
        collector = SageCollector([p.sender, p.receiver], comm=[comm])
        async with TelemetryServer(collector, auth_token=TOKEN, port=0) as server:
            first = await p.sender.transfer(TransferPlan.for_blocks(p.peer, SMALL, range(16), range(16), transfer_id="a"))
            url = server.url
            status, _ = await asyncio.to_thread(_post, url + "/control", {"chunk_size": "4KiB"}, None)
            assert status == 401
            status, _ = await asyncio.to_thread(_post, url + "/control", {"chunk_size": "4KiB"}, "wrong-token")
            assert status == 401
            status, body = await asyncio.to_thread(_post, url + "/control", {"chunk_size": "huge"}, TOKEN)
            assert status == 400 and b"chunk_size='huge'" in body
            status, body = await asyncio.to_thread(_post, url + "/control", {"listen_port": 80}, TOKEN)
            assert status == 400 and b"cannot change on a live channel" in body
            assert p.sender.config.chunk_size == 1024  # a refused change changed nothing
            change = {
                "channel": "prefill",
                "chunk_size": "4KiB",
                "peer_window": 2,
                "fusion": {"bucket_bytes": "64KiB"},
                "overlap": 1,
            }
            status, body = await asyncio.to_thread(_post, url + "/control", change, TOKEN)
            assert status == 200, body
            settings = json.loads(body)
            assert settings["channels"]["prefill"]["chunk_size"] == 4096 and settings["channels"]["decode"]["chunk_size"] == 1024
            assert settings["collectives"][0]["fusion"]["bucket_bytes"] == 65536 and settings["collectives"][0]["overlap"] == 1
            second = await p.sender.transfer(TransferPlan.for_blocks(p.peer, SMALL, range(16), range(16), transfer_id="b"))
            assert second.chunks < first.chunks  # the next transfer uses the new chunk size
            status, text = await asyncio.to_thread(_get, url + "/metrics")
            assert status == 200
            assert 'sage_transport_config_chunk_size_bytes{channel="prefill"} 4096.0' in text.decode()
            assert 'sage_transport_config_window_chunks{channel="prefill"} 2.0' in text.decode()
            assert 'sage_transport_fusion_bucket_bytes{backend="mock",rank="0"} 65536.0' in text.decode()
            status, body = await asyncio.to_thread(_get, url + "/summary")
            summary = json.loads(body)
            card = next(c for c in summary["channels"] if c["name"] == "prefill")
            assert card["transfers_completed"] == 2 and card["failure_rate"] == 0.0 and card["bandwidth_bytes_per_s"] > 0
            assert card["chunk_latency_p50_s"] > 0 and card["chunk_latency_p99_s"] >= card["chunk_latency_p50_s"]
            assert card["peers"][0]["transport"] == "mock" and card["config"]["chunk_size"] == 4096
            assert summary["recent_transfers"]["count"] >= 2 and "comm_share" in summary
            assert (await asyncio.to_thread(_get, url + "/nothing"))[0] == 404
        assert comm.fusion_policy == CommFusion(bucket_bytes=65536)


async def test_a_refused_control_change_changes_nothing_anywhere() -> None:
    """apply() validates every part first: a bad overlap, or a key live on no channel, leaves the channels and the
    collectives as they were (it once reconfigured the channels, then failed on the overlap)."""
    async with channel_pair(blocks=4) as p:
        comm = MockCommGroup(1).backend(0)
        server = TelemetryServer(SageCollector([p.sender, p.receiver], comm=[comm]), auth_token=TOKEN, port=0)
        before = (p.sender.config, p.receiver.config, comm.get_stats().overlap.limit)
        for bad, reason in (
            ({"chunk_size": "4KiB", "overlap": 0}, "overlap=0"),
            ({"chunk_size": "4KiB", "overlap": "many"}, "overlap='many'"),
            ({"chunk_size": "4KiB", "listen_port": 80}, "cannot change on a live channel"),
        ):
            with pytest.raises(ConfigError, match=reason):
                server.apply(bad)
            assert (p.sender.config, p.receiver.config, comm.get_stats().overlap.limit) == before


async def test_a_malformed_content_length_is_a_400_and_the_socket_closes() -> None:
    async with channel_pair(blocks=4) as p:
        async with TelemetryServer(SageCollector([p.sender]), auth_token=TOKEN, port=0) as server:
            for length in ("ten", "-1", "1e3"):
                reader, writer = await asyncio.open_connection(server.host, server.port)
                writer.write(f"POST /control HTTP/1.1\r\nContent-Length: {length}\r\n\r\n".encode())
                await writer.drain()
                reply = await asyncio.wait_for(reader.read(), 5)  # read() returns only once the server closes
                writer.close()
                assert reply.startswith(b"HTTP/1.1 400") and b"is not a byte count" in reply, reply
            assert (await asyncio.to_thread(_get, server.url + "/summary"))[0] == 200  # and it serves on


async def test_ack_timeout_s_applies_to_live_sessions() -> None:
    """A chunk whose acknowledgement never comes is resent after ack_timeout_s: changed on a live channel, the
    next wait of its running session uses the new value (each session once read it only when it started)."""
    from sage_transport.transports.mock import FaultAction, FaultRule

    config = KVTransportConfig(chunk_size=1024, peer_window=4, ack_timeout_s=30.0)
    async with channel_pair(blocks=16, config=config) as p:
        await p.sender.transfer(TransferPlan.for_blocks(p.peer, SMALL, range(2), range(2), transfer_id="warm"))
        p.sender.reconfigure(ack_timeout_s=0.05)
        p.network.faults.add(FaultRule(FaultAction.DROP, src="mock://prefill", after=0, times=1))
        result = await asyncio.wait_for(
            p.sender.transfer(TransferPlan.for_blocks(p.peer, SMALL, range(16), range(16), transfer_id="dropped")), 10
        )
        assert result.bytes > 0 and p.sender.statistics().retries >= 1  # resent on the new timeout


async def test_control_plane_is_closed_without_a_token() -> None:
    async with channel_pair(blocks=4) as p:
        async with TelemetryServer(SageCollector([p.sender]), port=0) as server:
            status, body = await asyncio.to_thread(_post, server.url + "/control", {"chunk_size": "4KiB"}, "anything")
            assert status == 403 and b"closed" in body
            with pytest.raises(ConfigError, match="cannot change on a live channel"):
                p.sender.reconfigure(backend="tcp")


async def test_a_scrape_with_a_hundred_peers_lists_every_peer() -> None:
    from sage_transport import KVMemory, KVTransferChannel
    from sage_transport.transports.mock import MockNetwork, MockTransport

    network = MockNetwork()
    config = KVTransportConfig(chunk_size=1024)
    async with KVTransferChannel(MockTransport(network, name="hub"), config, name="hub") as hub:
        hub.register(KVMemory.allocate(SMALL, 4, fill=0))
        address = await hub.listen()
        async with asyncio.TaskGroup() as group:
            peers = [KVTransferChannel(MockTransport(network, name=f"p{i}"), config, name=f"p{i}") for i in range(100)]
            for peer in peers:
                await peer.__aenter__()
                peer.register(KVMemory.allocate(SMALL, 4, fill=0))
                group.create_task(peer.connect(address))
        try:
            async with TelemetryServer(SageCollector([hub]), port=0) as server:
                status, text = await asyncio.to_thread(_get, server.url + "/metrics")
            assert status == 200
            assert text.decode().count('sage_transport_peer_info{channel="hub"') == 100
        finally:
            for peer in peers:
                await peer.aclose()


# ---- logs, traces, migrate ----------------------------------------------------------------------------------


async def test_one_log_line_per_transfer_never_per_chunk() -> None:
    structlog.reset_defaults()
    async with channel_pair(blocks=16) as p:
        with capture_logs() as logs:
            result = await p.sender.transfer(TransferPlan.for_blocks(p.peer, SMALL, range(16), range(16), transfer_id="t"))
            await p.receiver.wait_received("t")
    assert result.chunks > 1
    events = [e["event"] for e in logs]
    assert events.count("transfer.sent") == 1 and events.count("transfer.received") == 1
    assert len(events) == 2, events


async def test_migrate_serves_metrics_while_it_runs_and_lingers(tmp_path: Path) -> None:
    urls: list[str] = []
    scraped: list[str] = []

    async def scrape() -> None:
        while not urls:
            await asyncio.sleep(0.01)
        while True:
            status, text = await asyncio.to_thread(_get, urls[0] + "/metrics")
            if status == 200 and 'sage_transport_transfers_total{channel="prefill",outcome="completed"} 2.0' in text.decode():
                scraped.append(text.decode())
                return
            await asyncio.sleep(0.05)

    scraper = asyncio.create_task(scrape())
    record = await run_migration(
        model="llama-3-8b", tokens=512, transport="mock", repeats=2, reference=False,
        observe=Observe(metrics_port=0, linger_s=1.0, trace_path=tmp_path / "t.json", announce=urls.append),
    )  # fmt: skip
    await asyncio.wait_for(scraper, 5)
    assert record.verified and scraped and urls[0].startswith("http://127.0.0.1:")
    trace = json.loads((tmp_path / "t.json").read_text())
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    names = {e["name"] for e in spans}
    assert {"sending", "in flight", "verify"} <= names
    assert sum(e["name"] == "sending" for e in spans) == 2 * record.chunks
    assert len({e["pid"] for e in trace["traceEvents"]}) == 1  # both channels live in this process here


def test_chrome_trace_joins_processes() -> None:
    sender = {
        "side": "sender",
        "pid": 1,
        "events": [["queued", "r", "t", 1, 1.0, 1.0], ["sent", "r", "t", 0, 1.1, 1.2], ["acked", "r", "t", 0, 1.5, 1.5]],
    }
    receiver = {"side": "receiver", "pid": 2, "events": [["received", "s", "t", 0, 1.3, 1.35]]}
    trace = chrome_trace([sender, receiver])["traceEvents"]
    spans = {(e["pid"], e["name"]): e for e in trace if e["ph"] == "X"}
    assert spans[(1, "queued")]["dur"] == pytest.approx(100000.0)
    assert spans[(1, "in flight")]["ts"] == pytest.approx(200000.0) and spans[(1, "in flight")]["dur"] == pytest.approx(300000.0)
    assert spans[(2, "verify")]["dur"] == pytest.approx(50000.0)


# ---- dashboard -----------------------------------------------------------------------------------------------


def test_dashboard_is_a_grafana_dashboard_over_our_metrics() -> None:
    dash = json.loads((ROOT / "dashboards" / "sage_transport.json").read_text())
    assert isinstance(dash["schemaVersion"], int) and dash["schemaVersion"] >= 30
    assert dash["uid"] and dash["title"] and isinstance(dash["panels"], list) and dash["panels"]
    assert any(v["type"] == "datasource" for v in dash["templating"]["list"])
    ids = [panel["id"] for panel in dash["panels"]]
    assert len(ids) == len(set(ids))
    known = {name.removesuffix("_total") for name in METRIC_NAMES}
    for panel in dash["panels"]:
        assert panel["type"] in {"timeseries", "stat", "table", "gauge"} and panel["title"]
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) for k in ("h", "w", "x", "y")) and 0 < grid["w"] and grid["x"] + grid["w"] <= 24
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["refId"] and target["expr"]
            for metric in re.findall(r"sage_transport_\w+", target["expr"]):
                base = re.sub(r"_(bucket|count|sum|total)$", "", metric)
                assert base in known, (panel["title"], metric)
