"""The prefill instance: ``python -m sage_transport.pd.prefill --model M --pool-blocks N``.

It owns a paged KV pool of the model's shape and runs prefills one at a time, each layer an emulated wait
(:mod:`.timing`). Commands arrive as JSON lines on stdin, events leave as JSON lines on stdout:

* out, first: ``{"address", "pool_blocks", "nixl"}`` (its channel, and NIXL metadata when NIXL is installed);
* in ``{"prefill": {"id", "tokens", "early"}}``: queue a prefill; ``early`` means the decode already asked for the
  KV (variant c) and it is served layer by layer as computed; otherwise the decode pulls once ``prefilled`` comes;
* out ``{"started": id, "t"}``, ``{"prefilled": id, "t", "src": [block ids]}`` (``t``: ``time.monotonic()``, which
  every process on the host shares);
* in ``{"quit": 1}``.

Pulls whose transfer id starts with ``bulk-`` (the decode's bulk migration stream) are served as asked.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from typing import Any

from ..channel import KVTransferChannel
from ..config import KVTransportConfig
from ..errors import SageTransportError
from ..memory import KVMemory
from ..plan import BlockMapping, TransferPlan
from ..schema import KVCacheSchema
from .nixl_peer import NixlSide, nixl_api
from .timing import ComputeModel


class PrefillInstance:
    def __init__(self, model: str, pool_blocks: int, config: KVTransportConfig, seed: int, scale: float) -> None:
        self.schema = KVCacheSchema.for_model(model)
        self.compute = ComputeModel.for_model(model, scale)
        self.pool = KVMemory.allocate(self.schema, pool_blocks, fill=0x5A)
        self.channel = KVTransferChannel(None, config, name="prefill")
        self.rng = random.Random(seed)
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.early: set[str] = set()
        self.running: dict[str, list[int]] = {}  # request id → its source blocks, from prefill start
        self.layers_done: dict[str, int] = {}
        self.serving: set[str] = set()
        self.finished: set[str] = set()  # prefills done: their pulls name our blocks
        self.prefilled_early: dict[str, list[int]] = {}  # asked-ahead prefills done before their pull came: blocks
        self.nixl: NixlSide | None = None

    def emit(self, event: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()

    def resolve(self, peer: str, plan: TransferPlan) -> TransferPlan | None:
        """A decode's pull: after the prefill (a, b) it names our blocks already and goes as asked; asked before
        (c, or a pull that overtook its prefill command) it waits for the prefill to start and is then served from
        our blocks, each layer as computed."""
        tid = plan.transfer_id
        if tid in self.finished or tid.startswith("bulk-"):  # the bulk stream's pulls name our blocks too
            return plan
        if tid in self.running:
            self.serve_early(tid)
        elif tid in self.prefilled_early:  # asked ahead, but the whole prefill ran before the pull came: all ready
            self.serve_early(tid, self.prefilled_early.pop(tid))
        return None

    def serve_early(self, tid: str, prefilled: list[int] | None = None) -> None:
        """Serve a deferred pull from our blocks: those of the running prefill, each layer as it is computed, or
        ``prefilled``, the blocks of a prefill already over (every layer ready at once)."""
        asked = self.channel.deferred_pulls.get(tid)
        if asked is None or tid in self.serving:
            return
        mapping = asked.mappings[0]
        src = tuple((self.running[tid] if prefilled is None else prefilled)[: len(mapping.dst_blocks)])
        plan = TransferPlan(
            transfer_id=tid, peer=asked.peer, schema=asked.schema, priority=asked.priority, progressive=True,
            mappings=(BlockMapping(mapping.layer_start, mapping.layer_stop, src, mapping.dst_blocks),),
        )  # fmt: skip
        self.channel.serve_pull(tid, plan)
        self.serving.add(tid)
        done = self.schema.num_layers if prefilled is not None else self.layers_done.get(tid, 0)
        if done:
            self.channel.mark_layer_ready(tid, range(done))
        if prefilled is not None:  # nothing more to mark: the prefill loop has let go of it
            self.serving.discard(tid)

    async def prefills(self) -> None:
        while True:
            job = await self.queue.get()
            tid, tokens = job["id"], int(job["tokens"])
            blocks = self.schema.blocks_for_tokens(tokens)
            src = self.rng.sample(range(self.pool.num_blocks), blocks)  # distinct, as an engine's blocks are
            self.running[tid] = src
            self.emit({"started": tid, "t": time.monotonic()})
            if tid in self.channel.deferred_pulls:
                self.serve_early(tid)
            layer_s = self.compute.prefill_layer_s(tokens)
            deadline = time.monotonic()
            for layer in range(self.schema.num_layers):
                deadline += layer_s
                await asyncio.sleep(max(0.0, deadline - time.monotonic()))
                self.layers_done[tid] = layer + 1
                if tid in self.serving:
                    try:
                        self.channel.mark_layer_ready(tid, layer)
                    except SageTransportError:
                        self.serving.discard(tid)  # ended (failed or aborted): the decode hears it from its pull
            if tid not in self.early:
                self.finished.add(tid)
            elif tid not in self.serving:  # asked ahead, not pulled yet: its pull is served when it comes
                self.prefilled_early[tid] = src
            self.emit({"prefilled": tid, "t": time.monotonic(), "src": src})
            self.running.pop(tid, None)
            self.layers_done.pop(tid, None)
            self.serving.discard(tid)
            self.early.discard(tid)

    async def commands(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            command = json.loads(line)
            if "quit" in command:
                return
            job = command["prefill"]
            if job.get("early"):
                self.early.add(job["id"])
            self.queue.put_nowait(job)

    async def run(self) -> None:
        async with self.channel:
            self.channel.register(self.pool)
            self.channel.pull_resolver = self.resolve
            address = await self.channel.listen()
            nixl = None
            if nixl_api() is not None:
                view = self.pool.views[0]
                import numpy as np

                base = int(np.frombuffer(view, np.uint8).ctypes.data)
                self.nixl = NixlSide("prefill", base, view.nbytes, self.pool.schema.page_bytes)
                self.nixl.serve()
                nixl = {"metadata": self.nixl.metadata().hex(), "base": base, "nbytes": view.nbytes}
            self.emit({"address": address, "pool_blocks": self.pool.num_blocks, "nixl": nixl})
            worker = asyncio.ensure_future(self.prefills())
            try:
                await self.commands()
            finally:
                worker.cancel()
                if self.nixl is not None:
                    self.nixl.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="the prefill instance of `sage-transport bench pd`")
    parser.add_argument("--model", default="qwen2.5-7b")
    parser.add_argument("--pool-blocks", type=int, required=True)
    parser.add_argument("--config", default="", help="key=value,... channel settings")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0)
    args = parser.parse_args()
    import structlog

    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))  # stdout carries the events
    config = KVTransportConfig.resolve(args.config)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(PrefillInstance(args.model, args.pool_blocks, config, args.seed, args.scale).run())


if __name__ == "__main__":
    main()
