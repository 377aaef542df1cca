"""KVCacheSchema: real model shapes, derived sizes and validation."""

from __future__ import annotations

import msgspec
import pytest

from sage_transport import MODEL_SPECS, ConfigError, DType, KVCacheSchema, Layout


@pytest.mark.parametrize(
    ("model", "layers", "kv_heads", "bytes_per_token"),
    [
        ("qwen2.5-7b", 28, 4, 28 * 2 * 4 * 128 * 2),  # 56 KiB per token: 32K tokens = 1.75 GiB
        ("llama-3-8b", 32, 8, 32 * 2 * 8 * 128 * 2),
        ("llama-3-70b", 80, 8, 80 * 2 * 8 * 128 * 2),
        ("qwen3-8b", 36, 8, 36 * 2 * 8 * 128 * 2),
    ],
)
def test_model_shapes_use_kv_heads(model: str, layers: int, kv_heads: int, bytes_per_token: int) -> None:
    schema = KVCacheSchema.for_model(model)
    assert (schema.num_layers, schema.num_kv_heads, schema.head_dim) == (layers, kv_heads, 128)
    assert schema.bytes_per_token == bytes_per_token
    assert schema.bytes_per_block == bytes_per_token * 16


def test_every_known_model_is_grouped_query() -> None:
    for name, spec in MODEL_SPECS.items():
        assert spec.num_kv_heads < spec.num_attention_heads, f"{name} sized by query heads"
        assert spec.num_attention_heads % spec.num_kv_heads == 0, name


def test_qwen25_7b_32k_is_one_and_three_quarter_gib() -> None:
    schema = KVCacheSchema.for_model("Qwen2.5-7B")
    assert schema.bytes_per_token * 32768 == int(1.75 * (1 << 30))


@pytest.mark.parametrize(
    ("dtype", "bits"), [("bf16", 16), ("fp16", 16), ("fp8_e4m3", 8), ("fp8_e5m2", 8), ("int8", 8), ("int4", 4)]
)
def test_dtypes_size_pages(dtype: str, bits: int) -> None:
    schema = KVCacheSchema(num_layers=2, num_kv_heads=4, head_dim=64, block_size=16, dtype=dtype)  # type: ignore[arg-type]
    assert schema.dtype is DType(dtype)
    assert schema.page_bytes == 16 * 4 * 64 * bits // 8
    assert schema.bytes_per_block == schema.page_bytes * 2 * 2


def test_overrides_and_aliases() -> None:
    schema = KVCacheSchema.for_model("llama-3.1-8b", block_size=32, dtype="float16", layout="block_layer_kv")
    assert schema.block_size == 32 and schema.dtype is DType.FP16 and schema.layout is Layout.BLOCK_LAYER_KV


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"num_layers": 0}, "num_layers=0"),
        ({"num_kv_heads": -1}, "num_kv_heads=-1"),
        ({"head_dim": 1.5}, "head_dim=1.5"),
        ({"block_size": True}, "block_size=True"),
        ({"dtype": "fp7"}, "dtype='fp7'"),
        ({"layout": "diagonal"}, "layout='diagonal'"),
        ({"kv_planes": 3}, "kv_planes=3"),
        ({"dtype": "int4", "block_size": 1, "num_kv_heads": 1, "head_dim": 1}, "whole number of bytes"),
    ],
)
def test_bad_fields_are_named(kwargs: dict[str, object], fragment: str) -> None:
    fields: dict[str, object] = {"num_layers": 2, "num_kv_heads": 2, "head_dim": 8}
    fields.update(kwargs)
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace(".", r"\.")):
        KVCacheSchema(**fields)  # type: ignore[arg-type]


def test_unknown_model_lists_known_ones() -> None:
    with pytest.raises(ConfigError, match="model='gpt-5'.*qwen2.5-7b"):
        KVCacheSchema.for_model("gpt-5")


def test_schema_is_frozen_and_round_trips_msgpack() -> None:
    schema = KVCacheSchema.for_model("qwen3-8b", dtype="fp8_e4m3")
    with pytest.raises(AttributeError):
        schema.num_layers = 1  # type: ignore[misc]
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(schema), type=KVCacheSchema) == schema
