"""torch's ``TCPStore`` as the rendezvous store (what a torch.distributed job already runs).

It has neither leases nor watches nor key listing, so membership is emulated: a registration appends its name to
a roster (an ``add`` counter and one key per entry) and bumps a beat counter every third of its TTL; a watcher
polls the roster and the beats every quarter of the TTL, by its own clock, and a member whose key was deleted
(withdrawn) or whose beat stood still for a TTL has left. So a leave shows up within TTL plus a poll, never
sooner, and a watcher costs two store calls per member per poll: for more than a few dozen members, use etcd.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

from .errors import TransferTimeoutError, UnsupportedError

__all__ = ["TorchTCPStore"]

_ROSTER = "__roster__/"
_BEAT = "__beat__/"


class _Beat:
    """One registration on a TCPStore: :meth:`refresh` bumps its beat, :meth:`withdraw` deletes its key."""

    def __init__(self, store: TorchTCPStore, key: str) -> None:
        self.store, self.key = store, key

    async def refresh(self) -> None:
        await asyncio.to_thread(self.store.raw.add, _BEAT + self.key, 1)

    async def withdraw(self) -> None:
        await asyncio.to_thread(self.store.raw.delete_key, self.key)


class TorchTCPStore:
    """``torch.distributed.TCPStore`` (torch is imported only here); its calls run in threads."""

    def __init__(self, host: str, port: int, *, is_server: bool = False, timeout_s: float = 30.0) -> None:
        try:
            from torch.distributed import TCPStore  # type: ignore[attr-defined]
        except ImportError as exc:
            raise UnsupportedError("tcpstore:// needs torch (pip install 'sage-transport[torch]')") from exc
        self.url = f"tcpstore://{host}:{port}"
        self.raw: Any = TCPStore(host, port, is_master=is_server, timeout=timedelta(seconds=timeout_s), wait_for_workers=False)

    async def register(self, key: str, value: str, ttl_s: float) -> _Beat:
        await asyncio.to_thread(self._register, key[: key.rindex("/") + 1], key, value)
        return _Beat(self, key)

    def _register(self, prefix: str, key: str, value: str) -> None:
        self.raw.set(key, value)
        self.raw.add(_BEAT + key, 1)
        entry = self.raw.add(prefix + _ROSTER + "count", 1)
        self.raw.set(f"{prefix}{_ROSTER}{entry}", key)

    async def put(self, key: str, value: str) -> None:
        await asyncio.to_thread(self.raw.set, key, value)

    async def get(self, key: str, timeout_s: float) -> str:
        def wait() -> str:
            try:
                self.raw.wait([key], timedelta(seconds=timeout_s))
            except Exception as exc:  # torch raises its own DistStoreError / RuntimeError on timeout
                raise TransferTimeoutError(f"no address published under {key!r} within {timeout_s:g} s") from exc
            return bytes(self.raw.get(key)).decode()

        return await asyncio.to_thread(wait)

    def _snapshot(self, prefix: str, roster: list[str]) -> dict[str, tuple[str, int]]:
        """``{key: (value, beat)}`` of the roster's members whose key exists; the roster grows in place."""
        count = int(self.raw.add(prefix + _ROSTER + "count", 0))
        for entry in range(len(roster) + 1, count + 1):
            roster.append(bytes(self.raw.get(f"{prefix}{_ROSTER}{entry}")).decode())
        alive = {}
        for key in dict.fromkeys(roster):
            if self.raw.check([key]):
                alive[key] = (bytes(self.raw.get(key)).decode(), int(self.raw.add(_BEAT + key, 0)))
        return alive

    async def members(self, prefix: str) -> dict[str, str]:
        """Registered and not withdrawn (a member that died stays until a watcher's TTL passes: no leases)."""
        found = await asyncio.to_thread(self._snapshot, prefix, [])
        return {key: value for key, (value, _) in found.items()}

    async def watch(self, prefix: str, ttl_s: float) -> AsyncIterator[tuple[str, str, str | None]]:
        """``(kind, key, value)``: every member under ``prefix`` now as a ``"put"``, then joins (``"put"``) and
        leaves (``"delete"``, value None), polled every ``ttl_s / 4`` (see the module docstring)."""
        roster: list[str] = []
        known: dict[str, tuple[str, int, float, bool]] = {}  # key -> (value, beat, when it last moved, present)
        while True:
            found = await asyncio.to_thread(self._snapshot, prefix, roster)
            now = time.monotonic()
            for key, (value, beat) in found.items():
                seen = known.get(key)
                if seen is None or beat != seen[1] or value != seen[0]:
                    known[key] = (value, beat, now, True)
                    if seen is None or not seen[3] or value != seen[0]:  # new, back, or at a new address
                        yield "put", key, value
            for key, (value, beat, moved, present) in list(known.items()):
                if key not in found:
                    del known[key]
                    if present:
                        yield "delete", key, None
                elif present and now - moved > ttl_s:  # its beat stood still for a TTL: gone (until it beats)
                    known[key] = (value, beat, moved, False)
                    yield "delete", key, None
            await asyncio.sleep(ttl_s / 4)

    async def close(self) -> None:
        return None
