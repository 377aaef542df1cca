"""Planner properties (hypothesis): every source byte lands exactly once at the right place, no chunk exceeds
chunk_size, contiguous runs are never split below chunk_size, progressive chunks stay within a layer."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sage_transport import BlockMapping, KVCacheSchema, KVGeometry, Layout, PlanError, TransferPlan, plan_chunks


def _pages(schema: KVCacheSchema, geometry: KVGeometry) -> dict[tuple[int, int, int], tuple[int, int]]:
    """Reference: (layer, plane, block) → (segment, byte offset), written out axis by axis."""
    sizes = {"layer": schema.num_layers, "plane": schema.kv_planes, "block": geometry.num_blocks}
    axes = geometry.layout.axes
    seg_axes, buf_axes = axes[: geometry.split_axes], axes[geometry.split_axes :]
    out = {}
    for layer in range(schema.num_layers):
        for plane in range(schema.kv_planes):
            for block in range(geometry.num_blocks):
                idx = {"layer": layer, "plane": plane, "block": block}
                seg = 0
                for a in seg_axes:
                    seg = seg * sizes[a] + idx[a]
                off = 0
                for a in buf_axes:
                    off = off * sizes[a] + idx[a]
                out[(layer, plane, block)] = (seg, off * schema.page_bytes)
    return out


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, object]:
    schema = KVCacheSchema(
        num_layers=draw(st.integers(1, 4)),
        num_kv_heads=draw(st.integers(1, 2)),
        head_dim=draw(st.sampled_from([4, 8])),
        block_size=draw(st.integers(1, 3)),
        dtype=draw(st.sampled_from(["bf16", "fp8_e4m3"])),
        kv_planes=draw(st.integers(1, 2)),
    )
    geometries = []
    for _ in range(2):
        layout = draw(st.sampled_from(list(Layout)))
        geometries.append(KVGeometry(layout, draw(st.integers(1, 12)), draw(st.integers(0, 2))))
    n = draw(st.integers(1, min(g.num_blocks for g in geometries)))
    src_blocks = draw(st.permutations(range(geometries[0].num_blocks)))[:n]
    dst_blocks = draw(st.permutations(range(geometries[1].num_blocks)))[:n]
    if draw(st.booleans()):  # sorted runs coalesce: exercise the contiguous paths too
        src_blocks, dst_blocks = sorted(src_blocks), sorted(dst_blocks)
    lo = draw(st.integers(0, schema.num_layers - 1))
    hi = draw(st.integers(lo + 1, schema.num_layers))
    page = schema.page_bytes
    return {
        "schema": schema,
        "src": geometries[0],
        "dst": geometries[1],
        "mappings": (BlockMapping(lo, hi, tuple(src_blocks), tuple(dst_blocks)),),
        "chunk_size": draw(st.sampled_from([max(1, page // 2), page, page + 1, 3 * page, 8 * page])),
        "gather": draw(st.booleans()),
        "progressive": draw(st.booleans()),
    }


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_planner_properties(s: dict[str, object]) -> None:
    schema, src, dst = s["schema"], s["src"], s["dst"]
    assert isinstance(schema, KVCacheSchema) and isinstance(src, KVGeometry) and isinstance(dst, KVGeometry)
    chunk_size = s["chunk_size"]
    assert isinstance(chunk_size, int)
    table = plan_chunks(schema, s["mappings"], src, dst, chunk_size, gather=bool(s["gather"]), progressive=bool(s["progressive"]))  # type: ignore[arg-type]
    page = schema.page_bytes
    src_map, dst_map = _pages(schema, src), _pages(schema, dst)

    # source memory with a unique value per byte position (uint32 labels), destination counters
    src_segments = src.segment_count(schema)
    dst_segments = dst.segment_count(schema)
    label = np.arange(src_segments * src.segment_bytes(schema), dtype=np.int64).reshape(src_segments, -1)
    landed = np.full((dst_segments, dst.segment_bytes(schema)), -1, dtype=np.int64)
    writes = np.zeros_like(landed)
    for k in range(len(table.piece_len)):
        n = int(table.piece_len[k])
        ss, so, ds, do = (int(a[k]) for a in (table.src_seg, table.src_off, table.dst_seg, table.dst_off))
        landed[ds, do : do + n] = label[ss, so : so + n]
        writes[ds, do : do + n] += 1

    expected = np.full_like(landed, -1)
    (m,) = s["mappings"]  # type: ignore[misc]
    for layer in range(m.layer_start, m.layer_stop):
        for plane in range(schema.kv_planes):
            for sb, db in zip(m.src_blocks, m.dst_blocks):
                ss, so = src_map[(layer, plane, sb)]
                ds, do = dst_map[(layer, plane, db)]
                expected[ds, do : do + page] = label[ss, so : so + page]
    assert writes.max() <= 1, "a destination byte is written twice"
    assert np.array_equal(landed, expected), "some source byte landed in the wrong place or not at all"
    assert (
        table.total_bytes
        == TransferPlan.for_blocks("p", schema, m.src_blocks, m.dst_blocks, layers=(m.layer_start, m.layer_stop)).total_bytes
    )
    assert int(table.chunk_nbytes.max()) <= chunk_size

    # contiguous runs are split only at multiples of the (page-aligned) chunk size
    cap = (chunk_size // page) * page if chunk_size >= page else chunk_size
    where = {src_map[(layer, plane, sb)]: (dst_map[(layer, plane, db)], layer)
             for layer in range(m.layer_start, m.layer_stop) for plane in range(schema.kv_planes)
             for sb, db in zip(m.src_blocks, m.dst_blocks)}  # fmt: skip
    for k in range(len(table.piece_len)):
        n, ss, so, ds, do = (int(a[k]) for a in (table.piece_len, table.src_seg, table.src_off, table.dst_seg, table.dst_off))
        end = so + n
        if end % page or n == cap:
            continue
        follower = where.get((ss, end))
        if follower is not None:
            (fds, fdo), flayer = follower
            page_layer = where[(ss, end - page)][1]
            same_layer = flayer == page_layer or not s["progressive"]
            assert not (fds == ds and fdo == do + n and same_layer), f"piece {k} ({n} bytes) split a contiguous run below {cap}"

    if s["progressive"]:
        assert np.array_equal(table.chunk_layer_lo, table.chunk_layer_hi)
        assert np.all(np.diff(table.chunk_layer_lo) >= 0)
    again = plan_chunks(schema, s["mappings"], src, dst, chunk_size, gather=bool(s["gather"]), progressive=bool(s["progressive"]))  # type: ignore[arg-type]
    assert again.digest == table.digest


def test_contiguous_transfer_is_few_large_zero_copy_chunks() -> None:
    schema = KVCacheSchema.for_model("qwen2.5-7b")
    g = KVGeometry(Layout.LAYER_KV_BLOCK, 2048)
    plan = TransferPlan.for_blocks("p", schema, range(2048), range(2048))
    table = plan_chunks(schema, plan.mappings, g, g, 16 << 20)
    assert table.total_bytes == plan.total_bytes
    assert len(table) == plan.total_bytes // (16 << 20)
    assert np.all(np.diff(table.piece_ptr) == 1)


def test_shuffled_destination_gathers_to_chunk_size() -> None:
    schema = KVCacheSchema.for_model("qwen2.5-7b")
    g = KVGeometry(Layout.LAYER_KV_BLOCK, 2048)
    perm = np.random.default_rng(0).permutation(2048).tolist()
    plan = TransferPlan.for_blocks("p", schema, range(2048), perm)
    gathered = plan_chunks(schema, plan.mappings, g, g, 4 << 20, gather=True)
    single = plan_chunks(schema, plan.mappings, g, g, 4 << 20, gather=False)
    assert gathered.max_chunk_bytes == 4 << 20 and len(gathered) == plan.total_bytes // (4 << 20)
    assert len(single) > 100_000


def test_block_ids_are_checked_against_memory() -> None:
    schema = KVCacheSchema(num_layers=2, num_kv_heads=1, head_dim=8)
    plan = TransferPlan.for_blocks("p", schema, [0, 5], [0, 1])
    with pytest.raises(PlanError, match="src block 5 is out of range: the source holds 4 blocks"):
        plan_chunks(schema, plan.mappings, KVGeometry(Layout.LAYER_KV_BLOCK, 4), KVGeometry(Layout.LAYER_KV_BLOCK, 8), 4096)


def test_plan_validation_names_values() -> None:
    schema = KVCacheSchema(num_layers=2, num_kv_heads=1, head_dim=8)
    with pytest.raises(PlanError, match="src_blocks has 2 ids but dst_blocks has 1"):
        TransferPlan.for_blocks("p", schema, [0, 1], [0])
    with pytest.raises(PlanError, match="names block 3 twice"):
        TransferPlan.for_blocks("p", schema, [0, 1], [3, 3])
    with pytest.raises(PlanError, match="block id -1"):
        TransferPlan.for_blocks("p", schema, [-1], [0])
    with pytest.raises(PlanError, match=r"layer range \[0, 3\) exceeds num_layers=2"):
        TransferPlan.for_blocks("p", schema, [0], [0], layers=(0, 3))
    with pytest.raises(PlanError, match="priority='urgent'"):
        TransferPlan.for_blocks("p", schema, [0], [0], priority="urgent")
    with pytest.raises(PlanError, match="deadline_s=-1"):
        TransferPlan.for_blocks("p", schema, [0], [0], deadline_s=-1)
    with pytest.raises(PlanError, match="destination block 2 is written by two mappings"):
        TransferPlan(
            transfer_id="t", peer="p", schema=schema,
            mappings=(BlockMapping(0, 2, (0,), (2,)), BlockMapping(1, 2, (1,), (2,))),
        )  # fmt: skip


def _greedy_reference(lengths: list[int], groups: list[int] | None, chunk_size: int) -> list[int]:
    starts, acc, previous = [], chunk_size + 1, None
    for i, length in enumerate(lengths):
        group = groups[i] if groups is not None else 0
        if group != previous or acc + length > chunk_size:
            starts.append(i)
            acc = 0
        acc += length
        previous = group
    return starts


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(1, 4), min_size=1, max_size=3000),
    st.integers(4, 64),
    st.booleans(),
    st.integers(0, 2**32 - 1),
)
def test_packing_matches_greedy_reference(pages: list[int], chunk_pages: int, grouped: bool, seed: int) -> None:
    from sage_transport.planner import _pack

    lengths = np.asarray(pages, dtype=np.int64) * 256
    groups = np.sort(np.random.default_rng(seed).integers(0, 3, len(pages))) if grouped else None
    got = _pack(lengths, groups, chunk_pages * 256).tolist()
    assert got == _greedy_reference(lengths.tolist(), None if groups is None else groups.tolist(), chunk_pages * 256)
