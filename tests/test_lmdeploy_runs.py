"""The LMDeploy backend's byte-run planning, without LMDeploy: coalescing assignments and turning them into block
mappings (pages of a pool's rows)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from sage_transport import KVMemory
from sage_transport.errors import PlanError
from sage_transport.integrations.lmdeploy import ByteRun, PoolGeometry, _is_device_pointer, _Pool, coalesce, runs_to_mappings
from sage_transport.plan import BlockMapping

PAGE = 256


def entry(key: int, local: int, remote: int, length: int = PAGE) -> SimpleNamespace:
    return SimpleNamespace(mr_key=key, source_offset=local, target_offset=remote, length=length)


def test_entries_adjacent_on_both_sides_merge_whatever_their_order() -> None:
    batch = [entry(0, 2 * PAGE, 9 * PAGE), entry(0, 0, 7 * PAGE), entry(0, PAGE, 8 * PAGE), entry(1, 0, 0, 64)]
    assert coalesce(batch) == [ByteRun(0, 0, 7 * PAGE, 3 * PAGE), ByteRun(1, 0, 0, 64)]


def test_entries_adjacent_on_one_side_only_stay_apart() -> None:
    batch = [entry(0, 0, 7 * PAGE), entry(0, PAGE, 3 * PAGE), entry(0, 3 * PAGE, 4 * PAGE)]
    runs = [ByteRun(0, 0, 7 * PAGE, PAGE), ByteRun(0, PAGE, 3 * PAGE, PAGE), ByteRun(0, 3 * PAGE, 4 * PAGE, PAGE)]
    assert coalesce(batch) == runs


def test_two_sources_for_one_destination_and_negative_entries_are_refused() -> None:
    with pytest.raises(PlanError, match="overlap in local pool 0 at byte 128"):
        coalesce([entry(0, 0, 0), entry(0, 128, 5 * PAGE)])
    with pytest.raises(PlanError, match="length=-1"):
        coalesce([entry(0, 0, 0, -1)])


def test_runs_become_one_mapping_per_set_of_rows_moving_the_same_blocks() -> None:
    local, remote = PoolGeometry(rows=3, entries=10, page_bytes=PAGE), PoolGeometry(rows=3, entries=20, page_bytes=PAGE)
    runs = []
    for row in range(3):  # rows 0 and 1 move remote blocks 4,5 → local 1,2; row 2 moves remote 19 → local 9
        if row < 2:
            runs.append(ByteRun(0, (row * 10 + 1) * PAGE, (row * 20 + 4) * PAGE, 2 * PAGE))
        else:
            runs.append(ByteRun(0, (row * 10 + 9) * PAGE, (row * 20 + 19) * PAGE, PAGE))
    assert runs_to_mappings(runs, local, remote) == (BlockMapping(0, 2, (4, 5), (1, 2)), BlockMapping(2, 3, (19,), (9,)))


def test_runs_off_their_pages_or_across_rows_are_refused() -> None:
    geometry = PoolGeometry(rows=2, entries=4, page_bytes=PAGE)
    with pytest.raises(PlanError, match="does not fall on its 256-byte pages"):
        runs_to_mappings([ByteRun(0, 8, 0, PAGE)], geometry, geometry)
    with pytest.raises(PlanError, match="maps row 0 of the peer's pool to row 1 of ours"):
        runs_to_mappings([ByteRun(0, 4 * PAGE, 0, PAGE)], geometry, geometry)
    with pytest.raises(PlanError, match="pool pages differ"):
        runs_to_mappings([ByteRun(0, 0, 0, PAGE)], geometry, PoolGeometry(2, 4, 2 * PAGE))


def test_a_pool_shape_becomes_a_byte_schema_of_its_rows_and_pages() -> None:
    info = SimpleNamespace(shape=(28, 512, 2, 64, 4, 128), element_size=2, entry_axis=1)
    geometry = PoolGeometry.from_info(info)
    assert geometry == PoolGeometry(28, 512, 2 * 64 * 4 * 128 * 2)
    schema = geometry.schema()
    assert (schema.num_layers, schema.kv_planes, schema.page_bytes) == (28, 1, geometry.page_bytes)
    assert PoolGeometry(1, 1, 3 * 1024 * 1024).schema().page_bytes == 3 * 1024 * 1024  # over block_size's 1 MiB cap


def test_host_memory_is_not_a_device_pointer() -> None:
    torch = pytest.importorskip("torch")
    assert _is_device_pointer(torch.zeros(16).data_ptr()) is False


@pytest.mark.gpu
def test_a_cuda_pool_is_registered_as_device_kv_over_its_own_memory() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here: the device-pointer check runs on the GPU machine (bench/gpu_check.sh)")
    pool_memory = torch.arange(4096, dtype=torch.int32, device="cuda")
    assert _is_device_pointer(pool_memory.data_ptr()) is True
    assert _is_device_pointer(torch.zeros(16).pin_memory().data_ptr()) is False  # pinned host memory is host KV
    pool = _Pool(0, pool_memory.data_ptr(), pool_memory.numel() * 4)
    pool.on_device = True
    buffer = pool.buffer()
    assert buffer.is_cuda and buffer.data_ptr() == pool_memory.data_ptr() and buffer.numel() == 4096 * 4
    memory = KVMemory(PoolGeometry(4, 4, 1024).schema(), 4, buffer)
    assert memory.kind == "cuda"
    buffer[:4].fill_(0)
    assert int(pool_memory[0]) == 0  # the same memory: nothing was copied
