"""Parsers shared by vendor probes: the ``topo -m`` connection matrix (``nvidia-smi topo -m``, ``npu-smi info
-t topo``, ``cnmon topo -m``, ``xpu-smi topo -m``) and the sectioned tables of ``rocm-smi --showtopo`` /
``hy-smi --showtopo``.

A matrix is a header of device labels (``GPU0 GPU1 ... CPU Affinity NUMA Affinity``), one row per device
with a cell per column, then a legend. What a cell means (``NV12``, ``HCCS``, ``PIX``) is the vendor
module's business; the PCIe words every tool borrows from NVIDIA are classified here.
"""

from __future__ import annotations

import re

import msgspec

from .model import Device, DeviceKind, Link, LinkKind

__all__ = ["ConnectionMatrix", "SectionTables", "parse_connection_matrix", "parse_section_tables", "pcie_link"]

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_LABEL = re.compile(r"^(GPU|NPU|MLU|DCU|HCU|XPU|NIC|CPU)(\d+)$", re.IGNORECASE)
_CPU_LIST = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")

#: PCIe path words → (hops, share of a direct link's bandwidth, extra latency in µs).
PCIE_PATHS: dict[str, tuple[int, float, float]] = {
    "PIX": (1, 1.0, 0.0),  # one PCIe switch
    "PXB": (2, 1.0, 0.3),  # several PCIe switches, no host bridge
    "PHB": (2, 0.8, 0.5),  # through a CPU's PCIe host bridge
    "NODE": (3, 0.8, 0.8),  # across host bridges inside one NUMA node
    "SYS": (4, 0.5, 1.5),  # across the SMP interconnect between NUMA nodes (QPI/UPI/xGMI-to-CPU)
}
#: One direction of a PCIe Gen4 x16 link after protocol overhead, GB/s: used when sysfs gives no speed.
NOMINAL_PCIE_GBPS = 24.0


class ConnectionMatrix(msgspec.Struct, frozen=True, kw_only=True):
    """A parsed ``topo -m`` matrix. ``cells[(row, column)]`` is the raw word; ``nic_names`` maps ``NIC0``
    to the device the tool's NIC legend names."""

    labels: list[str]
    cells: dict[tuple[str, str], str]
    cpu_affinity: dict[str, str]
    numa_affinity: dict[str, int]
    nic_names: dict[str, str]


def parse_connection_matrix(text: str) -> ConnectionMatrix:
    """Parse a ``topo -m`` matrix. Raises ``ValueError`` naming what is missing when ``text`` holds none."""
    lines = [_ANSI.sub("", line).rstrip() for line in text.splitlines()]
    header_at = -1
    columns: list[str] = []
    for i, line in enumerate(lines):
        tokens = line.split()
        # a header starts with a label, and the next line is the row of that same label
        if tokens and _LABEL.match(tokens[0]):
            if i + 1 < len(lines) and lines[i + 1].split()[:1] == [tokens[0]]:
                header_at = i
                columns = []
                for t in tokens:
                    if not _LABEL.match(t):
                        break
                    columns.append(t.upper())
                break
    if header_at < 0:
        raise ValueError("no connection matrix found (expected a header row of device labels such as GPU0 GPU1)")
    header_words = lines[header_at].split()[len(columns) :]
    has_cpu = any(w.lower() == "cpu" for w in header_words)
    has_numa = any(w.lower() == "numa" for w in header_words)
    cells: dict[tuple[str, str], str] = {}
    cpu_affinity: dict[str, str] = {}
    numa_affinity: dict[str, int] = {}
    rows: list[str] = []
    for line in lines[header_at + 1 :]:
        tokens = line.split()
        if not tokens or not _LABEL.match(tokens[0]):
            if rows:
                break
            continue
        row = tokens[0].upper()
        if len(tokens) < 1 + len(columns):
            raise ValueError(f"matrix row {row} has {len(tokens) - 1} cells; the header names {len(columns)} columns")
        rows.append(row)
        for column, cell in zip(columns, tokens[1 : 1 + len(columns)]):
            cells[(row, column)] = cell.upper()
        rest = tokens[1 + len(columns) :]
        if has_cpu and rest and (_CPU_LIST.match(rest[0]) or rest[0].upper() == "N/A"):
            if rest[0].upper() != "N/A":
                cpu_affinity[row] = rest[0]
            rest = rest[1:]
        if has_numa and rest and rest[0].isdigit():
            numa_affinity[row] = int(rest[0])
    nic_names: dict[str, str] = {}
    for line in lines:
        match = re.match(r"^\s*(NIC\d+)\s*:\s*(\S+)\s*$", line)
        if match:
            nic_names[match.group(1).upper()] = match.group(2)
    return ConnectionMatrix(labels=rows, cells=cells, cpu_affinity=cpu_affinity, numa_affinity=numa_affinity, nic_names=nic_names)


