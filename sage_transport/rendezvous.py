"""Find peers by name, and learn who joins and leaves, through a shared store.

Two stores: etcd (``etcd://HOST:PORT``: addresses under leases, so a member that dies disappears when its lease
expires, and watches, so peers learn of joins and leaves as they happen; :mod:`.rendezvous_etcd`) and torch's
``TCPStore`` (``tcpstore://HOST:PORT``, what a torch.distributed job already runs; the first process with
``is_server=True`` hosts it; it has no leases and no watches, so membership there is emulated by beats that
watchers poll: :mod:`.rendezvous_tcpstore`). Each channel publishes ``name → host:port`` under a prefix and
keeps it alive while it runs::

    store = open_store("etcd://10.0.0.1:2379")
    async with await publish(decode_channel, store, ttl_s=10):   # listens if needed, registers, keeps alive
        ...
    peer = await connect_by_name(prefill_channel, store, "decode-0")   # waits until "decode-0" is published
    async for event in watch_members(store):                          # every member now, then joins and leaves
        print(event.kind, event.name, event.address)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Literal, Protocol

import structlog

from .errors import ConfigError, PeerDeadError
from .rendezvous_etcd import EtcdStore
from .rendezvous_tcpstore import TorchTCPStore
from .transports.link import parse_host_port

if TYPE_CHECKING:
    from .channel import KVTransferChannel

__all__ = [
    "PREFIX",
    "SERVE_PREFIX",
    "AddressStore",
    "EtcdStore",
    "MemberEvent",
    "Registration",
    "TorchTCPStore",
    "connect_by_name",
    "current_members",
    "lookup",
    "open_store",
    "publish",
    "register",
    "watch_members",
]

log = structlog.get_logger("sage_transport.rendezvous")

PREFIX = "sage_transport/addr/"
#: where ``sage-transport serve --store`` registers its job address (``migrate --store --to NAME`` looks there)
SERVE_PREFIX = "sage_transport/serve/"
#: a registration's default time to live: a member that stops refreshing is gone this long after its last refresh
DEFAULT_TTL_S = 10.0


class _Lease(Protocol):
    async def refresh(self) -> None: ...
    async def withdraw(self) -> None: ...


class AddressStore(Protocol):
    """A store every peer shares (``open_store``): registrations that live while refreshed, lookups, watches."""

    url: str

    async def register(self, key: str, value: str, ttl_s: float) -> _Lease: ...
    async def put(self, key: str, value: str) -> None: ...
    async def get(self, key: str, timeout_s: float) -> str:
        """The value, waiting up to ``timeout_s`` for it to appear; ``TransferTimeoutError`` otherwise."""
        ...

    async def members(self, prefix: str) -> dict[str, str]: ...
    def watch(self, prefix: str, ttl_s: float) -> AsyncIterator[tuple[str, str, str | None]]: ...
    async def close(self) -> None: ...


@dataclass(frozen=True)
class MemberEvent:
    """A member under the watched prefix appeared (``joined``, also for those there when the watch began) or
    went (``left``: withdrawn, its channel closed, or its lease expired because it died)."""

    kind: Literal["joined", "left"]
    name: str
    address: str | None  # None for ``left``


def open_store(url: str, *, is_server: bool = False, timeout_s: float = 30.0) -> AddressStore:
    """``etcd://HOST:PORT`` or ``tcpstore://HOST:PORT``; errors name the value."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ConfigError(f"store={url!r} must be etcd://HOST:PORT or tcpstore://HOST:PORT")
    host, port = parse_host_port(rest, "store")
    if scheme == "tcpstore":
        return TorchTCPStore(host, port, is_server=is_server, timeout_s=timeout_s)
    if scheme == "etcd":
        return EtcdStore(host, port)
    raise ConfigError(f"store={url!r}: unknown scheme {scheme!r}; use etcd:// or tcpstore://")


