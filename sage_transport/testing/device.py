"""Device KV where no GPU exists: host torch tensors run by :class:`~sage_transport.device.EmulatedRuntime`.

A channel treats such memory exactly as CUDA memory (kind ``cuda``: fletcher64 on the "device", device codecs,
staging, device windows for same-host placement), so every CPU machine tests the device path's logic; the GPU
tests (``-m gpu``) run the same tests with real CUDA tensors.
"""

from __future__ import annotations

import mmap
import os
import weakref
from typing import Any

import numpy as np

from ..memory import KVMemory
from ..schema import KVCacheSchema

__all__ = ["device_pages", "emulated_memory"]


def emulated_memory(
    schema: KVCacheSchema, num_blocks: int, *, seed: int | None = None, shared: bool = False, per_layer: bool = True
) -> KVMemory:
    """Emulated device KV: one tensor per layer (vLLM's allocation; ``per_layer=False``: one for all), random bytes
    from ``seed`` or zeros. ``shared``: over memfds, so a same-host peer's channel can map it (its window)."""
    import torch

    from ..device.runtime import EmulatedRuntime

    count = schema.num_layers if per_layer and schema.layout.axes[0] == "layer" else 1
    size = schema.num_layers * schema.kv_planes * num_blocks * schema.page_bytes // count
    tensors, fds = [], []
    for _ in range(count):
        if shared:
            fd = os.memfd_create("sage-emulated-device-kv", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
            fds.append(fd)
            tensors.append(torch.frombuffer(mmap.mmap(fd, size), dtype=torch.uint8))
        else:
            tensors.append(torch.zeros(size, dtype=torch.uint8))
    if seed is not None:
        generator = np.random.default_rng(seed)
        for tensor in tensors:
            tensor.numpy()[:] = generator.integers(0, 256, size, dtype=np.uint8)
    memory = KVMemory(schema, num_blocks, tensors, runtime=EmulatedRuntime())
    if fds:
        memory.shared_fds = fds
        for fd in fds:
            weakref.finalize(memory, os.close, fd)
    return memory


def device_pages(memory: KVMemory) -> np.ndarray:
    """``[layer, plane, block, page bytes]`` of a KV cache of any kind (device tensors copied to the host)."""
    schema = memory.schema
    flat: list[Any] = []
    for buf in memory.buffers:
        if hasattr(buf, "detach"):
            flat.append(buf.detach().reshape(-1).view(__import__("torch").uint8).cpu().numpy())
        else:
            flat.append(np.frombuffer(buf, np.uint8))
    pages = np.concatenate(flat)
    axes = schema.layout.axes
    sizes = {"layer": schema.num_layers, "plane": schema.kv_planes, "block": memory.num_blocks}
    shaped = pages.reshape(*(sizes[a] for a in axes), schema.page_bytes)
    order = [axes.index(a) for a in ("layer", "plane", "block")]
    return shaped.transpose(*order, 3)
