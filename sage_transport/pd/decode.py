"""The decode instance of ``sage-transport bench pd`` (this process) and one variant's run against a prefill process.

The decode engine steps like an engine: each step is an emulated wait (:mod:`.timing`) for the requests whose KV
has arrived, and each gives every running request one token. New KV arrives while requests decode. A bulk
migration stream (another sender's KV moving to this instance at ``bulk`` priority) runs throughout, in every
variant: with priorities (c) a request's KV goes ahead of it, otherwise they share the window.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import sys
import threading
import time
from collections.abc import Awaitable
from typing import Any

import numpy as np

from ..channel import KVTransferChannel
from ..config import KVTransportConfig
from ..memory import KVMemory
from ..plan import Priority, TransferPlan
from ..schema import KVCacheSchema
from .nixl_peer import POLL_S, NixlSide, nixl_api
from .timing import ComputeModel
from .workload import Request

__all__ = ["RequestRecord", "VARIANTS", "run_variant"]

VARIANTS = {
    "a": "after prefill, per-block READs posted as vLLM's NixlConnector does (prepped descriptors, async)",
    "b": "sage_transport, after prefill, no priorities",
    "c": "sage_transport, layer-wise overlap + priorities",
}


@dataclasses.dataclass
class RequestRecord:
    """What happened to one request (``time.monotonic()`` seconds)."""

    request_id: str
    tokens: int
    output_tokens: int
    kv_bytes: int
    arrival: float
    prefill_start: float = 0.0
    prefill_end: float = 0.0
    transfer_start: float = 0.0
    kv_ready: float = 0.0
    token_times: list[float] = dataclasses.field(default_factory=list)
    error: str = ""
    nixl_prep_s: float = 0.0
    nixl_xfer_s: float = 0.0
    instance: str = ""  # the decode instance that served it

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["token_times"] = [round(t - self.arrival, 6) for t in self.token_times]
        return out


class _Prefill:
    """The prefill child process and its JSON-lines pipe."""

    def __init__(self, proc: asyncio.subprocess.Process, hello: dict[str, Any]) -> None:
        self.proc = proc
        self.hello = hello
        self.waiters: dict[tuple[str, str], asyncio.Future[dict[str, Any]]] = {}

    @classmethod
    async def start(cls, model: str, pool_blocks: int, config: str, seed: int, scale: float) -> _Prefill:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sage_transport.pd.prefill", "--model", model, "--pool-blocks", str(pool_blocks),
            "--config", config, "--seed", str(seed), "--scale", str(scale),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=1 << 26,
        )  # fmt: skip
        assert proc.stdout is not None
        while True:
            line = await proc.stdout.readline()
            if not line:
                raise RuntimeError("the prefill process ended before it listened")
            if line.startswith(b"{"):
                hello = json.loads(line)
                if "address" in hello:
                    return cls(proc, hello)

    def send(self, command: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(command) + "\n").encode())

    def wait(self, kind: str, request_id: str) -> asyncio.Future[dict[str, Any]]:
        return self.waiters.setdefault((kind, request_id), asyncio.get_running_loop().create_future())

    async def events(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            if not line.startswith(b"{"):
                continue
            event = json.loads(line)
            for kind in ("started", "prefilled"):
                if kind in event:
                    future = self.wait(kind, event[kind])
                    if not future.done():
                        future.set_result(event)

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.send({"quit": 1})
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


class _Decoder:
    """The step loop, on a thread of its own as an engine's model runner is (the GPU computes a step whatever the
    transfer's event loop is doing; only the GIL is shared): requests join when their KV is in and leave after
    their output tokens. ``idle`` is set on the event loop whenever no request is running."""

    def __init__(self, compute: ComputeModel, loop: asyncio.AbstractEventLoop) -> None:
        self.compute = compute
        self.loop = loop
        self.running: list[RequestRecord] = []
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopped = threading.Event()
        self.idle = asyncio.Event()
        self.idle.set()
        self.steps = 0
        self.thread = threading.Thread(target=self._run, name="decode-steps", daemon=True)
        self._decoded: dict[str, asyncio.Future[None]] = {}

    def decoded(self, record: RequestRecord) -> asyncio.Future[None]:
        """Done once ``record`` has all its output tokens (call on the event loop)."""
        future = self._decoded.setdefault(record.request_id, self.loop.create_future())
        if len(record.token_times) >= record.output_tokens and not future.done():
            future.set_result(None)
        return future

    def _mark_decoded(self, request_id: str) -> None:
        future = self._decoded.setdefault(request_id, self.loop.create_future())
        if not future.done():
            future.set_result(None)

    def join(self, record: RequestRecord) -> None:
        with self.lock:
            self.running.append(record)
        self.idle.clear()
        self.wake.set()

    def stop(self) -> None:
        self.stopped.set()
        self.wake.set()
        self.thread.join(timeout=30)

    def _run(self) -> None:
        while not self.stopped.is_set():
            with self.lock:
                batch = list(self.running)
            if not batch:
                self.wake.wait()
                self.wake.clear()
                continue
            started = time.monotonic()  # a late step stays late: no catching up
            step_s = self.compute.decode_step_s([r.tokens + len(r.token_times) for r in batch])
            time.sleep(max(0.0, started + step_s - time.monotonic()))
            now = time.monotonic()
            self.steps += 1
            with self.lock:
                for record in batch:
                    record.token_times.append(now)
                    if len(record.token_times) >= record.output_tokens:
                        self.running.remove(record)
                        self.loop.call_soon_threadsafe(self._mark_decoded, record.request_id)
                empty = not self.running
            if empty:
                self.loop.call_soon_threadsafe(self._set_idle)

    def _set_idle(self) -> None:
        with self.lock:
            if not self.running:
                self.idle.set()


class DecodeInstance:
    """One decode instance: its KV pool, its channel to the prefill (and NIXL agent for variant a), its step thread
    and its share of the bulk stream. :meth:`serve` moves one request's KV in the variant's way, then decodes it."""

    def __init__(
        self, variant: str, schema: KVCacheSchema, compute: ComputeModel, config: KVTransportConfig, hello: dict[str, Any],
        *, longest: int, src_blocks: int, seed: int, bulk_mib: int, bulk_gbps: float, name: str = "decode",
    ) -> None:  # fmt: skip
        self.variant, self.schema, self.config, self.hello, self.name = variant, schema, config, hello, name
        self.src_blocks, self.bulk_gbps = src_blocks, bulk_gbps
        self.bulk_blocks = max(1, (bulk_mib << 20) // schema.bytes_per_block) if bulk_mib and bulk_gbps > 0 else 0
        self.dst_blocks = longest + max(1, self.bulk_blocks)  # room for the requests in flight, the bulk stream apart
        self.use_nixl = variant == "a" and nixl_api() is not None and hello.get("nixl") is not None
        self.rng = random.Random(seed)
        self.memory = KVMemory.allocate(schema, self.dst_blocks, fill=0)
        self.free = list(range(max(1, self.bulk_blocks), self.dst_blocks))
        self.loop = asyncio.get_running_loop()
        self.decoder = _Decoder(compute, self.loop)
        self.channel = KVTransferChannel(None, config, name=name)
        self.peer = ""
        self.nixl: NixlSide | None = None
        self.nixl_peer = ""
        self.stop = asyncio.Event()
        self.bulk_bytes = 0
        self._bulk: asyncio.Future[None] | None = None

    async def open(self) -> None:
        await self.channel.__aenter__()
        self.channel.register(self.memory)
        self.peer = await self.channel.connect(self.hello["address"])
        if self.use_nixl:
            base = int(np.frombuffer(self.memory.views[0], np.uint8).ctypes.data)
            self.nixl = NixlSide(self.name, base, self.memory.views[0].nbytes, self.schema.page_bytes)
            remote = self.hello["nixl"]
            self.nixl_peer = self.nixl.add_peer(bytes.fromhex(remote["metadata"]), remote["base"], remote["nbytes"])
        self.decoder.thread.start()
        if self.bulk_blocks:
            self._bulk = asyncio.ensure_future(self._bulk_stream())

    async def _nixl_read(self, pairs: list[tuple[int, int]], request_id: str) -> tuple[float, float]:
        """One READ of these blocks' pages, posted without blocking (others stay in flight meanwhile) and checked
        every millisecond, as vLLM's NixlConnector runs it (``nixl_peer``); (descriptor ids and posting, transfer)
        seconds."""
        assert self.nixl is not None
        start = time.perf_counter()
        remote_ids, local_ids = _page_ids(self.schema, self.src_blocks, self.dst_blocks, pairs)
        handle = self.nixl.post_read(self.nixl_peer, remote_ids, local_ids, request_id)
        posted = time.perf_counter()
        while (state := self.nixl.state(handle)) == "PROC":  # noqa: ASYNC110 (NIXL signals nothing: polled, as vLLM does)
            await asyncio.sleep(POLL_S)
        if state != "DONE":
            raise RuntimeError(f"NIXL READ of {len(local_ids)} pages for {request_id} ended {state}")
        return posted - start, time.perf_counter() - posted

    async def _bulk_stream(self) -> None:  # paced: the same offered load in every variant, on the variant's own path
        i = 0
        nbytes = self.bulk_blocks * self.schema.bytes_per_block
        while not self.stop.is_set():
            began = time.monotonic()
            src = [self.rng.randrange(self.src_blocks) for _ in range(self.bulk_blocks)]
            if self.use_nixl:  # NIXL has no priorities: bulk READs share the agent and the link with the KV's
                await self._nixl_read(list(zip(src, range(self.bulk_blocks))), f"bulk-{self.name}-{i}")
            else:
                plan = TransferPlan.for_blocks(
                    self.peer, self.schema, src, range(self.bulk_blocks), transfer_id=f"bulk-{self.name}-{i}",
                    priority=Priority.BULK,
                )  # fmt: skip
                await self.channel.pull(plan)
            self.bulk_bytes += nbytes
            i += 1
            await asyncio.sleep(max(0.0, began + nbytes / (self.bulk_gbps * 1e9) - time.monotonic()))

    async def serve(
        self, request_id: str, tokens: int, output_tokens: int, arrival: float,
        started: Awaitable[dict[str, Any]], done: Awaitable[dict[str, Any]],
    ) -> RequestRecord:  # fmt: skip
        """Move the KV of a request whose prefill was just asked for, then let it decode (returns at once after
        joining; its tokens land in the record)."""
        schema = self.schema
        blocks = schema.blocks_for_tokens(tokens)
        record = RequestRecord(request_id, tokens, output_tokens, blocks * schema.bytes_per_block, arrival, instance=self.name)
        dst = self.rng.sample(self.free, blocks)  # shuffled destination blocks, reused across requests
        try:
            if self.variant == "c":  # ask now: the prefill serves it layer by layer, ahead of the bulk stream
                plan = TransferPlan.for_blocks(
                    self.peer, schema, dst, dst, transfer_id=request_id, priority=Priority.DECODE_CRITICAL
                )
                record.transfer_start = time.monotonic()
                await self.channel.pull(plan)
                record.kv_ready = time.monotonic()
                finished = await done
            else:
                finished = await done
                record.transfer_start = time.monotonic()
                pairs = list(zip(finished["src"], dst))
                if self.use_nixl:
                    record.nixl_prep_s, record.nixl_xfer_s = await self._nixl_read(pairs, request_id)
                else:
                    plan = TransferPlan.for_blocks(  # a without NIXL: one message per block and layer
                        self.peer, schema, [s for s, _ in pairs], dst, transfer_id=request_id,
                        priority=Priority.BULK,  # no priorities: the same class as the bulk stream, FIFO
                        chunk_size=max(512, schema.page_bytes) if self.variant == "a" else None,
                    )  # fmt: skip
                    await self.channel.pull(plan)
                record.kv_ready = time.monotonic()
            record.prefill_start = (await started)["t"]
            record.prefill_end = finished["t"]
        except Exception as exc:  # recorded, the run goes on
            record.error = f"{type(exc).__name__}: {exc}"
            return record
        self.decoder.join(record)
        return record

    async def finish(self) -> None:
        """Wait for the running requests' last tokens, then stop the steps and the bulk stream and close."""
        await self.decoder.idle.wait()
        self.stop.set()
        await asyncio.to_thread(self.decoder.stop)
        if self._bulk is not None:
            self._bulk.cancel()
            await asyncio.gather(self._bulk, return_exceptions=True)
        if self.nixl is not None:
            self.nixl.close()
        await self.channel.aclose()


