"""Same-host placement into a peer's device KV: CUDA IPC handles out, mapped tensors in, batched copies between.

The receiver exports its registered tensors (:func:`export_window`): one ``cudaIpcGetMemHandle`` per allocation
holding them (the caching allocator packs tensors into larger allocations; ``cuMemGetAddressRange`` finds each
one's base) and each buffer's allocation and offset. The window rides on the attestation socket like the host
window, so only a kernel-attested process (and, without a token, only one of this user) ever sees the handles.
The sender opens each handle once (:func:`open_window`), checks every buffer lies inside what it mapped, and
wraps the buffers as tensors; :class:`DeviceWriter` then writes chunks with the same run kernels as a send
(gather on the device, scatter into the peer's tensors) on the channel's stream, checksums the source and where
it landed, and awaits one event per batch. Both processes must use the same GPU (by UUID): between two GPUs
chunks go through UCX (``cuda_ipc``), which copies peer to peer.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import UnsupportedError
from ..wire import DeviceWindow
from .checksum import combine
from .runtime import wait

if TYPE_CHECKING:
    from ..planner import ChunkTable
    from .kv import DeviceKV

__all__ = ["DeviceWriter", "export_window", "open_window"]

_IPC_LAZY_ENABLE_PEER_ACCESS = 1


class _IpcHandle(ctypes.Structure):
    # bytes, not c_char: a c_char array field reads back cut at its first NUL, and handles hold NULs
    _fields_ = [("reserved", ctypes.c_ubyte * 64)]


def handle_bytes(handle: _IpcHandle) -> bytes:
    """All 64 bytes of a CUDA IPC handle, as they travel."""
    return bytes(handle)


def handle_from(raw: bytes) -> _IpcHandle:
    """A CUDA IPC handle from the 64 bytes a peer sent (``UnsupportedError`` for any other length)."""
    if len(raw) != ctypes.sizeof(_IpcHandle):
        raise UnsupportedError(f"a CUDA IPC handle is {ctypes.sizeof(_IpcHandle)} bytes, the peer sent {len(raw)}")
    return _IpcHandle.from_buffer_copy(raw)


def _cudart() -> Any:
    for name in ("libcudart.so.12", "libcudart.so.13", "libcudart.so.11.0", "libcudart.so"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        lib.cudaIpcGetMemHandle.argtypes = [ctypes.POINTER(_IpcHandle), ctypes.c_void_p]
        lib.cudaIpcOpenMemHandle.argtypes = [ctypes.POINTER(ctypes.c_void_p), _IpcHandle, ctypes.c_uint]
        lib.cudaIpcCloseMemHandle.argtypes = [ctypes.c_void_p]
        lib.cudaGetErrorString.restype = ctypes.c_char_p
        return lib
    raise UnsupportedError("CUDA IPC needs the CUDA runtime library (libcudart), which torch loads; none was found")


def _driver() -> Any:
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        raise UnsupportedError(f"CUDA IPC needs the CUDA driver (libcuda.so.1): {exc}") from None
    lib.cuMemGetAddressRange_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_size_t), ctypes.c_uint64]
    return lib


def _check(lib: Any, code: int, what: str) -> None:
    if code != 0:
        lib.cudaGetLastError()  # else torch's next launch check reports this error as its own
        raise UnsupportedError(f"{what} failed: {lib.cudaGetErrorString(code).decode()} (error {code})")


def allocation_of(pointer: int) -> tuple[int, int]:
    """``(base, size)`` of the device allocation holding ``pointer``."""
    driver = _driver()
    base, size = ctypes.c_uint64(), ctypes.c_size_t()
    code = driver.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(pointer))
    if code != 0:
        raise UnsupportedError(f"cuMemGetAddressRange failed for device pointer {pointer:#x} (error {code})")
    return base.value, size.value


def export_window(kv: DeviceKV) -> tuple[DeviceWindow, list[int]]:
    """This side's device KV as a window for a same-host peer, and the file descriptors to pass with it."""
    runtime = kv.runtime
    if runtime.name == "emulated":  # host tensors over memfds (sage_transport.testing.device)
        fds = list(getattr(kv, "shared_fds", []))
        if len(fds) != len(kv.segments):
            raise UnsupportedError("emulated device memory is shared only when allocated over memfds")
        segments = [[i, 0, seg.numel()] for i, seg in enumerate(kv.segments)]
        return DeviceWindow("emulated", "emulated", [], segments), fds
    import torch

    cudart = _cudart()
    handles: list[bytes] = []
    bases: dict[int, int] = {}
    segments = []
    with torch.cuda.device(runtime.device):
        for seg in kv.segments:
            pointer = int(seg.data_ptr())
            base, _ = allocation_of(pointer)
            if base not in bases:
                handle = _IpcHandle()
                _check(cudart, cudart.cudaIpcGetMemHandle(ctypes.byref(handle), ctypes.c_void_p(base)), "cudaIpcGetMemHandle")
                bases[base] = len(handles)
                handles.append(handle_bytes(handle))
            segments.append([bases[base], pointer - base, seg.numel()])
    return DeviceWindow("cuda", runtime.device_uuid(), handles, segments), []


