"""NIXL, for variant ``a``: the pattern of vLLM's NixlConnector (one READ descriptor per layer × K/V × block), with
NIXL's own agent on each side (``enable_prog_thread=False``, as it runs on CPU; the owner polls it)."""

from __future__ import annotations

import threading
import time
from typing import Any

__all__ = ["NixlSide", "nixl_api"]


def nixl_api() -> Any | None:
    """NIXL's Python API module, or ``None`` where neither ``nixl`` nor ``nixl-cu12`` is installed."""
    for name in ("nixl._api", "nixl_cu12._api"):
        try:
            return __import__(name, fromlist=["nixl_agent"])
        except ImportError:
            continue
    return None


class NixlSide:
    """One NIXL agent over a registered host buffer. ``serve()`` progresses it on a thread (the READ target's side)."""

    def __init__(self, name: str, address: int, nbytes: int) -> None:
        api = nixl_api()
        if api is None:
            raise ImportError("NIXL is not installed (pip install nixl-cu12)")
        config = api.nixl_agent_config(enable_prog_thread=False, backends=["UCX"])
        self.agent = api.nixl_agent(name, config)
        self.address, self.nbytes = address, nbytes
        self.registration = self.agent.register_memory([(address, nbytes, 0, "")], "DRAM")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last = (0.0, 0.0)

    def metadata(self) -> bytes:
        return bytes(self.agent.get_agent_metadata())

    def serve(self) -> None:
        """Progress the agent on a thread (1 ms polls) until :meth:`close`."""

        def loop() -> None:
            while not self._stop.is_set():
                self.agent.get_new_notifs()
                time.sleep(0.001)

        self._thread = threading.Thread(target=loop, name="nixl-progress", daemon=True)
        self._thread.start()

    def add_peer(self, metadata: bytes) -> str:
        name = self.agent.add_remote_agent(metadata)
        return name.decode() if isinstance(name, bytes) else str(name)

    def read(self, peer: str, remote_base: int, pages: list[tuple[int, int]], page_bytes: int) -> float:
        """READ ``(remote offset, local offset)`` pages of ``page_bytes`` from ``peer``; blocks until done and
        returns the seconds it took (descriptor preparation included, as vLLM pays it per request)."""
        start = time.perf_counter()
        remote = [(remote_base + r, page_bytes, 0) for r, _ in pages]
        local = [(self.address + loc, page_bytes, 0) for _, loc in pages]
        remote_side = self.agent.prep_xfer_dlist(peer, remote, "DRAM")
        local_side = self.agent.prep_xfer_dlist("NIXL_INIT_AGENT", local, "DRAM")
        indices = list(range(len(pages)))
        handle = self.agent.make_prepped_xfer("READ", local_side, indices, remote_side, indices)
        posted = time.perf_counter()
        state = self.agent.transfer(handle)
        while state not in ("DONE", "ERR"):
            time.sleep(0.0002)  # vLLM checks once per engine step; a tight loop would starve the engine's thread
            state = self.agent.check_xfer_state(handle)
        self.agent.release_xfer_handle(handle)
        for side in (local_side, remote_side):
            release = getattr(self.agent, "release_dlist_handle", None)
            if release is not None:
                release(side)
        if state == "ERR":
            raise RuntimeError(f"NIXL READ of {len(pages)} pages from {peer} failed")
        end = time.perf_counter()
        self.last = (posted - start, end - posted)  # (descriptor preparation, transfer) seconds
        return end - start

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
