"""What sysfs says about this host: NUMA nodes, PCIe devices, network interfaces and RDMA ports.

Every reader takes the sysfs root as an argument, so tests run them on a recorded tree, and none raises:
a file that is missing or unreadable reads as unknown (None).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import msgspec

from .model import NetworkInterface, NumaNode, RdmaPort

__all__ = [
    "PciDevice",
    "measure_memory_bandwidth",
    "pcie_bandwidth_gbps",
    "read_cpu_model",
    "read_network_interfaces",
    "read_numa_nodes",
    "read_pci_devices",
    "read_rdma_ports",
]

_BDF = re.compile(r"^[0-9a-fA-F]{4,8}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$")

#: PCI class prefixes worth listing: network, display/3D, processing accelerators, co-processors.
_INTERESTING_CLASSES = ("0x02", "0x03", "0x12", "0x0b40")


class PciDevice(msgspec.Struct, frozen=True, kw_only=True):
    """A PCIe device: class and ids as sysfs prints them (``0x030200``, ``0x10de``), NUMA node, and the
    negotiated link (``link_speed`` like ``16.0 GT/s PCIe``, ``link_width`` lanes)."""

    bus_id: str
    pci_class: str
    vendor: str
    device: str
    numa_node: int | None
    link_speed: str | None
    link_width: int | None
    bandwidth_gbps: float | None


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None


def _read_int(path: Path) -> int | None:
    text = _read(path)
    try:
        return int(text, 0) if text is not None else None
    except ValueError:
        return None


def _numa(value: int | None) -> int | None:
    return value if value is not None and value >= 0 else None


def parse_cpu_list(text: str) -> list[int]:
    """``0-3,8,10-11`` → ``[0, 1, 2, 3, 8, 10, 11]`` (empty or malformed parts are skipped)."""
    cpus: list[int] = []
    for part in text.split(","):
        part = part.strip()
        low, sep, high = part.partition("-")
        if low.isdigit() and (not sep or high.isdigit()):
            cpus.extend(range(int(low), int(high if sep else low) + 1))
    return cpus


def read_numa_nodes(sys_root: Path, proc_root: Path = Path("/proc")) -> list[NumaNode]:
    """NUMA nodes from ``devices/system/node``; a kernel without NUMA reads as one node holding every CPU
    and ``/proc/meminfo``'s total."""
    nodes: list[NumaNode] = []
    base = sys_root / "devices/system/node"
    try:
        names = sorted((p.name for p in base.iterdir() if re.fullmatch(r"node\d+", p.name)), key=lambda n: int(n[4:]))
    except OSError:
        names = []
    for name in names:
        node = base / name
        cpus = parse_cpu_list(_read(node / "cpulist") or "")
        memory = 0
        meminfo = _read(node / "meminfo") or ""
        match = re.search(r"MemTotal:\s+(\d+)\s*kB", meminfo)
        if match:
            memory = int(match.group(1)) * 1024
        distances = [int(x) for x in (_read(node / "distance") or "").split() if x.isdigit()]
        nodes.append(NumaNode(id=int(name[4:]), cpus=cpus, memory_bytes=memory, distances=distances))
    if nodes:
        return nodes
    memory = 0
    match = re.search(r"MemTotal:\s+(\d+)\s*kB", _read(proc_root / "meminfo") or "")
    if match:
        memory = int(match.group(1)) * 1024
    return [NumaNode(id=0, cpus=list(range(os.cpu_count() or 1)), memory_bytes=memory, distances=[10])]


def read_cpu_model(proc_root: Path = Path("/proc")) -> str:
    """The first ``model name`` of ``/proc/cpuinfo`` (empty when there is none, as on some ARM kernels)."""
    for line in (_read(proc_root / "cpuinfo") or "").splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model"):
            return value.strip()
    return ""


def pcie_bandwidth_gbps(link_speed: str | None, link_width: int | None) -> float | None:
    """One direction of a PCIe link in GB/s from sysfs's ``current_link_speed`` (``16.0 GT/s PCIe``) and
    width, after line coding (8b/10b up to 5 GT/s, 128b/130b from 8 GT/s; Gen6's FLIT taken as 1:1)."""
    if not link_speed or not link_width:
        return None
    match = re.match(r"\s*([\d.]+)\s*GT/s", link_speed)
    if not match:
        return None
    rate = float(match.group(1))
    coding = 0.8 if rate <= 5.0 else (128 / 130 if rate < 64 else 1.0)
    return round(rate * coding * link_width / 8, 2)


def _bus_id_of(path: Path) -> str | None:
    """The PCI address of the device at ``path`` or of its nearest PCI ancestor (a virtio NIC hangs below
    its PCI function)."""
    try:
        parts = Path(os.path.realpath(path)).parts
    except OSError:
        return None
    for part in reversed(parts):
        if _BDF.match(part):
            return part.lower()
    return None


