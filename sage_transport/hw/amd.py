"""AMD GPUs and xGMI: ``amd-smi topology`` (ROCm 6+), else ``rocm-smi --showtopo``. The rocm-smi table
parser is shared with Hygon's ``hy-smi`` (a rocm-smi derivative; see ``domestic/hygon.py``)."""

from __future__ import annotations

import itertools
import re

from .matrix import NOMINAL_PCIE_GBPS, SectionTables, parse_section_tables
from .model import Device, DeviceKind, Link, LinkKind, VendorResult
from .vendors import ToolProbe

__all__ = ["amd_smi_probe", "links_from_rocm_tables", "parse_amd_smi_topology", "parse_rocm_showtopo", "rocm_smi_probe"]

#: One direction of one xGMI link between MI200/MI300 GPUs, GB/s (used when the tool prints no bandwidth).
NOMINAL_XGMI_GBPS = 50.0
_BDF = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$", re.IGNORECASE)


def links_from_rocm_tables(
    tables: dict[str, dict[tuple[str, str], str]], ids: dict[str, str], source: str, fabric_gbps: float,
    bandwidth_mbps: dict[tuple[str, str], str] | None = None,
) -> list[Link]:  # fmt: skip
    """Links from the link-type and hops tables (``XGMI`` → xGMI, ``PCIE`` → PCIe)."""
    link_types = next((t for title, t in tables.items() if "link type" in title), {})
    hops = next((t for title, t in tables.items() if "hops" in title), {})
    if not link_types:
        raise ValueError("no link-type table")
    links: list[Link] = []
    labels = list(ids)
    for x, y in itertools.combinations(labels, 2):
        word = link_types.get((x, y)) or link_types.get((y, x)) or ""
        n_hops = int(hops.get((x, y), "1")) if hops.get((x, y), "1").isdigit() else 1
        gbps = None
        if bandwidth_mbps:
            match = re.match(r"^(\d+)-(\d+)$", bandwidth_mbps.get((x, y), ""))
            if match and int(match.group(2)) > 0:
                gbps = int(match.group(2)) / 1000
        if word == "XGMI":
            kind, bw, latency = LinkKind.XGMI, gbps or fabric_gbps, 1.5
        elif word in ("PCIE", "PCI"):
            kind, bw, latency = LinkKind.PCIE, gbps or NOMINAL_PCIE_GBPS, 1.5 + 0.5 * max(0, n_hops - 1)
        else:
            continue
        links.append(
            Link(
                a=ids[x],
                b=ids[y],
                kind=kind,
                bandwidth_gbps=bw,
                latency_us=latency,
                hops=max(1, n_hops),
                source=source,
                detail=word,
            )
        )
    return links


def parse_rocm_showtopo(text: str, kind: DeviceKind = DeviceKind.GPU, vendor: str = "amd", source: str = "rocm-smi",
                        fabric_gbps: float = NOMINAL_XGMI_GBPS) -> VendorResult:  # fmt: skip
    """``rocm-smi --showtopo``: weight, hops and link-type tables between ``GPU<n>`` labels plus NUMA nodes."""
    parsed: SectionTables = parse_section_tables(text)
    ids: dict[str, str] = {}
    devices: list[Device] = []
    for label in parsed.labels:
        index = int(re.sub(r"\D", "", label))
        ids[label] = f"{kind.value}{index}"
        devices.append(
            Device(
                id=ids[label], kind=kind, vendor=vendor, name=f"{vendor} {label}", index=index, numa_node=parsed.numa.get(label)
            )
        )
    return VendorResult(devices=devices, links=links_from_rocm_tables(parsed.tables, ids, source, fabric_gbps))


def parse_amd_smi_topology(text: str) -> VendorResult:
    """``amd-smi topology``: ``WEIGHT TABLE:``, ``HOPS TABLE:``, ``LINK TYPE TABLE:``, ``NUMA BW TABLE:``
    sections keyed by the GPUs' PCI addresses (GPU n is the n-th row)."""
    tables: dict[str, dict[tuple[str, str], str]] = {}
    title = ""
    columns: list[str] = []
    rows: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        heading = re.match(r"^([A-Z][A-Z ]*TABLE):?$", line)
        if heading:
            title, columns = heading.group(1).lower(), []
            continue
        tokens = line.split()
        if not tokens or not title:
            continue
        if all(_BDF.match(t) for t in tokens):
            columns = [t.lower() for t in tokens]
            continue
        if columns and _BDF.match(tokens[0]) and len(tokens) >= 1 + len(columns):
            row = tokens[0].lower()
            if row not in rows:
                rows.append(row)
            table = tables.setdefault(title, {})
            for column, cell in zip(columns, tokens[1 : 1 + len(columns)]):
                table[(row, column)] = cell.upper()
    if not tables:
        raise ValueError("no topology tables found (expected 'LINK TYPE TABLE:' with PCI addresses)")
    ids = {bdf: f"gpu{i}" for i, bdf in enumerate(rows)}
    devices = [
        Device(id=ids[b], kind=DeviceKind.GPU, vendor="amd", name=f"amd gpu{i}", index=i, pci_bus_id=b)
        for i, b in enumerate(rows)
    ]
    bandwidth = next((t for t, v in tables.items() if "bw" in t), None)
    links = links_from_rocm_tables(tables, ids, "amd-smi", NOMINAL_XGMI_GBPS, tables.get(bandwidth) if bandwidth else None)
    return VendorResult(devices=devices, links=links)


def amd_smi_probe() -> ToolProbe:
    return ToolProbe("amd", "amd-smi", ("topology",), parse_amd_smi_topology)


def rocm_smi_probe() -> ToolProbe:
    return ToolProbe("amd", "rocm-smi", ("--showtopo",), parse_rocm_showtopo)
