"""Direct placement (CMA): the writer's bounds checks, permission probe, and a real cross-process write."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from sage_transport.errors import ProtocolError, TransportError, UnsupportedError
from sage_transport.placement import CmaWriter, buffer_address, cma_available, host_identity

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
