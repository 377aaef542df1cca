"""Huawei Ascend NPUs: ``npu-smi info -t topo``.

The tool prints a matrix of ``NPU<n>`` labels with the words of ``aclrtGetDevicesTopo``: ``HCCS`` (the
cache-coherent NPU fabric), ``HCCS_SW`` (through an HCCS switch, Atlas A3 super-nodes), ``SIO`` (the two dies
of one chip), and PCIe paths ``PIX``/``PHB``/``SYS``; a ``CPU Affinity`` column follows.
"""

from __future__ import annotations

from ..matrix import parse_connection_matrix
from ..model import DeviceKind, LinkKind, VendorResult
from ..vendors import ToolProbe
from ._fabric import links_from_matrix

__all__ = ["ascend_probe", "parse_npu_smi_topo"]

#: One direction, GB/s: Atlas 800T A2 (910B) gives each NPU pair one 56 GB/s HCCS link; the A3 HCCS switch
#: 196 GB/s per NPU; SIO joins two dies of one chip at 224 GB/s. Nominal figures from Huawei's datasheets.
_HCCS = {"HCCS": (56.0, 1.5, 1), "HCCS_SW": (196.0, 2.0, 2), "SIO": (224.0, 0.5, 1)}


def _fabric(word: str) -> tuple[LinkKind, float, float, int] | None:
    found = _HCCS.get(word.replace("-", "_"))
    return (LinkKind.HCCS, *found) if found else None


def parse_npu_smi_topo(text: str) -> VendorResult:
    return links_from_matrix(parse_connection_matrix(text), "NPU", DeviceKind.NPU, "huawei", "npu-smi", _fabric)


def ascend_probe() -> ToolProbe:
    return ToolProbe("ascend", "npu-smi", ("info", "-t", "topo"), parse_npu_smi_topo)
