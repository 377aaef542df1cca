"""The main job: migrate a paged KV cache of a real model's shape and verify it end to end.

Used by ``sage-transport migrate``. The source is filled with a pattern unique per 8-byte word; each
receiver's destination block table is shuffled (as a decode instance's allocator leaves it). Every chunk
is checksummed on arrival, and after each transfer every receiver reports a digest of its whole cache,
which must equal the digest this side computes for the expected cache.

* ``transport="mock"``: both ends in this process on the in-memory network.
* any other transport: ``receivers`` local ``sage-transport serve`` processes are started (or ``peers``,
  addresses of serve processes elsewhere, are used); each gets the job over its job port
  (:mod:`.serve`). Afterwards ``ucx_perftest`` runs on the same UCX transports at the chunk size used,
  and the record carries the ratio.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from .channel import KVTransferChannel
from .config import KVTransportConfig
from .errors import PeerDeadError, ProtocolError, SageTransportError
from .limits import nixl_migrate, shuffled_copy_gbps
from .memory import KVMemory
from .plan import IntegrityStatus, Priority, TransferPlan
from .schema import KVCacheSchema, Layout
from .serve import (
    JOB_PROTOCOL,
    JobBye,
    JobChallenge,
    JobDone,
    JobReady,
    JobReceived,
    JobSpec,
    cpu_seconds,
    job_proof,
    peak_rss,
    read_job_message,
    send_job_message,
)
from .telemetry.trace import ChunkTracer, chrome_trace

__all__ = ["MigrationRecord", "run_migration", "summary_lines"]

GIB = 1 << 30


class MigrationRecord(msgspec.Struct, frozen=True, kw_only=True):
    """What ``migrate --json`` writes: one record per run (``seconds`` is the median over repeats)."""

    model: str
    tokens: int
    blocks: int
    bytes: int
    seconds: float
    gbps: float
    chunks: int
    transport: str
    preset: str | None
    verified: bool
    integrity: str
    shuffled: bool
    repeats: int
    seconds_all: list[float]
    gbps_min: float
    gbps_max: float
    retries: int
    chunk_size: int
    receivers: int = 1
    peers: list[str] = []
    ucx_transports: dict[str, list[str]] = {}
    reference_gbps: float | None = None
    reference_command: str | None = None
    ratio: float | None = None
    cpu_seconds: dict[str, float] = {}
    cpu_seconds_per_gib: dict[str, float] = {}
    chunks_placed: int = 0
    placement: str = "none"  # how chunks were placed directly: shm (memory copy), cma (process_vm_writev), none
    connections: int = 1  # connections per receiver (``connections_per_peer``; fewer where a lane failed to join)
    bytes_by_connection: list[int] = []  # payload bytes each connection to the first receiver sent, all repeats
    kv_dtype: str = ""  # the KV dtype on the wire (the stored one unless target_dtype quantised it)
    compression: str = "none"
    wire_bytes: int = 0  # what the chunks took on the wire, per repeat, all receivers together
    compression_ratio: float = 1.0  # bytes / wire_bytes
    max_abs_error: float = 0.0  # of the received cache against the source (0: moved exactly)
    mean_abs_error: float = 0.0
    kv_data: str = "pattern"  # "pattern" (unique per 8-byte word) or "synthetic" (finite KV-like bf16 values)
    kv_dtypes: list[str] = []  # the wire dtype of each repeat (codec_policy=auto may change it)
    reference_note: str | None = None  # why there is no ucx_perftest reference, where there is none
    copy_gbps: float | None = None  # the same pages scattered by the same permutation in one process (limits.py)
    copy_bytes: int = 0  # how much of the cache that copy scattered (whole layers, up to 1 GiB)
    copy_ratio: float | None = None  # gbps / copy_gbps
    nixl: dict[str, Any] | None = None  # --compare nixl: NIXL as vLLM drives it, in the same run (gbps, cpu, ratio, ...)
    peak_rss: dict[str, int] = {}  # peak resident set, bytes: sender, and the largest receiver
    failed: dict[str, str] = {}  # receivers whose transfer failed ("ErrorType: message"); the others carried on
    failed_at: dict[str, float] = {}  # when each failure was noticed: CLOCK_MONOTONIC, comparable across one host's processes


@dataclass
class _Expectation:
    """What every receiver must hold after a transfer in the wire codec: the source through the codec's round
    trip, and the error that leaves."""

    memory: KVMemory
    max_abs: float
    mean_abs: float


def _quantised(config: KVTransportConfig, schema: KVCacheSchema) -> bool:
    """Whether transfers of this job may be quantised (then the source holds KV-like numbers, not bit patterns).
    Without torch an ``auto`` codec never runs; an ``always`` one is a :class:`ConfigError` naming the package."""
    from .wire_codec import QUANTISED, local_codecs, require_codec

    if config.target_dtype not in QUANTISED or config.target_dtype == schema.dtype:
        return False
    if config.codec_policy == "always":
        require_codec(config.target_dtype.value, "target_dtype")  # type: ignore[union-attr]
    return config.target_dtype.value in local_codecs()  # type: ignore[union-attr]


def _fill_kv_like(memory: KVMemory, seed: int) -> None:
    """Finite bf16/fp16 values shaped like KV (a quantising codec needs numbers, not bit patterns): Gaussian
    with one outlier channel per head, 20x larger, as real keys have. Synthetic, and the record says so."""
    import torch

    from .codec import torch_dtype

    gen = torch.Generator().manual_seed(seed)
    head_dim = memory.schema.head_dim
    for buf in memory.buffers:
        values = torch.frombuffer(buf, dtype=torch_dtype(memory.schema.dtype))
        step = (1 << 24) // head_dim * head_dim
        for start in range(0, values.numel(), step):
            part = torch.randn(min(step, values.numel() - start), generator=gen) * 0.5
            part.view(-1, head_dim)[:, 7] *= 20
            values[start : start + part.numel()].copy_(part)


def _codec_expectation(src: KVMemory, config: KVTransportConfig) -> _Expectation:
    """The source through the codec, a page-aligned slice at a time (chunks start at pages, and a page holds whole
    groups, so this is exactly what the receiver decodes), with the error against the source."""
    import torch

    from .codec import CodecSpec, decode, encode, torch_dtype

    schema = src.schema
    elements = schema.page_bytes // (schema.dtype.bits // 8)
    if elements % config.codec_group_size:
        raise SageTransportError(
            f"codec_group_size={config.codec_group_size} does not divide a page's {elements} elements: "
            "migrate cannot predict the receiver's cache"
        )
    spec = CodecSpec(config.target_dtype, config.codec_group_size)  # type: ignore[arg-type]
    dtype = torch_dtype(schema.dtype)
    expected = KVMemory.allocate(schema, src.num_blocks)
    worst, total, count = 0.0, 0.0, 0
    for buf_in, buf_out in zip(src.buffers, expected.buffers):
        a, b = torch.frombuffer(buf_in, dtype=dtype), torch.frombuffer(buf_out, dtype=dtype)
        step = max(1, (1 << 24) // elements) * elements
        for start in range(0, a.numel(), step):
            x, y = a[start : start + step], b[start : start + step]
            decode(encode(x, spec), spec, y)
            err = (x.float() - y.float()).abs_()
            worst, total, count = max(worst, err.max().item()), total + err.sum().item(), count + err.numel()
    return _Expectation(expected, worst, total / max(count, 1))


_FILL_WORDS = 1 << 21  # 16 MiB of the pattern at a time: a whole-cache index array would double the peak RSS


def _fill_pattern(memory: KVMemory, seed: int) -> None:
    for buf in memory.buffers:
        words = np.frombuffer(buf, dtype=np.uint64)
        for start in range(0, words.size, _FILL_WORDS):
            part = words[start : start + _FILL_WORDS]
            np.multiply(np.arange(start, start + part.size, dtype=np.uint64), np.uint64(0x9E3779B97F4A7C15), out=part)
            part ^= np.uint64(seed)


def _pages(memory: KVMemory, schema: KVCacheSchema) -> np.ndarray:
    return np.frombuffer(memory.buffers[0], dtype=np.uint8).reshape(schema.num_layers, schema.kv_planes, memory.num_blocks, -1)


def _verify(src: KVMemory, dst: KVMemory, schema: KVCacheSchema, dst_of_src: np.ndarray) -> bool:
    a, b = _pages(src, schema), _pages(dst, schema)
    return all(np.array_equal(a[layer], b[layer][:, dst_of_src]) for layer in range(schema.num_layers))


def expected_digest(src: KVMemory, schema: KVCacheSchema, dst_of_src: np.ndarray) -> int:
    """xxh3-64 of the cache a receiver must hold: destination block ``dst_of_src[s]`` holds source block ``s``."""
    import xxhash

    src_of_dst = np.argsort(dst_of_src)
    pages = _pages(src, schema)
    h = xxhash.xxh3_64()
    for layer in range(schema.num_layers):
        for plane in range(schema.kv_planes):
            h.update(np.ascontiguousarray(pages[layer, plane][src_of_dst]).data)
    return int(h.intdigest())


def _schema(model: str, block_size: int) -> KVCacheSchema:
    return KVCacheSchema.for_model(model, block_size=block_size, layout=Layout.LAYER_KV_BLOCK)


async def run_migration(
    *,
    model: str = "qwen2.5-7b",
    tokens: int = 32768,
    block_size: int = 16,
    transport: str = "ucx",
    config: KVTransportConfig | None = None,
    shuffle: bool = True,
    repeats: int = 1,
    seed: int = 0,
    receivers: int = 1,
    peers: Sequence[str] = (),
    reference: bool = True,
    progress: Callable[[int, int, float, bool], None] | None = None,
    pause_s: float = 0.0,
    observe: Observe | None = None,
    compare: Sequence[str] = (),
) -> MigrationRecord:
    """Run the migration ``repeats`` times and return the record (see the module docstring). ``pause_s``
    idles between transfers (untimed), as an engine does between decode steps; ``observe`` serves metrics
    during the job and records a chunk trace."""
    observe = observe or Observe()
    config = config or KVTransportConfig()
    if receivers < 1:
        raise SageTransportError(f"receivers={receivers} must be at least 1")
    schema = _schema(model, block_size)
    blocks = schema.blocks_for_tokens(tokens)
    from .units import format_size

    observe.step(f"filling the source cache ({format_size(blocks * schema.bytes_per_block)})")
    src = KVMemory.allocate(schema, blocks)
    expectation = None
    if _quantised(config, schema):
        _fill_kv_like(src, seed)
        observe.step(f"encoding a reference copy as {config.target_dtype.value} to check the receivers against")  # type: ignore[union-attr]
        expectation = _codec_expectation(src, config)
    else:
        _fill_pattern(src, seed)
    rng = np.random.default_rng(seed)
    if transport == "mock" and not peers:
        record = await _migrate_in_process(
            model, tokens, schema, blocks, src, config, shuffle, repeats, rng, progress, pause_s, observe, expectation
        )  # fmt: skip
    else:
        record = await _migrate_to_receivers(
            model, tokens, schema, blocks, src, transport, config, shuffle, repeats, rng, receivers, list(peers), reference,
            progress, pause_s, observe, expectation,
        )  # fmt: skip
    if expectation is not None and record.kv_dtype == config.target_dtype.value:  # type: ignore[union-attr]
        record = msgspec.structs.replace(
            record, max_abs_error=expectation.max_abs, mean_abs_error=expectation.mean_abs, kv_data="synthetic"
        )
    elif expectation is not None:
        record = msgspec.structs.replace(record, kv_data="synthetic")
    if "nixl" in compare:  # our cache goes first: NIXL's two processes hold a source and a destination of their own
        del src, expectation
        dst_of_src = np.random.default_rng(seed).permutation(blocks) if shuffle else np.arange(blocks)  # the same one
        record = await _with_nixl(record, schema, blocks, dst_of_src, repeats)
    return record


async def _migrate_in_process(
    model: str,
    tokens: int,
    schema: KVCacheSchema,
    blocks: int,
    src: KVMemory,
    config: KVTransportConfig,
    shuffle: bool,
    repeats: int,
    rng: np.random.Generator,
    progress: Callable[[int, int, float, bool], None] | None,
    pause_s: float = 0.0,
    observe: Observe | None = None,
    expectation: _Expectation | None = None,
) -> MigrationRecord:
    from .transports.mock import MockNetwork, MockTransport

    observe = observe or Observe()

    dst = KVMemory.allocate(schema, blocks, fill=0)
    dst_of_src = rng.permutation(blocks) if shuffle else np.arange(blocks)
    network = MockNetwork()
    seconds: list[float] = []
    kv_dtypes: list[str] = []
    chunks = retries = 0
    verified = True
    cpu_start = cpu_seconds()
    async with (
        KVTransferChannel(MockTransport(network, name="decode"), config, name="decode") as receiver,
        KVTransferChannel(MockTransport(network, name="prefill"), config, name="prefill") as sender,
    ):
        receiver.register(dst)
        sender.register(src)
        peer = await sender.connect(await receiver.listen())
        if observe.trace_path is not None:
            sender.tracer, receiver.tracer = ChunkTracer("sender (prefill)"), ChunkTracer("receiver (decode)")
        server = await _start_metrics(observe, [sender, receiver], config)
        for i in range(repeats):
            if pause_s and i:
                await asyncio.sleep(pause_s)
            plan = TransferPlan.for_blocks(
                peer, schema, range(blocks), dst_of_src.tolist(), transfer_id=f"migrate-{i}", priority=Priority.BULK
            )
            arrived = asyncio.ensure_future(receiver.wait_received(plan.transfer_id))
            start = time.perf_counter()
            handle = sender.submit(plan)
            async with _progress_task([handle], progress):
                result = await handle.wait()
            seconds.append(time.perf_counter() - start)
            received = await arrived
            chunks, retries = result.chunks, retries + result.retries
            wire = result
            kv_dtypes.append(result.kv_dtype)
            if config.integrity.value != "none":  # with integrity off only the byte compare below speaks
                verified &= result.integrity is IntegrityStatus.VERIFIED and received.integrity is IntegrityStatus.VERIFIED
        await _stop_metrics(server, observe)
        if observe.trace_path is not None:
            write_trace(observe.trace_path, [t.export() for t in (sender.tracer, receiver.tracer) if t is not None])
    cpu = cpu_seconds() - cpu_start
    coded = expectation is not None and wire.kv_dtype != schema.dtype.value
    verified = verified and _verify(expectation.memory if coded else src, dst, schema, dst_of_src)  # type: ignore[union-attr]
    nbytes = blocks * schema.bytes_per_block
    moved = nbytes * repeats / GIB
    record = _record(
        model, tokens, blocks, nbytes, seconds, chunks, "mock", config, verified, shuffle, retries, 1, [],
        cpu_seconds={"both_sides": cpu},
        cpu_per_gib={"both_sides": cpu / moved},
    )  # fmt: skip
    return msgspec.structs.replace(_with_wire(record, [wire]), kv_dtypes=kv_dtypes)


@dataclass
class Observe:
    """What to observe during a migration: serve metrics on ``metrics_port`` (0: any free port) and keep serving
    ``linger_s`` after the job; write a Chrome/Perfetto chunk trace to ``trace_path``. ``announce`` receives the
    metrics URL once the server listens, ``notice`` lines for the user (the result, before a linger holds the
    summary back), ``stage`` each set-up step as it starts."""

    metrics_port: int | None = None
    linger_s: float = 0.0
    trace_path: Path | None = None
    announce: Callable[[str], None] | None = None
    notice: Callable[[str], None] | None = None
    stage: Callable[[str], None] | None = None

    def step(self, text: str) -> None:
        if self.stage is not None:
            self.stage(text)


async def _start_metrics(observe: Observe, channels: list[KVTransferChannel], config: KVTransportConfig) -> Any:
    if observe.metrics_port is None:
        return None
    from .telemetry.prometheus import SageCollector
    from .telemetry.server import TelemetryServer

    server = TelemetryServer(
        SageCollector(channels), host=config.metrics_host, port=observe.metrics_port, auth_token=config.auth_token
    )
    await server.__aenter__()
    if observe.announce is not None:
        observe.announce(server.url)
    return server


async def _stop_metrics(server: Any, observe: Observe, done: str = "") -> None:
    if server is None:
        return
    try:
        if observe.linger_s > 0:
            if observe.notice is not None and done:  # the summary waits for the linger: say the result now
                observe.notice(f"{done}; metrics stay up {observe.linger_s:g} s (--linger), then the summary")
            await asyncio.sleep(observe.linger_s)
    finally:
        await server.__aexit__(None, None, None)


def write_trace(path: Path, processes: list[dict[str, Any]]) -> None:
    """Write the chunk events of ``processes`` as one Chrome/Perfetto trace (JSON)."""
    path.write_bytes(msgspec.json.encode(chrome_trace(processes)))


class _Receiver:
    def __init__(self, address: str, process: asyncio.subprocess.Process | None) -> None:
        self.address = address
        self.process = process
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.ready: JobReady | None = None
        self.peer = ""
        self.dst_of_src = np.arange(0)
        self.digest = 0
        self.coded_digest = 0
        self.failure: str | None = None  # why its transfer failed ("ErrorType: message"); then it gets no more
        self.failed_at = 0.0  # time.monotonic() when its failure was noticed


async def _outcome(handle: Any, node: _Receiver) -> Any:
    """The transfer's result; a failure is timed as it is noticed, not when the other receivers are done."""
    try:
        return await handle.wait()
    except SageTransportError:
        node.failed_at = time.monotonic()
        raise


