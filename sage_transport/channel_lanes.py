"""Extra connections per peer (``connections_per_peer``): how many to ask for, granting them, joining them.

A client asks in its ``Hello``; the server grants up to :data:`~sage_transport.wire.MAX_LANES` (one for device KV)
with a random key in its ``Ready``; the client opens the others, each presenting the key in a ``JoinLane`` as its
first message. A key joins each index once and is spent once all joined (or after twice ``connect_timeout_s``).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from .channel_core import ChannelCore, log
from .errors import AuthError, ProtocolError, SageTransportError
from .handshake import _reject, expect
from .transports.base import Connection
from .wire import MAX_CONTROL_BYTES, MAX_LANES, PROTOCOL_VERSION, JoinLane, Ready, encode_message

if TYPE_CHECKING:
    from .session import PeerSession


class LaneManagement(ChannelCore):
    """The channel's part in extra connections to a peer (see the module docstring)."""

    def _connections_for(self, conn: Connection) -> int:
        """Connections to ask a peer for (``connections_per_peer``; 0: 1 for a peer on this host, the topology
        profile's choice for a remote one). Device KV keeps one."""
        if self._device is not None:
            return 1
        if self.config.connections_per_peer:
            return self.config.connections_per_peer
        if conn.link_info().get("same_host"):
            return 1
        if self._profile_connections is None:
            from .hw import TopologyManager, TransportProfile

            topology = TopologyManager(vendors=(), measure_memory=False).probe()
            self._profile_connections = TransportProfile.derive(topology, self.config).connections_per_peer
        return self._profile_connections

    def _lanes_offered(self) -> int:
        """Connections a client may open to this channel per session: lanes carry host KV only."""
        return 1 if self._device is not None else MAX_LANES

    async def _join_lane(self, conn: Connection, msg: JoinLane) -> None:
        """An extra connection presenting a session's lane key: it carries that session's chunks from now on."""
        entry = self._lane_keys.get(msg.key)
        if msg.version != PROTOCOL_VERSION or entry is None or entry[0].closed:
            reason = "auth failed: unknown lane key" if msg.version == PROTOCOL_VERSION else "unsupported protocol version"
            await _reject(conn, reason)
            raise AuthError(f"{conn.peer_address} asked to join a session: {reason}")
        session, lanes, joined = entry
        if msg.index >= lanes or msg.index in joined:
            await _reject(conn, f"lane {msg.index} of {lanes}: out of range or joined already")
            raise ProtocolError(f"{conn.peer_address} joined as lane {msg.index} of {lanes} (or twice)")
        joined.add(msg.index)
        if len(joined) == lanes - 1:
            del self._lane_keys[msg.key]
        await conn.authenticated(MAX_CONTROL_BYTES, self.transport.capabilities.max_message_size)
        await conn.send(encode_message(Ready()))
        session.add_lane(conn)
        self._counters["lanes_joined"] += 1

    async def _open_lanes(self, session: PeerSession, address: str, lanes: int, key: bytes) -> None:
        """Open the extra connections a server granted (see :meth:`_join_lane`); one that fails is left out and
        logged: the session runs on the others."""
        for index in range(1, lanes):
            lane: Connection | None = None
            try:
                async with asyncio.timeout(self.config.connect_timeout_s):
                    lane = await self.transport.connect(address)
                    await lane.send(encode_message(JoinLane(PROTOCOL_VERSION, key, index)))
                    await expect(lane, Ready, "joining a session")
                    await lane.authenticated(MAX_CONTROL_BYTES, self.transport.capabilities.max_message_size)
                session.add_lane(lane)
                self._counters["lanes_joined"] += 1
            except (SageTransportError, TimeoutError, OSError) as exc:
                self._counters["lanes_failed"] += 1
                log.warning("peer.lane_failed", peer=session.peer, lane=index, error=str(exc) or type(exc).__name__)
                if lane is not None:
                    await lane.aclose()
