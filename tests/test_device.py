"""Device KV through the channel: fletcher64 on host and device, transfers between every pair of memory kinds,
corruption, device codecs, layer readiness from events, placement through device windows, refusals, and two
processes. Without a GPU the device is emulated (host torch tensors, :mod:`sage_transport.testing.device`): the
same code path but for the CUDA stream, events and IPC calls, which the ``gpu`` tests at the end exercise."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
import torch
import xxhash

from sage_transport import (
    ConfigError,
    KVCacheSchema,
    KVMemory,
    KVTransferChannel,
    KVTransportConfig,
    PlanError,
    TransferPlan,
    UnsupportedError,
)
from sage_transport.device import DeviceKV, EmulatedRuntime, fletcher64, fletcher64_pieces
from sage_transport.device.checksum import combine
from sage_transport.testing.device import device_pages, emulated_memory
from sage_transport.testing.device_peer import schema_for_test
from sage_transport.transports.mock import FaultAction, FaultRule, MockNetwork, MockTransport

from .conftest import SMALL, channel_pair, filled

HAS_UCX = importlib.util.find_spec("ucxx") is not None
HAS_CUDA = torch.cuda.is_available()
needs_ucx = pytest.mark.skipif(not HAS_UCX, reason="ucxx is not installed")


def memory_of(kind: str, schema: KVCacheSchema, blocks: int, *, seed: int | None = None, **options: Any) -> KVMemory:
    """``device`` (emulated here, CUDA in the gpu tests), ``cuda`` or ``host`` KV; random bytes from ``seed``."""
    if kind == "device":
        return emulated_memory(schema, blocks, seed=seed, **options)
    if kind == "cuda":
        memory = KVMemory.allocate(schema, blocks, fill=0, device="cuda")
        if seed is not None:
            generator = torch.Generator(device="cuda").manual_seed(seed)
            for buf in memory.buffers:
                buf.copy_(torch.randint(0, 256, buf.shape, dtype=torch.uint8, device="cuda", generator=generator))
        return memory
    return filled(schema, blocks, seed) if seed is not None else KVMemory.allocate(schema, blocks, fill=0, **options)


def float_memory(kind: str, schema: KVCacheSchema, blocks: int, seed: int) -> KVMemory:
    """KV holding finite bf16 values (what a codec quantises)."""
    memory = memory_of(kind, schema, blocks)
    generator = torch.Generator().manual_seed(seed)
    for buf in memory.buffers:
        target = torch.from_numpy(buf) if isinstance(buf, np.ndarray) else buf
        values = torch.randn(target.numel() // 2, generator=generator).to(torch.bfloat16)
        target.view(torch.bfloat16).copy_(values.to(target.device))
    return memory


@contextlib.asynccontextmanager
async def mock_pair(
    src: KVMemory, dst: KVMemory, config: KVTransportConfig, receiver_config: KVTransportConfig | None = None
) -> AsyncIterator[Any]:
    """conftest's pair over the mock with these memories: ``(network, sender, receiver, peer)``."""
    async with channel_pair(src.schema, src.num_blocks, config=config, receiver_config=receiver_config, src=src, dst=dst) as pair:
        yield pair.network, pair.sender, pair.receiver, pair.peer


async def move(
    sender: KVTransferChannel, receiver: KVTransferChannel, peer: str, schema: KVCacheSchema, order: list[int], **plan: Any
) -> tuple[Any, Any]:
    transfer = TransferPlan.for_blocks(peer, schema, range(len(order)), order, **plan)
    waiter = asyncio.ensure_future(receiver.wait_received(transfer.transfer_id))
    result = await sender.transfer(transfer)
    return result, await waiter


def shuffled(blocks: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).permutation(blocks).tolist()


