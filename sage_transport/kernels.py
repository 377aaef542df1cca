"""Compiled inner loops of the data path: copy and checksum many scattered pages in one call, without the GIL.

A chunk is hundreds of 16 KiB pages; a Python loop over them costs more than the copy. These loops are compiled
once per process by numba (a JIT over LLVM, wheels on PyPI, no toolchain at install) and call glibc's ``memcpy``
and the XXH3 functions that python-xxhash's extension exports, so the checksum is bit-for-bit the one
:func:`.integrity.streaming_checksum_function` computes (XXH3-64 over the pieces' concatenation, top bit cleared).

:func:`copy_pages` is the fused pass: each page is copied, then hashed at the source and, when asked, where it
landed, while both are still in the core's cache, so a verified copy reads and writes memory once. Everything
here takes byte addresses (``uint64`` arrays) and trusts them: callers bounds-check against registered memory
first (:mod:`.placement`, :mod:`.session`).

Without numba, or with another checksum than xxh3, :data:`AVAILABLE` is false and callers keep their numpy and
Python paths.
"""

from __future__ import annotations

import ctypes
import importlib.util
import threading
from typing import Any

import numpy as np

from .errors import UnsupportedError

__all__ = ["AVAILABLE", "copy_pages", "hash_pages", "ready", "warm_up", "warm_up_in_background"]

_MASK = (1 << 63) - 1


def _xxhash_library() -> Any | None:
    """python-xxhash's extension, when it exports the XXH3 C API (every wheel seen so far does)."""
    try:
        import xxhash._xxhash as xxhash_module

        lib = ctypes.CDLL(xxhash_module.__file__)
        lib.XXH3_64bits_update  # noqa: B018  # present, or AttributeError
    except (ImportError, OSError, AttributeError):
        return None
    return lib


def _load() -> tuple[Any, Any]:
    # numba is imported here, at the first copy, never by importing sage_transport: engines scan sys.modules at
    # start-up (vLLM's Triton kernel overrides trip over numba's objects), and most processes never copy
    import numba

    lib = _xxhash_library()
    if lib is None:
        raise UnsupportedError("python-xxhash does not export the XXH3 C API here; the compiled copy loops need it")
    create, free = lib.XXH3_createState, lib.XXH3_freeState
    reset, digest = lib.XXH3_64bits_reset, lib.XXH3_64bits_digest
    # the dispatching entry point picks the widest vector unit (AVX-512, AVX2) as python-xxhash itself does
    update = getattr(lib, "XXH3_64bits_update_dispatch", None) or lib.XXH3_64bits_update
    memcpy = ctypes.CDLL(None).memcpy
    create.argtypes, create.restype = [], ctypes.c_void_p
    free.argtypes, free.restype = [ctypes.c_void_p], ctypes.c_int
    reset.argtypes, reset.restype = [ctypes.c_void_p], ctypes.c_int
    update.argtypes, update.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t], ctypes.c_int
    digest.argtypes, digest.restype = [ctypes.c_void_p], ctypes.c_uint64
    memcpy.argtypes, memcpy.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t], ctypes.c_void_p

    @numba.njit(nogil=True)  # type: ignore[misc]
    def copy_kernel(src: Any, dst: Any, lengths: Any, hashes: int, out: Any) -> None:
        # hashes: 0 none, 1 the source, 2 the source and where it landed; out[0], out[1]: the two digests
        s_state = create()
        d_state = create()
        reset(s_state)
        reset(d_state)
        for i in range(len(lengths)):
            n = lengths[i]
            memcpy(dst[i], src[i], n)
            if hashes >= 1:
                update(s_state, src[i], n)
            if hashes >= 2:
                update(d_state, dst[i], n)
        if hashes >= 1:
            out[0] = digest(s_state)
        if hashes >= 2:
            out[1] = digest(d_state)
        free(s_state)
        free(d_state)

    @numba.njit(nogil=True)  # type: ignore[misc]
    def hash_kernel(addr: Any, lengths: Any, out: Any) -> None:
        state = create()
        reset(state)
        for i in range(len(lengths)):
            update(state, addr[i], lengths[i])
        out[0] = digest(state)
        free(state)

    return copy_kernel, hash_kernel


#: whether the compiled loops can run here (numba installed, xxhash's C API exported); they load at first use
AVAILABLE = importlib.util.find_spec("numba") is not None and _xxhash_library() is not None
_KERNELS: tuple[Any, Any] | None = None
_compiled = threading.Lock()
_warm = False
_warming = False


def warm_up() -> None:
    """Import numba and compile both loops now (about 0.5 s, once per process) rather than inside the first chunk."""
    global _warm, _KERNELS
    if _warm or not AVAILABLE:
        return
    with _compiled:
        if not _warm:
            kernels = _load()
            scratch = np.zeros(2, dtype=np.uint64)
            addr = np.full(1, scratch.ctypes.data, dtype=np.uint64)
            kernels[0](addr, addr, np.zeros(1, dtype=np.uint64), 2, np.zeros(2, dtype=np.uint64))
            kernels[1](addr, np.zeros(1, dtype=np.uint64), np.zeros(1, dtype=np.uint64))
            _KERNELS = kernels
            _warm = True


def ready() -> bool:
    """Whether the loops are compiled. An event loop's thread uses them only then (until then it takes the numpy
    and xxhash path, as without numba): the first call would otherwise wait there for the rest of the compile."""
    return _warm


def warm_up_in_background() -> None:
    """Start compiling both loops on a thread of its own that ends when they are (once per process): whoever
    calls them first then waits the rest of ~0.3 s, if anything, instead of compiling on an event loop's thread."""
    global _warming
    if _warm or _warming or not AVAILABLE:
        return
    _warming = True
    threading.Thread(target=warm_up, name="sage-kernels-compile", daemon=True).start()


def copy_pages(src: np.ndarray, dst: np.ndarray, lengths: np.ndarray, hashes: int = 0) -> tuple[int, int]:
    """Copy ``lengths[i]`` bytes from address ``src[i]`` to ``dst[i]`` for every i, in order, without the GIL.

    ``hashes``: 0 checksums nothing, 1 the source pieces, 2 the source and the destination pieces, each as one
    stream. Returns ``(source checksum, destination checksum)`` (0 where not computed)."""
    warm_up()
    assert _KERNELS is not None, "kernels.AVAILABLE is false"
    out = np.zeros(2, dtype=np.uint64)
    _KERNELS[0](
        np.ascontiguousarray(src, dtype=np.uint64),
        np.ascontiguousarray(dst, dtype=np.uint64),
        np.ascontiguousarray(lengths, dtype=np.uint64),
        hashes,
        out,
    )
    return int(out[0]) & _MASK, int(out[1]) & _MASK


def hash_pages(addr: np.ndarray, lengths: np.ndarray) -> int:
    """XXH3 checksum of the pieces at ``addr[i]`` of ``lengths[i]`` bytes, as one stream, without the GIL."""
    warm_up()
    assert _KERNELS is not None, "kernels.AVAILABLE is false"
    out = np.zeros(1, dtype=np.uint64)
    _KERNELS[1](np.ascontiguousarray(addr, dtype=np.uint64), np.ascontiguousarray(lengths, dtype=np.uint64), out)
    return int(out[0]) & _MASK
