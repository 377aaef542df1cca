"""NVIDIA GPUs and NVLink: NVML through ``nvidia-ml-py`` (imported lazily), else ``nvidia-smi topo -m``."""

from __future__ import annotations

import itertools
import time
from typing import Any

from .matrix import NOMINAL_PCIE_GBPS, matrix_devices, parse_connection_matrix, pcie_link
from .model import Device, DeviceKind, Link, LinkKind, ProbeStatus, VendorResult
from .vendors import ProbeEnv, ToolProbe

__all__ = ["NVLINK_GBPS_PER_LINK", "NVML_MISSING", "load_nvml", "nvidia_smi_probe", "parse_nvidia_smi_topo", "probe_nvml"]

#: Put in ``ProbeEnv.nvml`` to probe as if nvidia-ml-py were not installed (tests).
NVML_MISSING = object()

#: One direction of one NVLink, GB/s, by NVLink version (NVML's ``nvmlDeviceGetNvLinkVersion``).
NVLINK_GBPS_PER_LINK = {1: 20.0, 2: 25.0, 3: 25.0, 4: 25.0, 5: 50.0}
_NVML_LEVEL_WORD = {0: "PIX", 10: "PIX", 20: "PXB", 30: "PHB", 40: "NODE", 50: "SYS"}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _bus_id(value: Any) -> str:
    """NVML prints ``00000000:17:00.0``; sysfs names it ``0000:17:00.0``."""
    text = _text(value).strip().lower()
    domain, _, rest = text.partition(":")
    return f"{int(domain, 16):04x}:{rest}" if rest else text


def _numa_of(env: ProbeEnv, bus_id: str) -> int | None:
    try:
        node = int((env.sys_root / "bus/pci/devices" / bus_id / "numa_node").read_text().strip())
    except (OSError, ValueError):
        return None
    return node if node >= 0 else None


def load_nvml(env: ProbeEnv) -> Any:
    """The NVML binding: ``env.nvml`` if set, else ``pynvml`` from nvidia-ml-py; None when not installed."""
    if env.nvml is NVML_MISSING:
        return None
    if env.nvml is not None:
        return env.nvml
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        return None
    return pynvml


def probe_nvml(env: ProbeEnv) -> tuple[ProbeStatus, VendorResult]:
    """GPUs, NVLinks (direct or through NVSwitch) and PCIe paths between GPUs from NVML."""
    start = time.perf_counter()

    def status(available: bool, reason: str, result: VendorResult | None = None) -> ProbeStatus:
        return ProbeStatus(
            name="nvidia", available=available, reason=reason,
            devices=len(result.devices) if result else 0, links=len(result.links) if result else 0,
            elapsed_ms=round((time.perf_counter() - start) * 1e3, 3),
        )  # fmt: skip

    nvml = load_nvml(env)
    if nvml is None:
        return status(False, "nvidia-ml-py is not installed (pip install 'sage-transport[nvidia]')"), VendorResult()
    try:
        nvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return status(False, f"NVML did not start (no NVIDIA driver?): {exc}"), VendorResult()
    try:
        result = _read_nvml(nvml, env)
    except Exception as exc:
        return status(False, f"NVML query failed: {exc}"), VendorResult()
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass
    if not result.devices:
        return status(False, "NVML reports no NVIDIA GPU", result), result
    return status(True, "NVML", result), result


