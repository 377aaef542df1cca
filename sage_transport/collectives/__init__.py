"""Collectives beside KV transfer: one async :class:`CommBackend` over Gloo, NCCL and an in-process mock, with
:class:`CommFusion` (small all-reduces share one flat buffer) and :class:`OverlapWindow` (how many ops overlap
compute). ``await create_comm_backend("gloo", rank=..., world_size=...)`` builds one; torch is imported only by
the Gloo and NCCL backends."""

from .base import CommBackend, CommStats, ReduceOp
from .fusion import CommFusion, FusionStatistics
from .group import COMM_BACKENDS, comm_port, create_comm_backend, free_port, open_comm_store
from .mock import MockCommBackend, MockCommGroup
from .overlap import OverlapStatistics, OverlapWindow

__all__ = [
    "COMM_BACKENDS",
    "CommBackend",
    "CommFusion",
    "CommStats",
    "FusionStatistics",
    "MockCommBackend",
    "MockCommGroup",
    "OverlapStatistics",
    "OverlapWindow",
    "ReduceOp",
    "comm_port",
    "create_comm_backend",
    "free_port",
    "open_comm_store",
]
