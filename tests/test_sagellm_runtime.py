"""KVRuntimeBridge: sageLLM kv_runtime migration plans (their published fields, as sageLLM's dataclass carries them)
run as sage_transport transfers and pulls, with the pool's fragmentation and utilisation sizing chunks and window."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import pytest

from sage_transport.errors import ConfigError, PlanError, TransferTimeoutError
from sage_transport.integrations.loop_thread import LoopThread
from sage_transport.integrations.sagellm_runtime import KVRuntimeBridge
from sage_transport.plan import Priority

from .conftest import SMALL, channel_pair


@dataclasses.dataclass
class MigrationPlan:
    """sageLLM kv_runtime's plan, field for field (kv_runtime is not in the published wheels)."""

    plan_id: str
    src_tier: str
    dst_tier: str
    block_ids: list[int]
    total_bytes: int
    priority: int = 1
    deadline: float | None = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)


class PoolFeedback:
    def __init__(self, fragmentation: float, utilization: float) -> None:
        self.fragmentation, self.utilization = fragmentation, utilization

    def get_fragmentation(self) -> float:
        return self.fragmentation

    def get_utilization(self) -> float:
        return self.utilization


BLOCK_BYTES = SMALL.bytes_per_block


def pages(memory: Any) -> np.ndarray:
    s = memory.schema
    return np.frombuffer(memory.buffers[0], np.uint8).reshape(s.num_layers, s.kv_planes, memory.num_blocks, -1)


async def test_a_plan_to_a_peers_tier_is_sent_and_lands_in_its_destination_blocks() -> None:
    async with channel_pair() as pair:
        bridge = KVRuntimeBridge(pair.sender, peers={"remote_gpu": pair.peer})
        plan = MigrationPlan("mig-1", "gpu", "remote_gpu", [3, 9, 10], 3 * BLOCK_BYTES, priority=0,
                             metadata={"dst_block_ids": [0, 1, 60]})  # fmt: skip
        ours, pulled = bridge.to_transfer_plan(plan)
        assert not pulled and ours.priority is Priority.DECODE_CRITICAL and ours.transfer_id == "mig-1"
        assert await bridge.amigrate_blocks(plan) is True
        assert bridge.last_result is not None and bridge.last_result.bytes == 3 * BLOCK_BYTES
        src, dst = pages(pair.src), pages(pair.dst)
        for s, d in ((3, 0), (9, 1), (10, 60)):
            assert np.array_equal(src[:, :, s], dst[:, :, d])
        assert not dst[:, :, 2:60].any()


async def test_a_plan_from_a_peers_tier_is_pulled() -> None:
    async with channel_pair() as pair:
        bridge = KVRuntimeBridge(pair.receiver, peers={"prefill_cpu": "prefill"})
        plan = MigrationPlan("mig-2", "prefill_cpu", "gpu", [5, 6], 0, priority=3, deadline=30.0,
                             metadata={"layers": [1, 3]})  # fmt: skip
        ours, pulled = bridge.to_transfer_plan(plan)
        assert pulled and ours.priority is Priority.BULK and ours.deadline_s == 30.0
        assert await bridge.amigrate_blocks(plan) is True
        src, dst = pages(pair.src), pages(pair.dst)
        assert np.array_equal(src[1:3, :, 5:7], dst[1:3, :, 5:7])
        assert not dst[0].any() and not dst[3].any()


async def test_fragmentation_shrinks_chunks_and_utilisation_the_window() -> None:
    async with channel_pair() as pair:
        feedback = PoolFeedback(0.0, 0.0)
        bridge = KVRuntimeBridge(pair.sender, peers={"d": pair.peer}, feedback=feedback)
        plan = MigrationPlan("calm", "gpu", "d", list(range(16)), 16 * BLOCK_BYTES)
        assert await bridge.amigrate_blocks(plan) is True
        calm = bridge.last_result
        assert bridge.tuning is not None and (bridge.tuning.chunk_size, bridge.tuning.peer_window) == (1024, 4)
        feedback.fragmentation, feedback.utilization = 0.8, 0.9
        assert await bridge.amigrate_blocks(dataclasses.replace(plan, plan_id="pressed")) is True
        assert (bridge.tuning.chunk_size, bridge.tuning.peer_window) == (512, 2)
        assert pair.sender.config.peer_window == 2
        assert calm is not None and bridge.last_result is not None
        assert bridge.last_result.chunks == 2 * calm.chunks  # half-size chunks: twice as many
        assert (bridge.get_fragmentation(), bridge.get_utilization()) == (0.8, 0.9)
        feedback.utilization = 1.5
        with pytest.raises(ConfigError, match=r"get_utilization\(\) returned 1.5"):
            bridge.tune()


async def test_malformed_plans_are_refused_naming_the_field() -> None:
    async with channel_pair() as pair:
        bridge = KVRuntimeBridge(pair.sender, peers={"d": pair.peer})
        with pytest.raises(PlanError, match=r"total_bytes=100 but 2 blocks of layers \[0, 4\) hold 4096 bytes"):
            bridge.to_transfer_plan(MigrationPlan("a", "gpu", "d", [1, 2], 100))
        with pytest.raises(PlanError, match="neither src_tier='gpu' nor dst_tier='ssd' has a peer"):
            bridge.to_transfer_plan(MigrationPlan("b", "gpu", "ssd", [1], 0))
        with pytest.raises(PlanError, match="deadline=.* passed"):
            bridge.to_transfer_plan(MigrationPlan("c", "gpu", "d", [1], 0, deadline=time.time() - 5))
        with pytest.raises(PlanError, match="priority=None is not a number"):
            bridge.to_transfer_plan(MigrationPlan("e", "gpu", "d", [1], 0, priority=None))  # type: ignore[arg-type]
        with pytest.raises(PlanError, match="no 'block_ids' field"):
            bridge.to_transfer_plan({"plan_id": "f", "src_tier": "gpu", "dst_tier": "d"})


async def test_a_transfer_that_fails_returns_false_and_keeps_the_error() -> None:
    async with channel_pair(bandwidth_Bps=100_000) as pair:
        bridge = KVRuntimeBridge(pair.sender, peers={"d": pair.peer})
        plan = MigrationPlan("slow", "gpu", "d", list(range(8)), 8 * BLOCK_BYTES, deadline=0.05)
        assert await bridge.amigrate_blocks(plan) is False
        assert isinstance(bridge.last_error, TransferTimeoutError)


def test_migrate_blocks_serves_a_synchronous_caller_from_the_loop_thread() -> None:
    loop = LoopThread("test-bridge-loop")
    pair_cm = channel_pair()
    try:
        pair = loop.call(pair_cm.__aenter__(), timeout=30)
        bridge = KVRuntimeBridge(pair.sender, peers={"d": pair.peer}, loop=loop)
        assert bridge.migrate_blocks(MigrationPlan("sync", "gpu", "d", [4], BLOCK_BYTES, metadata={"dst_block_ids": [7]}))
        assert np.array_equal(pages(pair.src)[:, :, 4], pages(pair.dst)[:, :, 7])
        loop.call(pair_cm.__aexit__(None, None, None), timeout=30)
    finally:
        loop.stop()
