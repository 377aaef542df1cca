"""sageLLM's adapters against sageLLM's own packages: SageCommBackend found through ``sagellm_comm.get_comm_backend``
and driven through all 11 methods by two ranks in two processes, and ``sagellm_kv_cache.KVTransferEngine`` moving a
KV handle's tensor between them over SageKVTransferBackend. Skipped where the isagellm wheels are not installed."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from typing import Any

import pytest

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    sagellm_comm = pytest.importorskip("sagellm_comm", reason="sageLLM is not installed (pip install isagellm-comm)")
    sagellm_kv_cache = pytest.importorskip("sagellm_kv_cache", reason="pip install --no-deps isagellm-kv-cache")
    torch = pytest.importorskip("torch")
    from sage_transport.collectives import free_port
    from sage_transport.errors import ConfigError, PlanError
    from sage_transport.integrations import sagellm as adapter

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


def kv_tensor() -> torch.Tensor:
    return (torch.arange(2 * 4 * 64 * 8, dtype=torch.float32) * 0.5).view(2, 4, 64, 8).to(torch.float16)


def run_rank(rank: int, port: int) -> dict[str, Any]:
    """What rank ``rank`` of two sees through sageLLM's interfaces (both ranks run this)."""
    from sagellm_comm import CommOp, get_comm_backend
    from sagellm_kv_cache import KVHandle, KVTransferEngine

    comm = get_comm_backend("sage_transport")
    comm.init(rank, 2, "127.0.0.1", port)
    out: dict[str, Any] = {"type": type(comm).__name__, "rank": comm.get_rank(), "world": comm.get_world_size()}
    out["sum"] = comm.all_reduce(torch.full((3,), float(rank + 1)), CommOp.SUM).tolist()
    out["max"] = comm.all_reduce(torch.full((3,), float(rank + 1)), CommOp.MAX).tolist()
    out["gather"] = [t.tolist() for t in comm.all_gather(torch.tensor([rank * 10, rank * 10 + 1]))]
    out["broadcast"] = comm.broadcast(torch.tensor([7.0, 8.0]) if rank == 1 else torch.zeros(2), src_rank=1).tolist()
    if rank == 0:
        comm.send(torch.arange(5), 1)
    else:
        buffer = torch.zeros(5, dtype=torch.int64)
        comm.recv(buffer, 0)
        out["recv"] = buffer.tolist()
    comm.barrier()
    pair = comm.create_group([0, 1], "pair")
    out["group"] = [pair.group_id, list(pair.ranks)]
    out["group_sum"] = comm.all_reduce(torch.full((2,), float(rank)), group=pair).tolist()
    out["group_broadcast"] = comm.broadcast(torch.full((1,), float(rank + 5)), src_rank=1, group=pair).tolist()
    solo = comm.create_group([0], "solo")
    if rank == 0:
        out["solo_sum"] = comm.all_reduce(torch.ones(1), group=solo).tolist()
    else:
        try:
            comm.all_reduce(torch.ones(1), group=solo)
        except ConfigError as exc:
            out["solo_error"] = str(exc)

    backend = adapter.SageKVTransferBackend(comm)
    engine = KVTransferEngine(backend)
    handle = KVHandle.create(num_tokens=64, request_id="req-7")
    if rank == 0:
        engine.transfer_kv_handle(handle, 0, 1, tensor=kv_tensor())
    else:
        received = torch.zeros_like(kv_tensor())
        engine.transfer_kv_handle(handle, 0, 1, tensor=received)
        out["kv_equal"] = bool(torch.equal(received, kv_tensor()))
        wrong = torch.zeros(3, dtype=torch.uint8)
        try:  # the next payload has another size: an error naming both, and the stream stays in step
            backend.recv(wrong, 0)
        except PlanError as exc:
            out["size_error"] = str(exc)
        after = torch.zeros(4, dtype=torch.uint8)
        backend.recv(after, 0)
        out["after"] = after.tolist()
    if rank == 0:
        backend.send(torch.arange(8, dtype=torch.uint8), 1)
        backend.send(b"\x01\x02\x03\x04", 1)
    out["kv_bytes"] = backend.bytes_sent + backend.bytes_received
    # the engine's compression and checksum path: zlib bytes on the wire, a bytearray to receive them
    zipped = KVTransferEngine(backend, enable_compression=True, enable_checksum=True)
    if rank == 0:
        zipped.transfer_kv_handle(handle, 0, 1, tensor=kv_tensor())
        out["zipped_bytes"] = backend.bytes_sent - out["kv_bytes"]
    else:
        received = torch.zeros_like(kv_tensor())
        zipped.transfer_kv_handle(handle, 0, 1, tensor=received)
        out["zipped_equal"] = bool(torch.equal(received, kv_tensor()))
    comm.barrier()
    comm.destroy()
    return out


CHILD = f"""
import json, sys, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, {str(__file__.rsplit("/", 2)[0])!r})
import sage_transport.integrations.sagellm
from tests.test_sagellm_adapters import run_rank
print("RESULT " + json.dumps(run_rank(1, int(sys.argv[1]))), flush=True)
"""


def test_two_ranks_run_sagellms_comm_interface_and_kv_transfer_engine_over_sage_transport() -> None:
    assert "sage_transport" in sagellm_comm.list_comm_backends()
    port = free_port()
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(port)], stdout=subprocess.PIPE, text=True)
    try:
        mine = run_rank(0, port)
        output, _ = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert child.returncode == 0
    theirs = json.loads(next(line for line in output.splitlines() if line.startswith("RESULT "))[len("RESULT ") :])
    for rank, seen in ((0, mine), (1, theirs)):
        assert seen["type"] == "SageCommBackend" and seen["rank"] == rank and seen["world"] == 2
        assert seen["sum"] == [3.0] * 3 and seen["max"] == [2.0] * 3
        assert seen["gather"] == [[0, 1], [10, 11]]
        assert seen["broadcast"] == [7.0, 8.0]
        assert seen["group"] == ["pair", [0, 1]] and seen["group_sum"] == [1.0, 1.0] and seen["group_broadcast"] == [6.0]
    assert theirs["recv"] == [0, 1, 2, 3, 4]
    assert mine["solo_sum"] == [1.0]
    assert "rank 1 is not in group 'solo'" in theirs["solo_error"]
    assert theirs["kv_equal"] is True
    assert theirs["size_error"] == "recv from rank 0: 8 bytes arrived for a buffer of 3 bytes"
    assert theirs["after"] == [1, 2, 3, 4]
    kv_bytes = kv_tensor().numel() * 2
    assert mine["kv_bytes"] == kv_bytes + 8 + 4 and theirs["kv_bytes"] == kv_bytes + 4
    assert theirs["zipped_equal"] is True and 0 < mine["zipped_bytes"] < kv_bytes


def test_registering_twice_is_harmless_and_a_foreign_backend_of_the_same_name_is_refused() -> None:
    assert adapter.register() == "sage_transport"
    sagellm_comm.register_comm_backend("sage-test-foreign", lambda: None)
    with pytest.raises(ConfigError, match="already has a comm backend named 'sage-test-foreign'"):
        adapter.register("sage-test-foreign")
    with pytest.raises(ConfigError, match="SAGE_TRANSPORT_COMM_BACKEND='mpi'"):
        adapter.SageCommBackend("mpi")
