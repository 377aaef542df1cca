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
exact buffer. ``encode`` and ``decode`` run wherever the tensor lives (CPU here, CUDA on a GPU path).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import ConfigError, ProtocolError
from .schema import DType

__all__ = ["CodecSpec", "ErrorStats", "decode", "encode", "encoded_nbytes", "error_stats"]

_FP8 = {DType.FP8_E4M3: torch.float8_e4m3fn, DType.FP8_E5M2: torch.float8_e5m2}
_WIRE_DTYPES = (DType.FP8_E4M3, DType.FP8_E5M2, DType.INT8, DType.INT4)
_SOURCE_DTYPES = {torch.bfloat16, torch.float16, torch.float32}


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


def _grouped(values: torch.Tensor, spec: CodecSpec) -> torch.Tensor:
    flat = values.reshape(-1).float()
    pad = (-flat.numel()) % spec.group_size
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, spec.group_size)


def encode(values: torch.Tensor, spec: CodecSpec) -> torch.Tensor:
    """``values`` (bf16, fp16 or fp32; any shape) → a flat uint8 tensor of :func:`encoded_nbytes` bytes."""
    if values.dtype not in _SOURCE_DTYPES:
        raise ConfigError(f"cannot quantise a {values.dtype} tensor: KV must be bf16, fp16 or fp32")
    groups = _grouped(values, spec)
    if not torch.isfinite(groups).all():
        raise ProtocolError("cannot quantise KV holding inf or NaN: send it unquantised")
    if spec.dtype is DType.INT4:
        low = groups.amin(dim=1, keepdim=True)
        scale = (groups.amax(dim=1, keepdim=True) - low) / 15
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = torch.round((groups - low) / safe).clamp_(0, 15).to(torch.uint8).view(-1, 2)
        packed = codes[:, 0] | (codes[:, 1] << 4)
        parts = [scale.reshape(-1), low.reshape(-1)]
        body = packed
    else:
        amax = groups.abs().amax(dim=1, keepdim=True)
        top = 127.0 if spec.dtype is DType.INT8 else torch.finfo(_FP8[spec.dtype]).max
        scale = amax / top
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        scaled = groups / safe
        if spec.dtype is DType.INT8:
            body = torch.round(scaled).clamp_(-127, 127).to(torch.int8).view(torch.uint8).reshape(-1)
        else:
            body = scaled.to(_FP8[spec.dtype]).view(torch.uint8).reshape(-1)
        parts = [scale.reshape(-1)]
    meta = torch.cat(parts).to(torch.float32).view(torch.uint8)
    return torch.cat([meta, body])


def decode(encoded: torch.Tensor, spec: CodecSpec, out: torch.Tensor) -> torch.Tensor:
    """Write the elements of ``encoded`` into ``out`` (bf16, fp16 or fp32; its shape fixes the count)."""
    if out.dtype not in _SOURCE_DTYPES:
        raise ConfigError(f"cannot dequantise into a {out.dtype} tensor: KV must be bf16, fp16 or fp32")
    n = out.numel()
    expected = encoded_nbytes(n, spec)
    if encoded.dtype is not torch.uint8 or encoded.numel() != expected:
        raise ProtocolError(f"encoded chunk has {encoded.numel()} bytes, expected {expected} for {n} {spec.dtype.value} elements")
    groups = math.ceil(n / spec.group_size)
    meta_count = groups * (2 if spec.zero_points else 1)
    meta = encoded[: meta_count * 4].view(torch.float32)
    body = encoded[meta_count * 4 :]
    scale = meta[:groups].unsqueeze(1)
    if spec.dtype is DType.INT4:
        low = meta[groups:].unsqueeze(1)
        codes = torch.stack([body & 0xF, body >> 4], dim=1).reshape(groups, spec.group_size).float()
        values = codes * scale + low
    elif spec.dtype is DType.INT8:
        values = body.view(torch.int8).reshape(groups, spec.group_size).float() * scale
    else:
        values = body.view(_FP8[spec.dtype]).reshape(groups, spec.group_size).float() * scale
    out.view(-1).copy_(values.reshape(-1)[:n])
    return out


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
