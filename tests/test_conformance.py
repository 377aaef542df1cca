"""Every transport available here passes the conformance kit unchanged."""

from __future__ import annotations

import pytest

from sage_transport import available_transports
from sage_transport.testing import CONFORMANCE_CHECKS, PairFactory, mock_pair

PAIR_FACTORIES: dict[str, PairFactory] = {"mock": mock_pair}


def test_every_registered_transport_has_a_pair_factory() -> None:
    assert set(available_transports()) <= set(PAIR_FACTORIES)


@pytest.mark.parametrize("transport", sorted(PAIR_FACTORIES))
@pytest.mark.parametrize("check", CONFORMANCE_CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
async def test_conformance(transport: str, check) -> None:  # type: ignore[no-untyped-def]
    await check(PAIR_FACTORIES[transport])


async def test_conformance_holds_with_latency_and_bandwidth_model() -> None:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def slow_pair():  # type: ignore[no-untyped-def]
        async with mock_pair(latency_s=0.0005, bandwidth_Bps=2e9) as pair:
            yield pair

    for check in CONFORMANCE_CHECKS:
        await check(slow_pair)


async def test_a_broken_transport_fails_the_kit() -> None:
    """The kit can fail: a connection that loses a frame is caught."""
    from contextlib import asynccontextmanager

    from sage_transport.testing.conformance import check_ordering

    @asynccontextmanager
    async def lossy_pair():  # type: ignore[no-untyped-def]
        async with mock_pair() as pair:
            original = pair.b.recv

            async def skipping(sink=None):  # type: ignore[no-untyped-def]
                await original(sink)
                return await original(sink)

            pair.b.recv = skipping  # type: ignore[method-assign]
            yield pair

    with pytest.raises(AssertionError, match="frame 0 arrived as"):
        await check_ordering(lossy_pair)
