"""UCX specifics beyond the conformance kit: liveness by heartbeat, the transports-in-use report and its
warning, and the protocol-table parser."""

from __future__ import annotations

import asyncio
import importlib.util

import pytest

from sage_transport.errors import PeerDeadError
from sage_transport.testing import local_pair

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ucxx") is None, reason="ucxx is not installed")


async def test_a_peer_that_stops_beating_is_declared_dead() -> None:
    """Shared-memory endpoints cannot report a hung peer: the link's heartbeat deadline does."""
    async with local_pair("ucx", heartbeat_interval_s=0.05, peer_timeout_s=0.3) as pair:
        b = pair.b
        for task in b._link._tasks:  # type: ignore[attr-defined]  # b hangs: no heartbeats, nothing read
            task.cancel()
        with pytest.raises(PeerDeadError, match="no heartbeat"):
            async with asyncio.timeout(5):
                await pair.a.recv()


async def test_same_host_peer_reports_shared_memory_transports() -> None:
    async with local_pair("ucx") as pair:
        info = pair.a.link_info()
    assert info["same_host"] is True
    lanes = {lane.split("/")[0] for lanes in info["ucx_transports"].values() for lane in lanes}
    assert lanes & {"posix", "sysv", "cma"} and "tcp" not in lanes, info


async def test_hidden_tcp_fallback_on_one_host_is_warned_about(monkeypatch: pytest.MonkeyPatch) -> None:
    """UCX_TLS=tcp from the environment with no transport setting: a same-host peer runs on TCP, loudly."""
    from structlog.testing import capture_logs

    monkeypatch.setenv("UCX_TLS", "tcp")
    with capture_logs() as logs:
        async with local_pair("ucx") as pair:
            lanes = {lane for lanes in pair.a.link_info()["ucx_transports"].values() for lane in lanes}
    assert all(lane.startswith("tcp/") for lane in lanes), lanes
    assert any(entry["event"] == "ucx_same_host_peer_without_shared_memory" for entry in logs), logs


def test_protocol_table_parser() -> None:
    from sage_transport.transports.ucx import parse_protocol_table

    table = """
[1] [vm:1:0]   | ucp_context_0 intra-node cfg#0 | tagged message by ucp_tag_send* from host memory |
[1] [vm:1:0]   |                          0..92 | eager short                               | posix/memory |
[1] [vm:1:0]   |                        8K..inf | (?) rendezvous zero-copy read from remote | cma/memory   |
[1] [vm:1:0]   |                 8340..inf | (?) rendezvous zero-copy fenced write to remote | 52% on tcp/lo and 48% on tcp/eth0 |
"""
    parsed = parse_protocol_table(table)
    assert parsed["eager short"] == ["posix/memory"]
    assert parsed["rendezvous zero-copy read from remote"] == ["cma/memory"]
    assert parsed["rendezvous zero-copy fenced write to remote"] == ["tcp/lo", "tcp/eth0"]


def test_the_transport_leaves_the_environment_and_stdout_alone() -> None:
    """Importing the UCX transport keeps the user's UCX_* environment (ucxx's own settings go to our contexts as
    options), and a transfer's endpoints print nothing to the process's stdout: no protocol table, at exit either."""
    import subprocess
    import sys

    code = """
import asyncio, os, sys
before = {k: v for k, v in os.environ.items() if k.startswith("UCX_")}
from sage_transport.transports import ucx
assert {k: v for k, v in os.environ.items() if k.startswith("UCX_")} == before, "the environment changed"
assert ucx._UCXX_DEFAULTS.get("RNDV_THRESH") == "8192", ucx._UCXX_DEFAULTS  # what ucxx wanted, kept for our contexts
from sage_transport.testing import local_pair

async def main():
    async with local_pair("ucx") as pair:
        _, frame = await asyncio.gather(pair.a.send(b"head", bytes(1 << 20)), pair.b.recv())
        assert frame.payload is not None and len(frame.payload) == 1 << 20
        lanes = pair.a.link_info()["ucx_transports"]
    sys.stderr.write(repr(lanes))

asyncio.run(main())
"""
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("UCX_")} | {"UCX_LOG_LEVEL": "error"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "", proc.stdout  # UCX wrote nothing to fd 1
    assert "memory" in proc.stderr  # the lanes were still read (from ucp_ep_print_info)
