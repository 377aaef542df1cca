"""Direct placement on one host: a sender writes a chunk's pieces straight into the receiver's registered
memory, by a plain memory copy when the receiver's KV cache is shared memory (:class:`ShmWriter`, a memfd the
sender maps), else with Linux ``process_vm_writev`` (:class:`CmaWriter`, the system call under UCX's CMA
transport).

One call takes up to :data:`IOV_MAX` scattered ranges on each side and runs without the GIL (ctypes
releases it), so a chunk whose destination is 256 shuffled 16 KiB pages costs one system call and no
staging copy, and several chunks are written at once on a small thread pool: both cores copy, where a
two-sided receive leaves all the copying to the receiver's one thread. The kernel checks permission as for
ptrace (same user, and Yama's ``ptrace_scope`` where set): :meth:`CmaWriter.check` probes it before use.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import socket
import sys
from typing import Any

import numpy as np

from . import kernels
from .errors import ProtocolError, TransportError, UnsupportedError

__all__ = ["IOV_MAX", "CmaWriter", "ShmWriter", "buffer_address", "cma_available", "host_identity"]

IOV_MAX = 1024
_IOVEC = np.dtype([("base", "<u8"), ("len", "<u8")])


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def _load() -> tuple[Any, Any] | None:
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    try:
        write, read = libc.process_vm_writev, libc.process_vm_readv
    except AttributeError:
        return None
    for fn in (write, read):
        fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
        fn.restype = ctypes.c_ssize_t
    return write, read


_CALLS = _load()


def host_identity() -> str:
    """Host name plus kernel boot id: equal exactly when two processes can share memory."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "unknown-boot"
    return f"{socket.gethostname()}/{boot}"


def cma_available() -> bool:
    """Whether this platform has ``process_vm_writev``."""
    return _CALLS is not None


def buffer_address(buffer: Any) -> int:
    """The address of a host buffer's first byte (any object with the buffer protocol)."""
    array = np.frombuffer(buffer, dtype=np.uint8)
    return int(array.ctypes.data) if array.size else 0


def _check_bounds(pid: int, sizes: np.ndarray, segs: np.ndarray, offs: np.ndarray, lengths: np.ndarray, whose: str) -> None:
    if len(lengths) and bool((offs.astype(np.uint64) + lengths > sizes[segs]).any()):
        raise ProtocolError(f"a piece falls outside {whose} registered memory")