# ---- fletcher64 ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nbytes", [0, 5, 8, 4096, 4096 * 33 + 3])
def test_fletcher64_is_the_same_on_host_and_device_and_over_pieces(nbytes: int) -> None:
    data = np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8)
    kv = DeviceKV([torch.zeros(8, dtype=torch.uint8)], 8, EmulatedRuntime())
    sums = torch.zeros(2, dtype=torch.int64)
    kv.sums(torch.from_numpy(data.copy()), nbytes, sums)
    assert combine(int(sums[0]), int(sums[1]), nbytes) == fletcher64(data)
    cut = nbytes // 16 * 8
    assert fletcher64_pieces([data[:cut], data[cut:]]) == fletcher64(data)


def test_fletcher64_catches_a_flipped_bit_and_swapped_words() -> None:
    data = np.random.default_rng(7).integers(0, 256, 1 << 16, dtype=np.uint8)
    value = fletcher64(data)
    flipped = data.copy()
    flipped[12345] ^= 0x10
    swapped = data.copy().view(np.uint64)
    swapped[[3, 700]] = swapped[[700, 3]]
    assert fletcher64(flipped) != value and fletcher64(swapped.view(np.uint8)) != value
    assert fletcher64(data[:-8]) != fletcher64(np.concatenate([data[:-8], np.zeros(8, np.uint8)]))  # length counts


# ---- memory ------------------------------------------------------------------------------------------------


def test_device_memory_is_checked_like_host_memory() -> None:
    runtime = EmulatedRuntime()
    with pytest.raises(ConfigError, match="buffer 3 holds 32 bytes but needs 4096"):
        KVMemory(SMALL, 8, [torch.zeros(SMALL.page_bytes * 16, dtype=torch.uint8)] * 3 + [torch.zeros(8)], runtime=runtime)
    with pytest.raises(ConfigError, match="not contiguous"):
        KVMemory(SMALL, 8, torch.zeros(2, SMALL.page_bytes * 32, dtype=torch.uint8).t(), runtime=runtime)
    memory = emulated_memory(SMALL, 8)
    assert memory.kind == "cuda" and memory.views == [] and len(memory.buffers) == SMALL.num_layers
    with pytest.raises(ConfigError, match="shared=True is for host memory"):
        KVMemory.allocate(SMALL, 8, shared=True, device="cuda")


