"""KV quantisation for the wire: FP8 (E4M3, E5M2), INT8 and INT4, group-wise, on torch tensors.

A chunk's elements (bf16/fp16/fp32, flattened in the cache's own order) are cut into groups of ``group_size``
consecutive elements (the default, 128, is one head's vector of one token for the usual head sizes). Each
group gets its own scale, so one outlier spoils only its group:

* ``fp8_e4m3`` / ``fp8_e5m2``: ``scale = amax / max_finite``; elements are stored as ``x / scale`` in FP8.
* ``int8``: symmetric, ``scale = amax / 127``.
* ``int4``: asymmetric, ``scale = (max - min) / 15`` and a zero point (the group's minimum),
  two elements per byte, low nibble first.

Encoded layout (all little-endian): the groups' scales (fp32), then for int4 the groups' minimums (fp32), then
the quantised elements. :func:`encoded_nbytes` gives its size without encoding, so a receiver can post the
exact buffer. ``encode`` and ``decode`` run wherever the tensor lives (CPU here, CUDA on a GPU path) and can
write into a caller's buffer (``out``). On the CPU they work through the data a few hundred KiB at a time so
every intermediate stays in cache; FP8 decodes with integer shifts (E5M2 is the top byte of an fp16, E4M3 is
an fp16 times 2^8 after a 7-bit shift) because torch's own FP8 conversion runs element by element.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch

from .errors import ConfigError, ProtocolError
from .schema import DType

__all__ = ["CodecSpec", "ErrorStats", "decode", "encode", "encoded_nbytes", "error_stats", "torch_dtype"]

_FP8 = {DType.FP8_E4M3: torch.float8_e4m3fn, DType.FP8_E5M2: torch.float8_e5m2}
_WIRE_DTYPES = (DType.FP8_E4M3, DType.FP8_E5M2, DType.INT8, DType.INT4)
_SOURCE_DTYPES = {torch.bfloat16, torch.float16, torch.float32}
_TORCH = {DType.BF16: torch.bfloat16, DType.FP16: torch.float16, DType.FP32: torch.float32}
_CPU_BLOCK_ELEMENTS = 1 << 18  # 256 Ki elements: 1 MiB of fp32 scratch, resident in a core's L2/L3
_TINY = 1e-30  # a zero group's divisor: its elements are all 0, so any finite factor gives 0
_E4M3_SHIFT = 256.0  # an E4M3 byte's 7 magnitude bits shifted left by 7 are an fp16 of value/2^8
_scratch = threading.local()


def torch_dtype(dtype: DType) -> torch.dtype:
    """The torch dtype of a stored (unquantised) KV dtype."""
    try:
        return _TORCH[dtype]
    except KeyError:
        raise ConfigError(f"KV stored as {dtype.value} cannot be quantised: it must be bf16, fp16 or fp32") from None


@dataclass(frozen=True)
class CodecSpec:
    """How a chunk is quantised: the wire ``dtype`` and the elements per scale (``group_size``; even for int4)."""

    dtype: DType
    group_size: int = 128

    def __post_init__(self) -> None:
        if self.dtype not in _WIRE_DTYPES:
            choices = ", ".join(d.value for d in _WIRE_DTYPES)
            raise ConfigError(f"target_dtype={self.dtype.value!r} is not a quantised wire dtype; choose one of {choices}")
        if self.group_size < 2 or self.group_size > 1 << 20 or (self.dtype is DType.INT4 and self.group_size % 2):
            raise ConfigError(f"group_size={self.group_size!r} must be 2..1048576 (and even for int4)")

    @property
    def zero_points(self) -> bool:
        return self.dtype is DType.INT4


def encoded_nbytes(nelements: int, spec: CodecSpec) -> int:
    """Bytes of ``nelements`` encoded with ``spec`` (scales, zero points and elements)."""
    groups = math.ceil(nelements / spec.group_size)
    meta = groups * 4 * (2 if spec.zero_points else 1)
    padded = groups * spec.group_size
    return meta + (padded // 2 if spec.dtype is DType.INT4 else padded)


def _f32_scratch(n: int, device: torch.device) -> torch.Tensor:
    if device.type != "cpu":
        return torch.empty(n, dtype=torch.float32, device=device)
    buf = getattr(_scratch, "f32", None)
    if buf is None or buf.numel() < n:
        buf = _scratch.f32 = torch.empty(max(n, _CPU_BLOCK_ELEMENTS), dtype=torch.float32)
    return buf[:n]


def _blocks(groups: int, spec: CodecSpec, device: torch.device) -> list[tuple[int, int]]:
    step = groups if device.type != "cpu" else max(1, _CPU_BLOCK_ELEMENTS // spec.group_size)
    return [(a, min(a + step, groups)) for a in range(0, groups, step)]


def _padded(values: torch.Tensor, spec: CodecSpec) -> torch.Tensor:
    flat = values.reshape(-1)
    pad = (-flat.numel()) % spec.group_size
    if pad:  # the last group is padded with zeros (never with garbage: it joins the group's scale)
        flat = torch.nn.functional.pad(flat.float(), (0, pad))
    return flat.view(-1, spec.group_size)


def encode(
    values: torch.Tensor, spec: CodecSpec, out: torch.Tensor | None = None, finite: torch.Tensor | None = None
) -> torch.Tensor:
    """``values`` (bf16, fp16 or fp32; any shape) → a flat uint8 tensor of :func:`encoded_nbytes` bytes, written
    into ``out`` when given (a uint8 tensor of at least that many bytes, on the same device). Values holding inf
    or NaN raise ``ProtocolError``; with ``finite`` (a bool tensor of one element on the device) nothing waits
    for the device to say so: ``finite`` is set to whether they were all finite, for the caller to read once its
    stream has passed."""
    if values.dtype not in _SOURCE_DTYPES:
        raise ConfigError(f"cannot quantise a {values.dtype} tensor: KV must be bf16, fp16 or fp32")
    n = values.numel()
    size = encoded_nbytes(n, spec)
    if out is None:
        out = torch.empty(size, dtype=torch.uint8, device=values.device)
    elif out.dtype is not torch.uint8 or out.numel() < size:
        raise ConfigError(f"encode: out must be a uint8 tensor of at least {size} bytes")
    out = out[:size]
    source = _padded(values, spec)
    groups, gs = source.shape
    meta_count = groups * (2 if spec.zero_points else 1)
    meta = out[: meta_count * 4].view(torch.float32)
    body = out[meta_count * 4 :]
    scales = meta[:groups].view(groups, 1)
    top = 15.0 if spec.dtype is DType.INT4 else 127.0 if spec.dtype is DType.INT8 else torch.finfo(_FP8[spec.dtype]).max
    for a, b in _blocks(groups, spec, values.device):
        f = _f32_scratch((b - a) * gs, values.device).view(b - a, gs)
        f.copy_(source[a:b])
        high, low = f.amax(1, keepdim=True), f.amin(1, keepdim=True)
        if spec.dtype is DType.INT4:
            span = high - low
            torch.div(span, top, out=scales[a:b])
            meta[groups + a : groups + b].copy_(low.view(-1))
            f.sub_(low).mul_(top / span.clamp_min_(_TINY)).round_().clamp_(0, 15)
            codes = f.view(-1, 2)
            packed = body[a * gs // 2 : b * gs // 2]
            packed.copy_(codes[:, 1])
            packed.bitwise_left_shift_(4).bitwise_or_(codes[:, 0].to(torch.uint8))
        else:
            amax = torch.maximum(high, low.neg_())
            torch.div(amax, top, out=scales[a:b])
            f.mul_(top / amax.clamp_min_(_TINY))
            part = body[a * gs : b * gs]
            if spec.dtype is DType.INT8:
                part.view(torch.int8).copy_(f.round_().clamp_(-127, 127).view(-1))
            else:
                part.view(_FP8[spec.dtype]).copy_(f.view(-1))
    # inf or NaN anywhere makes its group's scale (or minimum) inf or NaN: one check over the metadata
    if finite is not None:
        finite.copy_(torch.isfinite(meta).all().view(1))
    elif not bool(torch.isfinite(meta).all()):
        raise ProtocolError("cannot quantise KV holding inf or NaN: send it unquantised")
    return out


def decode(encoded: torch.Tensor, spec: CodecSpec, out: torch.Tensor) -> torch.Tensor:
    """Write the elements of ``encoded`` into ``out`` (bf16, fp16 or fp32; its shape fixes the count)."""
    if out.dtype not in _SOURCE_DTYPES:
        raise ConfigError(f"cannot dequantise into a {out.dtype} tensor: KV must be bf16, fp16 or fp32")
    n = out.numel()
    expected = encoded_nbytes(n, spec)
    if encoded.dtype is not torch.uint8 or encoded.numel() != expected:
        raise ProtocolError(f"encoded chunk has {encoded.numel()} bytes, expected {expected} for {n} {spec.dtype.value} elements")
    gs = spec.group_size
    groups = math.ceil(n / gs)
    meta_count = groups * (2 if spec.zero_points else 1)
    meta = encoded[: meta_count * 4].view(torch.float32)
    body = encoded[meta_count * 4 :]
    flat = out.view(-1)
    whole = n // gs  # groups that fill out completely; a padded last group goes through a scratch tensor
    if whole:
        _decode_groups(body, meta, groups, spec, 0, whole, flat[: whole * gs].view(whole, gs))
    if whole < groups:
        tail = torch.empty(1, gs, dtype=torch.float32, device=out.device)
        _decode_groups(body, meta, groups, spec, whole, groups, tail)
        flat[whole * gs :].copy_(tail.view(-1)[: n - whole * gs])
    return out


def _decode_groups(
    body: torch.Tensor, meta: torch.Tensor, groups: int, spec: CodecSpec, first: int, stop: int, out: torch.Tensor
) -> None:
    # every path widens to an fp32 scratch, scales there and narrows into ``out``: torch's mixed-dtype kernels
    # (an fp16 or int8 tensor times an fp32 scale into bf16) run 15x slower than these three plain passes
    gs = spec.group_size
    for a, b in _blocks(stop - first, spec, out.device):
        a, b = a + first, b + first
        dst = out[a - first : b - first]
        f = dst if dst.dtype is torch.float32 else _f32_scratch((b - a) * gs, out.device).view(b - a, gs)
        scale = meta[a:b].view(-1, 1)
        if spec.dtype is DType.INT4:
            packed = body[a * gs // 2 : b * gs // 2]
            f.copy_(torch.stack((packed & 0xF, packed >> 4), dim=1).view(b - a, gs))
            f.mul_(scale).add_(meta[groups + a : groups + b].view(-1, 1))
        elif spec.dtype is DType.INT8:
            f.copy_(body[a * gs : b * gs].view(torch.int8).view(b - a, gs))
            f.mul_(scale)
        else:
            bits = body[a * gs : b * gs].to(torch.int16)
            if spec.dtype is DType.FP8_E5M2:
                bits.bitwise_left_shift_(8)
                f.copy_(bits.view(torch.float16).view(b - a, gs))
                f.mul_(scale)
            else:
                sign = (bits & 0x80).bitwise_left_shift_(8)
                bits.bitwise_and_(0x7F).bitwise_left_shift_(7).bitwise_or_(sign)
                f.copy_(bits.view(torch.float16).view(b - a, gs))
                f.mul_(scale * _E4M3_SHIFT)
        if f is not dst:
            dst.copy_(f)


@dataclass(frozen=True)
class ErrorStats:
    """How far decoded KV is from the original: absolute errors, and the mean error relative to the mean magnitude."""

    max_abs: float
    mean_abs: float
    mean_rel: float  # mean |error| / mean |x|


def error_stats(original: torch.Tensor, decoded: torch.Tensor) -> ErrorStats:
    """Error of ``decoded`` against ``original`` (same shape)."""
    a, b = original.reshape(-1).float(), decoded.reshape(-1).float()
    err = (a - b).abs()
    scale = a.abs().mean().item() or 1.0
    return ErrorStats(max_abs=err.max().item(), mean_abs=err.mean().item(), mean_rel=err.mean().item() / scale)
