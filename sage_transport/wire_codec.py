"""A transfer's chunks on the wire: quantised (:mod:`.codec`), losslessly compressed (lz4 or zstd), or both.

:class:`ChunkCodec` is what the session's hot path calls, in worker threads (torch and cramjam release the GIL):
the sender gathers a chunk's pieces, quantises them into a staging buffer, compresses that when it pays, and sends
the result; the receiver lands the payload in staging, verifies its checksum, decompresses and dequantises it into
the destination pieces. A compressed chunk is always shorter than its uncompressed wire form, so its length says
which it is (the sender sends the uncompressed form when compression does not shrink it).

Which codecs this process can decode (:func:`local_codecs`) is told to peers in the handshake; a sender never
announces a codec its peer did not list, and a receiver refuses an announcement it cannot decode.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from collections.abc import Sequence
from functools import cache
from typing import Any

from .config import Compression
from .errors import ConfigError, ProtocolError, UnsupportedError
from .schema import DType

__all__ = ["QUANTISED", "ChunkCodec", "codec_throughput", "local_codecs"]

QUANTISED = (DType.FP8_E4M3, DType.FP8_E5M2, DType.INT8, DType.INT4)
_ELEMENT_BYTES = {DType.BF16: 2, DType.FP16: 2, DType.FP32: 4}
_ZSTD_LEVEL = 1  # level 1: 0.85 GB/s a core here; higher levels cost more than the bytes they save on KV


_thread_state = threading.local()


def _one_torch_thread() -> None:
    """Run this worker thread's torch ops on this thread alone. The channel already encodes and decodes several
    chunks at once on its worker threads; torch's own intra-op threads on top of them oversubscribe the cores and
    spin (fp8 encode on two chunks at once: 2.17 GB/s against 1.59 here). With torch's OpenMP backend the setting is
    per thread, so the engine's own threads keep theirs; with another backend it would be global, so it is left."""
    if getattr(_thread_state, "done", False):
        return
    _thread_state.done = True
    import torch

    if "OpenMP" in torch.__config__.parallel_info() and threading.current_thread() is not threading.main_thread():
        torch.set_num_threads(1)


@cache
def local_codecs() -> frozenset[str]:
    """Wire dtypes and compressions this process can decode: quantised dtypes with torch, lz4/zstd with cramjam."""
    names: set[str] = set()
    if importlib.util.find_spec("torch") is not None:
        names.update(d.value for d in QUANTISED)
    if importlib.util.find_spec("cramjam") is not None:
        names.update((Compression.LZ4.value, Compression.ZSTD.value))
    return frozenset(names)


def require_codec(name: str, field: str) -> None:
    """Raise a :class:`ConfigError` naming the package to install when this process cannot run codec ``name``."""
    if name in local_codecs():
        return
    package = "cramjam" if name in (Compression.LZ4.value, Compression.ZSTD.value) else "torch"
    extra = "compress" if package == "cramjam" else "torch"
    raise ConfigError(f"{field}={name} needs the {package} package: pip install 'sage-transport[{extra}]'")


