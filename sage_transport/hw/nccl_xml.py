"""Export the topology as an NCCL topology file (``NCCL_TOPO_FILE``): CPUs by NUMA node, their GPUs and
NICs by PCI address, NVLinks between GPUs. Only where GPUs are present."""

from __future__ import annotations

import platform
import xml.etree.ElementTree as ET

from .model import DeviceKind, LinkKind
from .topology import TopologyInfo

__all__ = ["to_nccl_xml"]


def to_nccl_xml(topology: TopologyInfo) -> str | None:
    """The NCCL ``<system>`` XML, or None when the topology holds no GPU."""
    gpus = [d for d in topology.devices if d.kind is DeviceKind.GPU]
    if not gpus:
        return None
    pci = {p.bus_id: p for p in topology.pci_devices}
    system = ET.Element("system", version="1")
    cpus: dict[int, ET.Element] = {}

    def cpu(node: int | None) -> ET.Element:
        node = node if node is not None else 0
        if node not in cpus:
            affinity = next((n for n in topology.numa_nodes if n.id == node), None)
            cpus[node] = ET.SubElement(
                system, "cpu", numaid=str(node), arch=platform.machine() or "x86_64",
                affinity=_mask(affinity.cpus) if affinity else "",
            )  # fmt: skip
        return cpus[node]

    by_id = {g.id: g for g in gpus}
    for rank, gpu in enumerate(sorted(gpus, key=lambda g: g.index or 0)):
        info = pci.get(gpu.pci_bus_id or "")
        attrs = {"busid": gpu.pci_bus_id or f"0000:{rank:02x}:00.0", "class": info.pci_class if info else "0x030200"}
        if info:
            attrs.update(
                vendor=info.vendor, device=info.device, link_speed=info.link_speed or "", link_width=str(info.link_width or "")
            )
        pci_el = ET.SubElement(cpu(gpu.numa_node), "pci", attrs)
        gpu_el = ET.SubElement(pci_el, "gpu", dev=str(gpu.index or 0), rank=str(rank), gdr="1")
        for link in topology.links_of(gpu.id):
            other = link.b if link.a == gpu.id else link.a
            if link.kind is LinkKind.NVLINK and other in by_id:
                count = link.detail[2:].split()[0] if link.detail.startswith("NV") else "1"
                ET.SubElement(gpu_el, "nvlink", target=by_id[other].pci_bus_id or "", count=count, tclass="0x030200")
    for port in topology.rdma_ports:
        parent = cpu(port.numa_node)
        nic = ET.SubElement(ET.SubElement(parent, "pci", {"busid": port.pci_bus_id or "", "class": "0x020700"}), "nic")
        ET.SubElement(
            nic,
            "net",
            name=port.device,
            dev=str(port.port - 1),
            speed=str(int(port.rate_gbps * 1000)),
            port=str(port.port),
            gdr="1",
        )
    ET.indent(system)
    return ET.tostring(system, encoding="unicode") + "\n"


def _mask(cpus: list[int]) -> str:
    """NCCL's affinity mask: hex words of 32 CPUs, most significant first, comma-separated."""
    if not cpus:
        return ""
    value = 0
    for c in cpus:
        value |= 1 << c
    words = []
    while value:
        words.append(f"{value & 0xFFFFFFFF:08x}")
        value >>= 32
    return ",".join(reversed(words))
