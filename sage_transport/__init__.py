"""sage_transport: KV-cache transport and communication layer for LLM inference engines.

Quick use::

    async with KVTransferChannel(MockTransport(net), name="prefill") as channel:
        channel.register(KVMemory(schema, num_blocks, kv_buffer))
        peer = await channel.connect(address)
        result = await channel.transfer(TransferPlan.for_blocks(peer, schema, src_blocks, dst_blocks))

Importing this package imports no heavy backend (torch, ucxx, prometheus_client); transports load by name.
"""

from __future__ import annotations

from .channel import ChannelStatistics, KVTransferChannel
from .config import Compression, Integrity, KVTransportConfig, ProgressMode
from .errors import (
    AuthError,
    ChecksumError,
    ConfigError,
    ConnectionClosedError,
    FrameTooLargeError,
    HandshakeError,
    PeerDeadError,
    PlanError,
    ProtocolError,
    SageTransportError,
    TransferAbortedError,
    TransferTimeoutError,
    TransportError,
    UnsupportedError,
    VersionMismatchError,
)
from .hw import TopologyInfo, TopologyManager, TransportProfile, recommend_preset
from .memory import KVGeometry, KVMemory
from .plan import BlockMapping, IntegrityStatus, KVChunk, Priority, TransferPlan, TransferResult
from .planner import ChunkTable, plan_chunks
from .presets import load_presets
from .scheduler import Scheduler
from .schema import MODEL_SPECS, DType, KVCacheSchema, Layout
from .telemetry import ChunkTracer, Telemetry
from .transfers import LayerArrival, TransferHandle, TransferProgress, TransferStatus
from .transports import Transport, available_transports, create_transport, register_transport

__version__ = "0.1.0"

__all__ = [
    "AuthError",
    "BlockMapping",
    "ChannelStatistics",
    "ChecksumError",
    "ChunkTable",
    "ChunkTracer",
    "Compression",
    "ConfigError",
    "ConnectionClosedError",
    "DType",
    "FrameTooLargeError",
    "HandshakeError",
    "Integrity",
    "IntegrityStatus",
    "ProgressMode",
    "KVCacheSchema",
    "KVChunk",
    "KVGeometry",
    "KVMemory",
    "KVTransferChannel",
    "KVTransportConfig",
    "LayerArrival",
    "Layout",
    "MODEL_SPECS",
    "PeerDeadError",
    "PlanError",
    "Priority",
    "ProtocolError",
    "SageTransportError",
    "Scheduler",
    "Telemetry",
    "TopologyInfo",
    "TopologyManager",
    "TransportProfile",
    "TransferAbortedError",
    "TransferHandle",
    "TransferPlan",
    "TransferProgress",
    "TransferResult",
    "TransferStatus",
    "TransferTimeoutError",
    "Transport",
    "TransportError",
    "UnsupportedError",
    "VersionMismatchError",
    "__version__",
    "available_transports",
    "create_transport",
    "load_presets",
    "recommend_preset",
    "plan_chunks",
    "register_transport",
]
