"""NIXL, for variant ``a``, driven the way vLLM 0.32's NixlConnector drives it (``vllm/distributed/kv_transfer/
kv_connector/v1/nixl/``):

* the agent: ``nixl_agent_config(num_threads=4, capture_telemetry=True)``, NIXL's own progress thread on (the
  default), UCX backend (``base_worker.py``, "Agent." block: ``num_threads`` defaults to 4);
* descriptor lists prepared once: the local pool's pages at registration (``prep_xfer_dlist("NIXL_INIT_AGENT", …)``,
  ``base_worker.py`` ~2125-2136), each remote pool's pages once per remote agent at its handshake (~2407);
  one descriptor per page (layer × K/V × block), as vLLM's per-region block descriptors;
* per request, one READ posted without blocking: descriptor ids computed from the block ids,
  ``make_prepped_xfer("READ", local, ids, remote, ids, notif_msg=request_id)`` then ``transfer(handle)``
  (``pull_worker.py`` ~546-560); its completion checked later with ``check_xfer_state`` (``base_worker.py`` ~3083,
  once per engine step there; every millisecond here), several requests in flight at once;
* the notification: the READ carries the request id; the prefill side drains ``get_new_notifs()`` (once per engine
  step in vLLM, every millisecond here) and so learns which requests were read.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["NixlSide", "nixl_api"]

POLL_S = 0.001  # how often a READ's state and the notifications are checked (vLLM: once per engine step)


def nixl_api() -> Any | None:
    """NIXL's Python API module, or ``None`` where neither ``nixl`` nor ``nixl-cu12`` is installed."""
    for name in ("nixl._api", "nixl_cu12._api"):
        try:
            return __import__(name, fromlist=["nixl_agent"])
        except ImportError:
            continue
    return None


def _pages(address: int, nbytes: int, page_bytes: int) -> np.ndarray:
    """An Nx3 descriptor array (address, length, device 0): every page of a pool, in order."""
    count = nbytes // page_bytes
    descs = np.zeros((count, 3), dtype=np.uint64)
    descs[:, 0] = address + np.arange(count, dtype=np.uint64) * np.uint64(page_bytes)
    descs[:, 1] = page_bytes
    return descs


class NixlSide:
    """One NIXL agent over a registered host pool of ``page_bytes`` pages, its local descriptors prepared once.
    ``serve()`` drains notifications on a thread (the READ target's side); :meth:`post_read` and :meth:`state` are
    the initiator's, called from one thread."""

    def __init__(self, name: str, address: int, nbytes: int, page_bytes: int) -> None:
        api = nixl_api()
        if api is None:
            raise ImportError("NIXL is not installed (pip install nixl-cu12)")
        config = api.nixl_agent_config(num_threads=4, capture_telemetry=True)  # vLLM's, for a UCX-only agent
        self.agent = api.nixl_agent(name, config)
        self.address, self.nbytes, self.page_bytes = address, nbytes, page_bytes
        self.registration = self.agent.register_memory([(address, nbytes, 0, "")], "DRAM")
        self.local = self.agent.prep_xfer_dlist("NIXL_INIT_AGENT", _pages(address, nbytes, page_bytes), "DRAM")
        self.remote: dict[str, Any] = {}
        self.notified: list[str] = []  # request ids whose READ completed, as the target learnt them
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def metadata(self) -> bytes:
        return bytes(self.agent.get_agent_metadata())

    def serve(self) -> None:
        """Drain notifications every millisecond on a thread until :meth:`close` (NIXL progresses itself)."""

        def loop() -> None:
            while not self._stop.is_set():
                for messages in self.agent.get_new_notifs().values():
                    self.notified.extend(m.decode() if isinstance(m, bytes) else str(m) for m in messages)
                time.sleep(POLL_S)

        self._thread = threading.Thread(target=loop, name="nixl-notifs", daemon=True)
        self._thread.start()

    def add_peer(self, metadata: bytes, remote_base: int, remote_nbytes: int) -> str:
        """Load a remote agent and prepare its pool's page descriptors once."""
        name = self.agent.add_remote_agent(metadata)
        name = name.decode() if isinstance(name, bytes) else str(name)
        self.remote[name] = self.agent.prep_xfer_dlist(name, _pages(remote_base, remote_nbytes, self.page_bytes), "DRAM")
        return name

    def post_read(
        self, peer: str, remote_ids: Sequence[int] | np.ndarray, local_ids: Sequence[int] | np.ndarray, notif: str
    ) -> Any:
        """Post one READ of these pages (descriptor ids on each side); returns its handle at once."""
        handle = self.agent.make_prepped_xfer(
            "READ", self.local, np.asarray(local_ids, dtype=np.int32), self.remote[peer],
            np.asarray(remote_ids, dtype=np.int32), notif_msg=notif.encode(),
        )  # fmt: skip
        state = self.agent.transfer(handle)
        if state == "ERR":
            self.agent.release_xfer_handle(handle)
            raise RuntimeError(f"NIXL could not post the READ of {len(local_ids)} pages from {peer}")
        return handle

    def state(self, handle: Any) -> str:
        """``"DONE"``, ``"PROC"`` or ``"ERR"``; a handle done or failed is released."""
        state = str(self.agent.check_xfer_state(handle))
        if state in ("DONE", "ERR"):
            self.agent.release_xfer_handle(handle)
        return state

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