class ShmWriter:
    """Writes into a same-host peer's shared-memory KV cache with numpy copies, which release the GIL: pages of
    one chunk go in one vectorised scatter, several chunks at once. The memory is exactly the memfds the peer
    handed over itself (``SCM_RIGHTS`` on the attestation socket, :mod:`.attest`); this takes ownership of
    ``fds`` and closes them once mapped."""

    def __init__(self, pid: int, fds: list[int], remote_sizes: list[int], local: list[memoryview]) -> None:
        import mmap
        import stat

        self.pid = pid
        self._remote: list[np.ndarray] = []
        try:
            for i, (fd, size) in enumerate(zip(fds, remote_sizes)):
                try:
                    info = os.fstat(fd)
                except OSError as exc:
                    raise UnsupportedError(f"process {pid}'s shared buffer {i} (fd {fd}) cannot be used: {exc}") from exc
                if not stat.S_ISREG(info.st_mode) or info.st_size < size:
                    raise ProtocolError(
                        f"process {pid}'s shared buffer {i} is {info.st_size} bytes of a "
                        f"{'file' if stat.S_ISREG(info.st_mode) else 'non-file'}, its window says {size}"
                    )
                flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)  # fault the pages in now, not per chunk
                try:
                    self._remote.append(np.frombuffer(mmap.mmap(fd, size, flags=flags), dtype=np.uint8))
                except (OSError, ValueError) as exc:
                    raise UnsupportedError(f"cannot map process {pid}'s shared KV memory (buffer {i}): {exc}") from exc
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._remote_size = np.array(remote_sizes, dtype=np.uint64)
        self._remote_base = np.array([int(r.ctypes.data) for r in self._remote], dtype=np.uint64)
        self._local = [np.frombuffer(view, dtype=np.uint8) for view in local]
        self._local_size = np.array([v.nbytes for v in local], dtype=np.uint64)
        self._local_base = np.array([int(v.ctypes.data) if v.size else 0 for v in self._local], dtype=np.uint64)

    def check(self) -> None:
        """Opening and mapping the peer's memory already proved access."""

    def write_checked(
        self, src_seg: np.ndarray, src_off: np.ndarray, dst_seg: np.ndarray, dst_off: np.ndarray, lengths: np.ndarray
    ) -> tuple[int, int]:
        """Copy every piece and checksum it at the source and where it landed, in one pass per page (the compiled
        loop of :mod:`.kernels`; call from a worker thread). Returns ``(source checksum, landed checksum)``."""
        lengths = lengths.astype(np.uint64, copy=False)
        _check_bounds(self.pid, self._remote_size, dst_seg, dst_off, lengths, f"process {self.pid}'s")
        _check_bounds(self.pid, self._local_size, src_seg, src_off, lengths, "this process's")
        src = self._local_base[src_seg] + src_off.astype(np.uint64)
        dst = self._remote_base[dst_seg] + dst_off.astype(np.uint64)
        return kernels.copy_pages(src, dst, lengths, 2)

    def write(
        self, src_seg: np.ndarray, src_off: np.ndarray, dst_seg: np.ndarray, dst_off: np.ndarray, lengths: np.ndarray
    ) -> int:
        """Copy every piece (call from a worker thread). Returns the bytes written."""
        lengths = lengths.astype(np.uint64, copy=False)
        _check_bounds(self.pid, self._remote_size, dst_seg, dst_off, lengths, f"process {self.pid}'s")
        _check_bounds(self.pid, self._local_size, src_seg, src_off, lengths, "this process's")
        n = len(lengths)
        if not n:
            return 0
        page = int(lengths[0])
        uniform = bool((src_seg == src_seg[0]).all() and (dst_seg == dst_seg[0]).all() and (lengths == page).all())
        if uniform and page and not bool((dst_off % page).any()) and (n == 1 or bool((np.diff(src_off) == page).all())):
            src = self._local[int(src_seg[0])]
            dst = self._remote[int(dst_seg[0])]
            start = int(src_off[0])
            rows = dst[: dst.size - dst.size % page].reshape(-1, page)
            rows[(dst_off // page).astype(np.intp)] = src[start : start + n * page].reshape(n, page)  # one scatter, GIL released
            return n * page
        for s, so, d, do, length in zip(src_seg.tolist(), src_off.tolist(), dst_seg.tolist(), dst_off.tolist(), lengths.tolist()):
            self._remote[d][do : do + length] = self._local[s][so : so + length]
        return int(lengths.sum())


class CmaWriter:
    """Writes pieces of this process's registered buffers into another process's registered buffers.

    ``local`` and ``remote`` are ``(address, size)`` per registered buffer (segment); pieces name a segment
    and an offset on each side, and every piece is bounds-checked against the remote segment before the
    call, so a plan cannot make us write outside what the receiver registered.
    """

    def __init__(self, pid: int, remote: list[tuple[int, int]], local: list[tuple[int, int]]) -> None:
        if _CALLS is None:
            raise UnsupportedError("process_vm_writev is not available on this platform")
        self.pid = pid
        self._remote_base = np.array([a for a, _ in remote], dtype=np.uint64)
        self._remote_size = np.array([n for _, n in remote], dtype=np.uint64)
        self._local_base = np.array([a for a, _ in local], dtype=np.uint64)
        self._local_size = np.array([n for _, n in local], dtype=np.uint64)

    def source_checksum(self, src_seg: np.ndarray, src_off: np.ndarray, lengths: np.ndarray) -> int:
        """XXH3 of the pieces of this process's registered memory, as one stream (compiled, without the GIL)."""
        lengths = lengths.astype(np.uint64, copy=False)
        _check_bounds(self.pid, self._local_size, src_seg, src_off, lengths, "this process's")
        return kernels.hash_pages(self._local_base[src_seg] + src_off.astype(np.uint64), lengths)

    def check(self) -> None:
        """Probe permission and the window: read one byte of the peer's first buffer (reading changes nothing)."""
        assert _CALLS is not None
        if not len(self._remote_base):
            raise UnsupportedError(f"process {self.pid} registered no memory")
        scratch = ctypes.create_string_buffer(1)
        local = _Iovec(ctypes.cast(scratch, ctypes.c_void_p), 1)
        remote = _Iovec(int(self._remote_base[0]), 1)
        if _CALLS[1](self.pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0) != 1:
            code = ctypes.get_errno()
            raise UnsupportedError(f"cannot write process {self.pid}'s memory: {os.strerror(code)} (errno {code})")

    def write(
        self, src_seg: np.ndarray, src_off: np.ndarray, dst_seg: np.ndarray, dst_off: np.ndarray, lengths: np.ndarray
    ) -> int:
        """Write every piece (blocking; call it from a worker thread). Returns the bytes written."""
        assert _CALLS is not None
        n = len(lengths)
        lengths = lengths.astype(np.uint64, copy=False)
        dst_end = dst_off.astype(np.uint64) + lengths
        if n and bool((dst_end > self._remote_size[dst_seg]).any()):
            raise ProtocolError(f"a piece falls outside process {self.pid}'s registered memory")
        if n and bool((src_off.astype(np.uint64) + lengths > self._local_size[src_seg]).any()):
            raise ProtocolError("a piece falls outside this process's registered memory")
        local = np.empty(n, dtype=_IOVEC)
        remote = np.empty(n, dtype=_IOVEC)
        local["base"] = self._local_base[src_seg] + src_off.astype(np.uint64)
        local["len"] = lengths
        remote["base"] = self._remote_base[dst_seg] + dst_off.astype(np.uint64)
        remote["len"] = lengths
        writev = _CALLS[0]
        total = 0
        for start in range(0, n, IOV_MAX):
            stop = min(start + IOV_MAX, n)
            expected = int(lengths[start:stop].sum())
            done = writev(self.pid, local[start:].ctypes.data, stop - start, remote[start:].ctypes.data, stop - start, 0)
            if done != expected:
                code = ctypes.get_errno() if done < 0 else 0
                if code == errno.ESRCH:
                    raise TransportError(f"process {self.pid} is gone")
                reason = os.strerror(code) if code else f"short write ({done} of {expected} bytes)"
                raise TransportError(f"process_vm_writev into process {self.pid} failed: {reason}")
            total += expected
        return total
