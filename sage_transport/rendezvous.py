"""Publish and look up channel addresses by name through a shared store, for many peers at once.

Two stores: torch's ``TCPStore`` (what a torch.distributed job already runs; ``tcpstore://HOST:PORT``, the
first process with ``is_server=True`` hosts it) and etcd (``etcd://HOST:PORT``, through etcd's v3 JSON
gateway with the standard library: no client package). Each channel publishes ``name → host:port`` under a
prefix; a peer looks the name up (waiting until it appears) and connects::

    store = open_store("tcpstore://10.0.0.1:29500", is_server=rank == 0)
    await publish(channel, store)                       # listens if needed, then publishes channel.name
    peer = await connect_by_name(channel, store, "decode-0")
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import urllib.error
import urllib.request
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Protocol

from .errors import ConfigError, PeerDeadError, TransferTimeoutError, UnsupportedError
from .transports.link import parse_host_port

if TYPE_CHECKING:
    from .channel import KVTransferChannel

__all__ = ["AddressStore", "EtcdStore", "TorchTCPStore", "connect_by_name", "lookup", "open_store", "publish"]

PREFIX = "sage_transport/addr/"


class AddressStore(Protocol):
    """A key-value store shared by every peer; blocking calls (run in a thread by :func:`publish`/:func:`lookup`)."""

    def put(self, key: str, value: str) -> None: ...

    def get(self, key: str, timeout_s: float) -> str:
        """The value, waiting up to ``timeout_s`` for it to appear; ``TransferTimeoutError`` otherwise."""
        ...


class TorchTCPStore:
    """``torch.distributed.TCPStore`` (torch is imported only here)."""

    def __init__(self, host: str, port: int, *, is_server: bool = False, timeout_s: float = 30.0) -> None:
        try:
            from torch.distributed import TCPStore  # type: ignore[attr-defined]
        except ImportError as exc:
            raise UnsupportedError("tcpstore:// needs torch (pip install 'sage-transport[torch]')") from exc
        self._store = TCPStore(host, port, is_master=is_server, timeout=timedelta(seconds=timeout_s), wait_for_workers=False)

    def put(self, key: str, value: str) -> None:
        self._store.set(key, value)

    def get(self, key: str, timeout_s: float) -> str:
        try:
            self._store.wait([key], timedelta(seconds=timeout_s))
        except Exception as exc:  # torch raises its own DistStoreError / RuntimeError on timeout
            raise TransferTimeoutError(f"no address published under {key!r} within {timeout_s:g} s") from exc
        return bytes(self._store.get(key)).decode()


class EtcdStore:
    """etcd v3 through its JSON gateway (``/v3/kv/put``, ``/v3/kv/range``), standard library only."""

    def __init__(self, host: str, port: int, *, request_timeout_s: float = 5.0) -> None:
        self.base = f"http://{host}:{port}"
        self.request_timeout_s = request_timeout_s

    def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(
            self.base + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.request_timeout_s) as response:
                return dict(json.loads(response.read() or b"{}"))
        except (urllib.error.URLError, OSError) as exc:
            raise PeerDeadError(f"etcd at {self.base} did not answer {path}: {exc}") from exc

    @staticmethod
    def _b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    def put(self, key: str, value: str) -> None:
        self._call("/v3/kv/put", {"key": self._b64(key), "value": self._b64(value)})

    def get(self, key: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        delay = 0.01
        while True:
            reply = self._call("/v3/kv/range", {"key": self._b64(key)})
            kvs = reply.get("kvs") or []
            if kvs:
                return base64.b64decode(kvs[0]["value"]).decode()
            if time.monotonic() >= deadline:
                raise TransferTimeoutError(f"no address published under {key!r} in etcd within {timeout_s:g} s")
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 0.5)


def open_store(url: str, *, is_server: bool = False, timeout_s: float = 30.0) -> AddressStore:
    """``tcpstore://HOST:PORT`` or ``etcd://HOST:PORT``; errors name the value."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ConfigError(f"store={url!r} must be tcpstore://HOST:PORT or etcd://HOST:PORT")
    host, port = parse_host_port(rest, "store")
    if scheme == "tcpstore":
        return TorchTCPStore(host, port, is_server=is_server, timeout_s=timeout_s)
    if scheme == "etcd":
        return EtcdStore(host, port)
    raise ConfigError(f"store={url!r}: unknown scheme {scheme!r}; use tcpstore:// or etcd://")


async def publish(channel: KVTransferChannel, store: AddressStore, address: str | None = None) -> str:
    """Make ``channel`` reachable under its name: listen (unless ``address`` is given) and publish."""
    if address is None:
        address = await channel.listen()
    await asyncio.to_thread(store.put, PREFIX + channel.name, address)
    return address


async def lookup(store: AddressStore, name: str, timeout_s: float = 30.0) -> str:
    """The address published for ``name`` (waits until it appears)."""
    return await asyncio.to_thread(store.get, PREFIX + name, timeout_s)


async def connect_by_name(channel: KVTransferChannel, store: AddressStore, name: str, timeout_s: float = 30.0) -> str:
    """Look ``name`` up and connect ``channel`` to it; returns the peer name to put in plans."""
    return await channel.connect(await lookup(store, name, timeout_s))
