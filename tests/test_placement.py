"""Direct placement (CMA): the writer's bounds checks, permission probe, and a real cross-process write."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from sage_transport import KVCacheSchema, KVMemory
from sage_transport.errors import ProtocolError, TransportError, UnsupportedError
from sage_transport.placement import CmaWriter, ShmWriter, buffer_address, cma_available, host_identity

pytestmark = pytest.mark.skipif(not cma_available(), reason="process_vm_writev is Linux-only")

CHILD = """
import sys, numpy as np
buf = np.zeros(1 << 16, dtype=np.uint8)
print(buf.ctypes.data, flush=True)
sys.stdin.readline()
print(int(buf[:4096].sum()), int(buf[8192:8192 + 4096].sum()), int(buf[4096:8192].sum()), flush=True)
"""


def _child() -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def test_scattered_write_into_another_process() -> None:
    proc, address = _child()
    try:
        src = np.full(8192, 1, dtype=np.uint8)
        writer = CmaWriter(proc.pid, [(address, 1 << 16)], [(buffer_address(src), src.nbytes)])
        writer.check()
        # two pieces: source [0:4096) -> remote [8192:12288), source [4096:8192) -> remote [0:4096)
        written = writer.write(
            np.array([0, 0]), np.array([0, 4096]), np.array([0, 0]), np.array([8192, 0]), np.array([4096, 4096])
        )
        assert written == 8192
        out, _ = proc.communicate("go\n", timeout=30)
        assert out.split() == ["4096", "4096", "0"]  # both pieces landed, nothing in between was touched
    finally:
        proc.kill()
        proc.wait()


def test_write_outside_the_window_is_refused_before_any_byte_moves() -> None:
    src = np.zeros(4096, dtype=np.uint8)
    target = np.zeros(4096, dtype=np.uint8)
    writer = CmaWriter(os.getpid(), [(buffer_address(target), 4096)], [(buffer_address(src), 4096)])
    with pytest.raises(ProtocolError, match="outside"):
        writer.write(np.array([0]), np.array([0]), np.array([0]), np.array([1]), np.array([4096]))
    with pytest.raises(ProtocolError, match="outside"):
        writer.write(np.array([0]), np.array([1]), np.array([0]), np.array([0]), np.array([4096]))


def test_a_gone_process_fails_the_probe_and_the_write() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    src = np.zeros(4096, dtype=np.uint8)
    writer = CmaWriter(proc.pid, [(buffer_address(src), 4096)], [(buffer_address(src), 4096)])
    with pytest.raises(UnsupportedError, match=str(proc.pid)):
        writer.check()
    with pytest.raises(TransportError):
        writer.write(np.array([0]), np.array([0]), np.array([0]), np.array([0]), np.array([4096]))


def test_host_identity_is_stable_and_names_this_host() -> None:
    import socket

    assert host_identity() == host_identity()
    assert host_identity().startswith(socket.gethostname() + "/")


def test_shared_memory_writer_scatters_pages_and_checks_bounds() -> None:
    schema = KVCacheSchema(num_layers=2, num_kv_heads=1, head_dim=64, block_size=16)  # 2 KiB pages
    target = KVMemory.allocate(schema, 8, fill=0, shared=True)
    assert len(target.shared_fds) == 1
    src = np.arange(4 * 2048, dtype=np.uint8)  # four pages
    writer = ShmWriter(os.getpid(), [os.dup(target.shared_fds[0])], [target.nbytes], [memoryview(src)])  # takes the fd
    # a contiguous source run scattered to pages 5, 0, 7, 2 (the vectorised path)
    order = np.array([5, 0, 7, 2])
    n = len(order)
    written = writer.write(np.zeros(n, int), np.arange(n) * 2048, np.zeros(n, int), order * 2048, np.full(n, 2048))
    assert written == 4 * 2048
    pages = np.frombuffer(target.buffers[0], np.uint8).reshape(-1, 2048)
    assert np.array_equal(pages[order], src.reshape(4, 2048))
    # uneven pieces take the general path
    writer.write(np.array([0, 0]), np.array([1, 100]), np.array([0, 0]), np.array([10, 5000]), np.array([7, 300]))
    flat = np.frombuffer(target.buffers[0], np.uint8)
    assert np.array_equal(flat[10:17], src[1:8]) and np.array_equal(flat[5000:5300], src[100:400])
    with pytest.raises(ProtocolError, match="outside"):
        writer.write(np.array([0]), np.array([0]), np.array([0]), np.array([target.nbytes - 10]), np.array([2048]))


def test_shared_memory_writer_refuses_a_missing_descriptor() -> None:
    with pytest.raises(UnsupportedError, match="fd"):
        ShmWriter(os.getpid(), [999_999], [4096], [memoryview(bytearray(4096))])


def test_shared_memory_writer_refuses_a_descriptor_smaller_than_its_window_and_closes_it() -> None:
    small = os.memfd_create("small")
    os.ftruncate(small, 4096)
    with pytest.raises(ProtocolError, match="4096 bytes of a file, its window says 8192"):
        ShmWriter(os.getpid(), [small], [8192], [memoryview(bytearray(4096))])
    with pytest.raises(OSError):
        os.fstat(small)  # handed over, so closed
