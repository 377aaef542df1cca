"""One peer session's state: :class:`SessionState`, shared by its send path (:mod:`.session_send`) and its
receive path (:mod:`.session_receive`)."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

from . import kernels
from .config import Integrity
from .placement import ShmWriter
from .session_host import SessionHost
from .transfers import Expectation, Incoming, Outgoing
from .transports.base import Connection
from .wire import (
    Region,
)

if TYPE_CHECKING:
    import concurrent.futures

    from .attest import PeerIdentity
    from .placement import CmaWriter
    from .wire import Attest

_YIELD_EVERY = 64
#: bytes of one transfer's chunks one placement job writes (the loop's round trip is paid per job)
_PLACE_BATCH_BYTES = 16 << 20
#: the same for device KV: one job is a few kernels whatever its size (consecutive chunks go together), and the
#: Python around them (tens of microseconds a job) is what a larger job spreads thinner
_DEVICE_PLACE_BATCH_BYTES = 64 << 20
#: a placed peer's window is this many times ``peer_window`` (nothing is staged for its chunks)
_PLACED_WINDOW_FACTOR = 4
#: a placement job this small is copied on the loop thread: a worker thread's round trip costs more
_INLINE_PLACE_BYTES = 256 << 10


class ReadSlot:
    """What one reader knows of the frame it is reading: its header, where its payload lands, the buffers it
    took. The session's own connection has one, and so has each of its extra connections (lanes), so that
    several payloads land at once."""

    __slots__ = ("decode_in", "decoded", "kind", "landing", "lane", "scatters", "staging")

    def __init__(self, lane: bool = False, scatters: bool = False) -> None:
        self.decoded: Any = None
        self.kind = 0  # IN_PLACE, STAGED, ...
        self.decode_in: tuple[memoryview, memoryview] | None = None
        self.staging = memoryview(bytearray(0))
        self.lane = lane  # an extra connection (lane): chunks only
        self.landing: Incoming | None = None  # (with lanes) the transfer whose pages the payload being read lands in
        self.scatters = scatters  # its connection fills a list of buffers: a chunk's pages, where they lie


class SessionState:
    """The state of one peer connection; :class:`~sage_transport.session.PeerSession` adds the tasks that drive it."""

    def __init__(self, host: SessionHost, conn: Connection, peer: str, region: Region | None) -> None:
        self.host = host
        self.conn = conn
        self.peer = peer
        self.region = region
        self.outgoing: dict[int, Outgoing] = {}
        self.incoming: dict[int, Incoming] = {}
        self.pulls: dict[str, Expectation] = {}  # transfers asked of this peer, not yet announced
        self.outbox: collections.deque[bytes] = collections.deque()
        self.wake = asyncio.Event()
        self.closed = False
        self._next_wire_id = 0
        self._staging_free: list[memoryview] = []  # staging buffers for gathered chunks, reused (one per send in flight)
        self._sends: set[asyncio.Task[None]] = set()  # chunk sends in flight (several per peer)
        self._send_limit = host.config.send_lanes
        self._slot = ReadSlot(scatters=conn.gathers)  # the frame being read on the session's own connection (session_receive)
        self._device_in: Any = None  # device KV: the staging tensor the frame being read lands in
        self.lanes: list[Connection] = []  # extra connections to the peer, for chunks (``connections_per_peer``)
        self._lane_busy = [0]  # chunk sends in flight on the own connection and on each lane
        self._lane_turn = 0  # where the search for the least busy one starts next
        self.peer_codecs: frozenset[str] = frozenset()  # what the peer decodes (from the handshake)
        # codec_policy=auto: stored bytes/s of the last large transfer sent as stored or with each codec
        self.rates: dict[str, float] = {}
        self.auto_choices = 0
        # wire codecs: (stored bytes, wire form) buffer pairs for encodes and decodes in worker threads
        self._encode_free: list[tuple[memoryview, memoryview]] = []
        self._decode_free: list[tuple[memoryview, memoryview]] = []
        self._decoding = 0
        self._encoding = 0
        self._decode_done = asyncio.Event()
        self._ack_flush_scheduled = False
        # zero_copy off: payloads land in staging and reach the KV cache only once verified
        self._zero_copy = host.config.zero_copy
        self.tasks: list[asyncio.Task[None]] = []
        # who the peer is: kernel-attested process (None: unknown, e.g. another host), and whether it may pull,
        # push and be handed our memory (token proven, or attested as this user on this host)
        self.identity: PeerIdentity | None = None
        self.trusted = False
        self.peer_invite: Attest | None = None  # the peer's attestation socket: where we present a window later
        self.attest_nonce: bytes | None = None  # our invitation's nonce, revoked when the session ends
        self.pull_destinations: dict[str, list[tuple[int, int, tuple[int, ...]]]] = {}  # what our pulls asked for
        # fence: receiver-side aborts of transfers the peer may still be writing directly, until its Fence
        self.fencing: dict[int, tuple[Expectation, BaseException, asyncio.TimerHandle]] = {}
        # incoming chunk sizes the peer may use: the largest chunk (on the wire) of any transfer it announced
        self.max_incoming_chunk = 0
        self.max_wire_id_in = 0
        self.incoming_pages = 0  # pages planned in this peer's open incoming transfers (bounded)
        # direct placement: chunks of accepted transfers are written into the peer's memory by worker threads
        self.window_offered = False
        self.hold_sent = 0  # the classes we told this peer to hold (fan_in.FanInArbiter)
        self.placer: CmaWriter | ShmWriter | None = None
        self._placement_pool: concurrent.futures.Executor | None = None
        self._placing = 0
        self._place_limit = host.config.send_lanes + 1  # one job queued behind each copying thread
        # xxh3 placement: copy and checksum (source and landed) in one compiled pass per page
        self._held_pick: tuple[Hashable, int] | None = None  # picked after a placement batch ended: goes next
        self._unaccepted: list[tuple[Outgoing, int]] = []  # large chunks picked before the receiver accepted
        self._fused_place = kernels.AVAILABLE and host.config.integrity is Integrity.XXH3
        self._trust_writer = host.config.verify_placed == "writer"
        self.counters: collections.Counter[str] = collections.Counter()  # chunks and bytes, this peer only

    def count_sent(self, chunks: int, nbytes: int) -> None:
        """Chunks and bytes gone to the peer: the channel's counters and this peer's."""
        counters, mine = self.host.counters, self.counters
        counters["chunks_sent"] += chunks
        counters["bytes_sent"] += nbytes
        mine["chunks_sent"] += chunks
        mine["bytes_sent"] += nbytes

    def count_received(self, nbytes: int) -> None:
        """One chunk of ``nbytes`` taken from the peer: the channel's counters and this peer's."""
        counters, mine = self.host.counters, self.counters
        counters["chunks_received"] += 1
        counters["bytes_received"] += nbytes
        mine["chunks_received"] += 1
        mine["bytes_received"] += nbytes

    if TYPE_CHECKING:  # what both paths call of the session (defined in :mod:`.session`)

        def post(self, message: Any) -> None: ...
        def _accept(self, inc: Incoming, seq: int) -> None: ...
        def _placed(
            self, out: Outgoing, seqs: list[int], attempts: list[int], results: Any, exc: BaseException | None
        ) -> None: ...
        def _chunk_sent(self, task: asyncio.Task[None]) -> None: ...
