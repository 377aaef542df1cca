"""Registered KV memory: byte views over user buffers and the page geometry of a layout.

A :class:`KVMemory` is one KV cache as the user holds it: a single buffer in ``schema.layout`` order, or one
buffer per leading layout axis value (per layer, or per layer and plane: vLLM registers one tensor per layer).
Buffers are numpy arrays, torch CPU tensors or any C-contiguous buffer-protocol object, or torch CUDA tensors
(device memory: moved by :mod:`.device` on the device itself); nothing is copied.
"""

from __future__ import annotations

import mmap
import os
import sys
import weakref
from collections.abc import Sequence
from typing import Any

import msgspec

from .errors import ConfigError, PlanError, UnsupportedError
from .schema import KVCacheSchema, Layout

__all__ = ["KVGeometry", "KVMemory", "as_byte_view", "memory_kind"]


def memory_kind(obj: Any) -> str:
    """``"cuda"`` for a CUDA tensor, ``"cpu"`` for anything else."""
    if getattr(obj, "is_cuda", False):
        return "cuda"
    return "cpu"


def as_byte_view(obj: Any, *, writable: bool = False) -> memoryview:
    """A flat unsigned-byte memoryview of ``obj`` without copying. CPU memory only."""
    if type(obj).__module__.startswith("torch") and hasattr(obj, "is_contiguous"):
        if obj.is_cuda:
            raise UnsupportedError("a CUDA tensor has no host byte view; use a transport with cuda memory")
        if not obj.is_contiguous():
            raise PlanError(f"tensor of shape {tuple(obj.shape)} is not contiguous; register contiguous memory")
        torch = sys.modules["torch"]
        obj = obj.detach().reshape(-1).view(torch.uint8).numpy()
    try:
        view = memoryview(obj)
    except TypeError as exc:
        raise PlanError(f"{type(obj).__name__} does not expose the buffer protocol") from exc
    if writable and view.readonly:
        raise PlanError(f"{type(obj).__name__} buffer is read-only; a destination must be writable")
    if not view.c_contiguous:
        raise PlanError(f"buffer of shape {view.shape} is not C-contiguous")
    if view.format == "B" and view.ndim == 1:
        return view
    try:
        return view.cast("B")
    except TypeError:
        numpy = sys.modules.get("numpy")
        if numpy is not None and isinstance(obj, numpy.ndarray):
            return memoryview(obj.reshape(-1).view(numpy.uint8))
        raise


class KVGeometry(msgspec.Struct, frozen=True, array_like=True):
    """Where each page lives: layout, block count and how many leading layout axes are split into buffers."""

    layout: Layout
    num_blocks: int
    split_axes: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.num_blocks, bool) or not isinstance(self.num_blocks, int) or not 0 < self.num_blocks < 1 << 40:
            raise ConfigError(f"num_blocks={self.num_blocks!r} must be a positive integer")
        if self.split_axes not in (0, 1, 2):
            raise ConfigError(f"split_axes={self.split_axes!r} must be 0, 1 or 2")

    def strides(self, schema: KVCacheSchema) -> tuple[dict[str, int], dict[str, int]]:
        """(page strides of the in-buffer axes, segment strides of the split axes), keyed by axis name."""
        sizes = {"layer": schema.num_layers, "plane": schema.kv_planes, "block": self.num_blocks}
        axes = self.layout.axes
        in_buffer: dict[str, int] = {}
        stride = 1
        for axis in reversed(axes[self.split_axes :]):
            in_buffer[axis] = stride
            stride *= sizes[axis]
        segment: dict[str, int] = {}
        stride = 1
        for axis in reversed(axes[: self.split_axes]):
            segment[axis] = stride
            stride *= sizes[axis]
        return in_buffer, segment

    def segment_count(self, schema: KVCacheSchema) -> int:
        sizes = {"layer": schema.num_layers, "plane": schema.kv_planes, "block": self.num_blocks}
        count = 1
        for axis in self.layout.axes[: self.split_axes]:
            count *= sizes[axis]
        return count

    def segment_bytes(self, schema: KVCacheSchema) -> int:
        sizes = {"layer": schema.num_layers, "plane": schema.kv_planes, "block": self.num_blocks}
        pages = 1
        for axis in self.layout.axes[self.split_axes :]:
            pages *= sizes[axis]
        return pages * schema.page_bytes