class device_range:
    """``nbytes`` of device memory at ``pointer`` as torch can wrap it without copying (``__cuda_array_interface__``)."""

    def __init__(self, pointer: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (pointer, False),
            "version": 3,
            "strides": None,
        }


def open_window(
    window: DeviceWindow, kv: DeviceKV, sizes: list[int], fds: list[int], same_process: list[int] | None = None
) -> DeviceWriter:
    """Map a peer's device window (``sizes``: each buffer's bytes as its region says); a writer into it. Takes
    ownership of ``fds`` (emulated windows). ``same_process``: the buffers' addresses, where the kernel attested
    the peer as this very process (CUDA IPC handles do not open in the process that made them; its pointers are
    valid here as they are). Raises ``UnsupportedError`` where it cannot be mapped here."""
    runtime = kv.runtime
    if window.kind != runtime.name:
        raise UnsupportedError(f"the peer's device memory is {window.kind}, ours {runtime.name}")
    if len(window.segments) != len(sizes):
        raise UnsupportedError(f"the peer's window has {len(window.segments)} buffers, its region {len(sizes)}")
    for i, ((_, _, nbytes), size) in enumerate(zip(window.segments, sizes)):
        if nbytes != size:
            raise UnsupportedError(f"the peer's buffer {i} is {nbytes} bytes in its window, {size} in its region")
    if window.kind == "emulated":
        import torch

        maps = [mmap.mmap(fd, size) for fd, size in zip(fds, sizes)]
        for fd in fds:
            os.close(fd)
        tensors = [torch.frombuffer(m, dtype=torch.uint8) for m in maps]
        return DeviceWriter(kv, tensors, lambda: None)
    if window.uuid != runtime.device_uuid():
        raise UnsupportedError(f"the peer's KV is on GPU {window.uuid}, ours on {runtime.device_uuid()}: chunks go through UCX")
    import torch

    if same_process is not None:
        tensors = []
        if len(same_process) != len(sizes):
            raise UnsupportedError(f"the peer's window names {len(same_process)} addresses for {len(sizes)} buffers")
        for i, (address, nbytes) in enumerate(zip(same_process, sizes)):
            base, size = allocation_of(address)
            if address + nbytes > base + size:
                raise UnsupportedError(f"the peer's buffer {i} runs past the device allocation holding it")
            tensors.append(torch.as_tensor(device_range(address, nbytes)))
        return DeviceWriter(kv, tensors, lambda: None)
    cudart = _cudart()
    opened: list[int] = []

    def close() -> None:
        while opened:
            cudart.cudaIpcCloseMemHandle(ctypes.c_void_p(opened.pop()))

    try:
        with torch.cuda.device(runtime.device):
            mapped = []
            for raw in window.handles:
                handle, mapped_at = handle_from(raw), ctypes.c_void_p()
                code = cudart.cudaIpcOpenMemHandle(ctypes.byref(mapped_at), handle, _IPC_LAZY_ENABLE_PEER_ACCESS)
                _check(cudart, code, "cudaIpcOpenMemHandle")
                opened.append(int(mapped_at.value or 0))
                mapped.append((opened[-1], allocation_of(opened[-1])[1]))
            tensors = []
            for i, (allocation, offset, nbytes) in enumerate(window.segments):
                if allocation >= len(mapped) or offset + nbytes > mapped[allocation][1]:
                    raise UnsupportedError(f"the peer's buffer {i} lies outside the allocation it names")
                tensors.append(torch.as_tensor(device_range(mapped[allocation][0] + offset, nbytes)))
    except BaseException:
        close()
        raise
    return DeviceWriter(kv, tensors, close)


