"""Addresses and membership through a real etcd (Debian's etcd-server, started here on free ports) and torch's
TCPStore: one sender finding two receivers, joins and leaves as they happen, a killed member expiring with its
lease, an unreachable store named in its error."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterator

import numpy as np
import pytest

from sage_transport import KVCacheSchema, KVMemory, KVTransferChannel, TransferPlan
from sage_transport.errors import ConfigError, PeerDeadError, TransferTimeoutError
from sage_transport.rendezvous import (
    AddressStore,
    EtcdStore,
    MemberEvent,
    TorchTCPStore,
    connect_by_name,
    lookup,
    open_store,
    publish,
    watch_members,
)
from sage_transport.testing.etcd import EtcdServer, etcd_binary, registered_serves

from .conftest import filled

SCHEMA = KVCacheSchema(num_layers=2, num_kv_heads=2, head_dim=32, block_size=8)
needs_etcd = pytest.mark.skipif(etcd_binary() is None, reason="no etcd binary (Debian: apt-get install etcd-server)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdServer]:
    if etcd_binary() is None:
        pytest.skip("no etcd binary (Debian: apt-get install etcd-server)")
    pytest.importorskip("aetcd")
    with EtcdServer() as server:
        yield server


async def _one_sender_two_receivers(sender_store: AddressStore, receiver_stores: list[AddressStore]) -> None:
    blocks = 32
    src = filled(SCHEMA, blocks)
    dsts = [KVMemory.allocate(SCHEMA, blocks, fill=0) for _ in receiver_stores]
    async with (
        KVTransferChannel("ucx", name="decode-0") as r0,
        KVTransferChannel("ucx", name="decode-1") as r1,
        KVTransferChannel("ucx", name="prefill-0") as tx,
    ):
        tx.register(src)
        for channel, dst, store in zip((r0, r1), dsts, receiver_stores):
            channel.register(dst)
            await publish(channel, store)
        for name, dst in (("decode-0", dsts[0]), ("decode-1", dsts[1])):
            peer = await connect_by_name(tx, sender_store, name, timeout_s=10)
            result = await tx.transfer(TransferPlan.for_blocks(peer, SCHEMA, range(blocks), range(blocks)))
            assert result.integrity.value == "verified"
            assert np.array_equal(np.frombuffer(dst.buffers[0], np.uint8), np.frombuffer(src.buffers[0], np.uint8))


async def _next(events: AsyncIterator[MemberEvent], timeout_s: float) -> MemberEvent:
    return await asyncio.wait_for(anext(events), timeout_s)


async def test_tcpstore_publishes_addresses_for_many_peers() -> None:
    pytest.importorskip("torch")
    port = _free_port()
    server = open_store(f"tcpstore://127.0.0.1:{port}", is_server=True)
    clients = [open_store(f"tcpstore://127.0.0.1:{port}") for _ in range(2)]
    await _one_sender_two_receivers(server, clients)
    with pytest.raises(TransferTimeoutError, match="nobody"):
        await lookup(server, "nobody", timeout_s=0.2)


async def test_etcd_publishes_addresses_for_many_peers(etcd: EtcdServer) -> None:
    store = open_store(etcd.url)
    assert isinstance(store, EtcdStore)
    try:
        await _one_sender_two_receivers(store, [open_store(etcd.url), open_store(etcd.url)])
        with pytest.raises(TransferTimeoutError, match="nobody"):
            await lookup(store, "nobody", timeout_s=0.1)
    finally:
        await store.close()


async def test_etcd_watchers_see_members_join_and_leave_as_it_happens(etcd: EtcdServer) -> None:
    prefix = "t-watch/"
    store = open_store(etcd.url)
    async with KVTransferChannel("tcp", name="decode-a") as a, KVTransferChannel("tcp", name="decode-b") as b:
        first = await publish(a, store, prefix=prefix, ttl_s=5)
        events = watch_members(store, prefix)
        assert await _next(events, 5) == MemberEvent("joined", "decode-a", first.address)  # there before the watch
        second = await publish(b, store, prefix=prefix, ttl_s=5)
        assert await _next(events, 5) == MemberEvent("joined", "decode-b", second.address)
        await first.withdraw()
        assert await _next(events, 5) == MemberEvent("left", "decode-a", None)
        assert not first.alive and second.alive
        await b.aclose()  # a closed channel withdraws its registration
        assert await _next(events, 5) == MemberEvent("left", "decode-b", None)
        await events.aclose()
    await store.close()


_MEMBER = """
import asyncio, sys
from sage_transport import KVTransferChannel
from sage_transport.rendezvous import open_store, publish
async def main():
    async with KVTransferChannel("tcp", name="doomed") as channel:
        await publish(channel, open_store(sys.argv[1]), prefix=sys.argv[2], ttl_s=float(sys.argv[3]))
        print("published", flush=True)
        await asyncio.sleep(3600)
