"""vLLM's per-layer KV views read as pages (``integrations.vllm_layout``), in every ``KVCacheLayout`` vLLM 0.32 can
resolve and the older 5-D shapes: the views are built here the way vLLM builds them (one allocation in the layout's
physical order, permuted back to the logical ``(L, B, H, N, C)``), so no vLLM is needed."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from sage_transport.errors import ConfigError  # noqa: E402
from sage_transport.integrations.vllm_layout import paged_kv  # noqa: E402
from sage_transport.memory import KVMemory  # noqa: E402
from sage_transport.schema import Layout  # noqa: E402

L, B, H, N, C = 3, 6, 2, 4, 8  # layers, blocks, heads, tokens per block, 2 * head_dim
LAYOUTS = {  # vllm.v1.kv_cache_layout.KVCacheLayout: the physical order of the logical axes
    "LBHNC": (0, 1, 2, 3, 4), "LBNHC": (0, 1, 3, 2, 4), "LHBNC": (0, 2, 1, 3, 4),
    "BLHNC": (1, 0, 2, 3, 4), "BLNHC": (1, 0, 3, 2, 4), "BHLNC": (1, 2, 0, 3, 4),
}  # fmt: skip


def vllm_views(order: tuple[int, ...], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    logical = (L, B, H, N, C)
    physical = torch.arange(math.prod(logical), dtype=dtype).view([logical[i] for i in order])
    views = physical.permute([order.index(axis) for axis in range(5)])
    return {f"model.layers.{layer}.self_attn.attn": views[layer] for layer in range(L)}


def block_elements(paged, name: str, block: int) -> list[float]:  # type: ignore[no-untyped-def]
    """What the schema's pages hold for one vLLM layer and block, read through the registered buffers."""
    page = paged.schema.page_bytes // 4
    values = []
    for layer in paged.layers[name]:
        if paged.schema.layout is Layout.LAYER_BLOCK_KV:
            values += paged.buffers[layer][block * page : (block + 1) * page].tolist()
        else:
            start = (block * paged.schema.num_layers + layer) * page
            values += paged.buffers[0][start : start + page].tolist()
    return sorted(values)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_vllm_layout_is_read_as_pages_of_its_own_memory(name: str) -> None:
    views = vllm_views(LAYOUTS[name])
    paged = paged_kv(views)
    memory = KVMemory(paged.schema, paged.num_blocks, list(paged.buffers))  # no copy: views of vLLM's tensors
    assert memory.nbytes == L * B * H * N * C * 4 and paged.num_blocks == B
    for buffer in paged.buffers:
        assert buffer.untyped_storage().data_ptr() == views[next(iter(views))].untyped_storage().data_ptr()
    for layer_name, view in views.items():
        for block in range(B):
            assert block_elements(paged, layer_name, block) == sorted(view[block].reshape(-1).tolist())
    heads_apart = name in ("LHBNC", "BHLNC")  # heads outside the block: one page per head
    assert paged.schema.num_layers == L * (H if heads_apart else 1)
    assert paged.schema.layout is (Layout.BLOCK_LAYER_KV if name.startswith("B") else Layout.LAYER_BLOCK_KV)
    assert sorted(sum(paged.layers.values(), ())) == list(range(paged.schema.num_layers))


def test_older_vllm_shapes_kv_planes_outermost_and_flashinfer() -> None:
    planes = {f"l{i}": torch.arange(2 * B * N * H * 4, dtype=torch.float16).view(2, B, N, H, 4) + i for i in range(L)}
    paged = paged_kv(planes)
    assert paged.schema.num_layers == 2 * L and paged.schema.num_kv_heads == H and paged.schema.head_dim == 4
    assert paged.layers["l1"] == (2, 3)
    flashinfer = {f"l{i}": torch.zeros(B, 2, N, H, 4, dtype=torch.bfloat16) for i in range(L)}
    assert paged_kv(flashinfer).schema.num_layers == L  # K and V of a block are one page


def test_one_block_layout_pairs_with_another_page_for_page() -> None:
    """Two instances that resolved different block-contiguous layouts (per layer, or block-outermost) still get
    the same pages per (layer, block), so their blocks pair."""
    a, b = paged_kv(vllm_views(LAYOUTS["LBHNC"])), paged_kv(vllm_views(LAYOUTS["BLHNC"]))
    assert (a.schema.num_layers, a.schema.page_bytes) == (b.schema.num_layers, b.schema.page_bytes)
    assert a.layers == b.layers


def test_groups_give_each_schema_layer_its_block_ids() -> None:
    views = vllm_views(LAYOUTS["LBHNC"])
    names = list(views)
    paged = paged_kv(views, {names[0]: 0, names[1]: 1, names[2]: 0})
    assert paged.groups == (0, 1, 0) and paged.runs == ((0, 0, 1), (1, 1, 2), (0, 2, 3))


def test_views_it_cannot_address_are_refused_naming_the_layer() -> None:
    with pytest.raises(ConfigError, match="register_kv_caches got no layers"):
        paged_kv({})
    with pytest.raises(ConfigError, match=r"KV view of shape \(4, 4\)"):
        paged_kv({"x": torch.zeros(4, 4)})
    with pytest.raises(ConfigError, match="mix dtypes"):
        paged_kv({"a": torch.zeros(B, H, N, C), "b": torch.zeros(B, H, N, C, dtype=torch.float16)})
    with pytest.raises(ConfigError, match="int64 is not bf16"):
        paged_kv({"a": torch.zeros(B, H, N, C, dtype=torch.int64)})
    strided = torch.zeros(B, H, N, 2 * C)[..., :C]  # every token's content split: no page is contiguous
    with pytest.raises(ConfigError, match="VLLM_KV_CACHE_LAYOUT=LBHNC"):
        paged_kv({"model.layers.0.attn": strided})
    with pytest.raises(ConfigError, match="layers of different shapes"):
        paged_kv({"a": torch.zeros(B, H, N, C), "b": torch.zeros(B + 1, H, N, C)})
    gapped = torch.zeros(B, 3 * H, N, C)  # two layers' views inside a block, with a hole between
    with pytest.raises(ConfigError, match="neither one page"):
        paged_kv({"a": gapped[:, :H], "b": gapped[:, 2 * H :]})
    assert paged_kv({"fp8": torch.zeros(B, H, N, C, dtype=torch.uint8)}).schema.dtype.value == "fp8_e4m3"
