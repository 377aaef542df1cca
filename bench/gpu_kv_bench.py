"""GPU KV through the channel on one GPU, against what the GPU itself does with the same bytes (issue 22).

    python bench/gpu_kv_bench.py [--tokens 32768] [--repeat 5] [--one-token 300] [--out DIR]

Two processes on one GPU (the receiver: ``python -m sage_transport.testing.device_peer --kind cuda``), Qwen2.5-7B
KV (28 layers, one tensor per layer as vLLM allocates it), every block to a shuffled destination block,
checksums on (fletcher64 on the device), over UCX. Every figure is a median of ``--repeat`` runs with its
spread, next to its reference measured in the same sitting:

* **ipc**: chunks placed straight into the receiver's KV through CUDA IPC (the default on one host), against
  **d2d**: the same shuffled blocks copied device to device inside one process (``dst[:, order] = src`` per layer,
  one index kernel per layer: the fastest a single process moves them);
* **ucx_cuda**: the same with placement off: chunks gathered on the device and sent through UCX (``cuda_ipc``);
* **staged**: UCX without CUDA transports (``ucx_tls=sm,cma,self``): chunks staged through pinned host memory
  (the cross-node path without GPUDirect), against **pinned**: D2H then H2D copies of the same bytes;
* **one_token**: p50/p90/p99 of one token (56 pages of 1 KiB, a different block each time) to the other process.

The receiver's pages are checked against the sender's (xxh3 of every page, in the shuffled order) after each case.
Writes ``gpu_kv.json`` and ``gpu_kv.md`` into ``--out``. ``--kind emulated`` runs the same cases over emulated
device memory (host tensors, no GPU): a dry run of this script's logic, whose figures mean nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import xxhash  # noqa: E402

from sage_transport import KVCacheSchema, KVMemory, KVTransferChannel, KVTransportConfig, Layout, TransferPlan  # noqa: E402
from sage_transport.testing.device import device_pages, emulated_memory  # noqa: E402

MODEL = "qwen2.5-7b"


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


KIND = "cuda"  # --kind


def synchronize() -> None:
    if KIND == "cuda":
        torch.cuda.synchronize()


def filled(schema: KVCacheSchema, blocks: int, seed: int) -> KVMemory:
    if KIND == "emulated":
        return emulated_memory(schema, blocks, seed=seed)
    memory = KVMemory.allocate(schema, blocks, device="cuda")
    generator = torch.Generator(device="cuda").manual_seed(seed)
    for buf in memory.buffers:
        buf.copy_(torch.randint(0, 256, buf.shape, dtype=torch.uint8, device="cuda", generator=generator))
    return memory


def d2d_reference(memory: KVMemory, order: list[int], repeat: int) -> list[float]:
    """GB/s of ``dst[:, order] = src`` per layer tensor, inside this process."""
    schema, blocks = memory.schema, memory.num_blocks
    index = torch.tensor(order, device=memory.buffers[0].device)
    views = [buf.view(schema.kv_planes, blocks, schema.page_bytes) for buf in memory.buffers]
    targets = [torch.empty_like(v) for v in views]
    rates = []
    for _ in range(repeat + 1):
        synchronize()
        start = time.perf_counter()
        for src, dst in zip(views, targets):
            dst[:, index] = src
        synchronize()
        rates.append(memory.nbytes / (time.perf_counter() - start) / 1e9)
    del targets
    return rates[1:]


def pinned_reference(memory: KVMemory, repeat: int) -> list[float]:
    """GB/s of pinned D2H then H2D copies of the same bytes (one copy per layer tensor each way)."""
    hosts = [torch.empty(buf.shape, dtype=torch.uint8, pin_memory=KIND == "cuda") for buf in memory.buffers]
    back = [torch.empty_like(buf) for buf in memory.buffers]
    rates = []
    for _ in range(repeat + 1):
        synchronize()
        start = time.perf_counter()
        for buf, host in zip(memory.buffers, hosts):
            host.copy_(buf, non_blocking=True)
        for host, target in zip(hosts, back):
            target.copy_(host, non_blocking=True)
        synchronize()
        rates.append(memory.nbytes / (time.perf_counter() - start) / 1e9)
    return rates[1:]


class Receiver:
    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sage_transport.testing.device_peer", *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip

    def line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while True:
            text = self.proc.stdout.readline()
            if not text:
                raise RuntimeError("the receiver process ended")
            if text.startswith("{"):
                return json.loads(text)  # type: ignore[no-any-return]

    def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.line()

    def close(self) -> None:
        if self.proc.stdin is not None:
            with __import__("contextlib").suppress(BrokenPipeError):
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def bulk_case(name: str, memory: KVMemory, order: list[int], config: str, repeat: int, tls: str | None) -> dict[str, Any]:
    schema = memory.schema
    saved = os.environ.get("UCX_TLS")
    if tls is not None:  # UCX_* in the environment wins over the profile, in both processes
        os.environ["UCX_TLS"] = tls
    env = dict(os.environ)
    try:
        return await _bulk(name, memory, order, config, repeat, env, schema)
    finally:
        if saved is None:
            os.environ.pop("UCX_TLS", None)
        else:
            os.environ["UCX_TLS"] = saved


async def _bulk(
    name: str, memory: KVMemory, order: list[int], config: str, repeat: int, env: dict[str, str], schema: KVCacheSchema
) -> dict[str, Any]:
    receiver = Receiver(["--kind", KIND, "--model", MODEL, "--blocks", str(memory.num_blocks), "--config", config], env)
    try:
        address = receiver.line()["address"]
        async with KVTransferChannel("ucx", KVTransportConfig.from_string(config), name=f"bench-{name}") as sender:
            sender.register(memory)
            peer = await sender.connect(address)
            rates = []
            for i in range(repeat + 1):  # the first run is the warm-up (and proves acceptance for placement)
                plan = TransferPlan.for_blocks(peer, schema, range(memory.num_blocks), order, transfer_id=f"{name}-{i}")
                result = await sender.transfer(plan)
                assert result.integrity.value == "verified"
                rates.append(result.gbps)
            links = sender.links()[peer]
        report = receiver.ask("digest")
    finally:
        receiver.close()
    expected = np.zeros_like(device_pages(memory))
    expected[:, :, order] = device_pages(memory)
    return {
        "gbps": spread(rates[1:]),
        "placement": links.get("placement"),
        "ucx_transports": links.get("ucx_transports"),
        "verified": report["digest"] == xxhash.xxh3_64_hexdigest(expected.tobytes()) and report["checksum_failures"] == 0,
    }


async def one_token_case(transfers: int) -> dict[str, Any]:
    schema = KVCacheSchema.for_model(MODEL, block_size=1, layout=Layout.LAYER_KV_BLOCK)
    blocks = 4096
    memory = filled(schema, blocks, 5)
    receiver = Receiver(["--kind", KIND, "--model", MODEL, "--block-size", "1", "--blocks", str(blocks)], dict(os.environ))
    rng = np.random.default_rng(1)
    try:
        address = receiver.line()["address"]
        async with KVTransferChannel("ucx", name="bench-token") as sender:
            sender.register(memory)
            peer = await sender.connect(address)
            times = []
            for i in range(transfers + 20):
                src, dst = int(rng.integers(blocks)), int(rng.integers(blocks))
                plan = TransferPlan.for_blocks(peer, schema, [src], [dst], transfer_id=f"tok-{i}")
                start = time.perf_counter()
                await sender.transfer(plan)
                times.append((time.perf_counter() - start) * 1e6)
    finally:
        receiver.close()
    times = sorted(times[20:])
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]  # noqa: E731
    return {
        "us": {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "transfers": len(times)},
        "bytes": schema.num_layers * 2 * schema.page_bytes,
    }


async def guarded(name: str, case: Any, limit_s: float) -> dict[str, Any]:
    """A case's record, or its error (with the traceback on stderr): one case failing or hanging must not hide
    the others' figures."""
    try:
        record: dict[str, Any] = await asyncio.wait_for(case, limit_s)
    except Exception as exc:
        traceback.print_exc()
        record = {"error": repr(exc) if not isinstance(exc, TimeoutError) else f"cut after {limit_s:.0f} s"}
    print(name, json.dumps(record), flush=True)
    return record


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--one-token", type=int, default=300)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--kind", choices=("cuda", "emulated"), default="cuda", help="emulated: a dry run without a GPU")
    parser.add_argument("--cases", default="ipc,ucx_cuda,staged,one_token", help="which cases to run (comma-separated)")
    parser.add_argument("--case-timeout", type=float, default=90.0, help="seconds one case may take before it is cut")
    args = parser.parse_args()
    global KIND
    KIND = args.kind
    schema = KVCacheSchema.for_model(MODEL)
    blocks = -(-args.tokens // schema.block_size)
    memory = filled(schema, blocks, 3)
    order = np.random.default_rng(0).permutation(blocks).tolist()
    record: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name() if KIND == "cuda" else "emulated (no GPU: figures mean nothing)",
        "torch": torch.__version__, "model": MODEL, "tokens": args.tokens,
        "bytes": memory.nbytes, "command": " ".join(sys.argv),
    }  # fmt: skip
    record["d2d"] = spread(d2d_reference(memory, order, args.repeat))
    record["pinned"] = spread(pinned_reference(memory, args.repeat))
    cases = {"ipc": ("", None), "ucx_cuda": ("direct_placement=false", None), "staged": ("direct_placement=false", "sm,cma,self")}
    chosen = set(args.cases.split(","))
    for name, (config, tls) in cases.items():
        if name not in chosen:
            record[name] = {"error": "not run (--cases)"}
            continue
        record[name] = await guarded(name, bulk_case(name, memory, order, config, args.repeat, tls), args.case_timeout)
    if "one_token" in chosen:
        record["one_token"] = await guarded("one_token", one_token_case(args.one_token), args.case_timeout)
    else:
        record["one_token"] = {"error": "not run (--cases)"}
    for name, reference in (("ipc", "d2d"), ("ucx_cuda", "d2d"), ("staged", "pinned")):
        if "gbps" in record[name]:
            record[name]["ratio"] = record[name]["gbps"]["median"] / record[reference]["median"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_kv.json").write_text(json.dumps(record, indent=2))
    title = f"# GPU KV on {record['gpu']} ({args.tokens} tokens of {MODEL}, {memory.nbytes / 1e9:.2f} GB)"
    header = "| case | GB/s median (min-max) | reference | ratio | placement | verified |"
    lines = [title, "", header, "|---|---|---|---|---|---|"]
    for name, reference in (("ipc", "d2d"), ("ucx_cuda", "d2d"), ("staged", "pinned")):
        case = record[name]
        if "gbps" not in case:
            lines.append(f"| {name} | {case.get('error')} | | | | |")
            continue
        g, r = case["gbps"], record[reference]
        lines.append(
            f"| {name} | {g['median']:.2f} ({g['min']:.2f}-{g['max']:.2f}) | {reference} {r['median']:.2f} | "
            f"{case['ratio']:.2f} | {case['placement']} | {case['verified']} |"
        )
    token = record["one_token"]
    lines += ["", f"one token: {token.get('us', token)}"]
    (args.out / "gpu_kv.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    asyncio.run(main())
