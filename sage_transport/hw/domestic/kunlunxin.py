"""Kunlunxin XPUs: ``xpu-smi topo -m``.

The matrix has ``XPU<n>`` labels; cells are PCIe path words or an XPU-Link word (``XL<n>``/``KL<n>`` for n
bonded links, or ``XPULINK``), then ``CPU Affinity``.
"""

from __future__ import annotations

from ..matrix import parse_connection_matrix
from ..model import DeviceKind, LinkKind, VendorResult
from ..vendors import ToolProbe
from ._fabric import counted, links_from_matrix

__all__ = ["kunlunxin_probe", "parse_xpu_smi_topo"]

#: One direction of one XPU-Link, GB/s (P800 class). Nominal.
XPU_LINK_GBPS_PER_LINK = 25.0


def _fabric(word: str) -> tuple[LinkKind, float, float, int] | None:
    n = counted(word, ("XPULINK", "XPU-LINK", "XL", "KL"))
    return (LinkKind.XPU_LINK, n * XPU_LINK_GBPS_PER_LINK, 2.0, 1) if n else None


def parse_xpu_smi_topo(text: str) -> VendorResult:
    return links_from_matrix(parse_connection_matrix(text), "XPU", DeviceKind.XPU, "kunlunxin", "xpu-smi", _fabric)


def kunlunxin_probe() -> ToolProbe:
    return ToolProbe("kunlunxin", "xpu-smi", ("topo", "-m"), parse_xpu_smi_topo)