class KVMemory:
    """A KV cache registered with a channel: schema, block count and the buffers holding it."""

    def __init__(self, schema: KVCacheSchema, num_blocks: int, buffers: Any | Sequence[Any], *, runtime: Any = None) -> None:
        """``buffers``: one buffer, or one per leading layout axis value. CUDA tensors make device memory (its
        ``runtime``, a :class:`~sage_transport.device.CudaRuntime` with a stream of its own, is made when a channel
        registers it); ``runtime`` given runs host torch tensors as device memory (the emulated runtime of
        :mod:`sage_transport.testing.device`, for tests where no GPU exists)."""
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks <= 0:
            raise ConfigError(f"num_blocks={num_blocks!r} must be a positive integer")
        items = list(buffers) if isinstance(buffers, (list, tuple)) else [buffers]
        kinds = {memory_kind(b) for b in items}
        if len(kinds) != 1:
            raise ConfigError(f"buffers mix memory kinds {sorted(kinds)}; register one kind per KV cache")
        self.schema = schema
        self.kind = kinds.pop() if runtime is None else runtime.kind
        self.runtime: Any = runtime
        self.device = "cpu"  # ``cuda:N`` for device memory
        self.geometry = KVGeometry(schema.layout, num_blocks, _split_axes(schema, num_blocks, len(items)))
        expected = self.geometry.segment_bytes(schema)
        self.buffers: list[Any] = items
        self.views: list[memoryview] = []
        self.shared_fds: list[int] = []  # one memfd per buffer when allocated with shared=True
        if self.kind == "cpu":
            for i, buf in enumerate(items):
                view = as_byte_view(buf, writable=True)
                if view.nbytes != expected:
                    raise ConfigError(
                        f"buffer {i} holds {view.nbytes} bytes but {schema.layout.value} with {num_blocks} blocks "
                        f"needs {expected} per buffer ({len(items)} buffer(s))"
                    )
                self.views.append(view)
        else:
            from .device.kv import check_device_buffers

            self.device = check_device_buffers(items, expected)

    @property
    def num_blocks(self) -> int:
        return self.geometry.num_blocks

    @property
    def nbytes(self) -> int:
        return self.geometry.segment_bytes(self.schema) * len(self.buffers)

    @classmethod
    def allocate(
        cls, schema: KVCacheSchema, num_blocks: int, *, fill: int | None = None, shared: bool = False, device: str | None = None
    ) -> KVMemory:
        """A host KV cache in one numpy buffer (``fill``: byte value, else uninitialised); with ``device``
        (``cuda``, ``cuda:1``) a device one in one torch tensor per layer, as vLLM allocates it.

        ``shared=True`` backs it with a memfd (Linux) that a same-host peer's channel may map after the
        handshake, so direct placement is a plain memory copy on both cores instead of ``process_vm_writev``.
        """
        import numpy as np

        pages = schema.num_layers * schema.kv_planes * num_blocks
        size = pages * schema.page_bytes
        if device is not None:
            if shared:
                raise ConfigError("shared=True is for host memory; device memory is shared through CUDA IPC")
            import torch

            count = schema.num_layers if schema.layout.axes[0] == "layer" else 1
            tensors = [torch.empty(size // count, dtype=torch.uint8, device=device) for _ in range(count)]
            if fill is not None:
                for tensor in tensors:
                    tensor.fill_(fill)
            return cls(schema, num_blocks, tensors)
        fd = -1
        if shared:
            if not hasattr(os, "memfd_create"):
                raise UnsupportedError("shared=True needs memfd_create (Linux)")
            fd = os.memfd_create("sage-kv-cache", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
            array = np.frombuffer(mmap.mmap(fd, size), dtype=np.uint8)
        else:
            array = np.empty(size, dtype=np.uint8)
        if fill is not None:
            array.fill(fill)
        memory = cls(schema, num_blocks, array)
        if fd >= 0:
            memory.shared_fds = [fd]
            weakref.finalize(memory, os.close, fd)
        return memory


def _split_axes(schema: KVCacheSchema, num_blocks: int, count: int) -> int:
    sizes = {"layer": schema.num_layers, "plane": schema.kv_planes, "block": num_blocks}
    product = 1
    for split, axis in enumerate(schema.layout.axes):
        if product == count:
            return split
        product *= sizes[axis]
        if split == 1:
            break
    if product == count:
        return 2
    raise ConfigError(
        f"{count} buffers do not match layout {schema.layout.value}: give one buffer, or one per "
        f"{' × '.join(schema.layout.axes[:2])} (leading axes of the layout)"
    )
