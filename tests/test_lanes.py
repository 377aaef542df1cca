"""Several connections per peer (``connections_per_peer``): chunks spread over them and land in place, control
stays in order on the first, an extra connection must present its session's key, a lost one fails the session."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest

from sage_transport import (
    AuthError,
    KVMemory,
    KVTransferChannel,
    KVTransportConfig,
    PeerDeadError,
    TransferPlan,
    TransportError,
)
from sage_transport.handshake import expect
from sage_transport.hw import TopologyManager
from sage_transport.hw.profile import connections_for_remote_peers
from sage_transport.transports.mock import FaultAction, FaultRule, MockNetwork, MockTransport
from sage_transport.wire import PROTOCOL_VERSION, JoinLane, Ready, encode_message

from .conftest import SMALL, assert_idle, channel_pair, filled, shuffled


def pages(memory: KVMemory) -> np.ndarray:
    s = memory.schema
    return np.frombuffer(memory.buffers[0], np.uint8).reshape(s.num_layers, s.kv_planes, memory.num_blocks, -1)


async def test_chunks_spread_over_every_connection_both_ways_and_land_exactly() -> None:
    config = KVTransportConfig(chunk_size=1024, peer_window=8, connections_per_peer=3)
    async with channel_pair(config=config) as pair:
        sending, receiving = pair.sender._sessions[pair.peer], pair.receiver._sessions["prefill"]
        assert len(sending.lanes) == len(receiving.lanes) == 2
        assert pair.sender.links()[pair.peer]["connections"] == 3
        dst = shuffled(64)
        result = await pair.sender.transfer(TransferPlan.for_blocks(pair.peer, SMALL, range(64), dst))
        assert result.integrity.value == "verified"
        assert np.array_equal(pair.dst_pages()[:, :, dst], pair.src_pages()[:, :, list(range(64))])
        carried = pair.sender.links()[pair.peer]["bytes_sent_by_connection"]
        assert len(carried) == 3 and all(n > 0 for n in carried) and sum(carried) == result.bytes, carried
        # and back: the accepting side sends on the lanes the other side opened
        back = await pair.receiver.transfer(TransferPlan.for_blocks("prefill", SMALL, range(8), range(8, 16)))
        assert back.integrity.value == "verified"
        assert all(n > 0 for n in pair.receiver.links()["prefill"]["bytes_sent_by_connection"])
        assert_idle(pair.sender, pair.receiver)


async def test_resent_and_duplicated_chunks_across_connections_lose_no_byte() -> None:
    """A copy of a chunk may come by another connection than the first: whichever lands second is a duplicate."""
    config = KVTransportConfig(chunk_size=1024, peer_window=8, connections_per_peer=3, ack_timeout_s=0.1)
    async with channel_pair(config=config, seed=3) as pair:
        pair.network.faults.add(FaultRule(FaultAction.CORRUPT, src="mock://prefill", after=20, times=2))
        pair.network.faults.add(FaultRule(FaultAction.DROP, src="mock://prefill", after=30, times=2))
        pair.network.faults.add(FaultRule(FaultAction.DUPLICATE, src="mock://prefill", times=None, probability=0.3))
        dst = shuffled(64, 2)
        result = await asyncio.wait_for(pair.sender.transfer(TransferPlan.for_blocks(pair.peer, SMALL, range(64), dst)), 20)
        assert result.retries >= 2 and pair.receiver.statistics().duplicates > 0
        assert np.array_equal(pair.dst_pages()[:, :, dst], pair.src_pages()[:, :, list(range(64))])
        assert_idle(pair.sender, pair.receiver)


async def test_over_tcp_every_connection_carries_chunks_into_place() -> None:
    config = KVTransportConfig(chunk_size=16 << 10, peer_window=16, connections_per_peer=4, direct_placement=False)
    src, dst = filled(SMALL, 512, 5), KVMemory.allocate(SMALL, 512, fill=0)
    async with asyncio.timeout(30):
        async with KVTransferChannel("tcp", config, name="a") as a, KVTransferChannel("tcp", config, name="b") as b:
            a.register(src)
            b.register(dst)
            peer = await a.connect(await b.listen())
            order = shuffled(512, 9)
            result = await a.transfer(TransferPlan.for_blocks(peer, SMALL, range(512), order))
            assert result.integrity.value == "verified"
            link = a.links()[peer]
            assert link["connections"] == 4 and all(n > 0 for n in link["bytes_sent_by_connection"]), link
            assert b.statistics().chunks_received == result.chunks and b.statistics().chunks_placed == 0
            receiving = b._sessions["a"]
            # every chunk landed straight in its scattered pages: no reader ever needed staging
            assert all(slot.staging.nbytes == 0 for slot in [receiving._slot]), "a chunk was staged"
            assert_idle(a, b)
    assert np.array_equal(pages(dst)[:, :, order], pages(src))


async def test_a_connection_without_its_sessions_key_is_refused_and_a_key_joins_once() -> None:
    network = MockNetwork()
    config = KVTransportConfig(connections_per_peer=2)
    async with (
        KVTransferChannel(MockTransport(network, name="s"), name="s") as server,
        KVTransferChannel(MockTransport(network, name="c"), config, name="c") as client,
    ):
        address = await server.listen()
        await client.connect(address)
        assert len(client._sessions["s"].lanes) == 1
        assert not server._lane_keys  # every lane it granted joined: the key is gone, a replay of it is a stranger's
        stranger = MockTransport(network, name="x")
        for key in (os.urandom(32), b"\0" * 32):
            conn = await stranger.connect(address)
            await conn.send(encode_message(JoinLane(PROTOCOL_VERSION, key, 1)))
            with pytest.raises(AuthError, match="unknown lane key"):
                await expect(conn, Ready, "joining")
            await conn.aclose()
        assert server.statistics().handshake_failures == 2
        assert len(server._sessions["c"].lanes) == 1  # nothing joined the session
        assert server.peers == ["c"]


async def test_a_lost_extra_connection_fails_the_transfers_and_leaves_nothing_running() -> None:
    config = KVTransportConfig(chunk_size=1024, peer_window=4, connections_per_peer=3)
    async with channel_pair(config=config, bandwidth_Bps=2e6) as pair:
        plan = TransferPlan.for_blocks(pair.peer, SMALL, range(64), range(64))
        handle = pair.sender.submit(plan)
        while handle.progress().chunks_verified < 8:
            await asyncio.sleep(0.002)
        await pair.receiver._sessions["prefill"].lanes[1].aclose()  # one extra connection goes, the first stays
        with pytest.raises((PeerDeadError, TransportError), match=plan.transfer_id):
            await asyncio.wait_for(handle.wait(), 10)
        await asyncio.sleep(0.05)
        assert pair.sender.peers == []
        assert_idle(pair.sender, pair.receiver)


async def test_by_default_a_peer_on_this_host_gets_one_connection() -> None:
    async with channel_pair() as pair:
        assert pair.sender.links()[pair.peer]["connections"] == 1
    async with asyncio.timeout(20):
        async with KVTransferChannel("tcp", name="a") as a, KVTransferChannel("tcp", name="b") as b:
            peer = await a.connect(await b.listen())
            assert a.links()[peer]["connections"] == 1


@pytest.mark.parametrize(
    ("cores", "speed_mbps", "expected"),
    [(2, 10_000, 1), (4, 100_000, 1), (8, 10_000, 1), (8, 100_000, 2), (32, 100_000, 4), (32, 200_000, 4), (16, None, 4)],
)
def test_the_profile_picks_connections_from_cores_and_link_speed(
    monkeypatch: pytest.MonkeyPatch, cores: int, speed_mbps: int | None, expected: int
) -> None:
    topology = TopologyManager(vendors=(), measure_memory=False).probe()
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(cores)))
    nic = topology.network_interfaces[0] if topology.network_interfaces else None
    if nic is not None:
        import msgspec

        nic = msgspec.structs.replace(nic, speed_mbps=speed_mbps)
    streams, why = connections_for_remote_peers(topology, KVTransportConfig(), rdma=False, nic=nic)
    if nic is None and speed_mbps is not None:
        pytest.skip("no network interface to describe")
    assert streams == expected, why
    assert str(cores) in why
    assert connections_for_remote_peers(topology, KVTransportConfig(connections_per_peer=5), False, nic)[0] == 5
    assert connections_for_remote_peers(topology, KVTransportConfig(), rdma=True, nic=nic)[0] == 1


def test_bad_connections_per_peer_is_refused_naming_the_field() -> None:
    from sage_transport import ConfigError

    for value in (-1, 17, "2"):
        with pytest.raises(ConfigError, match=rf"connections_per_peer={value!r}"):
            KVTransportConfig(connections_per_peer=value)  # type: ignore[arg-type]