# ---- transfers ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("src_kind", "dst_kind"), [("device", "device"), ("device", "host"), ("host", "device")])
@pytest.mark.parametrize("chunk_size", [512, 1024, 1 << 20])
@pytest.mark.parametrize("per_layer", [True, False])
@pytest.mark.parametrize("span", [True, False])
async def test_device_kv_moves_shuffled_between_every_pair_of_kinds(
    src_kind: str, dst_kind: str, chunk_size: int, per_layer: bool, span: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not span:  # chunks move by runs of one tensor (where no span over the tensors can be made)
        monkeypatch.setattr("sage_transport.device.kv.make_span", lambda segments, runtime: None)
    options = {"per_layer": per_layer}
    src = memory_of(src_kind, SMALL, 64, seed=3, **(options if src_kind == "device" else {}))
    dst = memory_of(dst_kind, SMALL, 64, **(options if dst_kind == "device" else {}))
    order = shuffled(64)
    async with mock_pair(src, dst, KVTransportConfig(chunk_size=chunk_size, peer_window=4)) as (_, sender, receiver, peer):
        result, received = await move(sender, receiver, peer, SMALL, order)
        assert result.integrity.value == received.integrity.value == "verified"
        assert result.bytes == received.bytes == 64 * SMALL.num_layers * 2 * SMALL.page_bytes
        small, _ = await move(sender, receiver, peer, SMALL, [order[0]], layers=(1, 2))  # one chunk: one frame each way
        assert small.chunks == 1
        assert receiver.statistics().checksum_failures == 0
    assert np.array_equal(device_pages(dst)[:, :, order], device_pages(src))


@pytest.mark.parametrize("span", [True, False])
async def test_a_chunk_is_one_kernel_over_the_span_or_one_per_run_without_it(span: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not span:  # where no span can be made (tensors too far apart): runs of one tensor each
        monkeypatch.setattr("sage_transport.device.kv.make_span", lambda segments, runtime: None)
    calls: list[str] = []
    real_copy = torch.Tensor.index_copy_
    monkeypatch.setattr(torch.Tensor, "index_copy_", lambda self, *a: (calls.append("index_copy_"), real_copy(self, *a))[1])
    real_select = torch.index_select
    monkeypatch.setattr(torch, "index_select", lambda *a, **k: (calls.append("index_select"), real_select(*a, **k))[1])
    src, dst = memory_of("device", SMALL, 64, seed=13), memory_of("device", SMALL, 64)
    order = shuffled(64, 13)
    async with mock_pair(src, dst, KVTransportConfig(chunk_size=1 << 20)) as (_, sender, receiver, peer):
        assert (sender._device.span is not None) is span
        result, _ = await move(sender, receiver, peer, SMALL, order)  # one chunk of every layer's pages
    assert result.chunks == 1 and np.array_equal(device_pages(dst)[:, :, order], device_pages(src))
    # gather + scatter: one kernel each over the span; without it one per layer tensor each way (the sender's runs are
    # contiguous, so slice copies; the receiver's shuffled ones one index_copy_ each)
    assert calls == (["index_select", "index_copy_"] if span else ["index_copy_"] * SMALL.num_layers), calls


@pytest.mark.parametrize("zero_copy", [True, False])
async def test_corrupted_device_chunks_are_refused_and_sent_again(zero_copy: bool) -> None:
    src, dst = memory_of("device", SMALL, 64, seed=5), memory_of("device", SMALL, 64)
    order = shuffled(64, 1)
    config = KVTransportConfig(chunk_size=1024, peer_window=4, zero_copy=zero_copy)
    async with mock_pair(src, dst, config) as (network, sender, receiver, peer):
        network.faults.add(FaultRule(FaultAction.CORRUPT, src="mock://prefill", payload_only=True, after=2, times=3))
        result, _ = await move(sender, receiver, peer, SMALL, order)
        assert result.retries >= 3 and receiver.statistics().checksum_failures >= 3
    assert np.array_equal(device_pages(dst)[:, :, order], device_pages(src))


@pytest.mark.parametrize(("src_kind", "dst_kind"), [("device", "device"), ("device", "host"), ("host", "device")])
@pytest.mark.parametrize("wire", ["int8", "fp8_e4m3"])
async def test_device_kv_is_quantised_and_dequantised_on_the_device(src_kind: str, dst_kind: str, wire: str) -> None:
    src, dst = float_memory(src_kind, SMALL, 32, seed=2), memory_of(dst_kind, SMALL, 32)
    order = shuffled(32, 2)
    config = KVTransportConfig(chunk_size=4096, codec_policy="always", target_dtype=wire)
    async with mock_pair(src, dst, config) as (_, sender, receiver, peer):
        result, received = await move(sender, receiver, peer, SMALL, order)
    assert result.integrity.value == received.integrity.value == "verified"
    assert 0 < result.wire_bytes < result.bytes / 1.8
    sent = torch.from_numpy(device_pages(src).copy()).view(torch.bfloat16).float()
    got = torch.from_numpy(device_pages(dst)[:, :, order].copy()).view(torch.bfloat16).float()
    error = (got - sent).abs().max().item() / sent.abs().max().item()
    assert 0 < error < (0.02 if wire == "int8" else 0.08)


async def test_compression_never_runs_on_device_kv() -> None:
    always = KVTransportConfig(codec_policy="always", compression="lz4")
    async with KVTransferChannel(MockTransport(MockNetwork(), name="a"), always) as channel:
        with pytest.raises(ConfigError, match="compression=lz4 runs on the host"):
            channel.register(emulated_memory(SMALL, 8))
    async with mock_pair(filled(SMALL, 16), memory_of("device", SMALL, 16), always, KVTransportConfig()) as (_, sender, _, peer):
        with pytest.raises(UnsupportedError, match="compression=lz4 runs on the host and this transfer moves device KV"):
            sender.submit(TransferPlan.for_blocks(peer, SMALL, range(4), range(4)))
    auto = KVTransportConfig(compression="lz4", codec_policy="auto")  # device transfers go without it
    async with mock_pair(memory_of("device", SMALL, 16, seed=1), memory_of("host", SMALL, 16), auto) as (
        _,
        sender,
        receiver,
        peer,
    ):
        result, _ = await move(sender, receiver, peer, SMALL, list(range(16)))
        assert result.wire_bytes == result.bytes


async def test_a_device_receiver_refuses_a_host_checksum_it_cannot_verify_on_the_device() -> None:
    async with mock_pair(filled(SMALL, 16), memory_of("device", SMALL, 16), KVTransportConfig()) as (_, sender, receiver, peer):
        assert sender._checksum_for(sender._sessions[peer])[0].value == "fletcher64"  # what a sender picks for it
        sender._checksum_for = lambda session: (sender.config.integrity, sender._checksum)  # type: ignore[method-assign]
        with pytest.raises(Exception, match="device KV is verified on the device, with fletcher64"):
            await move(sender, receiver, peer, SMALL, list(range(16)))


class _Event:
    """An engine's event stand-in: fires when told."""

    def __init__(self) -> None:
        self.fired = False
        self.queries = 0

    def query(self) -> bool:
        self.queries += 1
        return self.fired


async def test_a_layer_goes_once_the_engine_event_recorded_after_it_fired() -> None:
    src, dst = memory_of("device", SMALL, 16, seed=9), memory_of("device", SMALL, 16)
    async with mock_pair(src, dst, KVTransportConfig(chunk_size=1024)) as (_, sender, receiver, peer):
        plan = TransferPlan.for_blocks(peer, SMALL, range(16), range(16), progressive=True)
        handle = sender.submit(plan)
        with pytest.raises(PlanError, match="no query"):
            sender.mark_layer_ready(plan.transfer_id, 0, event=object())
        with pytest.raises(PlanError, match="layer 9 is outside"):
            sender.mark_layer_ready(plan.transfer_id, 9, event=_Event())
        events = [_Event() for _ in range(SMALL.num_layers)]
        for layer, event in enumerate(events):
            sender.mark_layer_ready(plan.transfer_id, layer, event=event)
        await asyncio.sleep(0.05)
        assert all(e.queries > 0 for e in events) and receiver.statistics().chunks_received == 0  # polled, none sent
        for event in events[::-1]:
            event.fired = True
        result = await handle.wait()
        assert result.integrity.value == "verified"
    assert np.array_equal(device_pages(dst), device_pages(src))


async def test_a_decode_pulls_device_kv_from_a_prefill_device_and_a_cancelled_transfer_leaves_nothing() -> None:
    src, dst = memory_of("device", SMALL, 64, seed=12), memory_of("device", SMALL, 64)
    async with mock_pair(src, dst, KVTransportConfig(chunk_size=512, peer_window=2)) as (network, sender, receiver, peer):
        prefill = receiver.peers[0]
        pulled = await receiver.pull(TransferPlan.for_blocks(prefill, SMALL, [5, 9, 1, 60], [0, 1, 2, 3]))
        assert pulled.integrity.value == "verified"
        assert np.array_equal(device_pages(dst)[:, :, [0, 1, 2, 3]], device_pages(src)[:, :, [5, 9, 1, 60]])
        network.latency_s = 0.002  # slow enough to cancel mid-flight
        handle = sender.submit(TransferPlan.for_blocks(peer, SMALL, range(64), shuffled(64, 4)))
        await asyncio.sleep(0.05)
        handle.cancel("the engine freed the blocks")
        with pytest.raises(Exception, match="freed the blocks"):
            await handle.wait()
        network.latency_s = 0.0
        result, _ = await move(sender, receiver, peer, SMALL, list(range(64)))  # the pair still works, nothing held
        assert result.integrity.value == "verified"
        for channel in (sender, receiver):
            stats = channel.statistics()
            assert (stats.transfers_sending, stats.transfers_receiving, stats.inflight_chunks) == (0, 0, 0)
    assert np.array_equal(device_pages(dst), device_pages(src))


# ---- placement into a same-host peer's device KV -----------------------------------------------------------


@needs_ucx
@pytest.mark.parametrize("verify", ["writer", "receiver"])
async def test_device_chunks_are_placed_through_the_peers_device_window(verify: str) -> None:
    schema, blocks = schema_for_test(), 96
    src, dst = memory_of("device", schema, blocks, seed=4), emulated_memory(schema, blocks, shared=True)
    order = shuffled(blocks, 3)
    config = KVTransportConfig(chunk_size=64 << 10, verify_placed=verify)
    async with KVTransferChannel("ucx", config, name="a") as sender, KVTransferChannel("ucx", config, name="b") as receiver:
        sender.register(src)
        receiver.register(dst)
        peer = await sender.connect(await receiver.listen())
        for i in range(2):  # the first proves acceptance, then chunks are placed
            result, received = await move(sender, receiver, peer, schema, order, transfer_id=f"t{i}")
            assert result.integrity.value == received.integrity.value == "verified"
        assert sender.links()[peer]["placement"] == "device_ipc"
        assert sender.statistics().chunks_placed > 0 and sender.statistics().placement_failures == 0
    assert np.array_equal(device_pages(dst)[:, :, order], device_pages(src))


async def test_a_polled_wait_lets_the_loop_run_and_ends_once_its_condition_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    from sage_transport import polling

    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.ensure_future(ticker())
    polls = 0

    def done() -> bool:
        nonlocal polls
        polls += 1
        return polls > 50

    await polling.poll_until(done)  # within its spin: every poll lets the ticker run once
    assert polls == 51 and ticks >= 49
    monkeypatch.setattr(polling, "_SPIN_S", 0.0)  # past the spin: it sleeps between polls
    polls, ticks = 48, 0
    await polling.poll_until(done)
    task.cancel()
    assert polls == 51 and ticks >= 2


@pytest.mark.parametrize("sizes", [[4096] * 5, [4096, 4096, 1024, 1024, 5, 8, 8, 4096], [0, 16, 16], [3, 3, 3]])
def test_pieces_of_one_size_checksum_together_as_each_alone(sizes: list[int]) -> None:
    kv = DeviceKV([torch.zeros(8, dtype=torch.uint8)], 8, EmulatedRuntime())
    data = torch.from_numpy(np.random.default_rng(len(sizes)).integers(0, 256, sum(sizes) + 3, dtype=np.uint8))
    together = torch.zeros(len(sizes), 2, dtype=torch.int64)
    kv.sums_many(data, sizes, together)
    offset = 0
    for i, nbytes in enumerate(sizes):
        alone = torch.zeros(2, dtype=torch.int64)
        kv.sums(data[offset:], nbytes, alone)
        assert together[i].tolist() == alone.tolist()
        assert combine(*together[i].tolist(), nbytes) == fletcher64(data[offset : offset + nbytes].numpy())
        offset += nbytes


@needs_ucx
@pytest.mark.parametrize("span", [True, False])
async def test_consecutive_placed_chunks_share_their_kernels(span: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not span:  # runs of one tensor each: still right, one kernel a run
        monkeypatch.setattr("sage_transport.device.kv.make_span", lambda segments, runtime: None)
    calls: list[int] = []
    real_copy = torch.Tensor.index_copy_
    monkeypatch.setattr(torch.Tensor, "index_copy_", lambda self, *a: (calls.append(1), real_copy(self, *a))[1])
    schema, blocks = schema_for_test(), 256
    src, dst = memory_of("device", schema, blocks, seed=8), emulated_memory(schema, blocks, shared=True)
    order = shuffled(blocks, 8)
    config = KVTransportConfig(chunk_size=64 << 10)
    async with KVTransferChannel("ucx", config, name="a") as sender, KVTransferChannel("ucx", config, name="b") as receiver:
        sender.register(src)
        receiver.register(dst)
        peer = await sender.connect(await receiver.listen())
        await move(sender, receiver, peer, schema, order, transfer_id="accepting")  # proves acceptance
        calls.clear()
        placed = sender.statistics().chunks_placed
        result, _ = await move(sender, receiver, peer, schema, order, transfer_id="placed")
        assert result.integrity.value == "verified" and sender.links()[peer]["placement"] == "device_ipc"
        chunks = sender.statistics().chunks_placed - placed
    assert result.chunks == 128 and chunks > 100  # (a chunk or two may go as a send meanwhile)
    if span:
        assert 1 <= len(calls) <= chunks // 8, f"{len(calls)} scatters for {chunks} chunks"  # one per placement job
    assert np.array_equal(device_pages(dst)[:, :, order], device_pages(src))


def test_a_cuda_ipc_handle_travels_whole_though_it_holds_nul_bytes() -> None:
    from sage_transport.device.ipc import _IpcHandle, handle_bytes, handle_from

    raw = bytes([0, 7, 0, 0, 255] + [0] * 50 + [1] * 9)  # what real handles look like: NULs early, data after
    handle = _IpcHandle.from_buffer_copy(raw)
    assert handle_bytes(handle) == raw and handle_bytes(handle_from(raw)) == raw
    with pytest.raises(UnsupportedError, match="64 bytes, the peer sent 63"):
        handle_from(raw[:63])


@needs_ucx
async def test_a_transfer_cancelled_while_its_chunks_are_placed_ends_on_both_sides_and_the_next_goes() -> None:
    schema, blocks = schema_for_test(), 512
    src, dst = memory_of("device", schema, blocks, seed=2), emulated_memory(schema, blocks, shared=True)
    config = KVTransportConfig(chunk_size=16 << 10, peer_window=2)
    async with KVTransferChannel("ucx", config, name="a") as sender, KVTransferChannel("ucx", config, name="b") as receiver:
        sender.register(src)
        receiver.register(dst)
        peer = await sender.connect(await receiver.listen())
        await move(sender, receiver, peer, schema, list(range(blocks)), transfer_id="warm")
        assert sender.links()[peer]["placement"] == "device_ipc"
        handle = sender.submit(TransferPlan.for_blocks(peer, schema, range(blocks), shuffled(blocks, 9), transfer_id="cut"))
        while handle.progress().chunks_verified < 4:
            await asyncio.sleep(0.001)
        handle.cancel("cut short")
        with pytest.raises(Exception, match="cut short"):
            await handle.wait()
        order = shuffled(blocks, 10)
        result, received = await move(sender, receiver, peer, schema, order, transfer_id="after")
        assert result.integrity.value == received.integrity.value == "verified"
        for channel in (sender, receiver):
            stats = channel.statistics()
            assert (stats.transfers_sending, stats.transfers_receiving, stats.inflight_chunks) == (0, 0, 0)
    assert np.array_equal(device_pages(dst)[:, :, order], device_pages(src))


@needs_ucx
async def test_host_and_device_kv_on_one_host_send_instead_of_placing() -> None:
    schema = schema_for_test()
    src, dst = memory_of("host", schema, 32, seed=1), emulated_memory(schema, 32, shared=True)
    async with KVTransferChannel("ucx", name="a") as sender, KVTransferChannel("ucx", name="b") as receiver:
        sender.register(src)
        receiver.register(dst)
        peer = await sender.connect(await receiver.listen())
        for i in range(2):
            await move(sender, receiver, peer, schema, list(range(32)), transfer_id=f"h{i}")
        assert sender.links()[peer]["placement"] == "none" and sender.statistics().chunks_placed == 0
    assert np.array_equal(device_pages(dst), device_pages(src))


# ---- two processes -----------------------------------------------------------------------------------------


async def _json_line(stream: asyncio.StreamReader) -> dict[str, Any]:
    """The child's next JSON line (its log lines go by)."""
    while True:
        line = await asyncio.wait_for(stream.readline(), 60)
        assert line, "the peer process ended early"
        if line.startswith(b"{"):
            return json.loads(line)  # type: ignore[no-any-return]


async def _to_peer_process(src_kind: str, dst_kind: str, config: str) -> dict[str, Any]:
    schema, blocks = schema_for_test(), 64
    src = memory_of(src_kind, schema, blocks, seed=11)
    order = shuffled(blocks, 5)
    args = ["--kind", dst_kind, "--blocks", str(blocks), "--config", config]
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sage_transport.testing.device_peer", *args,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    assert child.stdout is not None and child.stdin is not None
    try:
        address = (await _json_line(child.stdout))["address"]
        async with KVTransferChannel("ucx", KVTransportConfig.from_string(config), name="sender") as sender:
            sender.register(src)
            peer = await sender.connect(address)
            for tid in ("p0", "p1"):  # the first proves acceptance, then chunks may be placed
                result = await sender.transfer(TransferPlan.for_blocks(peer, schema, range(blocks), order, transfer_id=tid))
                assert result.integrity.value == "verified"
            child.stdin.write(b"digest\n")
            await child.stdin.drain()
            report = await _json_line(child.stdout)
            report["placement"] = sender.links()[peer]["placement"]
            report["placed"] = sender.statistics().chunks_placed
        child.stdin.write(b"quit\n")
        await child.stdin.drain()
        assert await asyncio.wait_for(child.wait(), 30) == 0
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    expected = np.zeros_like(device_pages(src))
    expected[:, :, order] = device_pages(src)
    report["expected"] = xxhash.xxh3_64_hexdigest(expected.tobytes())
    return report


@needs_ucx
@pytest.mark.parametrize(
    ("dst_kind", "config", "placement"),
    [
        ("emulated", "chunk_size=65536", "device_ipc"),
        ("emulated", "chunk_size=65536,direct_placement=false", "none"),
        ("cpu", "chunk_size=65536", "none"),
    ],
)
async def test_device_kv_to_another_process(dst_kind: str, config: str, placement: str) -> None:
    report = await _to_peer_process("device", dst_kind, config)
    assert report["checksum_failures"] == 0 and report["digest"] == report["expected"] and report["placement"] == placement
    assert (report["placed"] > 0) is (placement != "none")


# ---- on a GPU ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("src_kind", "dst_kind"), [("cuda", "cuda"), ("cuda", "host"), ("host", "cuda")])
@pytest.mark.parametrize("backend", ["mock", "ucx"])
@pytest.mark.gpu
async def test_gpu_kv_moves_between_kinds(src_kind: str, dst_kind: str, backend: str) -> None:
    if not HAS_CUDA:
        pytest.skip("needs a CUDA device")
    if backend == "ucx" and not HAS_UCX:
        pytest.skip("ucxx is not installed")
    schema, blocks = schema_for_test(), 96
    src, dst = memory_of(src_kind, schema, blocks, seed=6), memory_of(dst_kind, schema, blocks)
    order = shuffled(blocks, 6)
    config = KVTransportConfig(chunk_size=64 << 10)
    if backend == "mock":
        async with mock_pair(src, dst, config) as (_, sender, receiver, peer):
            result, _ = await move(sender, receiver, peer, schema, order)
    else:
        async with KVTransferChannel("ucx", config, name="a") as sender, KVTransferChannel("ucx", config, name="b") as receiver:
            sender.register(src)
            receiver.register(dst)
            peer = await sender.connect(await receiver.listen())
            await move(sender, receiver, peer, schema, order)  # the first proves acceptance, then chunks are placed
            result, _ = await move(sender, receiver, peer, schema, order)
            links = sender.links()[peer]
    assert result.integrity.value == "verified"
    assert np.array_equal(device_pages(dst)[:, :, order], device_pages(src))
    if backend == "ucx" and src_kind == dst_kind == "cuda":  # one process: placed through the peer's own addresses
        assert links["placement"] == "device_ipc"


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_UCX), reason="needs a CUDA device and ucxx")
@pytest.mark.parametrize(
    ("config", "placement"), [("chunk_size=65536", "device_ipc"), ("chunk_size=65536,direct_placement=false", "none")]
)
async def test_two_processes_on_one_gpu(config: str, placement: str) -> None:
    report = await _to_peer_process("cuda", "cuda", config)
    assert report["checksum_failures"] == 0 and report["digest"] == report["expected"] and report["placement"] == placement


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
async def test_gpu_layers_wait_for_a_cuda_event_and_codecs_run_on_the_gpu() -> None:
    src, dst = float_memory("cuda", SMALL, 32, seed=3), memory_of("cuda", SMALL, 32)
    config = KVTransportConfig(chunk_size=4096, codec_policy="always", target_dtype="int8")
    async with mock_pair(src, dst, config) as (_, sender, receiver, peer):
        plan = TransferPlan.for_blocks(peer, SMALL, range(32), range(32), progressive=True)
        handle = sender.submit(plan)
        compute = torch.cuda.Stream()
        with torch.cuda.stream(compute):
            torch.cuda._sleep(50_000_000)  # the "layer" is still being computed
            event = torch.cuda.Event()
            event.record(compute)
        sender.mark_layer_ready(plan.transfer_id, range(SMALL.num_layers), event=event)
        await asyncio.sleep(0)
        assert receiver.statistics().chunks_received == 0 or event.query()
        result = await handle.wait()
        assert result.integrity.value == "verified" and result.wire_bytes < result.bytes
    sent = torch.from_numpy(device_pages(src).copy()).view(torch.bfloat16).float()
    got = torch.from_numpy(device_pages(dst).copy()).view(torch.bfloat16).float()
    assert (got - sent).abs().max().item() / sent.abs().max().item() < 0.02


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
async def test_vllm_layer_views_on_the_gpu_move_once_each_layers_event_fired() -> None:
    from sage_transport.integrations.vllm_layout import paged_kv

    names = [f"model.layers.{i}.self_attn.attn" for i in range(4)]
    src = {n: torch.randn(2, 64, 16, 2, 64, dtype=torch.float16, device="cuda") for n in names}  # vLLM's per-layer views
    dst = {n: torch.zeros_like(t) for n, t in src.items()}
    memories = []
    for caches in (src, dst):
        paged = paged_kv(caches)
        memories.append(KVMemory(paged.schema, paged.num_blocks, list(paged.buffers)))
    assert {m.kind for m in memories} == {"cuda"}
    schema, order = memories[0].schema, shuffled(64, 8)
    async with mock_pair(memories[0], memories[1], KVTransportConfig(chunk_size=64 << 10)) as (_, sender, _receiver, peer):
        plan = TransferPlan.for_blocks(peer, schema, range(64), order, progressive=True)
        handle = sender.submit(plan)
        compute = torch.cuda.Stream()
        for layer in range(schema.num_layers):
            with torch.cuda.stream(compute):
                torch.cuda._sleep(2_000_000)  # the layer's attention
                event = torch.cuda.Event()
                event.record(compute)
            sender.mark_layer_ready(plan.transfer_id, layer, event=event)
        result = await handle.wait()
        assert result.integrity.value == "verified"
    for name in names:
        assert torch.equal(dst[name][:, order], src[name])


# ---- UCX and device memory ---------------------------------------------------------------------------------


@needs_ucx
def test_ucx_declares_cuda_memory_only_where_it_may_move_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from sage_transport.transports.ucx import cuda_support

    monkeypatch.delenv("UCX_TLS", raising=False)
    if not HAS_CUDA:
        assert cuda_support(None) is False  # torch sees no GPU: nothing registers CUDA memory
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cuda_support(None) is True and cuda_support("sm,cuda_copy,self") is True and cuda_support("all") is True
    assert cuda_support("sm,cma,self") is False and cuda_support("^cuda_copy,cuda_ipc") is False
    monkeypatch.setenv("UCX_TLS", "sm,self")
    assert cuda_support(None) is False


@needs_ucx
async def test_a_ucx_context_without_cuda_resources_falls_back_to_host_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    from sage_transport.transports.ucx import UcxTransport, context_info

    monkeypatch.delenv("UCX_TLS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as a GPU host whose UCX loads no CUDA transport
    transport = UcxTransport()
    try:
        assert "cuda" in transport.capabilities.memory_kinds
        transport._progress_driver()
        info = context_info(transport._slot.context)  # type: ignore[union-attr]
        assert "resource" in info and ("posix/" in info or "sysv/" in info)
        if "cuda_copy/" not in info:
            assert transport.capabilities.memory_kinds == frozenset({"cpu"})
    finally:
        await transport.aclose()
