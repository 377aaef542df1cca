"""Transports: the seam (:mod:`.base`), the registry, and the built-in implementations (imported lazily)."""

from .base import Connection, ConnectionStatistics, Frame, Listener, PayloadSink, Transport, TransportCapabilities
from .registry import available_transports, create_transport, get_transport_class, register_transport

__all__ = [
    "Connection",
    "ConnectionStatistics",
    "Frame",
    "Listener",
    "PayloadSink",
    "Transport",
    "TransportCapabilities",
    "available_transports",
    "create_transport",
    "get_transport_class",
    "register_transport",
]
