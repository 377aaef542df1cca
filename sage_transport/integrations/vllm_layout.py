"""Where vLLM keeps each block's KV: the per-layer views ``register_kv_caches`` receives, read as pages.

vLLM 0.32 hands a connector one view per attention layer, logically ``(num_blocks, heads, block_size, 2 * head_dim)``
(K and V packed in the content axis), laid out in memory by the resolved ``KVCacheLayout``: ``LBHNC`` (the default,
and what :class:`~sage_transport.integrations.vllm.SageKVConnector` asks for), ``LBNHC``, ``LHBNC`` (heads outside
the blocks), ``BLHNC``/``BLNHC``/``BHLNC`` (block-outermost: one allocation holds every layer of a block). Earlier
vLLM releases and other backends hand ``(2, num_blocks, block_size, heads, head_dim)`` (K and V planes outermost) or
``(num_blocks, 2, block_size, heads, head_dim)`` (FlashInfer).

:func:`paged_kv` reads the layout from the views' strides, not from the layout's name, so every one of these works:
each view is split into *series*, runs of one page per block (a page being the contiguous bytes a block holds in that
series: the whole block when its heads, tokens and content are contiguous, else one head or one plane of it). The
series become the layers of a :class:`~sage_transport.schema.KVCacheSchema` over the views' own memory, no copy:

* pages of a series adjacent (``block stride == page``): one buffer per series, ``layer_block_kv``;
* block-outermost (``block stride == series × page``, every series one page apart in one allocation): one buffer for
  all of them, ``block_layer_kv``.

Anything else raises :class:`~sage_transport.errors.ConfigError` naming the layer, its shape and strides. Two
instances that resolve the same layout get the same schema, so their blocks pair page for page.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import ConfigError
from ..schema import DType, KVCacheSchema, Layout

__all__ = ["PagedKV", "paged_kv"]

_DTYPES = {
    "torch.bfloat16": DType.BF16,
    "torch.float16": DType.FP16,
    "torch.float32": DType.FP32,
    "torch.float8_e4m3fn": DType.FP8_E4M3,
    "torch.float8_e5m2": DType.FP8_E5M2,
}


@dataclasses.dataclass(frozen=True)
class PagedKV:
    """vLLM's KV caches as a schema over their own memory.

    ``buffers`` are flat views into vLLM's tensors, in the order :class:`~sage_transport.memory.KVMemory` takes them;
    ``layers`` maps each vLLM layer name to the schema layers (series) that hold it; ``groups`` gives each schema
    layer's KV cache group (block ids are per group); ``runs`` are the maximal ranges of consecutive schema layers of
    one group, ``(group, start, stop)``, one block mapping each."""

    schema: KVCacheSchema
    num_blocks: int
    buffers: tuple[Any, ...]
    layers: Mapping[str, tuple[int, ...]]
    groups: tuple[int, ...]
    description: str

    @property
    def runs(self) -> tuple[tuple[int, int, int], ...]:
        runs: list[tuple[int, int, int]] = []
        for layer, group in enumerate(self.groups):
            if runs and runs[-1][0] == group and runs[-1][2] == layer:
                runs[-1] = (group, runs[-1][1], layer + 1)
            else:
                runs.append((group, layer, layer + 1))
        return tuple(runs)


@dataclasses.dataclass(frozen=True)
class _Series:
    layer: str
    offset: int  # elements from the start of the storage
    tensor: Any


def _dims(shape: Sequence[int]) -> tuple[int, int | None, int, int | None]:
    """(block axis, plane axis, token axis, head axis) of a view, by its rank and shape."""
    if len(shape) == 4:  # vLLM 0.32: (num_blocks, heads, block_size, 2 * head_dim)
        return 0, None, 2, 1
    if len(shape) == 5 and shape[0] == 2:  # (2, num_blocks, block_size, heads, head_dim)
        return 1, 0, 2, 3
    if len(shape) == 5 and shape[1] == 2:  # FlashInfer: (num_blocks, 2, block_size, heads, head_dim)
        return 0, 1, 2, 3
    raise ConfigError(
        f"KV view of shape {tuple(shape)}: expected (num_blocks, heads, block_size, 2*head_dim), "
        "(2, num_blocks, block_size, heads, head_dim) or (num_blocks, 2, block_size, heads, head_dim)"
    )


def _dense(sizes: Sequence[int], strides: Sequence[int]) -> bool:
    """Whether axes of these sizes and strides cover one contiguous run of elements."""
    axes = sorted((stride, size) for size, stride in zip(sizes, strides) if size > 1)
    expected = 1
    for stride, size in axes:
        if stride != expected:
            return False
        expected *= size
    return True


def _split(name: str, tensor: Any) -> tuple[list[_Series], int, int, int, bool]:
    """The series of one layer's view: (series, page elements, block stride, num_blocks, whether heads stay in the
    page)."""
    shape, strides = tuple(tensor.shape), tuple(tensor.stride())
    block, plane, _token, head = _dims(shape)
    inner = [axis for axis in range(len(shape)) if axis != block]
    peelable = {axis for axis in (plane, head) if axis is not None}  # a page keeps whole tokens
    peeled: list[int] = []
    while not _dense([shape[a] for a in inner], [strides[a] for a in inner]):
        outer = max(inner, key=lambda a: strides[a] if shape[a] > 1 else -1)
        if outer not in peelable:
            raise ConfigError(
                f"KV view {name} of shape {shape}, strides {strides}: a block's bytes are not one page or a few "
                "strided pages; set VLLM_KV_CACHE_LAYOUT=LBHNC"
            )
        inner.remove(outer)
        peeled.append(outer)
    peeled.sort()
    page = math.prod(shape[a] for a in inner)
    series = [
        _Series(name, int(tensor.storage_offset()) + sum(i * strides[a] for i, a in zip(index, peeled)), tensor)
        for index in itertools.product(*(range(shape[a]) for a in peeled))
    ]
    return series, page, int(strides[block]), int(shape[block]), head in inner


def paged_kv(kv_caches: Mapping[str, Any], groups: Mapping[str, int] | None = None, *, fp8: DType = DType.FP8_E4M3) -> PagedKV:
    """Read vLLM's per-layer KV views (see the module docstring). ``groups`` maps layer names to their KV cache
    group (absent: group 0); ``fp8`` names what ``uint8`` storage holds (vLLM keeps FP8 KV as bytes)."""
    if not kv_caches:
        raise ConfigError("register_kv_caches got no layers")
    groups = groups or {}
    tensors = list(kv_caches.values())
    dtypes = {str(t.dtype) for t in tensors}
    if len(dtypes) != 1:
        raise ConfigError(f"KV layers mix dtypes {sorted(dtypes)}")
    text = dtypes.pop()
    dtype = fp8 if text in ("torch.uint8", "torch.int8") else _DTYPES.get(text)
    if dtype is None:
        raise ConfigError(f"KV dtype {text} is not bf16, fp16, fp32 or fp8")
    devices = {str(t.device) for t in tensors}
    if len(devices) != 1:
        raise ConfigError(f"KV layers live on {sorted(devices)}: one worker's KV is on one device")
    all_series: list[_Series] = []
    page = stride = blocks = -1
    heads = 1
    first = next(iter(kv_caches))
    for name, tensor in kv_caches.items():
        series, layer_page, layer_stride, layer_blocks, keeps_heads = _split(name, tensor)
        if page < 0:
            page, stride, blocks = layer_page, layer_stride, layer_blocks
            block_size = int(tensor.shape[_dims(tensor.shape)[2]])
            heads = int(tensor.shape[_dims(tensor.shape)[3]]) if keeps_heads else 1  # type: ignore[index]
        elif (layer_page, layer_stride, layer_blocks) != (page, stride, blocks):
            raise ConfigError(
                f"KV view {name}: {layer_blocks} blocks of {layer_page} elements every {layer_stride}; {first} has "
                f"{blocks} of {page} every {stride} (layers of different shapes are not supported)"
            )
        all_series.extend(series)
    count = len(all_series)
    storages = {t.untyped_storage().data_ptr() for t in tensors}
    order: list[int]
    if stride == page:
        layout, order = Layout.LAYER_BLOCK_KV, list(range(count))
        buffers = tuple(s.tensor.as_strided((blocks * page,), (1,), s.offset) for s in all_series)
        description = f"{count} page series of {blocks} blocks"
    else:
        base = min(s.offset for s in all_series)
        slots = [(s.offset - base) / page for s in all_series]
        if len(storages) != 1 or stride != count * page or sorted(slots) != list(range(count)):
            raise ConfigError(
                f"KV views of shape {tuple(tensors[0].shape)}, strides {tuple(tensors[0].stride())}: a block's pages "
                f"are {stride} elements apart, neither one page ({page}) nor every layer's ({count} × {page}) in one "
                "allocation; set VLLM_KV_CACHE_LAYOUT=LBHNC"
            )
        layout, order = Layout.BLOCK_LAYER_KV, [int(slot) for slot in slots]
        buffers = (all_series[0].tensor.as_strided((blocks * count * page,), (1,), base),)
        description = f"block-outermost, {count} pages per block of {blocks}"
    layers: dict[str, list[int]] = {}
    layer_groups = [0] * count
    for one, schema_layer in zip(all_series, order):
        layers.setdefault(one.layer, []).append(schema_layer)
        layer_groups[schema_layer] = int(groups.get(one.layer, 0))
    schema = KVCacheSchema(
        num_layers=count, num_kv_heads=heads, head_dim=page // (block_size * heads), block_size=block_size, dtype=dtype,
        layout=layout, kv_planes=1,
    )  # fmt: skip
    return PagedKV(
        schema, blocks, buffers, {name: tuple(sorted(ids)) for name, ids in layers.items()}, tuple(layer_groups),
        f"{description}, pages of {page * tensors[0].element_size()} bytes ({layout.value})",
    )  # fmt: skip
