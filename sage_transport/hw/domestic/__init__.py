"""Probes for Chinese accelerators: Ascend (``npu-smi``), Cambricon (``cnmon``), Hygon DCU (``hy-smi``) and
Kunlunxin (``xpu-smi``). Each parses its vendor tool's topology output into devices and links."""

from .ascend import ascend_probe, parse_npu_smi_topo
from .cambricon import cambricon_probe, parse_cnmon_topo
from .hygon import hygon_probe, parse_hy_smi_showtopo
from .kunlunxin import kunlunxin_probe, parse_xpu_smi_topo

__all__ = [
    "ascend_probe",
    "cambricon_probe",
    "hygon_probe",
    "kunlunxin_probe",
    "parse_cnmon_topo",
    "parse_hy_smi_showtopo",
    "parse_npu_smi_topo",
    "parse_xpu_smi_topo",
]
