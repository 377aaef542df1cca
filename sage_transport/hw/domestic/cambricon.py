"""Cambricon MLUs: ``cnmon topo -m``.

The matrix has ``MLU<n>`` labels; cells are PCIe path words (``PIX``, ``PXB``, ``PHB``, ``NODE``, ``SYS``)
or an MLU-Link word (``MLULINK``, ``MLU-LINK`` or ``ML<n>`` for n bonded ports), then ``CPU Affinity``.
"""

from __future__ import annotations

from ..matrix import parse_connection_matrix
from ..model import DeviceKind, LinkKind, VendorResult
from ..vendors import ToolProbe
from ._fabric import counted, links_from_matrix

__all__ = ["cambricon_probe", "parse_cnmon_topo"]

#: One direction of one MLU-Link port, GB/s (MLU370-X8: 200 GB/s bidirectional over its ports). Nominal.
MLU_LINK_GBPS_PER_PORT = 25.0


def _fabric(word: str) -> tuple[LinkKind, float, float, int] | None:
    n = counted(word, ("MLULINK", "MLU-LINK", "ML"))
    return (LinkKind.MLU_LINK, n * MLU_LINK_GBPS_PER_PORT, 2.0, 1) if n else None


def parse_cnmon_topo(text: str) -> VendorResult:
    return links_from_matrix(parse_connection_matrix(text), "MLU", DeviceKind.MLU, "cambricon", "cnmon", _fabric)


def cambricon_probe() -> ToolProbe:
    return ToolProbe("cambricon", "cnmon", ("topo", "-m"), parse_cnmon_topo)
