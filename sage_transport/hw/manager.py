"""``TopologyManager``: run every probe (sysfs, NVML, vendor tools) and assemble a :class:`TopologyInfo`.

Probing never raises: a probe that finds nothing reports ``available=False`` and why. Vendor tools run in
parallel threads with a deadline each; on a host without accelerators no tool is found and the whole probe
is sysfs reads plus a few-millisecond memory copy.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgspec

from .amd import amd_smi_probe, rocm_smi_probe
from .domestic import ascend_probe, cambricon_probe, hygon_probe, kunlunxin_probe
from .host import (
    PciDevice,
    measure_memory_bandwidth,
    parse_cpu_list,
    read_cpu_model,
    read_network_interfaces,
    read_numa_nodes,
    read_pci_devices,
    read_rdma_ports,
)
from .matrix import NOMINAL_PCIE_GBPS
from .model import (
    NOMINAL_LATENCY_US,
    Device,
    DeviceKind,
    Link,
    LinkKind,
    NetworkInterface,
    NumaNode,
    ProbeStatus,
    RdmaPort,
    VendorResult,
)
from .nvidia import load_nvml, nvidia_smi_probe, probe_nvml
from .topology import FABRIC, Route, TopologyInfo
from .vendors import ProbeEnv, ToolProbe

__all__ = ["VendorProbe", "TopologyManager", "default_vendor_probes"]

#: Kernel modules that change what a transport can do: GPUDirect RDMA, single-copy shared memory, verbs.
_MODULES = ("nvidia_peermem", "nv_peer_mem", "amdgpu_peermem", "xpmem", "knem", "ib_uverbs")

#: A vendor probe: name and a function of the environment returning its status and result.
VendorProbe = tuple[str, Callable[[ProbeEnv], tuple[ProbeStatus, VendorResult]]]


def _first_found(name: str, *probes: ToolProbe) -> VendorProbe:
    """Try tools in order (e.g. amd-smi, then rocm-smi) and report the first one found."""

    def run(env: ProbeEnv) -> tuple[ProbeStatus, VendorResult]:
        for probe in probes:
            if env.which(probe.tool):
                return probe.probe(env)
        tools = " or ".join(p.tool for p in probes)
        return ProbeStatus(name=name, available=False, reason=f"{tools} not found on PATH"), VendorResult()

    return name, run


def _nvidia(env: ProbeEnv) -> tuple[ProbeStatus, VendorResult]:
    """NVML where nvidia-ml-py is installed, else ``nvidia-smi topo -m`` where that tool is."""
    if load_nvml(env) is None and env.which("nvidia-smi"):
        return nvidia_smi_probe().probe(env)
    return probe_nvml(env)


def default_vendor_probes() -> list[VendorProbe]:
    """NVIDIA (NVML, else nvidia-smi), AMD (amd-smi, else rocm-smi), Ascend, Cambricon, Hygon, Kunlunxin."""
    return [
        ("nvidia", _nvidia),
        _first_found("amd", amd_smi_probe(), rocm_smi_probe()),
        _first_found("ascend", ascend_probe()),
        _first_found("cambricon", cambricon_probe()),
        _first_found("hygon", hygon_probe()),
        _first_found("kunlunxin", kunlunxin_probe()),
    ]


class TopologyManager:
    """Probes this host. ``env`` points probes at other sysfs/procfs roots and tools (tests);
    ``vendors=()`` skips accelerator probes; ``measure_memory=False`` skips the memory-copy timing."""

    def __init__(
        self, env: ProbeEnv | None = None, *, vendors: Sequence[VendorProbe] | None = None, measure_memory: bool = True
    ) -> None:
        self.env = env or ProbeEnv()
        self.vendors = list(default_vendor_probes() if vendors is None else vendors)
        self.measure_memory = measure_memory

    def probe(self) -> TopologyInfo:
        start = time.perf_counter()
        env = self.env
        numa_nodes = read_numa_nodes(env.sys_root, env.proc_root)
        pci = read_pci_devices(env.sys_root)
        nics = read_network_interfaces(env.sys_root)
        rdma = read_rdma_ports(env.sys_root)
        statuses: list[ProbeStatus] = []
        results: list[VendorResult] = []
        if self.vendors:
            with ThreadPoolExecutor(max_workers=len(self.vendors), thread_name_prefix="sage-probe") as pool:
                for status, result in pool.map(lambda v: _safe(v, env), self.vendors):
                    statuses.append(status)
                    results.append(result)
        memory_gbps = measure_memory_bandwidth() if self.measure_memory else 0.0
        devices, links = _assemble(numa_nodes, pci, nics, rdma, results, memory_gbps)
        info = TopologyInfo(
            hostname=socket.gethostname(),
            boot_id=_read(env.proc_root / "sys/kernel/random/boot_id"),
            cpu_model=read_cpu_model(env.proc_root),
            cpus=sum(len(n.cpus) for n in numa_nodes) or (os.cpu_count() or 1),
            numa_nodes=numa_nodes,
            memory_bandwidth_gbps=memory_gbps,
            devices=devices,
            links=links,
            network_interfaces=nics,
            rdma_ports=rdma,
            pci_devices=pci,
            probes=statuses,
            kernel_modules=[m for m in _MODULES if (env.sys_root / "module" / m).exists()],
        )
        adjacency, routes = _adjacency_and_routes(info)
        elapsed_ms = round((time.perf_counter() - start) * 1e3, 3)
        return msgspec.structs.replace(info, adjacency=adjacency, routes=routes, elapsed_ms=elapsed_ms)


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _safe(vendor: VendorProbe, env: ProbeEnv) -> tuple[ProbeStatus, VendorResult]:
    name, run = vendor
    try:
        return run(env)
    except Exception as exc:  # a probe must never take the whole probe down
        return ProbeStatus(name=name, available=False, reason=f"probe failed: {type(exc).__name__}: {exc}"), VendorResult()


def _numa_of_cpus(cpu_list: str | None, numa_nodes: list[NumaNode]) -> int | None:
    if not cpu_list:
        return None
    first = parse_cpu_list(cpu_list)[:1]
    for node in numa_nodes:
        if first and first[0] in node.cpus:
            return int(node.id)
    return None


def _assemble(
    numa_nodes: list[NumaNode],
    pci: list[PciDevice],
    nics: list[NetworkInterface],
    rdma: list[RdmaPort],
    results: list[VendorResult],
    memory_gbps: float,
) -> tuple[list[Device], list[Link]]:
    """Devices and links of the whole host from the sysfs readings and the vendor results."""
    devices: list[Device] = []
    links: list[Link] = []
    pci_by_bus = {p.bus_id: p for p in pci}
    default_node = numa_nodes[0].id if numa_nodes else 0
    for node in numa_nodes:
        devices.append(
            Device(
                id=f"numa{node.id}",
                kind=DeviceKind.CPU,
                name=f"NUMA node {node.id}",
                index=node.id,
                numa_node=node.id,
                memory_bytes=node.memory_bytes,
                cpu_affinity=",".join(map(str, node.cpus)) if node.cpus else None,
            )
        )
    for a, b in itertools.combinations(numa_nodes, 2):
        distance = a.distances[b.id] if b.id < len(a.distances) else 20
        links.append(
            Link(
                a=f"numa{a.id}",
                b=f"numa{b.id}",
                kind=LinkKind.SHM,
                bandwidth_gbps=round((memory_gbps or 10.0) * 10 / max(distance, 10), 2),
                latency_us=round(NOMINAL_LATENCY_US[LinkKind.SHM] * distance / 10, 3),
                source="measured" if memory_gbps else "nominal",
                detail=f"SLIT distance {distance}",
            )
        )

    def attach(device_id: str, numa: int | None, bus_id: str | None) -> None:
        bandwidth = pci_by_bus[bus_id].bandwidth_gbps if bus_id in pci_by_bus else None
        links.append(
            Link(
                a=device_id,
                b=f"numa{default_node if numa is None else numa}",
                kind=LinkKind.PCIE,
                bandwidth_gbps=bandwidth or NOMINAL_PCIE_GBPS,
                latency_us=NOMINAL_LATENCY_US[LinkKind.PCIE],
                source="sysfs" if bandwidth else "nominal",
                detail=pci_by_bus[bus_id].link_speed or "" if bus_id in pci_by_bus else "",
            )
        )

    known: set[str] = {d.id for d in devices}
    for result in results:
        for device in result.devices:
            numa = device.numa_node
            if numa is None and device.pci_bus_id in pci_by_bus:
                numa = pci_by_bus[device.pci_bus_id].numa_node
            if numa is None:
                numa = _numa_of_cpus(device.cpu_affinity, numa_nodes)
            if device.id in known:
                continue
            devices.append(msgspec.structs.replace(device, numa_node=numa))
            known.add(device.id)
            attach(device.id, numa, device.pci_bus_id)
    has_network = False
    by_rdma_device: dict[str, list[RdmaPort]] = {}
    for port in rdma:
        by_rdma_device.setdefault(port.device, []).append(port)
    for name, ports in by_rdma_device.items():
        device_id = f"rdma:{name}"
        devices.append(
            Device(id=device_id, kind=DeviceKind.RDMA, name=name, numa_node=ports[0].numa_node, pci_bus_id=ports[0].pci_bus_id)
        )
        known.add(device_id)
        attach(device_id, ports[0].numa_node, ports[0].pci_bus_id)
        for port in ports:
            if not port.active or port.rate_gbps <= 0:
                continue
            kind = LinkKind.ROCE if port.link_layer.lower() == "ethernet" else LinkKind.INFINIBAND
            links.append(
                Link(
                    a=device_id,
                    b=FABRIC,
                    kind=kind,
                    bandwidth_gbps=port.rate_gbps / 8,
                    latency_us=NOMINAL_LATENCY_US[kind],
                    source="sysfs",
                    detail=f"port {port.port} {port.rate_gbps:g} Gb/s",
                )
            )
            has_network = True
    for nic in nics:
        if nic.virtual:
            continue
        device_id = f"nic:{nic.name}"
        devices.append(
            Device(
                id=device_id,
                kind=DeviceKind.NIC,
                name=nic.name,
                vendor=nic.driver,
                numa_node=nic.numa_node,
                pci_bus_id=nic.pci_bus_id,
            )
        )
        known.add(device_id)
        attach(device_id, nic.numa_node, nic.pci_bus_id)
        if nic.operstate in ("up", "unknown"):
            speed = nic.speed_mbps
            links.append(
                Link(
                    a=device_id,
                    b=FABRIC,
                    kind=LinkKind.ETHERNET,
                    bandwidth_gbps=(speed or 10_000) / 8000,
                    latency_us=NOMINAL_LATENCY_US[LinkKind.ETHERNET],
                    source="sysfs" if speed else "nominal",
                    detail=f"{speed} Mb/s" if speed else "speed not reported; 10 Gb/s assumed",
                )
            )
            has_network = True
    if has_network:
        devices.append(Device(id=FABRIC, kind=DeviceKind.SWITCH, name="the network beyond this host"))
        known.add(FABRIC)
    for result in results:
        links.extend(link for link in result.links if link.a in known and link.b in known)
    return devices, links


def _adjacency_and_routes(info: TopologyInfo) -> tuple[list[list[float]], list[Route]]:
    index = {d.id: i for i, d in enumerate(info.devices)}
    n = len(info.devices)
    adjacency = [[0.0] * n for _ in range(n)]
    for link in info.links:
        i, j = index[link.a], index[link.b]
        best = max(adjacency[i][j], link.bandwidth_gbps)
        adjacency[i][j] = adjacency[j][i] = best
    routes: list[Route] = []
    for a, b in itertools.combinations(info.devices, 2):
        try:
            routes.append(info.route(a.id, b.id))
        except ValueError:
            continue
    return adjacency, routes
