"""Emulated hosts for many-host tests and benchmarks: network namespaces on one bridge, each host's link shaped.

    with EmulatedHosts(8, rate_gbit=10) as hosts:      # root and iproute2; HostsUnavailable otherwise
        hosts.run(3, ["sage-transport", "serve", ...])   # a command inside host 3's namespace
        hosts.ip(3)                                     # its address; hosts.bridge_ip is the root namespace's

Host ``i`` is namespace ``sgh<tag>i`` with one veth pair: ``h<tag>i`` inside (address ``10.N.0.(i+2)/24``),
``b<tag>i`` on the bridge ``br<tag>`` (``10.N.0.1/24``, where an etcd for all of them can listen). With
``rate_gbit``, ``tc tbf`` shapes both directions of every host's link (the veth end inside, what the host
sends; the end on the bridge, what it receives), so fan-out is bound by the sender's link and fan-in by the
receiver's, as on a switch; ``queue_ms`` is how long a packet may wait in a link's queue (a switch port's
buffer: bytes queued behind it delay what comes after). Everything is removed on exit, also after a failure.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Sequence
from types import TracebackType
from typing import Any

__all__ = ["EmulatedHosts", "HostsUnavailable", "stop_processes"]


class HostsUnavailable(RuntimeError):
    """Namespaces cannot be made here (not root, no iproute2, or the kernel refused)."""


def _run(*command: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise HostsUnavailable(f"{' '.join(command)}: {done.stderr.strip() or done.returncode}")


class EmulatedHosts:
    """``count`` hosts on one bridge (see the module docstring)."""

    def __init__(self, count: int, *, rate_gbit: float | None = None, burst_kib: int = 1024, queue_ms: float = 50.0) -> None:
        if not 1 <= count <= 200:
            raise ValueError(f"count={count} must be in 1..200")
        if shutil.which("ip") is None or (rate_gbit is not None and shutil.which("tc") is None):
            raise HostsUnavailable("emulated hosts need iproute2 (ip, and tc to shape links)")
        self.count, self.rate_gbit, self.burst_kib, self.queue_ms = count, rate_gbit, burst_kib, queue_ms
        tag = uuid.uuid4().hex[:5]
        self.tag = tag
        self.subnet = 10 + int(tag[:2], 16) % 200
        self.bridge = f"br{tag}"
        self.bridge_ip = f"10.{self.subnet}.0.1"
        self.namespaces = [f"sgh{tag}{i}" for i in range(count)]

    def ip(self, host: int) -> str:
        return f"10.{self.subnet}.0.{host + 2}"

    def prefix(self, host: int) -> list[str]:
        """The command prefix that runs a command on ``host``."""
        return ["ip", "netns", "exec", self.namespaces[host]]

    def run(self, host: int, command: Sequence[str], **popen: Any) -> subprocess.Popen[Any]:
        """Start ``command`` on ``host`` (``subprocess.Popen`` options as given)."""
        return subprocess.Popen([*self.prefix(host), *command], **popen)

    def __enter__(self) -> EmulatedHosts:
        try:
            _run("ip", "link", "add", self.bridge, "type", "bridge")
            _run("ip", "addr", "add", f"{self.bridge_ip}/24", "dev", self.bridge)
            _run("ip", "link", "set", self.bridge, "up")
            for i, ns in enumerate(self.namespaces):
                inside, outside = f"h{self.tag}{i}", f"b{self.tag}{i}"
                _run("ip", "netns", "add", ns)
                _run("ip", "link", "add", inside, "type", "veth", "peer", "name", outside)
                _run("ip", "link", "set", inside, "netns", ns)
                _run("ip", "link", "set", outside, "master", self.bridge)
                _run("ip", "link", "set", outside, "up")
                _run("ip", "-n", ns, "addr", "add", f"{self.ip(i)}/24", "dev", inside)
                _run("ip", "-n", ns, "link", "set", inside, "up")
                _run("ip", "-n", ns, "link", "set", "lo", "up")
                if self.rate_gbit is not None:
                    rate, burst, queue = f"{self.rate_gbit}gbit", f"{self.burst_kib}kb", f"{self.queue_ms}ms"
                    shape = ["tbf", "rate", rate, "burst", burst, "latency", queue]
                    _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", inside, "root", *shape)
                    _run("tc", "qdisc", "add", "dev", outside, "root", *shape)
        except BaseException:
            self._remove()
            raise
        return self

    def _remove(self) -> None:
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # takes its veth end and the peer
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._remove()


def stop_processes(procs: Sequence[subprocess.Popen[Any]], timeout_s: float = 20.0) -> None:
    """SIGTERM every process still running (a serve withdraws its registration then), SIGKILL those that outlast
    ``timeout_s``, and close their pipes."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
