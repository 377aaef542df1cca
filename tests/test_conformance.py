"""Every transport passes the conformance kit unchanged: in one process, and between two processes over
each link kind this machine has (UCX over shared memory/CMA and over TCP)."""

from __future__ import annotations

import functools
import importlib.util

import pytest

from sage_transport import available_transports
from sage_transport.testing import CONFORMANCE_CHECKS, PairFactory, local_pair, mock_pair
from sage_transport.testing.remote import remote_pair

HAVE_UCX = importlib.util.find_spec("ucxx") is not None

PAIR_FACTORIES: dict[str, PairFactory] = {
    "mock": mock_pair,
    "tcp": functools.partial(local_pair, "tcp"),
    "ucx": functools.partial(local_pair, "ucx"),
}

# transport name, options, id: the same kit between this process and a child process
CROSS_PROCESS = [
    ("ucx", {"tls": "posix,cma,self"}, "ucx-shm"),
    ("ucx", {"tls": "tcp"}, "ucx-tcp"),
    ("tcp", {}, "tcp"),
]


def _needs(transport: str) -> None:
    if transport == "ucx" and not HAVE_UCX:
        pytest.skip("ucxx is not installed")


def test_every_registered_transport_has_a_pair_factory() -> None:
    assert set(available_transports()) <= set(PAIR_FACTORIES)


@pytest.mark.parametrize("transport", sorted(PAIR_FACTORIES))
@pytest.mark.parametrize("check", CONFORMANCE_CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
async def test_conformance(transport: str, check) -> None:  # type: ignore[no-untyped-def]
    _needs(transport)
    await check(PAIR_FACTORIES[transport])


@pytest.mark.parametrize(("transport", "options"), [(t, o) for t, o, _ in CROSS_PROCESS], ids=[i for _, _, i in CROSS_PROCESS])
@pytest.mark.parametrize("check", CONFORMANCE_CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
async def test_conformance_between_processes(transport: str, options: dict[str, str], check) -> None:  # type: ignore[no-untyped-def]
    _needs(transport)
    await check(functools.partial(remote_pair, transport, **options))


async def test_conformance_holds_with_latency_and_bandwidth_model() -> None:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def slow_pair(**options):  # type: ignore[no-untyped-def]
        async with mock_pair(latency_s=0.0005, bandwidth_Bps=2e9, **options) as pair:
            yield pair

    for check in CONFORMANCE_CHECKS:
        await check(slow_pair)


async def test_a_broken_transport_fails_the_kit() -> None:
    """The kit can fail: a connection that loses a frame is caught."""
    from contextlib import asynccontextmanager

    from sage_transport.testing.conformance import check_ordering

    @asynccontextmanager
    async def lossy_pair(**options):  # type: ignore[no-untyped-def]
        async with mock_pair(**options) as pair:
            original = pair.b.recv

            async def skipping(sink=None):  # type: ignore[no-untyped-def]
                await original(sink)
                return await original(sink)

            pair.b.recv = skipping  # type: ignore[method-assign]
            yield pair

    with pytest.raises(AssertionError, match="frame 0 arrived as"):
        await check_ordering(lossy_pair)


@pytest.mark.parametrize("transport", ["tcp", "ucx"])
def test_conformance_on_uvloop(transport: str) -> None:
    """The CLI runs on uvloop: the kit passes there too (uvloop's transports are not asyncio's classes)."""
    uvloop = pytest.importorskip("uvloop")
    _needs(transport)
    import asyncio

    async def run_all() -> None:
        for check in CONFORMANCE_CHECKS:
            await check(PAIR_FACTORIES[transport])

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run_all())