async def _start_local_receiver(host: str) -> _Receiver:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sage_transport.cli", "serve", "--host", host, "--port", "0", "--once",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    try:
        async with asyncio.timeout(60):
            line = (await process.stdout.readline()).decode()
    except TimeoutError:
        process.kill()
        raise SageTransportError("a local receiver did not start within 60 s") from None
    if "listening on " not in line:
        process.kill()
        raise SageTransportError(f"a local receiver failed to start: {line.strip() or 'no output'}")
    return _Receiver(line.rsplit("listening on ", 1)[1].strip(), process)


async def _migrate_to_receivers(
    model: str,
    tokens: int,
    schema: KVCacheSchema,
    blocks: int,
    src: KVMemory,
    transport: str,
    config: KVTransportConfig,
    shuffle: bool,
    repeats: int,
    rng: np.random.Generator,
    receivers: int,
    peers: list[str],
    reference: bool,
    progress: Callable[[int, int, float, bool], None] | None,
    pause_s: float = 0.0,
    observe: Observe | None = None,
    expectation: _Expectation | None = None,
) -> MigrationRecord:
    from .transports.link import parse_host_port

    observe = observe or Observe()
    traces: list[dict[str, Any]] = []

    # the token never travels: the receiver has its own, and the job and channel handshakes prove it
    local_only = ("listen_host", "listen_port", "auth_token")
    settings = {k: v for k, v in msgspec.to_builtins(config).items() if k not in local_only}

    def transfer_id(repeat: int, receiver: int) -> str:  # ids are unique per channel, so per receiver too
        return f"migrate-{repeat}-r{receiver}"

    nodes: list[_Receiver] = []
    try:
        if peers:
            nodes = [_Receiver(address, None) for address in peers]
        else:
            observe.step(f"starting {receivers} receiver process{'es' if receivers > 1 else ''}")
            nodes = list(await asyncio.gather(*(_start_local_receiver(config.listen_host) for _ in range(receivers))))
        for k, node in enumerate(nodes):
            host, port = parse_host_port(node.address, "--peer")
            try:
                node.reader, node.writer = await asyncio.open_connection(host, port, limit=64 << 20)
            except OSError as exc:
                raise PeerDeadError(f"no sage-transport serve answers at {node.address}: {exc}") from exc
            try:
                challenge = await read_job_message(node.reader, config.connect_timeout_s, "job challenge")
            except (PeerDeadError, ProtocolError) as exc:
                raise PeerDeadError(f"{node.address} accepted the connection but is no `sage-transport serve`: {exc}") from None
            if not isinstance(challenge, JobChallenge) or challenge.protocol != JOB_PROTOCOL:
                raise ProtocolError(f"{node.address} speaks another job protocol (expected {JOB_PROTOCOL})")
            spec = JobSpec(
                model=model, tokens=tokens, block_size=schema.block_size, transport=transport, config=settings,
                transfer_ids=[transfer_id(i, k) for i in range(repeats)], trace=observe.trace_path is not None,
                proof=job_proof(config.auth_token, challenge.nonce),
            )  # fmt: skip
            await send_job_message(node.writer, spec)
        observe.step("waiting for the receivers to allocate their caches")
        for node in nodes:
            assert node.reader is not None
            node.ready = await read_job_message(node.reader, 120, "ready message")
            if not isinstance(node.ready, JobReady) or node.ready.blocks != blocks:
                raise ProtocolError(f"receiver {node.address} answered {node.ready!r}")
            node.dst_of_src = rng.permutation(blocks) if shuffle else np.arange(blocks)
            node.digest = expected_digest(src, schema, node.dst_of_src)
            if expectation is not None:  # the cache a receiver holds when the codec ran (auto may skip it)
                node.coded_digest = expected_digest(expectation.memory, schema, node.dst_of_src)
        async with KVTransferChannel(transport, config, name="prefill") as channel:
            channel.register(src)
            for node in nodes:
                assert node.ready is not None
                node.peer = await channel.connect(node.ready.channel_address)
            if observe.trace_path is not None:
                channel.tracer = ChunkTracer("sender (prefill)")
            server = await _start_metrics(observe, [channel], config)
            seconds: list[float] = []
            chunks = retries = 0
            verified = True
            cpu_sender = 0.0
            last_results: list[Any] = []
            kv_dtypes: list[str] = []
            alive = list(enumerate(nodes))
            observe.step("moving the cache")
            for i in range(repeats):
                if pause_s and i:
                    await asyncio.sleep(pause_s)
                plans = [
                    TransferPlan.for_blocks(
                        node.peer,
                        schema,
                        range(blocks),
                        node.dst_of_src.tolist(),
                        transfer_id=transfer_id(i, k),
                        priority=Priority.BULK,
                    )
                    for k, node in alive
                ]
                cpu_start = cpu_seconds()
                start = time.perf_counter()
                handles = [channel.submit(plan) for plan in plans]
                async with _progress_task(handles, progress):
                    waits = (_outcome(handle, node) for handle, (_, node) in zip(handles, alive))
                    outcomes = await asyncio.gather(*waits, return_exceptions=True)
                seconds.append(time.perf_counter() - start)
                cpu_sender += cpu_seconds() - cpu_start
                results = []
                for (_, node), outcome in zip(alive, outcomes):  # a receiver that failed: the others carry on
                    if isinstance(outcome, SageTransportError):
                        node.failure = f"{type(outcome).__name__}: {outcome}"
                        if observe.notice is not None:
                            observe.notice(f"receiver {node.address} failed: {node.failure}")
                        if all(n.failure is not None for _, n in alive):
                            raise outcome
                    elif isinstance(outcome, BaseException):
                        raise outcome
                    else:
                        results.append(outcome)
                alive = [(k, node) for k, node in alive if node.failure is None]
                for (_, node), result in zip(alive, results):
                    assert node.reader is not None
                    received = await read_job_message(node.reader, 120)
                    if not isinstance(received, JobReceived) or received.transfer_id != result.transfer_id:
                        raise ProtocolError(f"receiver {node.address} answered {received!r}")
                    coded = expectation is not None and result.kv_dtype != schema.dtype.value
                    verified &= received.digest == (node.coded_digest if coded else node.digest)
                    if config.integrity.value != "none":
                        verified &= result.integrity is IntegrityStatus.VERIFIED and received.integrity == "verified"
                    chunks, retries = result.chunks, retries + result.retries
                last_results = list(results)
                kv_dtypes.append(results[0].kv_dtype)
            links = channel.links()
            placed = channel.statistics().chunks_placed
            median = float(np.median(seconds))
            done = f"transfers done: {blocks * schema.bytes_per_block * len(nodes) / median / 1e9:.2f} GB/s median of {repeats}"
            await _stop_metrics(server, observe, done)
            if channel.tracer is not None:
                traces.append(channel.tracer.export())
        cpu_receivers = 0.0
        peak_receiver = 0
        for node in nodes:
            assert node.writer is not None and node.reader is not None
            if node.failure is not None:  # it is gone, or its channel is: nothing to say goodbye to
                continue
            await send_job_message(node.writer, JobDone())
            bye = await read_job_message(node.reader, 60)
            if isinstance(bye, JobBye):
                cpu_receivers += bye.cpu_seconds
                peak_receiver = max(peak_receiver, bye.peak_rss)
                if bye.trace is not None:
                    traces.append(bye.trace)
        if observe.trace_path is not None:
            write_trace(observe.trace_path, traces)
    finally:
        for node in nodes:
            if node.writer is not None:
                node.writer.close()
            if node.process is not None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(10):
                        await node.process.wait()
                if node.process.returncode is None:
                    node.process.kill()
                    await node.process.wait()
    ucx_transports: dict[str, list[str]] = {}
    for info in links.values():
        for proto, lanes in info.get("ucx_transports", {}).items():
            ucx_transports.setdefault(proto, sorted(set(ucx_transports.get(proto, [])) | set(lanes)))
    nbytes = blocks * schema.bytes_per_block
    moved = nbytes * repeats * len(nodes) / GIB
    survivors = [node for node in nodes if node.failure is None]  # a failed receiver's bytes are not counted
    record = _record(
        model, tokens, blocks, nbytes * len(survivors), seconds, chunks, transport, config, verified, shuffle, retries,
        len(nodes), [node.address for node in nodes],
        cpu_seconds={"sender": cpu_sender, "receivers": cpu_receivers},
        cpu_per_gib={"sender": cpu_sender / moved, "receivers": cpu_receivers / moved},
        ucx_transports=ucx_transports,
    )  # fmt: skip
    kinds = sorted({str(info.get("placement", "none")) for info in links.values()} - {"none"})
    first_link = next(iter(links.values()), {})
    record = msgspec.structs.replace(
        record,
        chunks_placed=placed,
        placement="+".join(kinds) or "none",
        connections=int(first_link.get("connections", 1)),
        bytes_by_connection=list(first_link.get("bytes_sent_by_connection", [])),
    )
    gone = [n for n in nodes if n.failure is not None]
    record = msgspec.structs.replace(
        record, failed={n.address: str(n.failure) for n in gone}, failed_at={n.address: n.failed_at for n in gone}
    )
    record = msgspec.structs.replace(
        _with_wire(record, last_results),
        kv_dtypes=kv_dtypes,
        peak_rss={"sender": peak_rss(), **({"receivers": peak_receiver} if peak_receiver else {})},
    )
    if not reference:
        record = msgspec.structs.replace(record, reference_note="--no-reference")
    elif peers:
        record = msgspec.structs.replace(record, reference_note="ucx_perftest runs on this host only; the peers are elsewhere")
    elif not ucx_transports:
        record = msgspec.structs.replace(
            record, reference_note=f"the {transport} transport does not run on UCX: ucx_perftest has no like to compare"
        )
    else:
        record = await _with_reference(record, ucx_transports)
    if reference and not peers:
        record = _with_copy_reference(record, src, schema, nodes[0].dst_of_src)
    return record


