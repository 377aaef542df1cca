"""The data a topology probe produces: devices, links between them and what each probe found.

Everything here is a frozen msgspec Struct, so ``sage-transport probe --json`` is the Struct encoded as is.
Bandwidths are GB/s (10^9 bytes per second) in one direction, latencies microseconds; ``source`` says where a
figure came from (``sysfs``, ``nvml``, a vendor tool's name, ``measured`` or ``nominal``, the last being a
datasheet value for the link kind when nothing better is known).
"""

from __future__ import annotations

import enum

import msgspec

__all__ = [
    "Device",
    "DeviceKind",
    "Link",
    "LinkKind",
    "NetworkInterface",
    "NumaNode",
    "ProbeStatus",
    "RdmaPort",
    "VendorResult",
    "NOMINAL_LATENCY_US",
]


class LinkKind(str, enum.Enum):
    """How two devices are connected."""

    NVLINK = "nvlink"
    PCIE = "pcie"
    HCCS = "hccs"  # Huawei Ascend: cache-coherent NPU fabric (also its die-to-die SIO and HCCS switch)
    MLU_LINK = "mlu_link"  # Cambricon
    XGMI = "xgmi"  # AMD Infinity Fabric between GPUs, also Hygon DCU
    XPU_LINK = "xpu_link"  # Kunlunxin
    INFINIBAND = "infiniband"
    ROCE = "roce"
    ETHERNET = "ethernet"
    SHM = "shm"  # host memory: process to process on one host, across the SMP fabric between NUMA nodes


#: Typical one-way latency of a hop of each kind, µs (the figure used when the probe measures none).
NOMINAL_LATENCY_US: dict[LinkKind, float] = {
    LinkKind.NVLINK: 1.0,
    LinkKind.PCIE: 1.5,
    LinkKind.HCCS: 1.5,
    LinkKind.MLU_LINK: 2.0,
    LinkKind.XGMI: 1.5,
    LinkKind.XPU_LINK: 2.0,
    LinkKind.INFINIBAND: 2.0,
    LinkKind.ROCE: 3.0,
    LinkKind.ETHERNET: 10.0,
    LinkKind.SHM: 0.3,
}


class DeviceKind(str, enum.Enum):
    """What a topology node is: a NUMA node's CPUs and memory, an accelerator, or a network port."""

    CPU = "cpu"
    GPU = "gpu"
    NPU = "npu"
    MLU = "mlu"
    DCU = "dcu"
    XPU = "xpu"
    NIC = "nic"
    RDMA = "rdma"
    SWITCH = "switch"


class Device(msgspec.Struct, frozen=True, kw_only=True):
    """A node of the topology graph. ``id`` is unique (``numa0``, ``gpu3``, ``npu0``, ``nic:eth0``,
    ``rdma:mlx5_0:1``); ``index`` is the vendor's device index where there is one."""

    id: str
    kind: DeviceKind
    vendor: str = ""
    name: str = ""
    index: int | None = None
    numa_node: int | None = None
    pci_bus_id: str | None = None
    memory_bytes: int | None = None
    cpu_affinity: str | None = None


class Link(msgspec.Struct, frozen=True, kw_only=True):
    """A direct connection ``a`` — ``b`` (symmetric). ``hops``: switches or bridges crossed on the way;
    ``detail``: the tool's own word for it (``NV18``, ``PIX``, ``HCCS``)."""

    a: str
    b: str
    kind: LinkKind
    bandwidth_gbps: float
    latency_us: float
    hops: int = 1
    source: str = "nominal"
    detail: str = ""


class NumaNode(msgspec.Struct, frozen=True, kw_only=True):
    """A NUMA node: its CPUs, memory, and distances to every node (ACPI SLIT: 10 is local)."""

    id: int
    cpus: list[int]
    memory_bytes: int
    distances: list[int]


class NetworkInterface(msgspec.Struct, frozen=True, kw_only=True):
    """A network interface from ``/sys/class/net``. ``speed_mbps`` is None where the driver reports none
    (virtual NICs); ``rdma_device`` names the RDMA device on the same port (RoCE)."""

    name: str
    driver: str
    operstate: str
    speed_mbps: int | None
    mtu: int
    numa_node: int | None
    pci_bus_id: str | None
    virtual: bool
    rdma_device: str | None = None


class RdmaPort(msgspec.Struct, frozen=True, kw_only=True):
    """A port of an InfiniBand or RoCE device from ``/sys/class/infiniband``."""

    device: str
    port: int
    state: str
    rate_gbps: float  # signalling rate in Gb/s as the driver reports it
    link_layer: str  # "InfiniBand" or "Ethernet" (RoCE)
    numa_node: int | None
    pci_bus_id: str | None
    netdev: str | None = None

    @property
    def ucx_name(self) -> str:
        """The device as ``UCX_NET_DEVICES`` names it (``mlx5_0:1``)."""
        return f"{self.device}:{self.port}"

    @property
    def active(self) -> bool:
        return "ACTIVE" in self.state.upper()


class ProbeStatus(msgspec.Struct, frozen=True, kw_only=True):
    """What one probe found: ``available=False`` always carries the reason (tool missing, no device,
    the tool failed, its output did not parse)."""

    name: str
    available: bool
    reason: str = ""
    devices: int = 0
    links: int = 0
    elapsed_ms: float = 0.0


class VendorResult(msgspec.Struct, frozen=True, kw_only=True):
    """A vendor probe's output: its devices and the links among them (and to NUMA nodes)."""

    devices: list[Device] = []
    links: list[Link] = []
