"""NIXL against sage_transport on one link, through the PD bench's own NIXL baseline (``sage_transport.pd.nixl_peer``).

    python bench/nixl_link_check.py --blocks 2048 --requests 8 --per-request 64

A target process owns a KV pool (Qwen2.5-7B-shaped pages unless told otherwise) registered twice: with a NIXL agent
(notifications drained every millisecond) and with a ``KVTransferChannel`` over TCP (NIXL ships its own libucx,
which cannot share a process with ucxx's). This process, the initiator, reads ``--requests`` requests of
``--per-request`` random blocks into shuffled blocks of its own pool:

* **NIXL, as vLLM's NixlConnector drives it**: descriptor lists prepared once per side, every request's READ posted
  at once without blocking (``make_prepped_xfer`` with descriptor ids, the request id as notification), all in
  flight together, their states polled every millisecond;
* **sage_transport**: the same requests as concurrent ``pull`` calls of the same pages.

Both land byte-exact (checked page by page against the target's pattern); the target must have been notified of
every NIXL request; descriptor lists must have been prepared exactly once per side. Prints one JSON object: the
checks, and both wall times (a link figure for a glance, not a benchmark: the PD bench and bench/README.md give the
measured ones). ``tests/test_nixl_baseline.py`` runs it in CI's engine step, so the baseline cannot rot unseen.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sage_transport.channel import KVTransferChannel  # noqa: E402
from sage_transport.config import KVTransportConfig  # noqa: E402
from sage_transport.memory import KVMemory  # noqa: E402
from sage_transport.pd.decode import _page_ids  # noqa: E402
from sage_transport.pd.nixl_peer import POLL_S, NixlSide  # noqa: E402
from sage_transport.plan import TransferPlan  # noqa: E402
from sage_transport.schema import KVCacheSchema  # noqa: E402

CONFIG = KVTransportConfig(backend="tcp")


def pattern(pool: KVMemory) -> np.ndarray:
    """Every page of the target's pool holds bytes of its own (page index mixed in)."""
    view = np.frombuffer(pool.views[0], np.uint8).reshape(-1, pool.schema.page_bytes)
    column = (np.arange(view.shape[1]) % 251).astype(np.uint16)
    for start in range(0, view.shape[0], 1024):  # a row block at a time: no pool-sized temporary
        rows = np.arange(start, min(start + 1024, view.shape[0]), dtype=np.uint64)
        key = ((rows * np.uint64(2654435761)) % np.uint64(251)).astype(np.uint16)
        view[start : start + len(rows)] = (key[:, None] + column[None, :]) % 251
    return view


