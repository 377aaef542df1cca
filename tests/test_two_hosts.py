"""The main job across two "hosts": two network namespaces joined by a veth pair. `sage-transport serve` runs
in one, `sage-transport migrate --peer` in the other. Needs root (the tests create and remove their own
namespaces) and skips otherwise."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None, reason="network namespaces need root and iproute2"
)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@contextlib.contextmanager
def two_namespaces() -> Iterator[tuple[str, str, str]]:
    """Yields (sender namespace, receiver namespace, receiver IP)."""
    tag = uuid.uuid4().hex[:6]
    a, b = f"sgA{tag}", f"sgB{tag}"
    subnet = 10 + int(tag[:2], 16) % 200
    try:
        _ip("netns", "add", a)
        _ip("netns", "add", b)
        _ip("link", "add", f"va{tag}", "type", "veth", "peer", "name", f"vb{tag}")
        _ip("link", "set", f"va{tag}", "netns", a)
        _ip("link", "set", f"vb{tag}", "netns", b)
        _ip("-n", a, "addr", "add", f"10.{subnet}.7.1/24", "dev", f"va{tag}")
        _ip("-n", b, "addr", "add", f"10.{subnet}.7.2/24", "dev", f"vb{tag}")
        for ns, dev in ((a, f"va{tag}"), (b, f"vb{tag}")):
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
    except (subprocess.CalledProcessError, OSError) as exc:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        pytest.skip(f"cannot create network namespaces here: {exc}")
    try:
        yield a, b, f"10.{subnet}.7.2"
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


REPO = Path(__file__).resolve().parents[1]
TOKEN = "two-hosts-shared-secret-Rk8Tz3Wm6Nq1"
#: a serve bound beyond loopback requires a token, and so does everyone who talks to it
ENV = {**os.environ, "SAGE_TRANSPORT_AUTH_TOKEN": TOKEN}


def _cli(ns: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", ns, sys.executable, "-m", "sage_transport.cli", *args]


def test_serve_beyond_loopback_needs_a_token_and_a_sender_must_prove_it(tmp_path: Path) -> None:
    with two_namespaces() as (sender_ns, receiver_ns, receiver_ip):
        bare = {k: v for k, v in os.environ.items() if k != "SAGE_TRANSPORT_AUTH_TOKEN"}
        refused = subprocess.run(
            _cli(receiver_ns, "serve", "--host", receiver_ip, "--port", "0", "--once"),
            capture_output=True, text=True, timeout=60, env=bare,
        )  # fmt: skip
        assert refused.returncode != 0 and f"serve --host='{receiver_ip}' is not a loopback address" in refused.stderr
        server = subprocess.Popen(
            _cli(receiver_ns, "serve", "--host", receiver_ip, "--port", "0"), stdout=subprocess.PIPE, text=True, env=ENV
        )
        try:
            assert server.stdout is not None
            address = server.stdout.readline().rsplit("listening on ", 1)[1].strip()
            for env in (bare, {**bare, "SAGE_TRANSPORT_AUTH_TOKEN": "a-wrong-token-value-Yh2Cp5Xv9Bd4"}):
                proc = subprocess.run(
                    _cli(sender_ns, "migrate", "--peer", address, "--transport", "tcp", "--tokens", "256"),
                    capture_output=True, text=True, timeout=60, env=env,
                )  # fmt: skip
                assert proc.returncode != 0 and "did not prove the shared auth_token" in proc.stderr, proc.stderr[-800:]
            assert server.poll() is None  # rejected senders do not hurt the serve
        finally:
            server.kill()
            server.wait()
            if server.stdout is not None:
                server.stdout.close()


@pytest.mark.parametrize("transport", ["tcp", "ucx"])
def test_migrate_between_two_namespaces(transport: str, tmp_path: Path) -> None:
    with two_namespaces() as (sender_ns, receiver_ns, receiver_ip):
        server = subprocess.Popen(
            _cli(receiver_ns, "serve", "--host", receiver_ip, "--port", "0", "--once"), stdout=subprocess.PIPE, text=True, env=ENV
        )
        try:
            assert server.stdout is not None
            line = server.stdout.readline()
            assert f"listening on {receiver_ip}:" in line, line
            address = line.rsplit("listening on ", 1)[1].strip()
            out = tmp_path / "m.json"
            config = "ucx_tls=tcp" if transport == "ucx" else "chunk_size=4MiB"
            proc = subprocess.run(
                _cli(sender_ns, "migrate", "--peer", address, "--transport", transport, "--config", config,
                     "--tokens", "2048", "--repeat", "2", "--json", str(out)),
                capture_output=True, text=True, timeout=120, env=ENV,
            )  # fmt: skip
            assert proc.returncode == 0, proc.stderr[-2000:]
            record = json.loads(out.read_text())
            assert record["verified"] is True and record["peers"] == [address] and record["transport"] == transport
            if transport == "ucx":
                lanes = {lane for lanes in record["ucx_transports"].values() for lane in lanes}
                assert any(lane.startswith("tcp/") for lane in lanes), lanes
            assert server.wait(timeout=30) == 0
        finally:
            server.kill()
            server.wait()
            if server.stdout is not None:
                server.stdout.close()


def test_probe_peer_across_namespaces_uses_the_profile_s_network_transport() -> None:
    """No ucx_tls given: the topology profile's UCX transports must still reach a peer behind a veth (a namespace
    has only virtual NICs), and a forced remote endpoint must report TCP lanes, not shared memory."""
    with two_namespaces() as (sender_ns, receiver_ns, receiver_ip):
        server = subprocess.Popen(
            _cli(receiver_ns, "serve", "--host", receiver_ip, "--port", "0"), stdout=subprocess.PIPE, text=True, env=ENV
        )
        try:
            assert server.stdout is not None
            address = server.stdout.readline().rsplit("listening on ", 1)[1].strip()
            probe = _cli(sender_ns, "probe", "--no-vendors", "--json", "--peer", address, "--samples", "20")
            proc = subprocess.run(
                [*probe, "--config", "ucx_endpoint=remote"], capture_output=True, text=True, timeout=120, env=ENV
            )
            assert proc.returncode == 0, proc.stderr[-2000:]
            record = json.loads(proc.stdout)
        finally:
            server.kill()
            server.wait()
            if server.stdout is not None:
                server.stdout.close()
    assert record["profile"]["ucx_tls"][-1] == "tcp" and "tcp" not in record["profile"]["ucx_tls_same_host"]
    path = record["path"]
    assert path["verified"] is True and path["peer"] == address and path["placement"] == "none"
    lanes = {lane for lanes in path["ucx_transports"].values() for lane in lanes}
    assert lanes and all(lane.startswith("tcp/") for lane in lanes), lanes


@contextlib.contextmanager
def namespace_behind_veth() -> Iterator[tuple[str, str, str]]:
    """One namespace joined to this one by a veth pair. Yields (namespace, our end's device, its IP)."""
    tag = uuid.uuid4().hex[:6]
    ns, ours, theirs = f"sgP{tag}", f"vp{tag}", f"vq{tag}"
    subnet = 10 + int(tag[:2], 16) % 200
    try:
        _ip("netns", "add", ns)
        _ip("link", "add", ours, "type", "veth", "peer", "name", theirs)
        _ip("link", "set", theirs, "netns", ns)
        _ip("addr", "add", f"10.{subnet}.9.1/24", "dev", ours)
        _ip("-n", ns, "addr", "add", f"10.{subnet}.9.2/24", "dev", theirs)
        _ip("link", "set", ours, "up")
        _ip("-n", ns, "link", "set", theirs, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
    except (subprocess.CalledProcessError, OSError) as exc:
        subprocess.run(["ip", "link", "del", ours], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        pytest.skip(f"cannot create a network namespace here: {exc}")
    try:
        yield ns, ours, f"10.{subnet}.9.2"
    finally:
        subprocess.run(["ip", "link", "del", ours], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.mark.parametrize("transport", ["tcp", "ucx"])
async def test_a_partition_is_detected_in_time_and_a_fresh_connection_works_after_it(transport: str) -> None:
    """Promise 7 (the scenario below). UCX runs it in a fresh process: UCX lists network devices once per
    process, so a veth pair made after this process first used UCX would be invisible to it."""
    if transport == "tcp":
        await partition_scenario(transport)
        return
    code = "import asyncio, tests.test_two_hosts as t; asyncio.run(t.partition_scenario('ucx'))"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out = (await asyncio.wait_for(proc.communicate(), 120))[0].decode(errors="replace")
    assert proc.returncode == 0, out[-3000:]
    assert "partition scenario passed" in out


async def partition_scenario(transport: str) -> None:
    """Promise 7: the veth link to the peer's namespace goes down while a transfer runs. Within heartbeat ×
    misses (`peer_timeout_s`, 1 s here; UCX's link beats every 0.1 s, TCP's socket gives up on bytes
    unacknowledged that long) the transfer fails with a typed error naming the peer; once the link is back, a
    new connection carries a verified transfer, and the old handle stays failed."""
    import asyncio
    import time

    from sage_transport import KVMemory, KVTransferChannel, KVTransportConfig, TransferPlan
    from sage_transport.errors import TransportError
    from sage_transport.testing.peer import PEER_SCHEMA

    timeout_s = 1.0
    settings = f"chunk_size=8KiB,direct_placement=false,heartbeat_interval_s=0.1,peer_timeout_s={timeout_s},auth_token={TOKEN}"
    if transport == "ucx":  # a namespace shares this host's boot id, name and IPC: make UCX treat it as the other
        settings += ",ucx_endpoint=remote"  # host it stands for (shared memory across namespaces stalls, see README)
    with namespace_behind_veth() as (ns, ours, their_ip):
        child = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", ns, sys.executable, "-m", "sage_transport.testing.peer", "--role", "receiver",
            "--transport", transport, "--config", f"{settings},listen_host={their_ip}", "--blocks", "256",
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            assert child.stdout is not None
            hello = json.loads(await asyncio.wait_for(child.stdout.readline(), 30))
            config = KVTransportConfig.resolve(settings, env={})
            async with KVTransferChannel(transport, config, name="parent") as channel:
                channel.register(KVMemory.allocate(PEER_SCHEMA, 256, fill=3))
                peer = await channel.connect(hello["address"])
                await asyncio.wait_for(channel.transfer(TransferPlan.for_blocks(peer, PEER_SCHEMA, range(8), range(8))), 20)
                _ip("link", "set", ours, "down")
                cut = time.monotonic()
                old = channel.submit(TransferPlan.for_blocks(peer, PEER_SCHEMA, range(256), range(256), transfer_id="cut"))
                with pytest.raises(TransportError) as caught:
                    await asyncio.wait_for(old.wait(), 10 * timeout_s)
                noticed = time.monotonic() - cut
                assert "transfer cut" in str(caught.value) and hello["name"] in str(caught.value), caught.value
                assert noticed < 2 * timeout_s, f"partition noticed after {noticed:.2f} s"
                assert channel.peers == []
                _ip("link", "set", ours, "up")
                await asyncio.sleep(0.2)
                fresh = await channel.connect(hello["address"])
                plan = TransferPlan.for_blocks(fresh, PEER_SCHEMA, range(64), range(64), transfer_id="after")
                result = await asyncio.wait_for(channel.transfer(plan), 20)
                assert result.chunks > 0 and channel.peers == [fresh]
                with pytest.raises(TransportError):
                    await old.wait()  # the old handle stays failed
                print(f"partition scenario passed: noticed after {noticed:.3f} s", flush=True)
        finally:
            child.kill()
            await child.wait()