def _with_copy_reference(
    record: MigrationRecord, src: KVMemory, schema: KVCacheSchema, dst_of_src: np.ndarray
) -> MigrationRecord:
    gbps, nbytes = shuffled_copy_gbps(_pages(src, schema), dst_of_src)
    ratio = record.gbps / gbps if gbps else None
    return msgspec.structs.replace(record, copy_gbps=gbps, copy_bytes=nbytes, copy_ratio=ratio)


async def _with_nixl(
    record: MigrationRecord, schema: KVCacheSchema, blocks: int, dst_of_src: np.ndarray, repeats: int
) -> MigrationRecord:
    result = await nixl_migrate(schema.num_layers, schema.kv_planes, blocks, schema.page_bytes, dst_of_src, repeats)
    nbytes = blocks * schema.bytes_per_block
    seconds = result["seconds"]
    gbps = nbytes / float(np.median(seconds)) / 1e9
    nixl = {
        "gbps": gbps,
        "gbps_min": nbytes / max(seconds) / 1e9,
        "gbps_max": nbytes / min(seconds) / 1e9,
        "seconds_all": seconds,
        "cpu_seconds_per_gib": result["cpu"] / (nbytes * len(seconds) / GIB),
        "verified": result["verified"],
        "peak_rss_reader": result["peak_rss"],
        "ratio": record.gbps / gbps,
        "how": "NIXL 1.5 as vLLM's NixlConnector drives it: descriptor lists prepared once, one READ of every page "
        "posted by the receiver, its state polled every millisecond",
    }
    return msgspec.structs.replace(record, nixl=nixl)