def consecutive(seqs: list[int]) -> list[tuple[int, int]]:
    """``seqs`` as ``(first, last)`` runs of consecutive numbers, in their order."""
    runs: list[tuple[int, int]] = []
    for seq in seqs:
        if runs and seq == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], seq)
        else:
            runs.append((seq, seq))
    return runs


class DeviceWriter:
    """Writes chunks into a peer's mapped device KV on the channel's stream (see the module docstring)."""

    def __init__(self, kv: DeviceKV, peer: list[Any], close: Callable[[], None]) -> None:
        self.kv, self.peer, self._close = kv, peer, close
        from .kv import make_span

        self.peer_span = make_span(peer, kv.runtime)  # one kernel a chunk into the peer's tensors
        self._active = 0  # place() calls whose copies may still run: the mapping outlives them
        self._closing = False

    async def place(
        self, table: ChunkTable, seqs: list[int], checksum: bool, stopped: Callable[[], bool]
    ) -> list[tuple[int, int | None]]:
        """Write chunks ``seqs`` (no further one once ``stopped()``); per chunk the source checksum and the one
        of its pages where they landed (``(0, None)`` with checksums off)."""
        if self._closing:
            return []
        self._active += 1
        try:
            return await self._place(table, seqs, checksum, stopped)
        finally:
            self._active -= 1
            if self._closing and not self._active:
                self._release()

    async def _place(
        self, table: ChunkTable, seqs: list[int], checksum: bool, stopped: Callable[[], bool]
    ) -> list[tuple[int, int | None]]:
        kv = self.kv
        torch, runtime = kv.torch, kv.runtime
        src, dst = kv.rows(table, "src"), kv.rows(table, "dst", self.peer_span)  # rows of the peer's tensors
        written: list[tuple[int, int]] = []
        held = []
        with runtime.stream():
            sums = torch.empty(len(seqs), 4, dtype=torch.int64, device=runtime.device)  # each row written
            i = 0
            for first, last in consecutive(seqs):  # each run of consecutive chunks: a few kernels for them all
                if stopped():
                    break
                sizes = [int(n) for n in table.chunk_nbytes[first : last + 1]]
                staging = kv.device_staging(sum(sizes))
                held.append(staging)
                kv.gather(src, first, staging, last=last)
                if checksum:
                    kv.sums_many(staging, sizes, sums[i : i + len(sizes), :2])
                kv.scatter(dst, first, staging, self.peer, last=last)
                if checksum:  # read back where it landed: what the receiver would hash in place
                    kv.gather(dst, first, staging, self.peer, last=last)
                    kv.sums_many(staging, sizes, sums[i : i + len(sizes), 2:])
                written.extend(zip(range(first, last + 1), sizes))
                i += len(sizes)
            report = sums
            if runtime.device.type != "cpu":
                report = runtime.host_buffer(sums.numel() * 8).view(torch.int64).view(-1, 4)
                report.copy_(sums, non_blocking=True)
            event = runtime.record()
        try:
            await wait(event.query)
        finally:
            kv.release(*held)
        values = report.tolist()
        if not checksum:
            return [(0, None) for _ in written]
        return [(combine(v[0], v[1], n), combine(v[2], v[3], n)) for (_, n), v in zip(written, values)]

    def close(self) -> None:
        """Unmap the peer's memory once no copy into it runs (at once when none does)."""
        self._closing = True
        if not self._active:
            self._release()

    def _release(self) -> None:
        self.peer, self.peer_span = [], None
        close, self._close = self._close, lambda: None
        close()
