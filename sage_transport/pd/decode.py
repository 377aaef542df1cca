"""The decode instance of ``sage-transport bench pd`` (this process) and one variant's run against a prefill process.

The decode engine steps like an engine: each step is an emulated wait (:mod:`.timing`) for the requests whose KV
has arrived, and each gives every running request one token. New KV arrives while requests decode. A bulk
migration stream (another sender's KV moving to this instance at ``bulk`` priority) runs throughout, in every
variant: with priorities (c) a request's KV goes ahead of it, otherwise they share the window.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import random
import sys
import threading
import time
from typing import Any

import numpy as np

from ..channel import KVTransferChannel
from ..config import KVTransportConfig
from ..memory import KVMemory
from ..plan import Priority, TransferPlan
from ..schema import KVCacheSchema
from .nixl_peer import NixlSide, nixl_api
from .timing import ComputeModel
from .workload import Request

__all__ = ["RequestRecord", "VARIANTS", "run_variant"]

VARIANTS = {
    "a": "after prefill, per-block pull (vLLM NixlConnector pattern)",
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
                empty = not self.running
            if empty:
                self.loop.call_soon_threadsafe(self._set_idle)

    def _set_idle(self) -> None:
        with self.lock:
            if not self.running:
                self.idle.set()


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
) -> dict[str, Any]:
    """Run ``requests`` through a fresh prefill process and this decode instance; per-request records and totals.
    The bulk stream offers ``bulk_gbps`` in ``bulk_mib`` transfers (0: none)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}: choose one of {', '.join(VARIANTS)}")
    config = config or KVTransportConfig()
    if variant == "a" and nixl_api() is not None and config.backend == "ucx":
        # NIXL ships its own libucx: with ucxx's in the same process they crash. The per-block KV goes over NIXL
        # and only the bulk stream uses our channel, which then runs on our TCP transport.
        config = config.replace(backend="tcp")
    schema = KVCacheSchema.for_model(model)
    compute = ComputeModel.for_model(model, scale)
    longest = max(schema.blocks_for_tokens(r.tokens) for r in requests)
    bulk_blocks = max(1, (bulk_mib << 20) // schema.bytes_per_block)
    dst_blocks = longest + bulk_blocks  # the longest request, and the bulk stream apart (requests share blocks)
    src_blocks = min(longest, 2048)  # source blocks are drawn with replacement: the prefill's KV is emulated
    rng = random.Random(seed)
    prefill = await _Prefill.start(model, src_blocks, _config_spec(config), seed, scale)
    events = asyncio.ensure_future(prefill.events())
    memory = KVMemory.allocate(schema, dst_blocks, fill=0)
    use_nixl = variant == "a" and nixl_api() is not None and prefill.hello.get("nixl") is not None
    records: dict[str, RequestRecord] = {}
    decoder = _Decoder(compute, asyncio.get_running_loop())
    stop = asyncio.Event()
    bulk_bytes = 0
    nixl: NixlSide | None = None
    async with KVTransferChannel(None, config, name="decode") as channel:
        channel.register(memory)
        peer = await channel.connect(prefill.hello["address"])
        nixl_peer = ""
        loop = asyncio.get_running_loop()
        nixl_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nixl") if use_nixl else None
        if use_nixl:
            base = int(np.frombuffer(memory.views[0], np.uint8).ctypes.data)
            nixl = NixlSide("decode", base, memory.views[0].nbytes)
            nixl_peer = nixl.add_peer(bytes.fromhex(prefill.hello["nixl"]["metadata"]))
        free = list(range(bulk_blocks, dst_blocks))

        def take(count: int) -> list[int]:
            chosen = rng.sample(free, count)  # shuffled destination blocks (reused across requests: compute is emulated)
            return chosen

        async def bulk() -> None:  # paced: the same offered load in every variant, on the variant's own path
            nonlocal bulk_bytes
            i = 0
            while not stop.is_set():
                began = time.monotonic()
                src = [rng.randrange(src_blocks) for _ in range(bulk_blocks)]
                if use_nixl:  # NIXL has no priorities: bulk READs queue with the KV's on the agent's thread
                    assert nixl is not None
                    pages = _page_pairs(schema, src_blocks, dst_blocks, list(zip(src, range(bulk_blocks))))
                    base = prefill.hello["nixl"]["base"]
                    await loop.run_in_executor(nixl_thread, nixl.read, nixl_peer, base, pages, schema.page_bytes)
                else:
                    plan = TransferPlan.for_blocks(
                        peer, schema, src, range(bulk_blocks), transfer_id=f"bulk-{i}", priority=Priority.BULK
                    )
                    await channel.pull(plan)
                bulk_bytes += bulk_blocks * schema.bytes_per_block
                i += 1
                pace = bulk_blocks * schema.bytes_per_block / (bulk_gbps * 1e9)
                await asyncio.sleep(max(0.0, began + pace - time.monotonic()))

        async def request(req: Request, t0: float) -> None:
            await asyncio.sleep(max(0.0, t0 + req.arrival_s - time.monotonic()))
            blocks = schema.blocks_for_tokens(req.tokens)
            record = records[req.request_id] = RequestRecord(
                req.request_id, req.tokens, req.output_tokens, blocks * schema.bytes_per_block, time.monotonic()
            )
            dst = take(blocks)
            early = variant == "c"
            prefill.send({"prefill": {"id": req.request_id, "tokens": req.tokens, "early": early}})
            started = prefill.wait("started", req.request_id)
            done = prefill.wait("prefilled", req.request_id)
            try:
                if early:  # ask now: the prefill serves it layer by layer, ahead of the bulk stream
                    plan = TransferPlan.for_blocks(
                        peer, schema, dst, dst, transfer_id=req.request_id, priority=Priority.DECODE_CRITICAL
                    )
                    record.transfer_start = time.monotonic()
                    await channel.pull(plan)
                    record.kv_ready = time.monotonic()
                    finished = await done
                else:
                    finished = await done
                    record.transfer_start = time.monotonic()
                    pairs = list(zip(finished["src"], dst))
                    if use_nixl:
                        assert nixl is not None and nixl_thread is not None
                        pages = _page_pairs(schema, src_blocks, dst_blocks, pairs)
                        await loop.run_in_executor(  # one NIXL thread, as vLLM's worker drives its agent
                            nixl_thread, nixl.read, nixl_peer, prefill.hello["nixl"]["base"], pages, schema.page_bytes
                        )
                        record.nixl_prep_s, record.nixl_xfer_s = nixl.last
                    else:
                        plan = TransferPlan.for_blocks(  # a without NIXL: one message per block and layer
                            peer, schema, [s for s, _ in pairs], dst, transfer_id=req.request_id,
                            priority=Priority.BULK,  # no priorities: the same class as the bulk stream, FIFO
                            chunk_size=max(512, schema.page_bytes) if variant == "a" else None,
                        )  # fmt: skip
                        await channel.pull(plan)
                    record.kv_ready = time.monotonic()
                record.prefill_start = (await started)["t"]
                record.prefill_end = finished["t"]
            except Exception as exc:  # recorded, the run goes on
                record.error = f"{type(exc).__name__}: {exc}"
                return
            decoder.join(record)

        t0 = time.monotonic() + 0.2
        decoder.thread.start()
        background = asyncio.ensure_future(bulk()) if bulk_mib and bulk_gbps > 0 else None
        started_at = time.monotonic()
        await asyncio.gather(*(request(r, t0) for r in requests))
        await decoder.idle.wait()  # the last requests decode their tokens
        stop.set()
        await asyncio.to_thread(decoder.stop)
        if background is not None:
            background.cancel()
            await asyncio.gather(background, return_exceptions=True)
        elapsed = time.monotonic() - started_at
        if nixl is not None:
            nixl.close()
        if nixl_thread is not None:
            nixl_thread.shutdown(wait=True)
    events.cancel()
    await prefill.stop()
    return {
        "variant": variant, "description": VARIANTS[variant] + (" (NIXL)" if use_nixl else ""),
        "nixl": use_nixl, "records": [records[r.request_id].to_dict() for r in requests],
        "bulk_bytes": bulk_bytes, "elapsed_s": elapsed, "decode_steps": decoder.steps,
    }  # fmt: skip


def _page_pairs(schema: KVCacheSchema, src_blocks: int, dst_blocks: int, pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(remote offset, local offset) of every page of ``pairs``: one per layer × K/V × block, as NixlConnector reads."""
    page = schema.page_bytes
    out: list[tuple[int, int]] = []
    for layer in range(schema.num_layers):
        for plane in range(schema.kv_planes):
            remote_row = (layer * schema.kv_planes + plane) * src_blocks
            local_row = (layer * schema.kv_planes + plane) * dst_blocks
            out.extend(((remote_row + s) * page, (local_row + d) * page) for s, d in pairs)
    return out


def _config_spec(config: KVTransportConfig) -> str:
    """The channel settings that differ from the defaults, as ``key=value,...`` for the prefill process."""
    default = KVTransportConfig()
    fields = ("backend", "chunk_size", "prefetch_depth", "max_inflight", "integrity", "direct_placement", "progress_mode")
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
    """``python -m sage_transport.pd.decode`` with a JSON job on stdin: one variant's run, its result on stdout."""
    import structlog

    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
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
