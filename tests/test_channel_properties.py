"""Property: whatever the plan and whatever the mock link does (corrupt, duplicate, drop, delay), a transfer
succeeds byte-identical unless a chunk was corrupted more often than ``max_retries`` allows, and then it fails with
that reason and leaves both channels idle."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sage_transport import KVCacheSchema, KVTransportConfig, SageTransportError, TransferPlan
from sage_transport.errors import ChecksumError
from sage_transport.transports.mock import FaultAction, FaultRule

from .conftest import channel_pair

SCHEMA = KVCacheSchema(num_layers=3, num_kv_heads=1, head_dim=16, block_size=2)  # 64-byte pages
BLOCKS = 24


@st.composite
def cases(draw: st.DrawFn) -> dict[str, object]:
    n = draw(st.integers(1, BLOCKS))
    return {
        "src": draw(st.permutations(range(BLOCKS)))[:n],
        "dst": draw(st.permutations(range(BLOCKS)))[:n],
        "chunk_size": draw(st.sampled_from([512, 640, 2048])),
        "gather": draw(st.booleans()),
        "window": draw(st.integers(1, 6)),
        "progressive": draw(st.booleans()),
        "faults": draw(
            st.lists(
                st.tuples(
                    st.sampled_from([FaultAction.CORRUPT, FaultAction.DUPLICATE, FaultAction.DROP, FaultAction.DELAY]),
                    st.integers(0, 5),
                    st.floats(0.1, 1.0),
                ),
                max_size=3,
            )
        ),
        "seed": draw(st.integers(0, 1000)),
    }


async def _run(case: dict[str, object]) -> None:
    config = KVTransportConfig(
        chunk_size=case["chunk_size"], gather=case["gather"], peer_window=case["window"], ack_timeout_s=0.05, max_retries=5
    )  # type: ignore[arg-type]
    async with channel_pair(SCHEMA, BLOCKS, config=config, seed=case["seed"]) as pair:  # type: ignore[arg-type]
        for action, after, probability in case["faults"]:  # type: ignore[attr-defined]
            pair.network.faults.add(
                FaultRule(action, src="mock://prefill", after=after, times=3, probability=probability, delay_s=0.005)
            )
        plan = TransferPlan.for_blocks(
            pair.peer, SCHEMA, case["src"], case["dst"], progressive=case["progressive"], deadline_s=10
        )  # type: ignore[arg-type]
        handle = pair.sender.submit(plan)
        handle.mark_layers_ready()
        # only corruption counts against max_retries (drops, duplicates and delays cost resends, never failures):
        # fewer corruptions than that in all, and the transfer must succeed
        corruptions = sum(3 for action, _, _ in case["faults"] if action is FaultAction.CORRUPT)  # type: ignore[attr-defined]
        try:
            await handle.wait()
        except ChecksumError as exc:
            assert corruptions > config.max_retries, f"failed with at most {corruptions} corrupted copies: {exc}"
            assert f"(max_retries={config.max_retries})" in str(exc)
            with pytest.raises(SageTransportError):  # the receiver learns of the failure: nothing counts as arrived
                await asyncio.wait_for(pair.receiver.wait_received(plan.transfer_id), 5)
        else:
            src, dst = pair.src_pages(), pair.dst_pages()
            assert np.array_equal(dst[:, :, case["dst"]], src[:, :, case["src"]])  # type: ignore[index]
            untouched = np.setdiff1d(np.arange(BLOCKS), case["dst"])  # type: ignore[arg-type]
            assert not dst[:, :, untouched].any()
            received = await asyncio.wait_for(pair.receiver.wait_received(plan.transfer_id), 5)
            assert received.bytes == plan.total_bytes
        await asyncio.sleep(0.01)
        for channel in (pair.sender, pair.receiver):
            stats = channel.statistics()
            assert (stats.transfers_sending, stats.transfers_receiving, stats.inflight_chunks) == (0, 0, 0)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_transfers_are_exact_or_fail_cleanly_under_faults(case: dict[str, object]) -> None:
    asyncio.run(_run(case))