def _with_wire(record: MigrationRecord, results: Sequence[Any]) -> MigrationRecord:
    """The wire form of the last repeat's transfers: dtype, compression, bytes on the wire."""
    wire = sum(r.wire_bytes for r in results)
    return msgspec.structs.replace(
        record,
        kv_dtype=results[0].kv_dtype,
        compression=results[0].compression,
        wire_bytes=wire,
        compression_ratio=record.bytes / wire if wire else 1.0,
    )


async def _with_reference(record: MigrationRecord, ucx_transports: dict[str, list[str]]) -> MigrationRecord:
    from .perftest import measure_link

    tls = sorted({lane.split("/")[0] for lanes in ucx_transports.values() for lane in lanes} - {"self"})
    if record.chunks_placed and "cma" not in tls:  # chunks placed with process_vm_writev: compare with UCX's CMA too
        tls.append("cma")
    if not tls:
        return record
    try:
        ref = await measure_link(record.chunk_size, ucx_tls=",".join(tls))
    except SageTransportError:
        return record
    return msgspec.structs.replace(
        record, reference_gbps=ref.gbps, reference_command=ref.command, ratio=record.gbps / ref.gbps if ref.gbps else None
    )


def _record(
    model: str,
    tokens: int,
    blocks: int,
    nbytes: int,
    seconds: list[float],
    chunks: int,
    transport: str,
    config: KVTransportConfig,
    verified: bool,
    shuffle: bool,
    retries: int,
    receivers: int,
    peers: list[str],
    *,
    cpu_seconds: dict[str, float],
    cpu_per_gib: dict[str, float],
    ucx_transports: dict[str, list[str]] | None = None,
) -> MigrationRecord:
    median = float(np.median(seconds))
    return MigrationRecord(
        model=model,
        tokens=tokens,
        blocks=blocks,
        bytes=nbytes,
        seconds=median,
        gbps=nbytes / median / 1e9,
        chunks=chunks,
        transport=transport,
        preset=config.preset,
        verified=verified,
        integrity=config.integrity.value,
        shuffled=shuffle,
        repeats=len(seconds),
        seconds_all=seconds,
        gbps_min=nbytes / max(seconds) / 1e9,
        gbps_max=nbytes / min(seconds) / 1e9,
        retries=retries,
        chunk_size=config.chunk_size,
        receivers=receivers,
        peers=peers,
        ucx_transports=ucx_transports or {},
        cpu_seconds={k: round(v, 4) for k, v in cpu_seconds.items()},
        cpu_seconds_per_gib={k: round(v, 4) for k, v in cpu_per_gib.items()},
    )


