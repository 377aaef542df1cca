"""Topology probe and transport profiles: ``TopologyManager().probe()`` → :class:`TopologyInfo` →
:class:`TransportProfile` (with a preset) → the transport's settings (UCX transports, devices, rails, sizes).

Vendor probes live in ``nvidia``, ``amd`` and ``domestic/`` (Ascend, Cambricon, Hygon, Kunlunxin)."""

from .manager import TopologyManager, default_vendor_probes
from .model import Device, DeviceKind, Link, LinkKind, NetworkInterface, NumaNode, ProbeStatus, RdmaPort
from .nccl_xml import to_nccl_xml
from .profile import TransportProfile
from .recommend import recommend_preset
from .topology import FABRIC, Route, TopologyInfo
from .vendors import ProbeEnv

__all__ = [
    "FABRIC",
    "Device",
    "DeviceKind",
    "Link",
    "LinkKind",
    "NetworkInterface",
    "NumaNode",
    "ProbeEnv",
    "ProbeStatus",
    "RdmaPort",
    "Route",
    "TopologyInfo",
    "TopologyManager",
    "TransportProfile",
    "default_vendor_probes",
    "recommend_preset",
    "to_nccl_xml",
]
