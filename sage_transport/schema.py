"""KV-cache geometry: dtypes, layouts and :class:`KVCacheSchema`, with real model shapes.

A *page* is the unit every layout shares: one block of one layer of one plane (K or V), that is
``block_size * num_kv_heads * head_dim`` elements. Layouts only differ in how pages are ordered in memory.
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec

from .errors import ConfigError

__all__ = ["DType", "KVCacheSchema", "Layout", "MODEL_SPECS", "ModelSpec"]


class DType(str, enum.Enum):
    """Element types of a KV cache or of its wire form."""

    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"
    FP8_E4M3 = "fp8_e4m3"
    FP8_E5M2 = "fp8_e5m2"
    INT8 = "int8"
    INT4 = "int4"

    @property
    def bits(self) -> int:
        return _DTYPE_BITS[self]

    @classmethod
    def parse(cls, value: Any, field: str = "dtype") -> DType:
        """Accept a DType or its name (``"bf16"``, ``"bfloat16"``, ``"float16"``...)."""
        if isinstance(value, cls):
            return value
        text = str(value).strip().lower()
        text = _DTYPE_ALIASES.get(text, text)
        try:
            return cls(text)
        except ValueError:
            choices = ", ".join(d.value for d in cls)
            raise ConfigError(f"{field}={value!r} is not a KV dtype; choose one of {choices}") from None


_DTYPE_BITS = {
    DType.BF16: 16,
    DType.FP16: 16,
    DType.FP32: 32,
    DType.FP8_E4M3: 8,
    DType.FP8_E5M2: 8,
    DType.INT8: 8,
    DType.INT4: 4,
}
_DTYPE_ALIASES = {
    "bfloat16": "bf16",
    "float16": "fp16",
    "half": "fp16",
    "float32": "fp32",
    "float": "fp32",
    "float8_e4m3fn": "fp8_e4m3",
    "float8_e5m2": "fp8_e5m2",
    "fp8": "fp8_e4m3",
}


class Layout(str, enum.Enum):
    """Order of the page axes in memory, outermost first (``plane`` is K/V).

    * ``layer_kv_block``: vLLM's per-layer ``(2, num_blocks, block_size, heads, dim)`` stacked by layer.
    * ``layer_block_kv``: FlashInfer's per-layer ``(num_blocks, 2, block_size, heads, dim)``.
    * ``block_layer_kv``: block-major, all layers of a block together (offload/CPU pools).
    * ``kv_layer_block``: one K cache and one V cache, each ``(layers, num_blocks, ...)``.
    """

    LAYER_KV_BLOCK = "layer_kv_block"
    LAYER_BLOCK_KV = "layer_block_kv"
    BLOCK_LAYER_KV = "block_layer_kv"
    KV_LAYER_BLOCK = "kv_layer_block"

    @property
    def axes(self) -> tuple[str, str, str]:
        return _LAYOUT_AXES[self]


_LAYOUT_AXES: dict[Layout, tuple[str, str, str]] = {
    Layout.LAYER_KV_BLOCK: ("layer", "plane", "block"),
    Layout.LAYER_BLOCK_KV: ("layer", "block", "plane"),
    Layout.BLOCK_LAYER_KV: ("block", "layer", "plane"),
    Layout.KV_LAYER_BLOCK: ("plane", "layer", "block"),
}


def _positive(name: str, value: Any, *, maximum: int = 1 << 31) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= maximum:
        raise ConfigError(f"{name}={value!r} must be an integer in 1..{maximum}")
    return value


class KVCacheSchema(msgspec.Struct, frozen=True, array_like=True):
    """Shape of a paged KV cache. Use :meth:`for_model` for known models (it uses the real KV-head count).

    ``kv_planes`` is 2 for K and V, 1 for a single latent cache (MLA).
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int = 16
    dtype: DType = DType.BF16
    layout: Layout = Layout.LAYER_KV_BLOCK
    kv_planes: int = 2

    def __post_init__(self) -> None:
        _positive("num_layers", self.num_layers, maximum=4096)
        _positive("num_kv_heads", self.num_kv_heads, maximum=4096)
        _positive("head_dim", self.head_dim, maximum=65536)
        _positive("block_size", self.block_size, maximum=1 << 20)
        if self.kv_planes not in (1, 2):
            raise ConfigError(f"kv_planes={self.kv_planes!r} must be 1 (MLA latent) or 2 (K and V)")
        msgspec.structs.force_setattr(self, "dtype", DType.parse(self.dtype, "dtype"))
        if not isinstance(self.layout, Layout):
            try:
                msgspec.structs.force_setattr(self, "layout", Layout(str(self.layout)))
            except ValueError:
                choices = ", ".join(v.value for v in Layout)
                raise ConfigError(f"layout={self.layout!r} is not a layout; choose one of {choices}") from None
        if (self.block_size * self.num_kv_heads * self.head_dim * self.dtype.bits) % 8:
            raise ConfigError(
                f"dtype={self.dtype.value} with block_size={self.block_size}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim} gives a page that is not a whole number of bytes"
            )

    @property
    def page_bytes(self) -> int:
        """Bytes of one block of one layer of one plane (the unit of every layout)."""
        return self.block_size * self.num_kv_heads * self.head_dim * self.dtype.bits // 8

    @property
    def bytes_per_token(self) -> int:
        """KV bytes one token occupies across all layers and planes."""
        return self.num_layers * self.kv_planes * self.num_kv_heads * self.head_dim * self.dtype.bits // 8

    @property
    def bytes_per_block(self) -> int:
        """KV bytes of one block across all layers and planes."""
        return self.page_bytes * self.num_layers * self.kv_planes

    def blocks_for_tokens(self, tokens: int) -> int:
        """Number of blocks needed to hold ``tokens`` tokens."""
        return -(-tokens // self.block_size)

    @classmethod
    def for_model(cls, name: str, **overrides: Any) -> KVCacheSchema:
        """Schema of a known model (see :data:`MODEL_SPECS`); ``overrides`` set block_size, dtype, layout."""
        key = name.strip().lower().replace("_", "-")
        spec = MODEL_SPECS.get(_MODEL_ALIASES.get(key, key))
        if spec is None:
            known = ", ".join(sorted(MODEL_SPECS))
            raise ConfigError(f"model={name!r} is not known; choose one of {known} or build a KVCacheSchema")
        fields: dict[str, Any] = {"num_layers": spec.num_layers, "num_kv_heads": spec.num_kv_heads, "head_dim": spec.head_dim}
        fields.update(overrides)
        return cls(**fields)


class ModelSpec(msgspec.Struct, frozen=True):
    """Attention shape of a model, from its published config.json."""

    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int


#: Known models. ``num_kv_heads`` is the GQA key/value head count, never the query head count.
MODEL_SPECS: dict[str, ModelSpec] = {
    "llama-3-8b": ModelSpec(32, 32, 8, 128),
    "llama-3-70b": ModelSpec(80, 64, 8, 128),
    "llama-3.1-405b": ModelSpec(126, 128, 8, 128),
    "mistral-7b": ModelSpec(32, 32, 8, 128),
    "qwen2.5-7b": ModelSpec(28, 28, 4, 128),
    "qwen2.5-14b": ModelSpec(48, 40, 8, 128),
    "qwen2.5-32b": ModelSpec(64, 40, 8, 128),
    "qwen2.5-72b": ModelSpec(80, 64, 8, 128),
    "qwen3-8b": ModelSpec(36, 32, 8, 128),
    "qwen3-32b": ModelSpec(64, 64, 8, 128),
}
_MODEL_ALIASES = {
    "llama-3.1-8b": "llama-3-8b",
    "meta-llama-3-8b": "llama-3-8b",
    "llama-3.1-70b": "llama-3-70b",
    "meta-llama-3-70b": "llama-3-70b",
    "qwen2.5-7b-instruct": "qwen2.5-7b",
    "qwen/qwen2.5-7b-instruct": "qwen2.5-7b",
    "qwen/qwen3-8b": "qwen3-8b",
}