@contextlib.asynccontextmanager
async def _progress_task(handles: list[Any], progress: Callable[[int, int, float, bool], None] | None) -> Any:
    if progress is None:
        yield
        return
    start = time.perf_counter()
    total = sum(h.progress().bytes for h in handles)

    async def tick() -> None:
        while True:
            progress(sum(h.progress().bytes_verified for h in handles), total, time.perf_counter() - start, False)
            await asyncio.sleep(0.1)

    task = asyncio.create_task(tick())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        progress(sum(h.progress().bytes_verified for h in handles), total, time.perf_counter() - start, True)


def progress_bar(stream: Any = None) -> Callable[[int, int, float, bool], None]:
    """A one-line progress bar on ``stream`` (stderr): bytes verified, share, rate."""
    out = stream or sys.stderr

    def show(done: int, total: int, elapsed: float, final: bool) -> None:
        share = done / total if total else 1.0
        filled = int(share * 30)
        rate = done / elapsed / 1e9 if elapsed > 0 else 0.0
        out.write(
            f"\r  [{'#' * filled}{'.' * (30 - filled)}] {share:6.1%}  {done / GIB:6.2f}/{total / GIB:.2f} GiB  {rate:5.2f} GB/s"
        )
        if final:
            out.write("\n")
        out.flush()

    return show