async def run_variant(
    variant: str,
    requests: list[Request],
    *,
    model: str = "qwen2.5-7b",
    config: KVTransportConfig | None = None,
    seed: int = 0,
    scale: float = 1.0,
    bulk_mib: int = 64,
    bulk_gbps: float = 0.5,
    decodes: int = 1,
) -> dict[str, Any]:
    """Run ``requests`` through a fresh prefill process and ``decodes`` decode instances (this process; more run as
    child processes, requests dealt round-robin); per-request records and totals. The bulk stream offers
    ``bulk_gbps`` in ``bulk_mib`` transfers (0: none), shared among the decode instances."""
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}: choose one of {', '.join(VARIANTS)}")
    if decodes < 1:
        raise ValueError(f"decodes={decodes} must be at least 1")
    config = config or KVTransportConfig()
    if variant == "a" and nixl_api() is not None and config.backend == "ucx":
        # NIXL ships its own libucx: with ucxx's in the same process they crash. The per-block KV goes over NIXL
        # and only the bulk stream uses our channel, which then runs on our TCP transport.
        config = config.replace(backend="tcp")
    schema = KVCacheSchema.for_model(model)
    compute = ComputeModel.for_model(model, scale)
    longest = max(schema.blocks_for_tokens(r.tokens) for r in requests)
    # the prefill holds the longest request's blocks, distinct (a peer's plan may not ask more pages than it holds);
    # the decodes have room for as many of the longest requests in flight as fit in 12 GiB, so that requests in flight
    # together write distinct blocks, as an engine's do (a receiver bounds a peer's pages in flight by its memory)
    src_blocks = longest
    room = max(1, min(len(requests), (12 << 30) // decodes // (longest * schema.bytes_per_block))) * longest
    prefill = await _Prefill.start(model, src_blocks, _config_spec(config), seed, scale)
    events = asyncio.ensure_future(prefill.events())
    setup = {
        "variant": variant, "model": model, "config": _config_spec(config), "seed": seed, "scale": scale,
        "bulk_mib": bulk_mib, "bulk_gbps": bulk_gbps / decodes, "longest": room, "src_blocks": src_blocks,
        "hello": prefill.hello,
    }  # fmt: skip
    local = DecodeInstance(
        variant, schema, compute, config, prefill.hello, longest=room, src_blocks=src_blocks, seed=seed,
        bulk_mib=bulk_mib, bulk_gbps=bulk_gbps / decodes, name="decode0",
    )  # fmt: skip
    await local.open()
    workers = [await _Worker.start({**setup, "name": f"decode{i}", "seed": seed + i}) for i in range(1, decodes)]
    records: dict[str, RequestRecord | dict[str, Any]] = {}
    t0 = time.monotonic() + 0.2

    async def request(index: int, req: Request) -> None:
        await asyncio.sleep(max(0.0, t0 + req.arrival_s - time.monotonic()))
        arrival = time.monotonic()
        target = index % decodes
        prefill.send({"prefill": {"id": req.request_id, "tokens": req.tokens, "early": variant == "c"}})
        started = prefill.wait("started", req.request_id)
        done = prefill.wait("prefilled", req.request_id)
        if target == 0:
            records[req.request_id] = await local.serve(req.request_id, req.tokens, req.output_tokens, arrival, started, done)
            return
        worker = workers[target - 1]
        records[req.request_id] = await worker.serve(req, arrival, started, done)

    started_at = time.monotonic()
    await asyncio.gather(*(request(i, r) for i, r in enumerate(requests)))
    await local.finish()
    totals = [await w.finish() for w in workers]
    elapsed = time.monotonic() - started_at
    events.cancel()
    await prefill.stop()
    out = [r.to_dict() if isinstance(r, RequestRecord) else r for r in (records[q.request_id] for q in requests)]
    return {
        "variant": variant, "description": VARIANTS[variant] + (" (NIXL)" if local.use_nixl else ""),
        "nixl": local.use_nixl, "decodes": decodes, "records": out,
        "bulk_bytes": local.bulk_bytes + sum(t["bulk_bytes"] for t in totals), "elapsed_s": elapsed,
        "decode_steps": local.decoder.steps + sum(t["steps"] for t in totals),
    }  # fmt: skip


class _Worker:
    """A decode instance in a child process (``python -m sage_transport.pd.decode --worker``), fed JSON lines: the
    setup, each request routed to it and its prefill's events; it answers each request's record once decoded."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.totals: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.reader = asyncio.ensure_future(self._read())

    @classmethod
    async def start(cls, setup: dict[str, Any]) -> _Worker:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sage_transport.pd.decode", "--worker", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, limit=1 << 26,
        )  # fmt: skip
        worker = cls(proc)
        worker.send({"setup": setup})
        await worker.wait_ready()
        return worker

    def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(message) + "\n").encode())

    async def wait_ready(self) -> None:
        self._ready = asyncio.get_running_loop().create_future()
        await self._ready

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            if not line.startswith(b"{"):
                continue
            message = json.loads(line)
            if "ready" in message:
                self._ready.set_result(None)
            elif "record" in message:
                future = self.pending.pop(message["record"]["request_id"], None)
                if future is not None and not future.done():
                    future.set_result(message["record"])
            elif "done" in message:
                self.totals.set_result(message["done"])
        for future in [*self.pending.values(), self.totals, getattr(self, "_ready", None)]:
            if future is not None and not future.done():
                future.set_exception(RuntimeError("a decode worker process ended early"))

    async def serve(
        self, req: Request, arrival: float, started: Awaitable[dict[str, Any]], done: Awaitable[dict[str, Any]]
    ) -> dict[str, Any]:
        future = self.pending[req.request_id] = asyncio.get_running_loop().create_future()
        self.send(
            {"request": {"id": req.request_id, "tokens": req.tokens, "output_tokens": req.output_tokens, "arrival": arrival}}
        )

        async def relay(kind: str, event: Awaitable[dict[str, Any]]) -> None:
            self.send({kind: await event})

        relays = [asyncio.ensure_future(relay("started", started)), asyncio.ensure_future(relay("prefilled", done))]
        try:
            record: dict[str, Any] = await future
            return record
        finally:
            for task in relays:
                task.cancel()

    async def finish(self) -> dict[str, Any]:
        self.send({"finish": 1})
        totals = await self.totals
        await self.proc.wait()
        return totals


async def _worker_main() -> None:
    """The child side of :class:`_Worker`."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 26)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def emit(message: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    setup = json.loads(await reader.readline())["setup"]
    config = KVTransportConfig.resolve(setup["config"] or "")
    schema = KVCacheSchema.for_model(setup["model"])
    instance = DecodeInstance(
        setup["variant"], schema, ComputeModel.for_model(setup["model"], setup["scale"]), config, setup["hello"],
        longest=setup["longest"], src_blocks=setup["src_blocks"], seed=setup["seed"], bulk_mib=setup["bulk_mib"],
        bulk_gbps=setup["bulk_gbps"], name=setup["name"],
    )  # fmt: skip
    await instance.open()
    emit({"ready": 1})
    events: dict[tuple[str, str], asyncio.Future[dict[str, Any]]] = {}

    def event(kind: str, request_id: str) -> asyncio.Future[dict[str, Any]]:
        return events.setdefault((kind, request_id), loop.create_future())

    async def run(job: dict[str, Any]) -> None:
        rid = job["id"]
        record = await instance.serve(
            rid, job["tokens"], job["output_tokens"], job["arrival"], event("started", rid), event("prefilled", rid)
        )
        if not record.error:
            await instance.decoder.decoded(record)
        emit({"record": record.to_dict()})

    tasks = []
    while line := await reader.readline():
        message = json.loads(line)
        if "request" in message:
            tasks.append(asyncio.ensure_future(run(message["request"])))
        elif "started" in message or "prefilled" in message:
            kind = "started" if "started" in message else "prefilled"
            future = event(kind, message[kind][kind])
            if not future.done():
                future.set_result(message[kind])
        elif "finish" in message:
            await asyncio.gather(*tasks)
            await instance.finish()
            emit({"done": {"bulk_bytes": instance.bulk_bytes, "steps": instance.decoder.steps}})
            return


def _page_ids(
    schema: KVCacheSchema, src_blocks: int, dst_blocks: int, pairs: list[tuple[int, int]]
) -> tuple[np.ndarray, np.ndarray]:
    """Descriptor ids (page indices of each pool, layer-major) of every page of ``pairs``: one per layer × K/V ×
    block, as NixlConnector computes them from block ids."""
    rows = np.arange(schema.num_layers * schema.kv_planes, dtype=np.int64)[:, None]
    src = np.fromiter((s for s, _ in pairs), dtype=np.int64, count=len(pairs))[None, :]
    dst = np.fromiter((d for _, d in pairs), dtype=np.int64, count=len(pairs))[None, :]
    return (rows * src_blocks + src).ravel(), (rows * dst_blocks + dst).ravel()


def _config_spec(config: KVTransportConfig) -> str:
    """The channel settings that differ from the defaults, as ``key=value,...`` for the prefill process."""
    default = KVTransportConfig()
    fields = ("backend", "chunk_size", "peer_window", "max_inflight", "integrity", "direct_placement", "progress_mode")
    parts = []
    for name in fields:
        value = getattr(config, name)
        if value != getattr(default, name):
            parts.append(f"{name}={getattr(value, 'value', value)}")
    return ",".join(parts)


def run_in_process(variant: str, requests: list[Request], **options: Any) -> dict[str, Any]:
    """:func:`run_variant` in a fresh decode process (and so a fresh prefill process): no variant inherits another's
    transport state (UCX workers, NIXL agents and their threads)."""
    import subprocess

    job = {
        "variant": variant, "requests": [dataclasses.asdict(r) for r in requests],
        "config": _config_spec(options.pop("config", None) or KVTransportConfig()), **options,
    }  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "sage_transport.pd.decode"], input=json.dumps(job), capture_output=True, text=True,
        timeout=3600,
    )  # fmt: skip
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])  # type: ignore[no-any-return]
    raise RuntimeError(f"the decode process for variant {variant} failed ({proc.returncode}): {proc.stderr[-2000:]}")


def main() -> None:
    """``python -m sage_transport.pd.decode`` with a JSON job on stdin: one variant's run, its result on stdout
    (``--worker``: an extra decode instance of such a run)."""
    import structlog

    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    if "--worker" in sys.argv:
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
        asyncio.run(_worker_main())
        return
    job = json.loads(sys.stdin.read())
    requests = [Request(**r) for r in job.pop("requests")]
    variant = job.pop("variant")
    config = KVTransportConfig.resolve(job.pop("config") or "")
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    result = asyncio.run(run_variant(variant, requests, config=config, **job))
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
