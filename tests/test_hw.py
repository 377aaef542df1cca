"""Topology probe: vendor parsers on recorded outputs, sysfs readers on a built tree, the assembled graph,
routes and costs, the NCCL export, the transport profile and the recommendation."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from sage_transport.config import KVTransportConfig
from sage_transport.errors import ConfigError
from sage_transport.hw import (
    FABRIC,
    LinkKind,
    ProbeEnv,
    TopologyManager,
    TransportProfile,
    default_vendor_probes,
    recommend_preset,
    to_nccl_xml,
)
from sage_transport.hw.amd import parse_amd_smi_topology, parse_rocm_showtopo
from sage_transport.hw.domestic import (
    ascend_probe,
    parse_cnmon_topo,
    parse_hy_smi_showtopo,
    parse_npu_smi_topo,
    parse_xpu_smi_topo,
)
from sage_transport.hw.host import parse_cpu_list, pcie_bandwidth_gbps
from sage_transport.hw.model import DeviceKind
from sage_transport.hw.nvidia import NVML_MISSING, parse_nvidia_smi_topo, probe_nvml
from sage_transport.hw.vendors import ToolError

FIXTURES = Path(__file__).parent / "fixtures" / "hw"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def kinds(result: Any) -> dict[frozenset[str], Any]:
    return {frozenset((link.a, link.b)): link for link in result.links}


# ---- vendor parsers ---------------------------------------------------------------------------------------


def test_nvidia_smi_matrix_gives_nvlinks_pcie_paths_and_nic_affinity() -> None:
    result = parse_nvidia_smi_topo(fixture("nvidia_smi_topo_m_h100.txt"))
    assert [d.id for d in result.devices] == ["gpu0", "gpu1", "gpu2", "gpu3"]
    assert [d.numa_node for d in result.devices] == [0, 0, 1, 1]
    assert result.devices[2].cpu_affinity == "48-95,144-191"
    links = kinds(result)
    nv = links[frozenset(("gpu0", "gpu3"))]
    assert (nv.kind, nv.bandwidth_gbps, nv.detail) == (LinkKind.NVLINK, 18 * 25.0, "NV18")
    assert links[frozenset(("gpu0", "rdma:mlx5_0"))].detail == "PIX"
    assert links[frozenset(("gpu1", "rdma:mlx5_0"))].hops == 2  # PXB
    far = links[frozenset(("gpu0", "rdma:mlx5_1"))]
    assert (far.detail, far.hops) == ("SYS", 4)
    assert len(result.links) == 6 + 8  # every GPU pair once, every GPU-NIC pair once, no NIC-NIC link


def test_npu_smi_topo_gives_hccs_full_mesh() -> None:
    result = parse_npu_smi_topo(fixture("npu_smi_info_t_topo_910b.txt"))
    assert [d.kind for d in result.devices] == [DeviceKind.NPU] * 8
    assert len(result.links) == 28 and {link.kind for link in result.links} == {LinkKind.HCCS}
    assert kinds(result)[frozenset(("npu0", "npu7"))].bandwidth_gbps == 56.0
    assert result.devices[7].cpu_affinity == "72-95"


def test_npu_smi_topo_without_hccs_gives_pcie_paths() -> None:
    links = kinds(parse_npu_smi_topo(fixture("npu_smi_info_t_topo_310p.txt")))
    assert links[frozenset(("npu0", "npu1"))].detail == "PIX"
    assert links[frozenset(("npu2", "npu3"))].detail == "PHB"
    assert links[frozenset(("npu0", "npu2"))].kind is LinkKind.PCIE
    assert links[frozenset(("npu0", "npu2"))].bandwidth_gbps < links[frozenset(("npu0", "npu1"))].bandwidth_gbps


def test_cnmon_topo_gives_mlu_links_with_port_counts() -> None:
    result = parse_cnmon_topo(fixture("cnmon_topo_m_mlu370.txt"))
    links = kinds(result)
    assert links[frozenset(("mlu0", "mlu2"))].kind is LinkKind.MLU_LINK
    assert links[frozenset(("mlu0", "mlu2"))].bandwidth_gbps == 2 * 25.0
    assert links[frozenset(("mlu0", "mlu3"))].kind is LinkKind.PCIE
    assert links[frozenset(("mlu2", "mlu3"))].detail == "PHB"


def test_xpu_smi_topo_gives_xpu_links_and_numa_affinity() -> None:
    result = parse_xpu_smi_topo(fixture("xpu_smi_topo_m_p800.txt"))
    assert [d.numa_node for d in result.devices] == [0, 0, 1, 1]
    links = kinds(result)
    assert links[frozenset(("xpu0", "xpu1"))].kind is LinkKind.XPU_LINK
    assert links[frozenset(("xpu0", "xpu1"))].bandwidth_gbps == 100.0
    assert links[frozenset(("xpu2", "xpu3"))].detail == "SYS"


def test_rocm_smi_showtopo_gives_xgmi_and_numa_nodes() -> None:
    result = parse_rocm_showtopo(fixture("rocm_smi_showtopo_mi300x.txt"))
    assert [(d.id, d.numa_node) for d in result.devices] == [("gpu0", 0), ("gpu1", 0), ("gpu2", 1), ("gpu3", 1)]
    assert len(result.links) == 6 and {link.kind for link in result.links} == {LinkKind.XGMI}


def test_amd_smi_topology_reads_link_types_and_numa_bandwidth() -> None:
    result = parse_amd_smi_topology(fixture("amd_smi_topology_mi300x.txt"))
    assert [d.pci_bus_id for d in result.devices] == ["0000:0c:00.0", "0000:22:00.0", "0000:38:00.0"]
    link = kinds(result)[frozenset(("gpu0", "gpu2"))]
    assert (link.kind, link.bandwidth_gbps) == (LinkKind.XGMI, 64.0)


def test_hy_smi_showtopo_gives_dcus_with_xgmi_pairs_and_pcie_between_pairs() -> None:
    result = parse_hy_smi_showtopo(fixture("hy_smi_showtopo_k100.txt"))
    assert [d.kind for d in result.devices] == [DeviceKind.DCU] * 4
    links = kinds(result)
    assert links[frozenset(("dcu0", "dcu1"))].kind is LinkKind.XGMI
    cross = links[frozenset(("dcu1", "dcu2"))]
    assert (cross.kind, cross.hops) == (LinkKind.PCIE, 2)


@pytest.mark.parametrize(
    "parse",
    [
        parse_nvidia_smi_topo,
        parse_npu_smi_topo,
        parse_cnmon_topo,
        parse_xpu_smi_topo,
        parse_rocm_showtopo,
        parse_amd_smi_topology,
    ],
)
def test_parsers_reject_output_without_a_topology(parse: Any) -> None:
    with pytest.raises(ValueError):
        parse("No devices were found\n")


# ---- probes never raise -----------------------------------------------------------------------------------


def _env(tmp_path: Path, tools: dict[str, str | Exception] | None = None, nvml: object | None = None) -> ProbeEnv:
    tools = tools or {}

    def which(name: str) -> str | None:
        return f"/usr/bin/{name}" if name in tools else None

    def run(argv: Sequence[str]) -> str:
        out = tools[Path(argv[0]).name]
        if isinstance(out, Exception):
            raise out
        return out

    return ProbeEnv(sys_root=tmp_path / "sys", proc_root=tmp_path / "proc", which=which, run=run, nvml=nvml or _NoNvml())


class _NoNvml:
    def nvmlInit(self) -> None:
        raise RuntimeError("NVML Shared Library Not Found")


def test_a_missing_tool_a_failing_tool_and_garbage_each_say_why(tmp_path: Path) -> None:
    probe = ascend_probe()
    status, result = probe.probe(_env(tmp_path))
    assert not status.available and "npu-smi not found" in status.reason and not result.devices
    status, _ = probe.probe(_env(tmp_path, {"npu-smi": ToolError("`npu-smi info -t topo` exited with status 9: dcmi error")}))
    assert not status.available and "dcmi error" in status.reason
    status, _ = probe.probe(_env(tmp_path, {"npu-smi": "garbage\n"}))
    assert not status.available and "understands" in status.reason


def test_a_probe_that_crashes_is_reported_and_the_rest_of_the_topology_stands(tmp_path: Path) -> None:
    make_sysfs(tmp_path)

    def broken(env: ProbeEnv) -> Any:
        raise KeyError("boom")

    info = TopologyManager(_env(tmp_path), vendors=[("broken", broken)], measure_memory=False).probe()
    assert info.probes[0].name == "broken" and not info.probes[0].available and "boom" in info.probes[0].reason
    assert [n.id for n in info.numa_nodes] == [0, 1]


def test_nothing_found_on_an_empty_host_says_why_for_every_vendor(tmp_path: Path) -> None:
    info = TopologyManager(_env(tmp_path), measure_memory=False).probe()
    assert {p.name for p in info.probes} == {"nvidia", "amd", "ascend", "cambricon", "hygon", "kunlunxin"}
    assert all(not p.available and p.reason for p in info.probes)
    assert len(info.numa_nodes) == 1  # no sysfs NUMA tree: one node with every CPU
    assert len(default_vendor_probes()) == 6


# ---- sysfs ------------------------------------------------------------------------------------------------


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def make_sysfs(root: Path) -> None:
    """Two NUMA nodes; an Ethernet NIC and two InfiniBand HCAs (one per node) on PCIe; a veth."""
    sys = root / "sys"
    for node, cpus in ((0, "0-3"), (1, "4-7")):
        base = sys / f"devices/system/node/node{node}"
        _write(base / "cpulist", cpus)
        _write(base / "meminfo", f"Node {node} MemTotal:       65536000 kB")
        _write(base / "distance", "10 21" if node == 0 else "21 10")
    pci = sys / "devices/pci0000:00"
    for bus, cls, vendor, node, speed in (
        ("0000:17:00.0", "0x020700", "0x15b3", 0, "16.0 GT/s PCIe"),
        ("0000:98:00.0", "0x020700", "0x15b3", 1, "16.0 GT/s PCIe"),
        ("0000:03:00.0", "0x020000", "0x8086", 0, "8.0 GT/s PCIe"),
        ("0000:18:00.0", "0x030200", "0x10de", 0, "32.0 GT/s PCIe"),
        ("0000:05:00.0", "0x060400", "0x8086", 0, "8.0 GT/s PCIe"),  # a bridge: not listed
    ):
        dev = pci / bus
        _write(dev / "class", cls)
        _write(dev / "vendor", vendor)
        _write(dev / "device", "0x1021")
        _write(dev / "numa_node", str(node))
        _write(dev / "current_link_speed", speed)
        _write(dev / "current_link_width", "16")
        link = sys / "bus/pci/devices" / bus
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(dev)
    drivers = sys / "bus/pci/drivers"
    for name in ("ice", "mlx5_core"):
        (drivers / name).mkdir(parents=True, exist_ok=True)
    nic = sys / "class/net/ens1"
    nic.mkdir(parents=True)
    (nic / "device").symlink_to(pci / "0000:03:00.0")
    (pci / "0000:03:00.0/driver").symlink_to(drivers / "ice")
    _write(nic / "speed", "100000")
    _write(nic / "operstate", "up")
    _write(nic / "mtu", "9000")
    _write(nic / "type", "1")
    veth = sys / "class/net/veth0"
    _write(veth / "operstate", "up")
    _write(veth / "speed", "10000")
    _write(veth / "mtu", "1500")
    lo = sys / "class/net/lo"
    _write(lo / "type", "772")
    _write(lo / "operstate", "unknown")
    for i, bus in enumerate(("0000:17:00.0", "0000:98:00.0")):
        hca = sys / f"class/infiniband/mlx5_{i}"
        hca.mkdir(parents=True)
        (hca / "device").symlink_to(pci / bus)
        _write(hca / "ports/1/state", "4: ACTIVE")
        _write(hca / "ports/1/rate", "200 Gb/sec (4X HDR)")
        _write(hca / "ports/1/link_layer", "InfiniBand")
        _write(pci / bus / f"net/ib{i}/operstate", "up")
    _write(sys / "module/nvidia_peermem/refcnt", "0")
    _write(root / "proc/sys/kernel/random/boot_id", "0e0e9a2d-test")
    _write(root / "proc/cpuinfo", "processor\t: 0\nmodel name\t: Test CPU @ 3.0GHz")


def test_sysfs_readers_find_numa_nodes_nics_rdma_ports_and_pci_links(tmp_path: Path) -> None:
    make_sysfs(tmp_path)
    info = TopologyManager(_env(tmp_path), vendors=(), measure_memory=False).probe()
    assert [(n.id, n.cpus, n.distances) for n in info.numa_nodes] == [(0, [0, 1, 2, 3], [10, 21]), (1, [4, 5, 6, 7], [21, 10])]
    assert info.cpus == 8 and info.cpu_model == "Test CPU @ 3.0GHz" and info.boot_id == "0e0e9a2d-test"
    ens1 = next(n for n in info.network_interfaces if n.name == "ens1")
    assert (ens1.driver, ens1.speed_mbps, ens1.numa_node, ens1.virtual, ens1.mtu) == ("ice", 100000, 0, False, 9000)
    assert next(n for n in info.network_interfaces if n.name == "veth0").virtual
    assert "lo" not in {n.name for n in info.network_interfaces}
    ports = {p.ucx_name: p for p in info.rdma_ports}
    assert set(ports) == {"mlx5_0:1", "mlx5_1:1"}
    assert ports["mlx5_1:1"].numa_node == 1 and ports["mlx5_1:1"].rate_gbps == 200 and ports["mlx5_1:1"].active
    assert ports["mlx5_0:1"].netdev == "ib0"
    assert {p.bus_id for p in info.pci_devices} == {"0000:17:00.0", "0000:98:00.0", "0000:03:00.0", "0000:18:00.0"}
    assert "nvidia_peermem" in info.kernel_modules


def test_pcie_and_cpu_list_helpers() -> None:
    assert pcie_bandwidth_gbps("16.0 GT/s PCIe", 16) == pytest.approx(31.51, abs=0.01)
    assert pcie_bandwidth_gbps("2.5 GT/s PCIe", 1) == pytest.approx(0.25)
    assert pcie_bandwidth_gbps("Unknown", 16) is None
    assert parse_cpu_list("0-2,8,10-11") == [0, 1, 2, 8, 10, 11]


# ---- the assembled graph ----------------------------------------------------------------------------------


class FakeNvml:
    """Two H100s on NUMA node 0, each with 18 NVLinks to NVSwitches; PCIe common ancestor: host bridge."""

    NVML_NVLINK_MAX_LINKS = 18

    def __init__(self) -> None:
        self.buses = ["00000000:18:00.0", "00000000:19:00.0"]

    def nvmlInit(self) -> None: ...

    def nvmlShutdown(self) -> None: ...

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetName(self, h: int) -> bytes:
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetPciInfo(self, h: int) -> Any:
        return SimpleNamespace(busId=self.buses[h].encode())

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        return SimpleNamespace(total=80 << 30)

    def nvmlDeviceGetNvLinkState(self, h: int, link: int) -> int:
        return 1

    def nvmlDeviceGetNvLinkRemotePciInfo(self, h: int, link: int) -> Any:
        return SimpleNamespace(busId=b"00000000:c1:00.0")  # an NVSwitch, not a GPU

    def nvmlDeviceGetNvLinkVersion(self, h: int, link: int) -> int:
        return 4

    def nvmlDeviceGetTopologyCommonAncestor(self, a: int, b: int) -> int:
        return 30


def test_nvml_probe_reads_gpus_and_nvswitch_links(tmp_path: Path) -> None:
    make_sysfs(tmp_path)
    status, result = probe_nvml(_env(tmp_path, nvml=FakeNvml()))
    assert status.available and status.devices == 2
    assert result.devices[0].pci_bus_id == "0000:18:00.0" and result.devices[0].numa_node == 0
    assert result.devices[0].memory_bytes == 80 << 30
    (link,) = result.links
    assert (link.kind, link.bandwidth_gbps, link.hops) == (LinkKind.NVLINK, 450.0, 2)
    assert "NVSwitch" in link.detail


def test_nvml_missing_driver_or_binding_is_reported_not_raised(tmp_path: Path) -> None:
    status, result = probe_nvml(_env(tmp_path))
    assert not status.available and "NVML did not start" in status.reason and not result.devices
    status, _ = probe_nvml(_env(tmp_path, nvml=NVML_MISSING))
    assert not status.available and "nvidia-ml-py is not installed" in status.reason


def gpu_host(tmp_path: Path) -> Any:
    make_sysfs(tmp_path)
    env = _env(tmp_path, {"nvidia-smi": fixture("nvidia_smi_topo_m_h100.txt")}, nvml=NVML_MISSING)
    return TopologyManager(env, measure_memory=False).probe()


def test_gpu_host_graph_has_routes_costs_and_an_adjacency_matrix(tmp_path: Path) -> None:
    info = gpu_host(tmp_path)
    nvidia = next(p for p in info.probes if p.name == "nvidia")
    assert nvidia.available and nvidia.reason == "`nvidia-smi topo -m`"  # NVML absent: the tool's matrix
    ids = [d.id for d in info.devices]
    assert {"numa0", "numa1", "gpu0", "gpu3", "rdma:mlx5_0", "rdma:mlx5_1", "nic:ens1", FABRIC} <= set(ids)
    assert "nic:veth0" not in ids
    assert info.device("gpu2").numa_node == 1
    n = len(ids)
    assert len(info.adjacency) == n and all(len(row) == n for row in info.adjacency)
    i, j = ids.index("gpu0"), ids.index("gpu1")
    assert info.adjacency[i][j] == info.adjacency[j][i] == 450.0
    # GPU 0 leaves the host through its own PCIe switch's HCA, not the far one
    route = info.route("gpu0", FABRIC)
    assert route.path == ["gpu0", "rdma:mlx5_0", FABRIC]
    assert route.bandwidth_gbps == 24.0  # the PCIe switch path (nominal Gen4 x16) is narrower than 200 Gb/s
    assert info.route("gpu2", FABRIC).path[1] == "rdma:mlx5_1"
    assert any(r.src == "gpu0" and r.dst == "gpu1" for r in info.routes)
    # costs grow with size and prefer NVLink over the network
    small, large = info.get_communication_cost("gpu0", "gpu1", 1 << 10), info.get_communication_cost("gpu0", "gpu1", 1 << 30)
    assert 0 < small < large
    assert large == pytest.approx(1e-6 + (1 << 30) / 450e9)
    assert info.get_communication_cost("gpu0", "gpu1", 1 << 30) < info.get_communication_cost("gpu0", FABRIC, 1 << 30)
    assert info.get_communication_cost("gpu0", "gpu0", 1 << 20) == 0.0
    with pytest.raises(ConfigError, match="gpu9"):
        info.get_communication_cost("gpu0", "gpu9", 1)
    with pytest.raises(ConfigError, match="nbytes"):
        info.get_communication_cost("gpu0", "gpu1", -1)


def test_nccl_xml_lists_gpus_nvlinks_and_nics_by_numa_node(tmp_path: Path) -> None:
    import xml.etree.ElementTree as ET

    info = gpu_host(tmp_path)
    root = ET.fromstring(to_nccl_xml(info) or "")
    assert root.tag == "system"
    cpus = {c.get("numaid"): c for c in root.findall("cpu")}
    assert set(cpus) == {"0", "1"}
    assert len(cpus["0"].findall("pci/gpu")) == 2 and len(cpus["1"].findall("pci/gpu")) == 2
    assert all(len(g.findall("nvlink")) == 3 for g in root.iter("gpu"))
    assert {n.get("name") for n in root.iter("net")} == {"mlx5_0", "mlx5_1"}
    assert cpus["0"].get("affinity") == "0000000f"


def test_no_nccl_xml_without_gpus(tmp_path: Path) -> None:
    make_sysfs(tmp_path)
    assert to_nccl_xml(TopologyManager(_env(tmp_path), vendors=(), measure_memory=False).probe()) is None


def test_vendor_probe_through_the_manager_attaches_devices_to_numa_nodes_by_cpu_affinity(tmp_path: Path) -> None:
    make_sysfs(tmp_path)
    text = fixture("npu_smi_info_t_topo_310p.txt").replace("0-31", "0-3").replace("32-63", "4-7")
    info = TopologyManager(_env(tmp_path, {"npu-smi": text}), measure_memory=False).probe()
    assert [d.numa_node for d in info.accelerators] == [0, 0, 1, 1]
    assert info.route("npu0", "npu1").path == ["npu0", "npu1"]


# ---- profile and recommendation ---------------------------------------------------------------------------


def test_profile_picks_rdma_rails_nearest_the_buffer_and_never_tcp_on_one_host(tmp_path: Path) -> None:
    info = gpu_host(tmp_path)
    profile = TransportProfile.derive(info, KVTransportConfig.resolve("preset=high-bw", env={}), "gpu2")
    assert profile.numa_node == 1 and profile.buffer_device == "gpu2"
    assert profile.net_devices[0] == "mlx5_1:1"  # the NUMA-local HCA first
    assert "tcp" not in profile.ucx_tls_same_host and {"sm", "cma"} <= set(profile.ucx_tls_same_host)
    # NVIDIA GPU KV moves on the device: CUDA transports for same-host peers, cuda_copy staging for remote ones
    assert {"cuda_copy", "cuda_ipc"} <= set(profile.ucx_tls_same_host) and "cuda_copy" in profile.ucx_tls_remote
    assert profile.gpu_direct_rdma is ("nvidia_peermem" in info.kernel_modules)
    assert {"rc", "ud", "dc", "tcp"} <= set(profile.ucx_tls_remote)
    assert profile.alignment == 65536
    assert profile.chunk_size == 8 << 20 and profile.window == 16
    options = profile.ucx_options(environ={})
    assert options["NET_DEVICES"].startswith("mlx5_1:1") and "cuda_copy,cuda_ipc" in options["TLS"]
    assert "TLS" not in profile.ucx_options(environ={"UCX_TLS": "tcp"})  # the user's environment wins
    cpu = TransportProfile.derive(info, KVTransportConfig(), "numa0")
    assert cpu.net_devices[0] == "mlx5_0:1" and cpu.alignment == 4096 and not cpu.gpu_direct_rdma


def test_profile_on_an_ethernet_host_leaves_devices_to_ucx_and_warns_about_tcp_only(tmp_path: Path) -> None:
    info = TopologyManager(_env(tmp_path), vendors=(), measure_memory=False).probe()
    profile = TransportProfile.derive(info, KVTransportConfig())
    assert profile.ucx_tls == ["sm", "cma", "self", "tcp"] and profile.net_devices == [] and profile.rails == 1
    assert profile.rndv_threshold is None and "RNDV_THRESH" not in profile.ucx_options(environ={})
    tuned = TransportProfile.derive(info, KVTransportConfig.from_string("ucx_rndv_threshold=64KiB,ucx_net_devices=eth1"))
    assert tuned.ucx_options(environ={})["RNDV_THRESH"] == "65536" and tuned.net_devices == ["eth1"]
    tcp_only = TransportProfile.derive(info, KVTransportConfig(ucx_tls="tcp"))
    assert tcp_only.ucx_tls == ["tcp"] and "same-host peers will use TCP" in tcp_only.warnings[0]


def test_recommendation_follows_the_hardware(tmp_path: Path) -> None:
    assert recommend_preset(gpu_host(tmp_path))[0] == "high-bw"
    empty = TopologyManager(_env(tmp_path / "bare"), vendors=(), measure_memory=False).probe()
    name, reason = recommend_preset(empty)
    assert name == "high-bw" and "loopback" in reason
    (tmp_path / "eth").mkdir()
    _write(tmp_path / "eth/sys/class/net/eth0/operstate", "up")
    _write(tmp_path / "eth/sys/class/net/eth0/speed", "25000")
    (tmp_path / "eth/sys/class/net/eth0/device").mkdir()
    name, reason = recommend_preset(TopologyManager(_env(tmp_path / "eth"), vendors=(), measure_memory=False).probe())
    assert name == "low-cost" and "eth0, 25 Gb/s" in reason


def test_this_host_probes_without_raising() -> None:
    info = TopologyManager().probe()
    assert info.numa_nodes and info.cpus >= 1 and info.elapsed_ms > 0
    assert info.memory_bandwidth_gbps > 0
    assert all(p.available or p.reason for p in info.probes)
    assert info.boot_id == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert os.cpu_count() is None or info.cpus <= (os.cpu_count() or 1) * 2


def _nvidia_gpus() -> int:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return 0


@pytest.mark.gpu
@pytest.mark.skipif(_nvidia_gpus() == 0, reason="needs an NVIDIA GPU and its NVML")
def test_real_nvml_probe_finds_the_gpus_and_exports_an_nccl_topology() -> None:
    import xml.etree.ElementTree as ET

    info = TopologyManager().probe()
    nvidia = next(p for p in info.probes if p.name == "nvidia")
    assert nvidia.available and nvidia.devices == _nvidia_gpus()
    gpus = [d for d in info.devices if d.kind is DeviceKind.GPU]
    assert gpus and all(d.pci_bus_id and d.memory_bytes for d in gpus)
    assert all(info.route(d.id, "numa0").path[-1] == "numa0" for d in gpus if d.numa_node in (None, 0))
    root = ET.fromstring(to_nccl_xml(info) or "")
    assert len(list(root.iter("gpu"))) == len(gpus)
    profile = TransportProfile.derive(info, KVTransportConfig(), gpus[0].id)
    assert {"cuda_copy", "cuda_ipc"} <= set(profile.ucx_tls_same_host) and profile.alignment == 65536  # GPU KV on the device