def summary_lines(record: MigrationRecord) -> list[str]:
    """Human summary of a record."""
    from .units import format_size

    how = "full byte compare" if not record.peers else "digest of every receiver's whole cache"
    where = f"{record.receivers} receiver process{'es' if record.receivers > 1 else ''}" if record.peers else "in process"
    rows: list[tuple[str, Any]] = [
        ("model", f"{record.model} ({record.tokens} tokens, {record.blocks} blocks{', shuffled' if record.shuffled else ''})"),
        ("bytes", f"{record.bytes} ({format_size(record.bytes)}) to {where}"),
        ("transport", f"{record.transport} (preset {record.preset or 'none'}, chunk_size {format_size(record.chunk_size)})"),
    ]
    if record.ucx_transports:
        lanes = sorted({lane for lanes in record.ucx_transports.values() for lane in lanes})
        rows.append(("ucx uses", ", ".join(lanes)))
    rows += [
        (
            "chunks",
            f"{record.chunks} per transfer"
            + (
                f"; {record.chunks_placed} of {record.chunks * record.repeats * record.receivers} (all transfers) "
                f"written in place ({record.placement})"
                if record.chunks_placed
                else ""
            ),
        ),
        ("seconds", f"{record.seconds:.4f} median of {record.repeats}"),
        ("bandwidth", f"{record.gbps:.2f} GB/s (min {record.gbps_min:.2f}, max {record.gbps_max:.2f})"),
    ]
    if record.reference_gbps is not None:
        rows.append(
            (
                "reference",
                f"ucx_perftest {record.reference_gbps:.2f} GB/s at {format_size(record.chunk_size)}: ratio {record.ratio:.2f}",
            )
        )
    elif record.reference_note:
        rows.append(("reference", f"no ucx_perftest: {record.reference_note}"))
    if record.copy_gbps is not None:
        rows.append(
            (
                "limit",
                f"shuffled copy in one process (2 threads, {format_size(record.copy_bytes)} of the same pages) "
                f"{record.copy_gbps:.2f} GB/s: ratio {record.copy_ratio:.2f}",
            )
        )
    if record.nixl is not None:
        nixl = record.nixl
        rows.append(
            (
                "nixl",
                f"{nixl['gbps']:.2f} GB/s (min {nixl['gbps_min']:.2f}, max {nixl['gbps_max']:.2f}), vLLM's pattern, "
                f"cpu s/GiB {nixl['cpu_seconds_per_gib']:.3f}, verified {nixl['verified']}: ratio {nixl['ratio']:.2f}",
            )
        )
    if record.cpu_seconds_per_gib:
        rows.append(("cpu s/GiB", ", ".join(f"{k} {v:.3f}" for k, v in record.cpu_seconds_per_gib.items())))
    if record.peak_rss:
        rows.append(("peak rss", ", ".join(f"{k} {format_size(v)}" for k, v in record.peak_rss.items())))
    if record.kv_dtype and (record.kv_data != "pattern" or record.compression != "none"):
        wire = f"{record.kv_dtype}" + (f" + {record.compression}" if record.compression != "none" else "")
        wire += f": {record.wire_bytes} bytes ({format_size(record.wire_bytes)}), {record.compression_ratio:.2f}x smaller"
        if record.max_abs_error:
            wire += f"; error vs source max {record.max_abs_error:.4g}, mean {record.mean_abs_error:.4g} ({record.kv_data} KV)"
        if len(set(record.kv_dtypes)) > 1:  # codec_policy=auto measured both ways
            wire += f"; per repeat: {', '.join(record.kv_dtypes)}"
        rows.append(("wire", wire))
    rows += [
        ("retries", record.retries),
        ("verified", f"{record.verified} (per-chunk {record.integrity} + {how})"),
    ]
    rows += [("failed", f"{address}: {why}") for address, why in sorted(record.failed.items())]
    return [f"{k:>10}  {v}" for k, v in rows]
