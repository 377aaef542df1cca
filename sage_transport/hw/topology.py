"""``TopologyInfo``: the host as a graph of devices and links, with routes and transfer-cost estimates.

Nodes are NUMA nodes (``numa0``: their CPUs and memory), accelerators (``gpu0``, ``npu3``), network ports
(``nic:eth0``, ``rdma:mlx5_0``) and ``fabric``, the network beyond this host. A route is the cheapest path
for a given size (latency plus size over bandwidth, per hop); its cost is pipelined: the hops' latencies
plus the size over the narrowest hop.
"""

from __future__ import annotations

import heapq
import math

import msgspec

from ..errors import ConfigError
from .host import PciDevice
from .model import Device, DeviceKind, Link, NetworkInterface, NumaNode, ProbeStatus, RdmaPort

__all__ = ["FABRIC", "Route", "TopologyInfo"]

#: The id of the network beyond this host (every NIC and RDMA port links to it at its line rate).
FABRIC = "fabric"
_ACCELERATORS = (DeviceKind.GPU, DeviceKind.NPU, DeviceKind.MLU, DeviceKind.DCU, DeviceKind.XPU)


class Route(msgspec.Struct, frozen=True, kw_only=True):
    """The path from ``src`` to ``dst`` (device ids, both ends included), its narrowest bandwidth, summed
    latency and hops."""

    src: str
    dst: str
    path: list[str]
    bandwidth_gbps: float
    latency_us: float
    hops: int


class TopologyInfo(msgspec.Struct, frozen=True, kw_only=True):
    """Everything the probe found. ``adjacency[i][j]`` is the bandwidth (GB/s) of the fastest direct link
    between ``devices[i]`` and ``devices[j]`` (0: none); ``routes`` holds the 1 MiB route of every pair;
    ``kernel_modules`` lists the loaded modules that change what a transport can do (GPUDirect RDMA's
    ``nvidia_peermem``, ``xpmem``, ``knem``, ``ib_uverbs``)."""

    hostname: str
    boot_id: str
    cpu_model: str
    cpus: int
    numa_nodes: list[NumaNode]
    memory_bandwidth_gbps: float
    devices: list[Device]
    links: list[Link]
    network_interfaces: list[NetworkInterface]
    rdma_ports: list[RdmaPort]
    pci_devices: list[PciDevice]
    probes: list[ProbeStatus]
    kernel_modules: list[str] = []
    adjacency: list[list[float]] = []
    routes: list[Route] = []
    elapsed_ms: float = 0.0

    # ---- lookups ---------------------------------------------------------------------------------------

    def device(self, device_id: str) -> Device:
        """The device named ``device_id``; ``ConfigError`` naming the known ids if there is none."""
        for device in self.devices:
            if device.id == device_id:
                return device
        raise ConfigError(f"device={device_id!r} is not in this topology; known: {', '.join(d.id for d in self.devices)}")

    @property
    def accelerators(self) -> list[Device]:
        return [d for d in self.devices if d.kind in _ACCELERATORS]

    def links_of(self, device_id: str) -> list[Link]:
        return [link for link in self.links if device_id in (link.a, link.b)]

    # ---- routes and cost -------------------------------------------------------------------------------

    def route(self, src: str, dst: str, nbytes: int = 1 << 20) -> Route:
        """The cheapest path for ``nbytes`` from ``src`` to ``dst``. ``ConfigError`` for an unknown device,
        ``ValueError`` when no path joins them."""
        self.device(src)
        self.device(dst)
        if src == dst:
            return Route(src=src, dst=dst, path=[src], bandwidth_gbps=math.inf, latency_us=0.0, hops=0)
        graph: dict[str, list[tuple[str, Link]]] = {}
        for link in self.links:
            graph.setdefault(link.a, []).append((link.b, link))
            graph.setdefault(link.b, []).append((link.a, link))
        best: dict[str, float] = {src: 0.0}
        previous: dict[str, tuple[str, Link]] = {}
        queue: list[tuple[float, str]] = [(0.0, src)]
        while queue:
            cost, node = heapq.heappop(queue)
            if node == dst:
                break
            if cost > best.get(node, math.inf):
                continue
            for neighbour, link in graph.get(node, []):
                step = cost + link.latency_us * 1e-6 + nbytes / (link.bandwidth_gbps * 1e9)
                if step < best.get(neighbour, math.inf):
                    best[neighbour] = step
                    previous[neighbour] = (node, link)
                    heapq.heappush(queue, (step, neighbour))
        if dst not in previous:
            raise ValueError(f"no path joins {src} and {dst} in this topology")
        path, hops_links = [dst], []
        while path[-1] != src:
            node, link = previous[path[-1]]
            hops_links.append(link)
            path.append(node)
        path.reverse()
        return Route(
            src=src, dst=dst, path=path, bandwidth_gbps=min(link.bandwidth_gbps for link in hops_links),
            latency_us=round(sum(link.latency_us for link in hops_links), 3), hops=sum(link.hops for link in hops_links),
        )  # fmt: skip

    def get_communication_cost(self, src: str, dst: str, nbytes: int) -> float:
        """Estimated seconds to move ``nbytes`` from ``src`` to ``dst``: the route's latency plus ``nbytes``
        over its narrowest link. Moving within one NUMA node is a memory copy at the measured speed."""
        if nbytes < 0:
            raise ConfigError(f"nbytes={nbytes!r} must not be negative")
        if src == dst:
            self.device(src)
            if src.startswith("numa") and self.memory_bandwidth_gbps > 0:
                return nbytes / (self.memory_bandwidth_gbps * 1e9)
            return 0.0
        route = self.route(src, dst, nbytes)
        return route.latency_us * 1e-6 + nbytes / (route.bandwidth_gbps * 1e9)
