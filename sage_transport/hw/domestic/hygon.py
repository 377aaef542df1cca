"""Hygon DCUs: ``hy-smi --showtopo``, a rocm-smi derivative: weight, hops and link-type tables between
``DCU<n>`` (older releases: ``HCU<n>``) labels, ``XGMI`` or ``PCIE`` links, and NUMA nodes."""

from __future__ import annotations

from ..amd import parse_rocm_showtopo
from ..model import DeviceKind, VendorResult
from ..vendors import ToolProbe

__all__ = ["hygon_probe", "parse_hy_smi_showtopo"]

#: One direction of one xGMI link between Hygon DCUs (K100 class), GB/s. Nominal.
DCU_XGMI_GBPS = 32.0


def parse_hy_smi_showtopo(text: str) -> VendorResult:
    return parse_rocm_showtopo(text, kind=DeviceKind.DCU, vendor="hygon", source="hy-smi", fabric_gbps=DCU_XGMI_GBPS)


def hygon_probe() -> ToolProbe:
    return ToolProbe("hygon", "hy-smi", ("--showtopo",), parse_hy_smi_showtopo)