def pcie_link(a: str, b: str, word: str, source: str, bandwidth_gbps: float = NOMINAL_PCIE_GBPS) -> Link | None:
    """The link a PCIe path word describes, or None for a word that is not one (``X``, ``NA``)."""
    path = PCIE_PATHS.get(word.upper())
    if path is None:
        return None
    hops, share, extra = path
    return Link(
        a=a, b=b, kind=LinkKind.PCIE, bandwidth_gbps=round(bandwidth_gbps * share, 2), latency_us=1.5 + extra,
        hops=hops, source=source, detail=word.upper(),
    )  # fmt: skip


def matrix_devices(
    matrix: ConnectionMatrix, prefix: str, kind: DeviceKind, vendor: str, source: str
) -> tuple[list[Device], dict[str, str]]:
    """Devices for the matrix rows whose label starts with ``prefix`` (``GPU``), and label → device id."""
    devices: list[Device] = []
    ids: dict[str, str] = {}
    for label in matrix.labels:
        match = _LABEL.match(label)
        if not match or match.group(1).upper() != prefix:
            continue
        index = int(match.group(2))
        ids[label] = f"{kind.value}{index}"
        devices.append(
            Device(
                id=ids[label], kind=kind, vendor=vendor, name=f"{vendor} {prefix.lower()}{index} ({source})", index=index,
                numa_node=matrix.numa_affinity.get(label), cpu_affinity=matrix.cpu_affinity.get(label),
            )
        )  # fmt: skip
    return devices, ids


class SectionTables(msgspec.Struct, frozen=True, kw_only=True):
    """``rocm-smi --showtopo``-style output: tables by section title (lower case) → ``{(row, col): word}``,
    the row labels, and ``numa[label]`` from the NUMA section."""

    labels: list[str]
    tables: dict[str, dict[tuple[str, str], str]]
    numa: dict[str, int]


def parse_section_tables(text: str, label_prefix: str = r"(GPU|DCU|HCU)") -> SectionTables:
    """Parse ``==== Title ====`` sections holding square tables keyed by ``GPU0``/``DCU0`` labels, plus
    ``GPU[0] : (Topology) Numa Node: 0`` lines. Raises ``ValueError`` when no table is found."""
    label = re.compile(rf"^{label_prefix}\d+$", re.IGNORECASE)
    tables: dict[str, dict[tuple[str, str], str]] = {}
    numa: dict[str, int] = {}
    labels: list[str] = []
    title = ""
    columns: list[str] = []
    for raw in text.splitlines():
        line = _ANSI.sub("", raw).strip()
        heading = re.match(r"^=+\s*(.*?)\s*=+$", line)
        if heading:
            title, columns = heading.group(1).lower(), []
            continue
        tokens = line.split()
        if not tokens:
            continue
        if all(label.match(t) for t in tokens):
            columns = [t.upper() for t in tokens]
            continue
        if columns and label.match(tokens[0]) and len(tokens) >= 1 + len(columns):
            row = tokens[0].upper()
            table = tables.setdefault(title, {})
            for column, cell in zip(columns, tokens[1 : 1 + len(columns)]):
                table[(row, column)] = cell.upper()
            if row not in labels:
                labels.append(row)
            continue
        match = re.match(rf"^{label_prefix}\[(\d+)\]\s*:\s*\(Topology\)\s*Numa Node\s*:\s*(-?\d+)", line, re.IGNORECASE)
        if match:
            node = int(match.group(3))
            if node >= 0:
                numa[f"{match.group(1).upper()}{match.group(2)}"] = node
    if not tables:
        raise ValueError("no topology tables found (expected sections such as 'Link Type between two GPUs')")
    return SectionTables(labels=labels, tables=tables, numa=numa)