def _read_nvml(nvml: Any, env: ProbeEnv) -> VendorResult:
    count = int(nvml.nvmlDeviceGetCount())
    handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
    devices: list[Device] = []
    index_of_bus: dict[str, int] = {}
    for i, handle in enumerate(handles):
        bus = _bus_id(nvml.nvmlDeviceGetPciInfo(handle).busId)
        index_of_bus[bus] = i
        devices.append(
            Device(
                id=f"gpu{i}", kind=DeviceKind.GPU, vendor="nvidia", name=_text(nvml.nvmlDeviceGetName(handle)), index=i,
                numa_node=_numa_of(env, bus), pci_bus_id=bus, memory_bytes=int(nvml.nvmlDeviceGetMemoryInfo(handle).total),
            )
        )  # fmt: skip
    max_links = int(getattr(nvml, "NVML_NVLINK_MAX_LINKS", 18))
    peers: dict[int, dict[str, int]] = {i: {} for i in range(count)}  # gpu → {peer gpu index or "switch": links}
    version: dict[int, int] = {}
    for i, handle in enumerate(handles):
        for link in range(max_links):
            try:
                if int(nvml.nvmlDeviceGetNvLinkState(handle, link)) != 1:
                    continue
                remote = _bus_id(nvml.nvmlDeviceGetNvLinkRemotePciInfo(handle, link).busId)
                version[i] = int(nvml.nvmlDeviceGetNvLinkVersion(handle, link))
            except Exception:  # NVMLError_NotSupported / InvalidArgument past the last link
                continue
            key = str(index_of_bus[remote]) if remote in index_of_bus else "switch"
            peers[i][key] = peers[i].get(key, 0) + 1
    links: list[Link] = []
    for i, j in itertools.combinations(range(count), 2):
        per_link = NVLINK_GBPS_PER_LINK.get(min(version.get(i, 4), version.get(j, 4)), 25.0)
        direct = peers[i].get(str(j), 0)
        switched = min(peers[i].get("switch", 0), peers[j].get("switch", 0))
        if direct or switched:
            n = direct or switched
            links.append(
                Link(
                    a=f"gpu{i}", b=f"gpu{j}", kind=LinkKind.NVLINK, bandwidth_gbps=n * per_link, latency_us=1.0,
                    hops=1 if direct else 2, source="nvml", detail=f"NV{n}" + ("" if direct else " via NVSwitch"),
                )
            )  # fmt: skip
            continue
        try:
            level = int(nvml.nvmlDeviceGetTopologyCommonAncestor(handles[i], handles[j]))
        except Exception:
            level = 50
        path = pcie_link(f"gpu{i}", f"gpu{j}", _NVML_LEVEL_WORD.get(level, "SYS"), "nvml")
        if path is not None:
            links.append(path)
    return VendorResult(devices=devices, links=links)


def parse_nvidia_smi_topo(text: str) -> VendorResult:
    """``nvidia-smi topo -m``: ``NV<n>`` cells are n bonded NVLinks, PCIe words are PCIe paths; NIC rows
    become links to the RDMA devices the NIC legend names (``rdma:mlx5_0``)."""
    matrix = parse_connection_matrix(text)
    devices, ids = matrix_devices(matrix, "GPU", DeviceKind.GPU, "nvidia", "nvidia-smi")
    for label, name in matrix.nic_names.items():
        ids[label] = f"rdma:{name}"
    links: list[Link] = []
    seen: set[frozenset[str]] = set()
    for (row, column), word in matrix.cells.items():
        pair = frozenset((row, column))
        if row not in ids or column not in ids or len(pair) < 2 or pair in seen or not (row + column).count("GPU"):
            continue
        seen.add(pair)
        a, b = ids[row], ids[column]
        if word.startswith("NV") and word[2:].isdigit():
            n = int(word[2:])
            links.append(
                Link(a=a, b=b, kind=LinkKind.NVLINK, bandwidth_gbps=n * 25.0, latency_us=1.0, source="nvidia-smi", detail=word)
            )
            continue
        link = pcie_link(a, b, word, "nvidia-smi", NOMINAL_PCIE_GBPS)
        if link is not None:
            links.append(link)
    return VendorResult(devices=devices, links=links)


def nvidia_smi_probe() -> ToolProbe:
    """The ``nvidia-smi topo -m`` probe, used where NVML's Python binding is not installed."""
    return ToolProbe("nvidia", "nvidia-smi", ("topo", "-m"), parse_nvidia_smi_topo)