class Registration:
    """A name and address in a store, refreshed every third of ``ttl_s`` until :meth:`withdraw` (or ``async
    with`` ends, or ``closed()`` turns true: a published channel's close). Should the store stop answering,
    refreshes are retried and logged; once the store has let the registration expire it is made again."""

    def __init__(self, store: AddressStore, name: str, key: str, address: str, ttl_s: float, closed: Callable[[], bool]) -> None:
        self.store, self.name, self.key, self.address, self.ttl_s = store, name, key, address, ttl_s
        self.refreshes = 0
        self._closed = closed
        self._lease: _Lease | None = None
        self._task: asyncio.Task[None] | None = None

    async def _start(self) -> None:
        self._lease = await self.store.register(self.key, self.address, self.ttl_s)
        self._task = asyncio.create_task(self._keep_alive(), name=f"sage-registration-{self.name}")

    async def _keep_alive(self) -> None:
        while not self._closed():
            await asyncio.sleep(self.ttl_s / 3)
            if self._closed():
                break
            try:
                assert self._lease is not None
                await self._lease.refresh()
                self.refreshes += 1
            except PeerDeadError as exc:
                log.warning("registration.refresh_failed", name=self.name, store=self.store.url, error=str(exc))
                with contextlib.suppress(PeerDeadError):  # expired meanwhile, or the store came back: again
                    self._lease = await self.store.register(self.key, self.address, self.ttl_s)
        await self._withdraw_lease()

    async def _withdraw_lease(self) -> None:
        lease, self._lease = self._lease, None
        if lease is not None:
            try:
                await lease.withdraw()
            except PeerDeadError as exc:  # it expires by itself within its TTL
                log.warning("registration.withdraw_failed", name=self.name, store=self.store.url, error=str(exc))

    @property
    def alive(self) -> bool:
        return self._lease is not None

    async def withdraw(self) -> None:
        """Remove the name now (watchers see it leave); idempotent."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._withdraw_lease()

    async def __aenter__(self) -> Registration:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.withdraw()


async def register(
    store: AddressStore,
    name: str,
    address: str,
    *,
    ttl_s: float = DEFAULT_TTL_S,
    prefix: str = PREFIX,
    closed: Callable[[], bool] = lambda: False,
) -> Registration:
    """Register ``name → address`` under ``prefix`` with ``ttl_s`` and keep it alive (see :class:`Registration`)."""
    if not ttl_s >= 1.0:
        raise ConfigError(f"ttl_s={ttl_s!r} must be at least 1 second (etcd's leases count whole seconds)")
    if not name or "/" in name:
        raise ConfigError(f"name={name!r} must be non-empty and hold no '/'")
    registration = Registration(store, name, prefix + name, address, ttl_s, closed)
    await registration._start()
    return registration


async def publish(
    channel: KVTransferChannel,
    store: AddressStore,
    address: str | None = None,
    *,
    ttl_s: float = DEFAULT_TTL_S,
    prefix: str = PREFIX,
) -> Registration:
    """Make ``channel`` reachable under its name: listen (unless ``address`` is given), register under
    ``prefix`` with ``ttl_s`` and keep the registration alive while the channel runs."""
    if not ttl_s >= 1.0:  # before listening
        raise ConfigError(f"ttl_s={ttl_s!r} must be at least 1 second (etcd's leases count whole seconds)")
    if address is None:
        address = await channel.listen()
    return await register(store, channel.name, address, ttl_s=ttl_s, prefix=prefix, closed=lambda: channel.closed)


async def lookup(store: AddressStore, name: str, timeout_s: float = 30.0, *, prefix: str = PREFIX) -> str:
    """The address published for ``name`` (waits until it appears)."""
    return await store.get(prefix + name, timeout_s)


async def connect_by_name(
    channel: KVTransferChannel, store: AddressStore, name: str, timeout_s: float = 30.0, *, prefix: str = PREFIX
) -> str:
    """Look ``name`` up and connect ``channel`` to it; returns the peer name to put in plans."""
    return await channel.connect(await lookup(store, name, timeout_s, prefix=prefix))


async def current_members(store: AddressStore, prefix: str = PREFIX) -> dict[str, str]:
    """``{name: address}`` of the members under ``prefix`` now (what :func:`watch_members` starts with)."""
    return {key[len(prefix) :]: value for key, value in (await store.members(prefix)).items()}


async def watch_members(store: AddressStore, prefix: str = PREFIX, *, ttl_s: float = DEFAULT_TTL_S) -> AsyncIterator[MemberEvent]:
    """Every member under ``prefix`` now (as ``joined``), then each join and leave as it happens: a prefill
    learns of a new decode instance without restarting. ``ttl_s``: the members' TTL (what a TCPStore watcher
    polls by; etcd tells of expiries itself)."""
    async for kind, key, value in store.watch(prefix, ttl_s):
        name = key[len(prefix) :]
        yield MemberEvent("joined", name, value) if kind == "put" else MemberEvent("left", name, None)
