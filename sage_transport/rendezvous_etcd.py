"""etcd as the rendezvous store: addresses under leases, kept alive while their channel lives, and watches.

Through ``aetcd`` (etcd's v3 gRPC API from asyncio): a lease per registration (``LeaseGrant``, one ``put``
attached to it, ``LeaseKeepAlive`` every third of its TTL, ``LeaseRevoke`` on withdrawal), so a member that dies
disappears when its lease expires; a watch over the prefix from the revision of the snapshot it starts with, so
no join or leave between the two is missed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from .errors import PeerDeadError, TransferTimeoutError, UnsupportedError

__all__ = ["EtcdLease", "EtcdStore"]


def _client_module() -> Any:
    try:
        import aetcd
    except ImportError as exc:
        raise UnsupportedError("etcd:// needs aetcd (pip install 'sage-transport[etcd]')") from exc
    return aetcd


class EtcdLease:
    """One registration's lease: :meth:`refresh` keeps it (and its key) alive, :meth:`withdraw` ends both."""

    def __init__(self, store: EtcdStore, key: str, lease_id: int) -> None:
        self.store, self.key, self.lease_id = store, key, lease_id

    async def refresh(self) -> None:
        client = await self.store.client()
        reply = await self.store.call("keep alive", client.refresh_lease(self.lease_id))
        if reply is None or getattr(reply, "TTL", 1) <= 0:
            raise PeerDeadError(f"etcd at {self.store.url} let the lease of {self.key!r} expire")

    async def withdraw(self) -> None:
        client = await self.store.client()
        await self.store.call("revoke", client.revoke_lease(self.lease_id))


class EtcdStore:
    """An etcd cluster member at ``host:port`` (its client URL), connected on first use from the running loop."""

    def __init__(self, host: str, port: int, *, request_timeout_s: float = 5.0) -> None:
        self.host, self.port = host, port
        self.url = f"etcd://{host}:{port}"
        self.request_timeout_s = request_timeout_s
        self._client: Any = None

    async def client(self) -> Any:
        if self._client is None:
            aetcd = _client_module()
            client = aetcd.Client(host=self.host, port=self.port, timeout=self.request_timeout_s)
            await self.call("connect", client.connect())
            self._client = client
        return self._client

    async def call(self, what: str, request: Any) -> Any:
        """``request`` awaited; etcd's failures as ``PeerDeadError`` naming the store and what was asked."""
        aetcd = _client_module()
        try:
            return await asyncio.wait_for(request, self.request_timeout_s)
        except (aetcd.exceptions.ClientError, TimeoutError, OSError) as exc:
            raise PeerDeadError(f"etcd at {self.url} did not answer ({what}): {exc!r}") from exc

    async def register(self, key: str, value: str, ttl_s: float) -> EtcdLease:
        client = await self.client()
        lease = await self.call("lease grant", client.lease(max(1, round(ttl_s))))
        await self.call("put", client.put(key.encode(), value.encode(), lease=lease))
        return EtcdLease(self, key, lease.id)

    async def put(self, key: str, value: str) -> None:
        client = await self.client()
        await self.call("put", client.put(key.encode(), value.encode()))

    async def get(self, key: str, timeout_s: float) -> str:
        client = await self.client()
        deadline = asyncio.get_running_loop().time() + timeout_s
        delay = 0.01
        while True:
            found = await self.call("get", client.get(key.encode()))
            if found is not None:
                return bytes(found.value).decode()
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise TransferTimeoutError(f"no address published under {key!r} in {self.url} within {timeout_s:g} s")
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, 0.25)

    async def members(self, prefix: str) -> dict[str, str]:
        client = await self.client()
        found = await self.call("get prefix", client.get_prefix(prefix.encode()))
        return {bytes(kv.key).decode(): bytes(kv.value).decode() for kv in found}

    async def watch(self, prefix: str, ttl_s: float) -> AsyncIterator[tuple[str, str, str | None]]:
        """``(kind, key, value)``: every key under ``prefix`` now as a ``"put"``, then each put and delete
        (``"delete"``, value None: withdrawn, or its lease expired) as it happens, from the snapshot's revision on
        (``ttl_s`` is the lease's business here)."""
        aetcd = _client_module()
        client = await self.client()
        found = await self.call("get prefix", client.get_prefix(prefix.encode()))
        revision = found.header.revision
        watch = await self.call("watch", client.watch_prefix(prefix.encode(), start_revision=revision + 1))
        try:
            for kv in found:
                yield "put", bytes(kv.key).decode(), bytes(kv.value).decode()
            async for event in watch:
                key = bytes(event.kv.key).decode()
                if event.kind == aetcd.rtypes.EventKind.PUT:
                    yield "put", key, bytes(event.kv.value).decode()
                else:
                    yield "delete", key, None
        except aetcd.exceptions.ClientError as exc:
            raise PeerDeadError(f"etcd at {self.url} ended the watch of {prefix!r}: {exc!r}") from exc
        finally:  # the watch ends with its iterator (a store closed meanwhile has ended it already)
            if self._client is not None:
                with contextlib.suppress(aetcd.exceptions.ClientError, AttributeError):
                    await watch.cancel()

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()