async def target(schema: KVCacheSchema, blocks: int) -> None:
    pool = KVMemory.allocate(schema, blocks, fill=0)
    pattern(pool)
    base = int(np.frombuffer(pool.views[0], np.uint8).ctypes.data)
    nixl = NixlSide("target", base, pool.nbytes, schema.page_bytes)
    nixl.serve()
    async with KVTransferChannel(None, CONFIG, name="target") as channel:
        channel.register(pool)
        address = await channel.listen()
        hello = {"address": address, "nixl": {"metadata": nixl.metadata().hex(), "base": base, "nbytes": pool.nbytes}}
        print(json.dumps(hello), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # the initiator is done
        await asyncio.sleep(0.05)  # the last notifications
    nixl.close()
    print(json.dumps({"notified": nixl.notified}), flush=True)


class CountingAgent:
    """The NIXL agent, counting descriptor-list preparations."""

    def __init__(self, agent: Any) -> None:
        self._agent, self.prepared = agent, 0

    def prep_xfer_dlist(self, *args: Any, **kwargs: Any) -> Any:
        self.prepared += 1
        return self._agent.prep_xfer_dlist(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._agent, name)


async def initiator(schema: KVCacheSchema, blocks: int, requests: int, per_request: int, seed: int) -> dict[str, Any]:
    child = subprocess.Popen(  # noqa: ASYNC220 (a script: nothing else runs on this loop yet)
        [sys.executable, __file__, "--target", "--model-layers", str(schema.num_layers), "--blocks", str(blocks)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert child.stdin is not None and child.stdout is not None
    try:
        hello = _next_json(child.stdout)
        rng = np.random.default_rng(seed)
        if requests * per_request > blocks:
            raise SystemExit(f"--requests × --per-request = {requests * per_request} exceeds --blocks {blocks}")
        targets = rng.permutation(blocks)[: requests * per_request].reshape(requests, per_request)  # distinct: in flight together
        jobs = [(f"req-{i}", rng.choice(blocks, per_request, replace=False), targets[i]) for i in range(requests)]
        expected = KVMemory.allocate(schema, blocks, fill=0)
        source = pattern(expected)  # what the target's pages hold
        result: dict[str, Any] = {"requests": requests, "blocks_per_request": per_request,
                                  "bytes": requests * per_request * schema.bytes_per_block}  # fmt: skip

        pool = KVMemory.allocate(schema, blocks, fill=0)
        base = int(np.frombuffer(pool.views[0], np.uint8).ctypes.data)
        nixl = NixlSide("initiator", base, pool.nbytes, schema.page_bytes)  # prepares the local pages' list
        counting = nixl.agent = CountingAgent(nixl.agent)
        peer = nixl.add_peer(bytes.fromhex(hello["nixl"]["metadata"]), hello["nixl"]["base"], hello["nixl"]["nbytes"])
        started = time.perf_counter()
        handles = []
        for rid, src, dst in jobs:  # every READ posted before any is checked: all in flight together
            remote_ids, local_ids = _page_ids(schema, blocks, blocks, list(zip(src.tolist(), dst.tolist())))
            handles.append(nixl.post_read(peer, remote_ids, local_ids, rid))
        posted = time.perf_counter()
        states = ["PROC"] * len(handles)
        while "PROC" in states:
            await asyncio.sleep(POLL_S)
            states = [s if s != "PROC" else nixl.state(h) for s, h in zip(states, handles)]
        result["nixl_s"] = time.perf_counter() - started
        result["nixl_post_s"] = posted - started
        result["nixl_states"] = sorted(set(states))
        result["nixl_dlists_prepared_after_init"] = counting.prepared  # the remote pool's, once: none per request
        result["nixl_exact"] = _exact(pool, source, jobs)
        nixl.close()

        pool2 = KVMemory.allocate(schema, blocks, fill=0)
        async with KVTransferChannel(None, CONFIG, name="initiator-sage") as channel:
            channel.register(pool2)
            sage_peer = await channel.connect(hello["address"])
            started = time.perf_counter()
            await asyncio.gather(*(
                channel.pull(TransferPlan.for_blocks(sage_peer, schema, src.tolist(), dst.tolist(), transfer_id=f"sage-{rid}"))
                for rid, src, dst in jobs
            ))  # fmt: skip
            result["sage_s"] = time.perf_counter() - started
        result["sage_exact"] = _exact(pool2, source, jobs)

        child.stdin.write("done\n")
        child.stdin.flush()
        result["notified"] = sorted(_next_json(child.stdout)["notified"])
        result["all_notified"] = result["notified"] == sorted(rid for rid, _, _ in jobs)
        child.wait(timeout=60)
        return result
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def _next_json(stream: Any) -> dict[str, Any]:
    """The target's next JSON line (NIXL's and our logs share its stdout)."""
    for line in stream:
        if line.startswith("{"):
            return json.loads(line)  # type: ignore[no-any-return]
    raise RuntimeError("the target process ended without answering")


def _exact(pool: KVMemory, source: np.ndarray, jobs: list[tuple[str, np.ndarray, np.ndarray]]) -> bool:
    schema, blocks = pool.schema, pool.num_blocks
    got = np.frombuffer(pool.views[0], np.uint8).reshape(-1, schema.page_bytes)
    for _, src, dst in jobs:
        remote_ids, local_ids = _page_ids(schema, blocks, blocks, list(zip(src.tolist(), dst.tolist())))
        if not np.array_equal(got[local_ids], source[remote_ids]):
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-layers", type=int, default=28)
    parser.add_argument("--blocks", type=int, default=2048)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--per-request", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    schema = KVCacheSchema(num_layers=args.model_layers, num_kv_heads=4, head_dim=128, block_size=16)  # Qwen2.5-7B pages
    if args.target:
        asyncio.run(target(schema, args.blocks))
        return
    print(json.dumps(asyncio.run(initiator(schema, args.blocks, args.requests, args.per_request, args.seed))))


if __name__ == "__main__":
    main()