class ChunkCodec:
    """Quantise to ``wire_dtype`` (``None``: keep the stored dtype) in groups of ``group_size`` elements, then
    compress with ``compression``. ``stored`` is the KV cache's own dtype."""

    __slots__ = ("_compressor", "_decompress", "_spec", "_torch", "compression", "element_bytes", "stored", "wire_dtype")

    def __init__(self, stored: DType, wire_dtype: DType | None, group_size: int, compression: Compression) -> None:
        self.stored, self.wire_dtype, self.compression = stored, wire_dtype, compression
        self._spec: Any = None
        self._torch: Any = None
        if wire_dtype is not None:
            if stored not in _ELEMENT_BYTES:
                raise ConfigError(
                    f"target_dtype={wire_dtype.value}: KV stored as {stored.value} cannot be quantised (bf16, fp16 or fp32 can)"
                )
            require_codec(wire_dtype.value, "target_dtype")
            from . import codec

            self._spec = codec.CodecSpec(wire_dtype, group_size)
            self._torch = codec.torch_dtype(stored)
        self.element_bytes = _ELEMENT_BYTES.get(stored, 1)
        self._compressor: Any = None
        self._decompress: Any = None
        if compression is not Compression.NONE:
            require_codec(compression.value, "compression")
            import cramjam

            if compression is Compression.LZ4:
                self._compressor = lambda src, dst: cramjam.lz4.compress_block_into(src, dst, store_size=False)
                self._decompress = lambda src, dst: cramjam.lz4.decompress_block_into(src, dst)
            else:
                self._compressor = lambda src, dst: cramjam.zstd.compress_into(src, dst, level=_ZSTD_LEVEL)
                self._decompress = cramjam.zstd.decompress_into

    @property
    def group_size(self) -> int:
        return self._spec.group_size if self._spec is not None else 0

    @property
    def name(self) -> str:
        """``fp8_e4m3``, ``int4+zstd``, ``bf16+lz4``...: the KV dtype on the wire and the compression."""
        dtype = (self.wire_dtype or self.stored).value
        return dtype if self.compression is Compression.NONE else f"{dtype}+{self.compression.value}"

    @property
    def group_bytes(self) -> int:
        """Chunks of a quantised transfer are cut at multiples of this many stored bytes (whole groups)."""
        return self.group_size * self.element_bytes if self._spec is not None else 1

    def wire_nbytes(self, nbytes: int) -> int:
        """Bytes of a chunk of ``nbytes`` stored bytes once quantised (before compression)."""
        if self._spec is None:
            return nbytes
        from .codec import encoded_nbytes

        return encoded_nbytes(nbytes // self.element_bytes, self._spec)

    def bound(self, nbytes: int) -> int:
        """Most bytes a chunk of ``nbytes`` stored bytes can take on the wire."""
        return self.wire_nbytes(nbytes)

    def staging_bytes(self, nbytes: int) -> int:
        """Staging a sender needs for a chunk of ``nbytes``: the quantised form, then room to compress it."""
        quantised = self.wire_nbytes(nbytes)
        return quantised * (2 if self._compressor is not None else 1) + 1024

    # ---- sender ---------------------------------------------------------------------------------------

    def encode(self, source: memoryview, staging: memoryview) -> memoryview:
        """``source`` (a chunk's stored bytes) → its wire form, a view into ``staging``."""
        quantised_size = self.wire_nbytes(source.nbytes)
        if self._spec is not None:
            import torch

            from .codec import encode

            _one_torch_thread()

            values = torch.frombuffer(source, dtype=self._torch)
            encode(values, self._spec, torch.frombuffer(staging, dtype=torch.uint8, count=quantised_size))
            plain = staging[:quantised_size]
        else:
            plain = source
        if self._compressor is None:
            return plain
        room = staging[quantised_size if self._spec is not None else 0 :]
        try:
            size = self._compressor(plain, room[: quantised_size - 1])
        except Exception:  # did not fit in fewer bytes than the plain form: send that
            return plain
        return room[:size] if 0 < size < quantised_size else plain

    # ---- receiver -------------------------------------------------------------------------------------

    def decode(self, payload: memoryview, nbytes: int, targets: Sequence[memoryview], scratch: memoryview) -> None:
        """Write a received chunk (``nbytes`` stored bytes) into ``targets`` (its destination pieces, in order).
        ``scratch`` holds at least ``nbytes + wire_nbytes(nbytes)`` bytes."""
        quantised_size = self.wire_nbytes(nbytes)
        plain = payload
        if payload.nbytes != quantised_size:
            if self._decompress is None or payload.nbytes > quantised_size:
                raise ProtocolError(f"chunk payload has {payload.nbytes} bytes, expected {quantised_size}")
            plain = scratch[nbytes : nbytes + quantised_size]
            try:
                size = self._decompress(payload, plain)
            except Exception as exc:
                raise ProtocolError(f"{self.compression.value} payload does not decompress: {exc}") from None
            if size != quantised_size:
                raise ProtocolError(f"{self.compression.value} payload decompressed to {size} bytes, expected {quantised_size}")
        if self._spec is None:
            _scatter(plain, targets)
            return
        import torch

        from .codec import decode

        _one_torch_thread()
        encoded = torch.frombuffer(plain, dtype=torch.uint8)
        if len(targets) == 1:
            decode(encoded, self._spec, torch.frombuffer(targets[0], dtype=self._torch))
            return
        decode(encoded, self._spec, torch.frombuffer(scratch, dtype=self._torch, count=nbytes // self.element_bytes))
        _scatter(scratch[:nbytes], targets)

    # ---- on a device (GPU KV: :mod:`.device.kv`) --------------------------------------------------------

    def encode_tensor(self, source: Any, out: Any, finite: Any) -> None:
        """Quantise ``source`` (a chunk's stored bytes, a uint8 tensor) into ``out`` on its device, queued on the
        current stream; ``finite`` (bool[1]) is set to whether every value was finite. Quantisation only: a
        compressor runs on the host."""
        if self._spec is None or self._compressor is not None:
            raise UnsupportedError(f"codec {self.name} does not run on a device: only fp8, int8 and int4 without compression")
        from .codec import encode

        encode(source.view(self._torch), self._spec, out, finite=finite)

    def decode_tensor(self, payload: Any, nbytes: int, out: Any) -> None:
        """Dequantise ``payload`` (a uint8 tensor on a device) into ``out[:nbytes]``, queued on the current stream."""
        if self._spec is None or self._compressor is not None:
            raise UnsupportedError(f"codec {self.name} does not run on a device: only fp8, int8 and int4 without compression")
        from .codec import decode

        decode(payload, self._spec, out[:nbytes].view(self._torch))

    @property
    def runs_on_device(self) -> bool:
        """Whether :meth:`encode_tensor` and :meth:`decode_tensor` take it (quantisation, no compression)."""
        return self._spec is not None and self._compressor is None


def _scatter(data: memoryview, targets: Sequence[memoryview]) -> None:
    pos = 0
    for target in targets:
        n = target.nbytes
        target[:] = data[pos : pos + n]
        pos += n
    if pos != data.nbytes:
        raise ProtocolError(f"chunk holds {data.nbytes} bytes, its destination {pos}")


@cache
def codec_throughput(wire_dtype: DType | None, compression: Compression) -> float:
    """Bytes of bf16 KV per second one core encodes with this codec (measured once per process on 4 MiB): the
    ``auto`` codec policy compares it with the link's rate."""
    import torch

    codec = ChunkCodec(DType.BF16, wire_dtype, 128, compression)
    values = (torch.randn(2 << 20) * 0.5).to(torch.bfloat16)
    source = memoryview(values.view(torch.uint8).numpy())  # type: ignore[arg-type]
    staging = memoryview(bytearray(codec.staging_bytes(source.nbytes)))
    codec.encode(source, staging)
    start = time.perf_counter()
    codec.encode(source, staging)
    return source.nbytes / max(time.perf_counter() - start, 1e-9)