asyncio.run(main())
"""


async def _killed_member_leaves(url: str, prefix: str, ttl_s: float) -> float:
    """Seconds from SIGKILL of a published member to its ``left`` event."""
    store = open_store(url, is_server=False)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _MEMBER, url, prefix, str(ttl_s), stdout=asyncio.subprocess.PIPE, env=env
    )
    try:
        assert child.stdout is not None
        assert (await asyncio.wait_for(child.stdout.readline(), 60)).strip() == b"published"
        events = watch_members(store, prefix, ttl_s=ttl_s)
        joined = await _next(events, 10)
        assert joined.kind == "joined" and joined.name == "doomed"
        child.send_signal(signal.SIGKILL)  # no withdrawal: only the lease (or the beats) can tell
        killed = time.monotonic()
        left = await _next(events, ttl_s + 10)
        assert left == MemberEvent("left", "doomed", None)
        await events.aclose()
        return time.monotonic() - killed
    finally:
        if child.returncode is None:
            child.kill()
        await child.wait()
        await store.close()


async def test_a_killed_etcd_member_leaves_when_its_lease_expires(etcd: EtcdServer) -> None:
    gone_after = await _killed_member_leaves(etcd.url, "t-killed/", ttl_s=2.0)
    assert gone_after < 2.0 + 5.0, gone_after  # its lease's TTL and etcd's expiry check, never for ever


async def test_a_killed_tcpstore_member_leaves_once_its_beats_stop() -> None:
    pytest.importorskip("torch")
    port = _free_port()
    host = open_store(f"tcpstore://127.0.0.1:{port}", is_server=True)
    assert isinstance(host, TorchTCPStore)
    gone_after = await _killed_member_leaves(f"tcpstore://127.0.0.1:{port}", "t-killed/", ttl_s=1.0)
    assert gone_after < 1.0 + 5.0, gone_after
    async with KVTransferChannel("tcp", name="decode-t") as channel:  # and a withdrawal is seen as a leave
        registration = await publish(channel, host, prefix="t-tcp/", ttl_s=1.0)
        events = watch_members(host, "t-tcp/", ttl_s=1.0)
        assert await _next(events, 5) == MemberEvent("joined", "decode-t", registration.address)
        await registration.withdraw()
        assert await _next(events, 5) == MemberEvent("left", "decode-t", None)
        await events.aclose()


async def test_an_unreachable_etcd_is_named_in_the_error() -> None:
    pytest.importorskip("aetcd")
    url = f"etcd://127.0.0.1:{_free_port()}"
    store = open_store(url)
    async with KVTransferChannel("tcp", name="lonely") as channel:
        with pytest.raises(PeerDeadError, match=url.replace(".", r"\.")):
            await publish(channel, store, ttl_s=2)
    await store.close()


async def test_bad_store_urls_and_ttls_name_the_value() -> None:
    with pytest.raises(ConfigError, match="redis://x:1"):
        open_store("redis://x:1")
    with pytest.raises(ConfigError, match="'tcpstore'"):
        open_store("tcpstore")
    async with KVTransferChannel("tcp", name="short") as channel:
        with pytest.raises(ConfigError, match=r"ttl_s=0\.5 must be at least 1 second"):
            await publish(channel, open_store("etcd://127.0.0.1:1"), ttl_s=0.5)


def test_migrate_finds_its_receivers_through_etcd_and_a_killed_one_leaves(etcd: EtcdServer, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    import json
    import subprocess

    from sage_transport.cli import main

    serve = [sys.executable, "-m", "sage_transport.cli", "serve", "--store", etcd.url, "--ttl", "2", "--name"]
    serves = [subprocess.Popen([*serve, f"decode-{i}"], stdout=subprocess.PIPE, text=True) for i in range(2)]
    try:
        addresses = []
        for proc in serves:
            assert proc.stdout is not None
            addresses.append(proc.stdout.readline().rsplit("listening on ", 1)[1].strip())
            assert "registered as decode-" in proc.stdout.readline()
        job = ["migrate", "--store", etcd.url, "--tokens", "512", "--repeat", "1", "--json"]
        out = tmp_path / "all.json"
        assert main([*job, str(out), "--to-all"]) == 0
        record = json.loads(out.read_text())
        assert record["verified"] is True and sorted(record["peers"]) == sorted(addresses)
        out = tmp_path / "one.json"
        assert main([*job, str(out), "--to", "decode-1"]) == 0
        assert json.loads(out.read_text())["peers"] == [addresses[1]]
        serves[0].send_signal(signal.SIGKILL)  # its registration outlives it by its TTL, no longer
        serves[0].wait()

        deadline = time.monotonic() + 2.0 + 5.0
        while "decode-0" in registered_serves(etcd.url) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert registered_serves(etcd.url) == {"decode-1": addresses[1]}
    finally:
        for proc in serves:
            proc.terminate()
            proc.wait(timeout=20)
            if proc.stdout is not None:
                proc.stdout.close()
    capsys.readouterr()
    assert main(["migrate", "--to", "decode-1"]) != 0
    assert "--to and --to-all need --store URL" in capsys.readouterr().err
