"""Listening, connecting and authenticating peers, their sessions' start and end, and direct placement windows."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
from typing import Any

from .attest import Attestation, AttestationServer, PeerIdentity, Presented, attest_peer, close_fds, supported
from .channel_core import (
    _same_shape,
    log,
)
from .channel_lanes import LaneManagement
from .config import Integrity, KVTransportConfig, require_token_off_loopback
from .device.ipc import export_window, open_window
from .errors import (
    ConfigError,
    ConnectionClosedError,
    PeerDeadError,
    PlanError,
    ProtocolError,
    SageTransportError,
    TransferTimeoutError,
    TransportError,
    UnsupportedError,
)
from .handshake import Capabilities, client_handshake, expect, server_handshake
from .placement import CmaWriter, ShmWriter, buffer_address, cma_available, host_identity
from .plan import TransferPlan
from .session import PeerSession
from .transports.base import Connection, Listener
from .wire import MAX_CONTROL_BYTES, Hello, JoinLane, Region, Window
from .wire_codec import local_codecs


class PeerManagement(LaneManagement):
    """The channel's peers: listeners, handshakes, attestation, one session per peer, and ending them."""

    def _segments(self) -> list[tuple[int, int]]:
        return [(buffer_address(view), view.nbytes) for view in self._memory_views]

    def _window_for(self, conn: Connection, listener: PeerIdentity) -> tuple[Window, list[int]] | None:
        """The window on our memory to hand the process the kernel attests behind a peer's attestation socket
        (:mod:`.attest`), or ``None``: only with direct placement and zero-copy on, to a same-host peer, and,
        without a token, only to a process of this user."""
        config = self._config_for_window()
        if config is None:
            return None
        if not conn.link_info().get("same_host"):
            return None
        if config.auth_token is None and listener.uid != os.getuid():
            return None
        assert self._memory is not None
        if self._device is not None:  # device KV: CUDA IPC handles (memfds when emulated)
            try:
                device_window, fds = export_window(self._device)
            except UnsupportedError as exc:
                log.info("device_window_unavailable", reason=str(exc))
                return None
            buffers = [[seg.data_ptr(), seg.numel()] for seg in self._device.segments]
            return Window(host_identity(), buffers, bool(fds), device_window), list(fds)
        fds = self._memory.shared_fds if len(self._memory.shared_fds) == len(self._memory_views) else []
        return Window(host_identity(), [list(seg) for seg in self._segments()], bool(fds)), list(fds)

    def _config_for_window(self) -> KVTransportConfig | None:
        config = self.config
        if not (config.direct_placement and config.zero_copy and self._memory is not None):
            return None
        return config if self._device is not None or cma_available() else None

    def _attestation_server(self) -> AttestationServer | None:
        if self._attestation is None and supported():
            try:
                self._attestation = AttestationServer()
            except OSError as exc:
                log.warning("attestation_unavailable", error=str(exc))
                return None
            self._spawn(self._attestation.serve(), f"sage-attest-{self.name}")
        return self._attestation

    def _worker_pool(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._placement_pool is None:
            self._placement_pool = concurrent.futures.ThreadPoolExecutor(
                max(2, self.config.send_lanes), thread_name_prefix=f"sage-work-{self.name}"
            )
        return self._placement_pool

    def _placement_failed(self, session: PeerSession, exc: BaseException) -> None:
        self._counters["placement_failures"] += 1
        log.warning("direct_placement_failed", peer=session.peer, error=str(exc), fallback="two-sided sends")

    def _on_presented(self, session: PeerSession, presented: Presented) -> None:
        """A presentation on our attestation socket for this session (at connect time, or later when the peer
        registered its memory): write into the peer's memory from now on, if it handed some over."""
        fds = presented.fds
        try:
            if session.identity is not None and presented.identity.pid != session.identity.pid:
                raise ProtocolError(
                    f"peer {session.peer} presented itself as process {presented.identity.pid}, "
                    f"but the kernel attested process {session.identity.pid} for it"
                )
            window = presented.window
            if window is None or session.closed:
                return
            if not session.trusted:
                self._counters["untrusted_refusals"] += 1
                log.warning("window.refused", peer=session.peer, reason="the peer is neither token-proven nor attested")
                return
            if not self.config.direct_placement or self._memory is None or window.host != host_identity():
                return
            pid, sizes = presented.identity.pid, [n for _, n in window.buffers]
            if (window.device is not None) != (self._device is not None):  # host to device or back: sends (staged)
                return
            if window.device is not None:
                self._open_device_window(session, window, presented.fds, same_process=pid == os.getpid())
                fds = []  # the writer owns them now (or they were closed)
                return
            writer: CmaWriter | ShmWriter | None = None
            if window.shared and self.config.map_peer_cache:
                fds = []  # the writer owns them now
                try:
                    writer = ShmWriter(pid, presented.fds, sizes, self._memory_views)
                except UnsupportedError as exc:
                    log.info("shared_memory_placement_unavailable", peer=session.peer, reason=str(exc), fallback="cma")
            if writer is None:
                try:
                    writer = CmaWriter(pid, [(a, n) for a, n in window.buffers], self._segments())
                    writer.check()
                except UnsupportedError as exc:
                    log.info("direct_placement_unavailable", peer=session.peer, reason=str(exc))
                    return
            session.enable_placement(writer, self._worker_pool())
        except ProtocolError as exc:
            self._session_failed(session, exc)
        finally:
            close_fds(fds)

    def _open_device_window(self, session: PeerSession, window: Window, fds: list[int], same_process: bool) -> None:
        """Write into the peer's device KV through CUDA IPC from now on, where it can be mapped here (in this very
        process, as the kernel attests it: through the peer's addresses, which are ours)."""
        assert window.device is not None and session.region is not None
        expected = session.region.geometry.segment_bytes(session.region.schema)
        pointers = [address for address, _ in window.buffers] if same_process else None
        try:
            writer = open_window(window.device, self._device, [expected] * len(window.device.segments), fds, pointers)
        except UnsupportedError as exc:
            close_fds(fds)
            log.info("device_placement_unavailable", peer=session.peer, reason=str(exc), fallback="sends")
            return
        if len(writer.peer) != session.region.geometry.segment_count(session.region.schema):
            writer.close()
            raise ProtocolError(f"peer {session.peer} handed over {len(writer.peer)} device buffers for its region")
        session.enable_placement(writer, self._worker_pool())  # type: ignore[arg-type]

    def _region(self) -> Region | None:
        return None if self._memory is None else Region(self._memory.schema, self._memory.geometry, self._memory.kind)

    def _capabilities(self) -> Capabilities:
        return Capabilities(
            integrity=[m.value for m in Integrity],
            memory_kinds=sorted(self.transport.capabilities.memory_kinds),
            max_chunk=self.transport.capabilities.max_message_size,
            codecs=self.accepted_codecs(),
        )

    def accepted_codecs(self) -> list[str]:
        """Wire dtypes and compressions this side decodes and accepts (``accept_codecs`` ∩ what is installed)."""
        accept = self.config.accept_codecs
        if accept == "none":
            return []
        local = local_codecs()
        return sorted(local if accept == "all" else local.intersection(accept.split("+")))

    @property
    def peers(self) -> list[str]:
        return sorted(self._sessions)

    def links(self) -> dict[str, dict[str, Any]]:
        """Per peer, what its connection really runs on (``Connection.link_info``: UCX transports in use, ...), its
        placement, and ``connections``: how many it has (``connections_per_peer``) with the payload bytes each sent."""
        return {
            peer: {
                **session.conn.link_info(),
                "placement": session.placement_kind,
                "connections": 1 + len(session.lanes),
                "bytes_sent_by_connection": [c.statistics().bytes_sent for c in [session.conn, *session.lanes]],
            }
            for peer, session in self._sessions.items()
        }

    async def listen(self, address: str | None = None) -> str:
        """Accept peers at ``address`` (``None``: the transport's host, a free port). Returns the address peers
        connect to. An address other than loopback requires ``auth_token`` (:class:`ConfigError` otherwise)."""
        self._check_open()
        host = address.rsplit(":", 1)[0] if address and ":" in address else getattr(self.transport, "host", None)
        if isinstance(host, str):
            require_token_off_loopback(host, self.config.auth_token, "listen address" if address else "listen_host")
        listener = await self.transport.listen(address)
        self._listeners.append(listener)
        self._spawn(self._accept_loop(listener), f"sage-accept-{listener.address}")
        return listener.address

    async def _accept_loop(self, listener: Listener) -> None:
        pending = [0]  # handshakes in progress on this listener
        while True:
            try:
                conn = await listener.accept()
            except ConnectionClosedError:
                return
            if pending[0] >= self.config.max_pending_handshakes:  # a flood of strangers: each costs a close only
                self._counters["connections_refused"] += 1
                self._spawn(conn.aclose(), "sage-refuse")
                continue
            pending[0] += 1
            self._spawn(self._serve(conn, pending), f"sage-handshake-{conn.peer_address}")

    async def _serve(self, conn: Connection, pending: list[int]) -> None:
        try:
            async with asyncio.timeout(self.config.connect_timeout_s):
                first: Hello | JoinLane = await expect(conn, (Hello, JoinLane), "handshake")
                if isinstance(first, JoinLane):
                    await self._join_lane(conn, first)
                    return
                outcome = await server_handshake(
                    conn, name=self.name, token=self.config.auth_token, region=self._region(), known_peers=set(self._sessions),
                    codecs=self.accepted_codecs(), hello=first, max_lanes=self._lanes_offered(),
                )  # fmt: skip
                attestation = await self._authenticated(conn, initiator=False)
        except (SageTransportError, TimeoutError) as exc:
            self._counters["handshake_failures"] += 1
            log.warning("peer.refused", address=conn.peer_address, error=str(exc) or type(exc).__name__)
            await conn.aclose()
            return
        finally:
            pending[0] -= 1
        if outcome.peer_name in self._sessions:  # connected meanwhile under the same name
            self._revoke(attestation)
            await conn.aclose()
            return
        session = self._start_session(conn, outcome.peer_name, outcome.peer_region, outcome.peer_codecs, attestation)
        if outcome.lanes > 1:
            self._lane_keys[outcome.lane_key] = (session, outcome.lanes, set())
            # a key the client never used goes when its connect would have timed out
            asyncio.get_running_loop().call_later(2 * self.config.connect_timeout_s, self._lane_keys.pop, outcome.lane_key, None)

    async def _authenticated(self, conn: Connection, *, initiator: bool) -> Attestation:
        """After a handshake: lift the connection's pre-authentication limits, then learn from the kernel who the
        peer is and exchange windows (:mod:`.attest`)."""
        await conn.authenticated(MAX_CONTROL_BYTES, self.transport.capabilities.max_message_size)
        offer = functools.partial(self._window_for, conn)
        return await attest_peer(conn, self._attestation_server(), offer, initiator=initiator)

    def _revoke(self, attestation: Attestation) -> None:
        if attestation.nonce is not None and self._attestation is not None:
            self._attestation.revoke(attestation.nonce)
        if attestation.presented is not None:
            close_fds(attestation.presented.fds)

    async def connect(self, address: str) -> str:
        """Connect and authenticate to the channel listening at ``address``; returns the peer's name."""
        self._check_open()
        conn: Connection | None = None
        try:
            async with asyncio.timeout(self.config.connect_timeout_s):
                conn = await self.transport.connect(address)
                outcome = await client_handshake(
                    conn, name=self.name, token=self.config.auth_token, caps=self._capabilities(), region=self._region(),
                    lanes=self._connections_for(conn),
                )  # fmt: skip
                attestation = await self._authenticated(conn, initiator=True)
        except TimeoutError:
            if conn is not None:
                await conn.aclose()
            raise TransferTimeoutError(f"connecting to {address} took over {self.config.connect_timeout_s}s") from None
        except BaseException:
            if conn is not None:
                await conn.aclose()
            raise
        if outcome.peer_name in self._sessions:
            self._revoke(attestation)
            await conn.aclose()
            raise ConfigError(f"already connected to a peer named {outcome.peer_name!r}")
        session = self._start_session(conn, outcome.peer_name, outcome.peer_region, outcome.peer_codecs, attestation)
        if outcome.lanes > 1:
            await self._open_lanes(session, address, outcome.lanes, outcome.lane_key)
        log.info("peer.connected", peer=outcome.peer_name, address=address, connections=1 + len(session.lanes))
        return outcome.peer_name

    def _start_session(
        self, conn: Connection, peer: str, region: Region | None, codecs: frozenset[str], attestation: Attestation
    ) -> PeerSession:
        session = PeerSession(self._host, conn, peer, region)
        if self._device is not None:  # the transport's context exists now: it says whether it moves device memory
            self._host.device_wire = self._device.runtime.name == "cuda" and "cuda" in self.transport.capabilities.memory_kinds
        session.peer_codecs = codecs
        session.identity = attestation.identity
        session.trusted = self.config.auth_token is not None or (
            attestation.identity is not None and attestation.identity.uid == os.getuid()
        )
        session.peer_invite = attestation.peer_invite
        session.attest_nonce = attestation.nonce
        session.window_offered = attestation.offered
        self._sessions[peer] = session
        session.start()
        self._fan_in.refresh([session])  # a sender that joins while a decode-critical transfer comes in is held too
        if attestation.nonce is not None and self._attestation is not None:  # later presentations: this session's
            self._attestation.rebind(attestation.nonce, lambda presented: self._on_presented(session, presented))
        if attestation.presented is not None:
            self._on_presented(session, attestation.presented)
        return session

    def _session_failed(self, session: PeerSession, exc: BaseException) -> None:
        """A session's task hit a transport or protocol error: fail its transfers and tear it down."""
        if session.closed:
            return
        busy = bool(session.outgoing or session.incoming)
        if isinstance(exc, ConnectionClosedError) and not busy:
            log.info("peer.closed", peer=session.peer)
        else:
            log.warning("peer.lost", peer=session.peer, error=str(exc), transfers_failed=busy)
        self._end_session(session, exc)

    def _end_session(self, session: PeerSession, cause: BaseException) -> None:
        session.closed = True
        if self._sessions.get(session.peer) is session:
            del self._sessions[session.peer]
            self._scheduler.widen(session.peer, 1)
            self._scheduler.hold(session.peer, 0)  # a peer of that name later starts unheld
        if session.attest_nonce is not None and self._attestation is not None:
            self._attestation.revoke(session.attest_nonce)
        if isinstance(cause, ProtocolError):
            self._counters["protocol_errors"] += 1
        kind = PeerDeadError if isinstance(cause, PeerDeadError) else TransportError
        for out in list(session.outgoing.values()):
            acked = out.chunks_verified
            err = kind(
                f"transfer {out.plan.transfer_id} to {session.peer} failed after {acked}/{len(out.table)} "
                f"verified chunks: {cause}"
            )
            self._fail_outgoing(out, err, notify=False)
        for inc in list(session.incoming.values()):
            err = kind(
                f"transfer {inc.transfer_id} from {session.peer} failed with "
                f"{len(inc.table) - inc.remaining}/{len(inc.table)} chunks received: {cause}"
            )
            self._fail_incoming(session, inc, err, notify=False)
        for tid, exp in list(session.pulls.items()):
            self._finish_expectation(exp, None, kind(f"transfer {tid} asked of {session.peer} never started: {cause}"))
        session.pulls.clear()
        for exp, exc, timer in session.fencing.values():
            timer.cancel()
            self._finish_expectation(exp, None, exc)
        session.fencing.clear()
        for tid in [tid for tid, (s, _) in self._deferred_pulls.items() if s is session]:
            del self._deferred_pulls[tid]
        self._spawn(session.close(), f"sage-close-{session.peer}")

    def _session_for(self, plan: TransferPlan, doing: str) -> PeerSession:
        """The session a plan runs on, once the plan fits both sides' KV memory (else a ``PlanError`` naming why)."""
        self._check_open()
        tid = plan.transfer_id
        if self._memory is None:
            raise PlanError(f"transfer {tid}: register KV memory with the channel before {doing}")
        session = self._sessions.get(plan.peer)
        if session is None:
            raise PlanError(f"transfer {tid}: peer {plan.peer!r} is not connected (connected: {', '.join(self.peers) or 'none'})")
        if session.region is None:
            raise PlanError(f"transfer {tid}: peer {plan.peer!r} has not registered KV memory")
        for side, schema in (("local", self._memory.schema), (f"peer {plan.peer!r}", session.region.schema)):
            if not _same_shape(plan.schema, schema):
                raise PlanError(f"transfer {tid}: plan schema {plan.schema} does not match the {side} KV memory {schema}")
        return session
