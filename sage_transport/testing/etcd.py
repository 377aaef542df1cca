"""A real etcd for tests and benchmarks: ``etcd`` (Debian's ``etcd-server``, 3.4) on free ports in a temporary
data directory, started and stopped by the caller.

    with EtcdServer() as etcd:        # raises EtcdUnavailable where the binary is absent
        store = open_store(etcd.url)
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from types import TracebackType

__all__ = ["EtcdServer", "EtcdUnavailable", "etcd_binary", "registered_serves"]


class EtcdUnavailable(RuntimeError):
    """No ``etcd`` binary here (install Debian's ``etcd-server``), or it did not start."""


def etcd_binary() -> str | None:
    return shutil.which("etcd")


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class EtcdServer:
    """One etcd member listening on ``host`` (loopback by default; a bridge's address to serve network
    namespaces); ``url`` is what ``open_store`` takes."""

    def __init__(self, host: str = "127.0.0.1", *, start_timeout_s: float = 20.0) -> None:
        binary = etcd_binary()
        if binary is None:
            raise EtcdUnavailable("no etcd binary on PATH (Debian: apt-get install etcd-server)")
        self.host = host
        self.client_port, self.peer_port = _free_port(host), _free_port(host)
        self.url = f"etcd://{host}:{self.client_port}"
        self._binary, self._start_timeout_s = binary, start_timeout_s
        self._data: str | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> EtcdServer:
        self._data = tempfile.mkdtemp(prefix="sage-etcd-")
        client, peer = f"http://{self.host}:{self.client_port}", f"http://{self.host}:{self.peer_port}"
        command = [
            self._binary, "--name", "sage-test", "--data-dir", self._data,
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"sage-test={peer}", "--log-level", "error",
        ]  # fmt: skip
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + self._start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = (self.proc.stderr.read() if self.proc.stderr else b"").decode(errors="replace")[-500:]
                self.stop()
                raise EtcdUnavailable(f"etcd exited with {self.proc.returncode if self.proc else '?'}: {err}")
            if self.healthy():
                return self
            time.sleep(0.05)
        self.stop()
        raise EtcdUnavailable(f"etcd did not become healthy on {client} within {self._start_timeout_s:g} s")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.host}:{self.client_port}/health", timeout=1) as reply:
                return bool(json.loads(reply.read()).get("health") == "true")
        except (OSError, ValueError):
            return False

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc is not None and proc.stderr is not None:
            proc.stderr.close()
        data, self._data = self._data, None
        if data is not None:
            shutil.rmtree(data, ignore_errors=True)

    def __enter__(self) -> EtcdServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def registered_serves(url: str) -> dict[str, str]:
    """``{name: address}`` of the ``sage-transport serve --store`` instances registered at ``url`` now (from
    synchronous code: a loop of its own)."""
    import asyncio

    from ..rendezvous import SERVE_PREFIX, current_members, open_store

    async def read() -> dict[str, str]:
        store = open_store(url)
        try:
            return await current_members(store, SERVE_PREFIX)
        finally:
            await store.close()

    return asyncio.run(read())
