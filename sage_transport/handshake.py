"""The connection handshake: version check, names, regions and an HMAC challenge on a shared token.

No transfer message is accepted and no memory is described to the peer before the handshake succeeds.
Client ``Hello`` → server ``Welcome`` (server proof) → client ``Proof`` (client proof + client region, sent only
once the server proved the token) → server ``Ready`` (server region, sent only once the client proved it); a
failure anywhere is a ``Reject`` with a reason and a closed connection. Neither side describes its memory to a
peer that has not proven the token.
"""

from __future__ import annotations

import hmac
import os
from typing import Any, TypeVar

import msgspec

from .errors import AuthError, HandshakeError, ProtocolError, VersionMismatchError
from .transports.base import Connection
from .wire import (
    PROTOCOL_VERSION,
    Hello,
    Proof,
    Ready,
    Region,
    Reject,
    Welcome,
    decode_message,
    encode_message,
    handshake_proof,
)

__all__ = ["Capabilities", "HandshakeOutcome", "client_handshake", "expect", "server_handshake"]

_M = TypeVar("_M")


class Capabilities(msgspec.Struct, frozen=True):
    integrity: list[str]
    memory_kinds: list[str]
    max_chunk: int
    codecs: list[str] = []


class HandshakeOutcome(msgspec.Struct, frozen=True):
    peer_name: str
    peer_region: Region | None
    peer_codecs: frozenset[str] = frozenset()  # what the peer decodes
    lanes: int = 1  # connections agreed for this peer, its own included (extra ones join with ``lane_key``)
    lane_key: bytes = b""


async def expect(conn: Connection, kind: type[_M] | tuple[type[Any], ...], stage: str) -> _M:
    """The next frame, which must be a ``kind`` message (or one of several) without payload (a ``Reject`` raises
    its reason)."""
    frame = await conn.recv()
    if frame.payload is not None:
        raise ProtocolError(f"{stage}: unexpected payload from {conn.peer_address}")
    msg = decode_message(frame.header)
    if isinstance(msg, Reject):
        cls = AuthError if "auth" in msg.reason else HandshakeError
        raise cls(f"{conn.peer_address} rejected the connection: {msg.reason}")
    if not isinstance(msg, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ProtocolError(f"{stage}: expected {names}, got {type(msg).__name__} from {conn.peer_address}")
    return msg  # type: ignore[return-value]


async def _reject(conn: Connection, reason: str) -> None:
    try:
        await conn.send(encode_message(Reject(reason[:1024])))
    except Exception:
        pass


async def client_handshake(
    conn: Connection, *, name: str, token: str | None, caps: Capabilities, region: Region | None, lanes: int = 1
) -> HandshakeOutcome:
    """The connecting side's handshake; ``lanes``: connections it wants for this peer (the server may grant fewer)."""
    nonce = os.urandom(32)
    hello = Hello(PROTOCOL_VERSION, name, nonce, caps.integrity, caps.memory_kinds, caps.max_chunk, caps.codecs, lanes)
    await conn.send(encode_message(hello))
    welcome = await expect(conn, Welcome, "handshake")
    if welcome.version != PROTOCOL_VERSION:
        raise VersionMismatchError(f"{conn.peer_address} speaks protocol {welcome.version}, we speak {PROTOCOL_VERSION}")
    expected = handshake_proof(token, b"server", nonce, welcome.nonce, (name, welcome.name))
    if not hmac.compare_digest(expected, welcome.proof):
        await _reject(conn, "auth failed: the server's proof does not match our token")
        what = "did not prove the shared token" if token else "requires a token we were not given"
        raise AuthError(f"peer {welcome.name} at {conn.peer_address} {what}")
    proof = handshake_proof(token, b"client", welcome.nonce, nonce, (name, welcome.name))
    await conn.send(encode_message(Proof(proof, region)))
    ready = await expect(conn, Ready, "handshake")
    region = ready.region if ready.region is not None else welcome.region
    granted = min(ready.lanes, lanes)
    if granted > 1 and len(ready.lane_key) < 16:
        raise ProtocolError(f"{conn.peer_address} granted {granted} connections without a key to join them")
    return HandshakeOutcome(welcome.name, region, frozenset(ready.codecs), granted, ready.lane_key if granted > 1 else b"")


async def server_handshake(
    conn: Connection,
    *,
    name: str,
    token: str | None,
    region: Region | None,
    known_peers: set[str],
    codecs: list[str] | None = None,
    hello: Hello | None = None,
    max_lanes: int = 1,
) -> HandshakeOutcome:
    """The accepting side's handshake (``hello``: the client's first message when the caller read it already);
    grants the client up to ``max_lanes`` connections."""
    if hello is None:
        hello = await expect(conn, Hello, "handshake")
    if hello.version != PROTOCOL_VERSION:
        await _reject(conn, f"protocol version {hello.version} is not supported (we speak {PROTOCOL_VERSION})")
        raise VersionMismatchError(f"{conn.peer_address} speaks protocol {hello.version}, we speak {PROTOCOL_VERSION}")
    if hello.name in known_peers or hello.name == name:
        await _reject(conn, f"a peer named {hello.name!r} is already connected")
        raise HandshakeError(f"duplicate peer name {hello.name!r} from {conn.peer_address}")
    nonce = os.urandom(32)
    proof = handshake_proof(token, b"server", hello.nonce, nonce, (hello.name, name))
    # nothing about our memory goes out before the client has proven the token: the region rides on Ready
    await conn.send(encode_message(Welcome(PROTOCOL_VERSION, name, nonce, proof, None)))
    reply = await expect(conn, Proof, "handshake")
    expected = handshake_proof(token, b"client", nonce, hello.nonce, (hello.name, name))
    if not hmac.compare_digest(expected, reply.proof):
        await _reject(conn, "auth failed: the client's proof does not match our token")
        raise AuthError(f"peer {hello.name!r} at {conn.peer_address} failed the token challenge")
    lanes = max(1, min(hello.lanes, max_lanes))
    key = os.urandom(32) if lanes > 1 else b""
    await conn.send(encode_message(Ready(region, codecs or [], lanes, key)))
    return HandshakeOutcome(hello.name, reply.region, frozenset(hello.codecs), lanes, key)
