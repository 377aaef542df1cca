"""The error tree of sage_transport.

Every error the library raises derives from :class:`SageTransportError`. Families:

* :class:`ConfigError` (also a ``ValueError``): a bad configuration key or value, a bad preset file.
* :class:`PlanError` (also a ``ValueError``): a transfer plan that cannot be carried out as given.
* :class:`TransportError`: the link failed. :class:`PeerDeadError` when the peer vanished,
  :class:`ConnectionClosedError` when it closed cleanly.
* :class:`ProtocolError`: the peer broke the protocol: bad frame, version, auth, checksum.
* :class:`TransferTimeoutError` (also a builtin ``TimeoutError``): a deadline passed.
* :class:`TransferAbortedError`: the peer (or the caller) aborted a transfer.
* :class:`UnsupportedError`: a valid request this build or this transport cannot serve.

Backends translate their own exceptions at the edge (``raise PeerDeadError(...) from exc``) so callers
only ever catch these. Messages name the culprit: the peer, the transfer, the chunk, the value.
"""

from __future__ import annotations

__all__ = [
    "AuthError",
    "ChecksumError",
    "CollectiveError",
    "CollectiveTimeoutError",
    "ConfigError",
    "ConnectionClosedError",
    "FrameTooLargeError",
    "GroupPoisonedError",
    "HandshakeError",
    "PeerDeadError",
    "PlanError",
    "ProtocolError",
    "SageTransportError",
    "TransferAbortedError",
    "TransferTimeoutError",
    "TransportError",
    "UnsupportedError",
    "VersionMismatchError",
]


class SageTransportError(Exception):
    """Root of every error raised by sage_transport."""


class ConfigError(SageTransportError, ValueError):
    """A configuration key, value, preset or preset file is invalid."""


class PlanError(SageTransportError, ValueError):
    """A transfer plan is inconsistent with itself or with the registered memory."""


class UnsupportedError(SageTransportError):
    """The request is valid but this build or transport cannot serve it."""


class TransportError(SageTransportError):
    """The underlying link failed."""


class PeerDeadError(TransportError, ConnectionError):
    """The peer died or the link to it broke (reset, kill, lost heartbeat)."""


class ConnectionClosedError(TransportError):
    """The connection was closed, by us or cleanly by the peer (end of stream)."""


class ProtocolError(SageTransportError):
    """The peer sent something the protocol forbids."""


class FrameTooLargeError(ProtocolError):
    """A frame or control message exceeds its hard size bound."""


class HandshakeError(ProtocolError):
    """The connection handshake failed."""


class VersionMismatchError(HandshakeError):
    """The peer speaks a protocol version we do not."""


class AuthError(HandshakeError):
    """The peer failed the HMAC challenge on the shared token."""


class ChecksumError(ProtocolError):
    """A chunk failed its integrity check more often than allowed."""


class TransferTimeoutError(SageTransportError, TimeoutError):
    """A transfer (or a wait on one) passed its deadline."""


class TransferAbortedError(SageTransportError):
    """A transfer was aborted by the peer or cancelled locally; the reason is in the message."""


class CollectiveError(SageTransportError):
    """A collective operation failed (a rank died, the backend failed); the group is poisoned."""


class CollectiveTimeoutError(CollectiveError, TimeoutError):
    """A collective operation passed its deadline; the group is aborted and poisoned."""


class GroupPoisonedError(CollectiveError):
    """The group failed earlier (the message says which op, rank and why); rebuild it to go on."""