def read_pci_devices(sys_root: Path) -> list[PciDevice]:
    """Network, display, accelerator and co-processor functions from ``bus/pci/devices``."""
    devices: list[PciDevice] = []
    base = sys_root / "bus/pci/devices"
    try:
        entries = sorted(base.iterdir())
    except OSError:
        return devices
    for entry in entries:
        pci_class = _read(entry / "class") or ""
        if not pci_class.startswith(_INTERESTING_CLASSES):
            continue
        speed = _read(entry / "current_link_speed")
        width = _read_int(entry / "current_link_width")
        devices.append(
            PciDevice(
                bus_id=entry.name.lower(),
                pci_class=pci_class,
                vendor=_read(entry / "vendor") or "",
                device=_read(entry / "device") or "",
                numa_node=_numa(_read_int(entry / "numa_node")),
                link_speed=speed,
                link_width=width,
                bandwidth_gbps=pcie_bandwidth_gbps(speed, width),
            )
        )
    return devices


def _pci_numa(sys_root: Path, bus_id: str | None) -> int | None:
    return _numa(_read_int(sys_root / "bus/pci/devices" / bus_id / "numa_node")) if bus_id else None


def read_network_interfaces(sys_root: Path) -> list[NetworkInterface]:
    """Interfaces of ``class/net`` except loopback. ``virtual``: no backing device (veth, bridges, ifb)."""
    out: list[NetworkInterface] = []
    base = sys_root / "class/net"
    try:
        entries = sorted(base.iterdir())
    except OSError:
        return out
    rdma_by_netdev = {port.netdev: port.device for port in read_rdma_ports(sys_root) if port.netdev}
    for entry in entries:
        if entry.name == "lo" or (_read_int(entry / "type") or 1) == 772:  # ARPHRD_LOOPBACK
            continue
        device = entry / "device"
        virtual = not device.exists()
        bus_id = None if virtual else _bus_id_of(device)
        driver = ""
        if not virtual:
            try:
                driver = Path(os.readlink(device / "driver")).name
            except OSError:
                driver = ""
        speed = _read_int(entry / "speed")
        out.append(
            NetworkInterface(
                name=entry.name,
                driver=driver,
                operstate=_read(entry / "operstate") or "unknown",
                speed_mbps=speed if speed is not None and speed > 0 else None,
                mtu=_read_int(entry / "mtu") or 0,
                numa_node=_numa(_read_int(device / "numa_node")) if not virtual else None,
                pci_bus_id=bus_id,
                virtual=virtual,
                rdma_device=rdma_by_netdev.get(entry.name),
            )
        )
    return [
        nic
        if nic.numa_node is not None or nic.pci_bus_id is None
        else msgspec.structs.replace(nic, numa_node=_pci_numa(sys_root, nic.pci_bus_id))
        for nic in out
    ]


def read_rdma_ports(sys_root: Path) -> list[RdmaPort]:
    """Ports of ``class/infiniband`` devices (InfiniBand and RoCE alike; ``link_layer`` tells which)."""
    out: list[RdmaPort] = []
    base = sys_root / "class/infiniband"
    try:
        devices = sorted(base.iterdir())
    except OSError:
        return out
    for dev in devices:
        bus_id = _bus_id_of(dev / "device")
        numa = _numa(_read_int(dev / "device/numa_node"))
        try:
            netdevs = sorted(p.name for p in (dev / "device/net").iterdir())
        except OSError:
            netdevs = []
        try:
            ports = sorted((p for p in (dev / "ports").iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
        except OSError:
            ports = []
        for i, port in enumerate(ports):
            rate = re.match(r"\s*([\d.]+)\s*Gb/sec", _read(port / "rate") or "")
            out.append(
                RdmaPort(
                    device=dev.name,
                    port=int(port.name),
                    state=_read(port / "state") or "unknown",
                    rate_gbps=float(rate.group(1)) if rate else 0.0,
                    link_layer=_read(port / "link_layer") or "InfiniBand",
                    numa_node=numa,
                    pci_bus_id=bus_id,
                    netdev=netdevs[i] if i < len(netdevs) else (netdevs[0] if netdevs else None),
                )
            )
    return out


def measure_memory_bandwidth(nbytes: int = 16 << 20, repeats: int = 3) -> float:
    """One-thread memory copy speed in GB/s (best of ``repeats`` copies of ``nbytes``): what shared memory
    between two processes of this host can reach at most. Takes a few milliseconds."""
    src = bytearray(nbytes)
    dst = bytearray(nbytes)
    dst[:] = src  # touch both before timing
    view_src, view_dst = memoryview(src), memoryview(dst)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        view_dst[:] = view_src
        best = min(best, time.perf_counter() - start)
    return round(nbytes / best / 1e9, 2) if best > 0 else 0.0
