"""A real Prometheus server (Debian's `prometheus`, installed by .ci/run) scrapes our exporter on loopback, and
the values come back through Prometheus's HTTP API. Skips where the binary is missing."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from sage_transport import TransferPlan
from sage_transport.ports import free_port
from sage_transport.telemetry.prometheus import SageCollector
from sage_transport.telemetry.server import TelemetryServer

from .conftest import SMALL, channel_pair

pytestmark = pytest.mark.skipif(shutil.which("prometheus") is None, reason="the prometheus server is not installed")


def _query(base: str, expr: str) -> list[dict[str, object]]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]["result"]  # type: ignore[no-any-return]


async def test_prometheus_scrapes_the_exporter_and_reads_back_the_values(tmp_path: Path) -> None:
    async with channel_pair(blocks=32) as p, TelemetryServer(SageCollector([p.sender, p.receiver]), port=0) as exporter:
        result = await p.sender.transfer(TransferPlan.for_blocks(p.peer, SMALL, range(32), range(32), transfer_id="t"))
        await p.receiver.wait_received("t")
        web = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n"
            f"  - job_name: sage_transport\n    static_configs:\n      - targets: ['127.0.0.1:{exporter.port}']\n"
        )
        server = subprocess.Popen(  # noqa: ASYNC220
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{web}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        base = f"http://127.0.0.1:{web}"
        try:
            deadline = time.monotonic() + 60
            sent: list[dict[str, object]] = []
            while time.monotonic() < deadline:
                assert server.poll() is None, server.stderr.read().decode()[-2000:] if server.stderr else ""
                try:
                    sent = await asyncio.to_thread(_query, base, 'sage_transport_bytes_total{channel="prefill",direction="sent"}')
                except OSError:
                    sent = []
                if sent:
                    break
                await asyncio.sleep(0.5)
            assert sent, "Prometheus never stored a scrape of the exporter"
            assert float(sent[0]["value"][1]) == result.bytes  # type: ignore[index]
            assert sent[0]["metric"]["peer"] == p.peer  # type: ignore[index]
            count = await asyncio.to_thread(_query, base, 'sage_transport_chunk_latency_seconds_count{channel="prefill"}')
            assert float(count[0]["value"][1]) == result.chunks  # type: ignore[index]
            up = await asyncio.to_thread(_query, base, 'up{job="sage_transport"}')
            assert float(up[0]["value"][1]) == 1.0  # type: ignore[index]
        finally:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
            if server.stderr is not None:
                server.stderr.close()
