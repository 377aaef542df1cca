"""UCX through ucxx (PyPI ``ucxx-cu12``): shared memory and CMA on one host, TCP/IB/RoCE across hosts.

Peers reach each other by ``host:port``: that is a small TCP *link* (:mod:`.link`). Until the channel's
handshake succeeds the connection's frames travel on the link, size-limited and without payloads, and
nothing of UCX is disclosed; :meth:`UcxConnection.authenticated` then exchanges worker addresses and random
per-connection tags (a secret only the authenticated peer learns: frames on a guessed tag never match)
and the link carries heartbeats. Data never touches it. UCX's own TCP sockets are bound to the interface of a
non-loopback ``listen_host`` (``UCX_NET_DEVICES``) unless devices are set. Endpoints are made from worker addresses, and
their kind is chosen per peer:

* **same host** (same boot id and host name): shared memory (sysv/posix, made to accept peer error handling
  with ``MM_ERROR_HANDLING=y``), never TCP. Every endpoint has peer error handling: without it UCX aborts the
  whole process when a same-host sender dies in the middle of a rendezvous (its CMA read fails), and can
  neither cancel a send to a dead receiver nor close that endpoint. UCX's shared memory cannot detect a
  dead peer by itself, so the link does: a killed process's socket closes at once, a hung one stops beating.
* **remote**: UCX's keepalive and the link's heartbeats as well.

The transports UCX really selected for each peer are read from what UCX says of the endpoint once it is made
(``ucp_ep_print_info``, into memory: :attr:`UcxConnection.ucx_transports`) and a warning is logged when a same-host
peer runs over TCP. Importing this module leaves the process's environment as it was: what ucxx sets there for its
contexts is given to ours as options instead.

A frame is one *head* message (sizes, then the header when it fits in :data:`HEAD_SLOT` bytes, and a payload
too when both fit) and, on a second tag, an overflow header and a larger payload, which the receiver posts
straight into the sink's buffer.
Both messages are posted without an await in between, so concurrent senders never interleave and several
frames are in flight at once; ``send`` returns when UCX is done with the payload.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import functools
import os
import re
import secrets
import socket
import struct
from typing import TYPE_CHECKING, Any, ClassVar

import msgspec
import structlog

from ..config import KVTransportConfig, ProgressMode, is_loopback
from ..errors import ConfigError, ConnectionClosedError, FrameTooLargeError, PeerDeadError, ProtocolError, UnsupportedError
from ..memory import as_byte_view
from ..placement import host_identity
from .base import DISCARD_LIMIT, Connection, ConnectionStatistics, Frame, Listener, PayloadSink, Transport, TransportCapabilities
from .link import Link, open_link, parse_host_port
from .listeners import ServerListener
from .ucx_progress import WorkerProgress

if TYPE_CHECKING:
    from ..hw import TransportProfile

_USER_UCX_ENV = {k: v for k, v in os.environ.items() if k.startswith("UCX_")}
try:
    from ucxx._lib import libucxx as _ucx
    from ucxx._lib.arr import Array as _Array
except ImportError as exc:  # pragma: no cover - the registry turns this into UnsupportedError
    raise ImportError(f"the ucx transport needs ucxx (pip install ucxx-cu12): {exc}") from exc

#: what importing ucxx put in this process's environment for its UCX contexts (RNDV_THRESH, MAX_RNDV_RAILS,
#: RNDV_FRAG_MEM_TYPE, MEMTYPE_CACHE): our contexts get them as options instead, and the environment goes back to
#: what the user gave the process, for every other UCX program in it and every child it starts (NIXL's bundled UCX
#: ran at a quarter of its speed with them)
_UCXX_DEFAULTS = {k[4:]: v for k, v in os.environ.items() if k.startswith("UCX_") and _USER_UCX_ENV.get(k) != v}
for _name in _UCXX_DEFAULTS:
    if f"UCX_{_name}" in _USER_UCX_ENV:
        os.environ[f"UCX_{_name}"] = _USER_UCX_ENV[f"UCX_{_name}"]
    else:
        del os.environ[f"UCX_{_name}"]

__all__ = ["HEAD_SLOT", "UcxConnection", "UcxTransport", "host_identity"]

log = structlog.get_logger("sage_transport.ucx")

HEAD_SLOT = 8192  # head messages stay under UCX's eager/rendezvous switch on shared memory
_INLINE_SPINS = 2000  # polling mode: iterations a waiter spins on its own request before it parks on a future
_INLINE_SPINS_BLOCKING = 50
_PREFIX = struct.Struct("<IQ")  # header length, payload length + 1 (0: no payload; 2**64-1: goodbye)
_GOODBYE = (1 << 64) - 1
_INTRO_VERSION = 1
_SHARED_MEMORY_TLS = ("posix", "sysv", "cma", "xpmem", "knem", "self")


class _Intro(msgspec.Struct, frozen=True):
    version: int
    worker_address: bytes
    host: str
    recv_tag: int
    pid: int = 0  # 0: unknown (an older peer)


_intro_decoder = msgspec.msgpack.Decoder(_Intro)


_PROTO_ROW = re.compile(r"\|\s*[\w.]+\.\.[\w.]+\s*\|\s*(?P<proto>[^|]*?)\s*\|\s*(?P<lanes>[^|]+?)\s*\|")


def parse_protocol_table(text: str) -> dict[str, list[str]]:
    """``UCX_PROTO_INFO`` table → ``{protocol: [transport/device, ...]}`` (e.g. ``cma/memory``)."""
    out: dict[str, list[str]] = {}
    for match in _PROTO_ROW.finditer(text):
        proto = match["proto"].removeprefix("(?)").strip()
        lanes = [lane.strip() for lane in re.split(r"[,\s]+", match["lanes"]) if "/" in lane]
        if lanes:
            out.setdefault(proto, [])
            out[proto].extend(lane for lane in lanes if lane not in out[proto])
    return out


def endpoint_info(endpoint: Any) -> str:
    """What UCX says of an endpoint (``ucp_ep_print_info``: its lanes and protocol tables), read into memory: UCX
    prints nothing to the process's stdout, and no setting stays on after the endpoint is made."""
    return _printed(_libraries()[0].ucp_ep_print_info, endpoint.handle)


def context_info(context: Any) -> str:
    """What UCX says of a context (``ucp_context_print_info``: its components, memory domains and resources, e.g.
    ``cuda_copy/cuda`` where it moves CUDA memory), read into memory."""
    return _printed(_libraries()[0].ucp_context_print_info, context.handle)


def _printed(print_info: Any, handle: int) -> str:
    libc = _libraries()[1]
    size = ctypes.c_size_t()
    text = ctypes.c_char_p()
    stream = libc.open_memstream(ctypes.byref(text), ctypes.byref(size))
    if not stream:
        return ""
    try:
        print_info(ctypes.c_void_p(handle), ctypes.c_void_p(stream))
    finally:
        libc.fclose(ctypes.c_void_p(stream))  # flushes into ``text``
    try:
        return (text.value or b"").decode(errors="replace")
    finally:
        libc.free(text)


@functools.cache
def _libraries() -> tuple[Any, Any]:
    libucp = ctypes.CDLL("libucp.so.0")  # the one ucxx loaded (found by its soname)
    libucp.ucp_ep_print_info.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    libucp.ucp_ep_print_info.restype = None
    libucp.ucp_context_print_info.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    libucp.ucp_context_print_info.restype = None
    libc = ctypes.CDLL(None)
    libc.open_memstream.argtypes = [ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(ctypes.c_size_t)]
    libc.open_memstream.restype = ctypes.c_void_p
    libc.fclose.argtypes = [ctypes.c_void_p]
    libc.free.argtypes = [ctypes.c_void_p]
    return libucp, libc


def _map_error(exc: BaseException, conn: UcxConnection) -> BaseException:
    if conn._dead:
        return PeerDeadError(f"peer {conn.peer_address} is dead: {conn._dead}")
    if conn._closed:
        return ConnectionClosedError(f"connection {conn.local_address} -> {conn.peer_address} is closed")
    if isinstance(exc, _ucx.UCXMessageTruncatedError):
        return ProtocolError(f"message from {conn.peer_address} larger than the posted buffer: {exc}")
    return PeerDeadError(f"UCX error with {conn.peer_address}: {exc!r}")


class UcxConnection(Connection):
    """One UCX endpoint plus its liveness link."""

    def __init__(self, transport: UcxTransport, link: Link, peer: str) -> None:
        self.transport = transport
        self.local_address = link.local_address
        self.peer_address = peer
        self.same_host = False
        self._error_handling = True
        self.ucx_transports: dict[str, list[str]] = {}
        self._ep: Any = None  # made by authenticated(): until then frames go on the link
        self._link = link
        self._progress = transport._progress_driver()
        self._tag_head_out = self._tag_data_out = self._tag_head_in = self._tag_data_in = None
        self._scratch = bytearray(0)  # where refused payloads are consumed (up to DISCARD_LIMIT)
        self._head_buf = bytearray(HEAD_SLOT)
        self._head_array = _Array(self._head_buf)
        self._head_pending: Any = None
        self._waiting: set[asyncio.Future[None]] = set()
        self._dead = ""
        self._closed = False
        self._peer_closed = False
        self._broken = ""
        self._counts = [0, 0, 0, 0]

    def __repr__(self) -> str:
        kind = "same-host" if self.same_host else "remote"
        return f"<UcxConnection {self.local_address} -> {self.peer_address} ({kind})>"

    def _attach(self, endpoint: Any, send_tag: int, recv_tag: int, local: bool, error_handling: bool) -> None:
        tag = _ucx.UCXXTag
        self._ep, self.same_host, self._error_handling = endpoint, local, error_handling
        self._tag_head_out, self._tag_data_out = tag(send_tag), tag(send_tag | 1)
        self._tag_head_in, self._tag_data_in = tag(recv_tag), tag(recv_tag | 1)

    async def authenticated(self, max_header: int, max_payload: int) -> None:
        """Exchange worker addresses and secret tags over the link, make the endpoint, start heartbeats."""
        if self._ep is not None:
            await super().authenticated(max_header, max_payload)
            return
        self._check_sendable()
        recv_tag = _secret_tag()
        link = self._link
        await link.send_blob(self.transport._intro(recv_tag))
        intro = _decode_intro(await link.recv_blob(), self.peer_address)
        self.transport._open_endpoint(self, intro, recv_tag)
        await super().authenticated(max_header, max_payload)

    # ---- before the handshake: frames on the link -----------------------------------------------------

    async def _link_send(self, header: bytes, payload: Any) -> None:
        if payload is not None:
            raise ProtocolError(f"no payload may go to {self.peer_address} before the handshake completed")
        if len(header) > self.max_header:
            raise FrameTooLargeError(f"a {len(header)}-byte header before the handshake (limit {self.max_header})")
        await self._link.send_raw(_PREFIX.pack(len(header), 0) + header)

    async def _link_recv(self) -> Frame:
        prefix = await self._link.recv_exactly(_PREFIX.size)
        hlen, plen = _PREFIX.unpack(prefix)
        if plen == _GOODBYE:
            self._peer_closed = True
            raise ConnectionClosedError(f"peer {self.peer_address} closed the connection")
        error = self._frame_error(hlen, plen - 1 if plen else 0)
        if error:  # refused before anything is allocated; the link ends
            self._broken = error
            self._link.abort()
            raise FrameTooLargeError(error)
        self._counts[1] += 1
        return Frame(await self._link.recv_exactly(hlen), None)

    # ---- liveness -----------------------------------------------------------------------------------

    def _on_dead(self, reason: str) -> None:
        if self._dead or self._closed:
            return
        self._dead = reason
        error = PeerDeadError(f"peer {self.peer_address} is dead: {reason}")
        self._progress.fail(self._waiting, error)
        if self.same_host:  # UCX cannot tell a dead same-host peer: it would hold these (and our buffers) forever
            self._progress.abandon(self, error)
        self._close_endpoint()

    def _on_goodbye(self) -> None:
        self._peer_closed = True

    def _close_endpoint(self) -> None:
        ep, self._ep = self._ep, None
        if ep is not None:
            with contextlib.suppress(Exception):
                if self._error_handling:  # a forced close: UCX cancels what is in flight at once
                    head = self._head_pending
                    if self._progress.holds(self) or (head is not None and not head.completed):
                        self._progress.wedged += 1  # ucxx keeps cancelled requests, and so the worker, for good
                    ep.close_blocking(0, 1)
                else:  # a peer in this process: it never dies alone, its requests finish
                    ep.close()
        self._head_pending = None  # the progress tracker keeps it (and its buffer) until UCX is done

    # ---- waiting ------------------------------------------------------------------------------------

    async def _wait(self, request: Any, keepalive: Any, idle: bool = False, sending: bool = False) -> None:
        if not request.completed:
            # drive the worker from the waiting task itself for a while (no future, no second task hop):
            # a control message arrives in ~6 us instead of ~9; blocking mode spins briefly, polling longer
            worker = self._progress.worker
            try:
                for _ in range(_INLINE_SPINS if self._progress.polling else _INLINE_SPINS_BLOCKING):
                    worker.progress()
                    if request.completed or self._dead or self._closed:
                        break
                    await asyncio.sleep(0)
            except asyncio.CancelledError:
                self._progress.track(request, keepalive, idle, self, sending)  # UCX still owns the buffer: keep it alive
                raise
        if request.completed:
            try:
                request.check_error()
            except Exception as exc:
                raise _map_error(exc, self) from exc
            return
        if self._dead or self._closed:  # it broke while we spun: no one would ever resolve a new future
            if self._dead and self.same_host and sending:  # UCX never finishes it (see WorkerProgress.abandon)
                self._progress.wedged += 1
                self._progress.peer_died = True
            else:  # UCX finishes or cancels it: keep the buffer until then
                self._progress.track(request, keepalive, idle, self, sending)
            raise _map_error(ConnectionError("connection broken"), self)
        future = self._progress.track(request, keepalive, idle, self, sending)
        self._waiting.add(future)
        try:
            await future
        except (PeerDeadError, ConnectionClosedError):
            raise
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise _map_error(exc, self) from exc
        finally:
            self._waiting.discard(future)

    def _check_sendable(self) -> Any:
        if self._closed:
            raise ConnectionClosedError(f"connection {self.local_address} -> {self.peer_address} is closed")
        if self._dead:
            raise PeerDeadError(f"peer {self.peer_address} is dead: {self._dead}")
        if self._peer_closed:
            raise ConnectionClosedError(f"peer {self.peer_address} closed the connection")
        return self._ep

    # ---- send ---------------------------------------------------------------------------------------

    async def send(self, header: bytes, payload: Any = None) -> None:
        ep = self._check_sendable()
        if ep is None:
            await self._link_send(header, payload)
            self._counts[0] += 1
            return
        if payload is not None and getattr(payload, "is_cuda", False):
            await self._send_device(ep, header, payload)
            return
        view = None if payload is None else as_byte_view(payload)
        nbytes = 0 if view is None else view.nbytes
        if nbytes > self.transport.capabilities.max_message_size:
            raise FrameTooLargeError(f"payload of {nbytes} bytes exceeds max_message_size")
        hlen = len(header)
        prefix = _PREFIX.pack(hlen, 0 if view is None else nbytes + 1)
        inline = hlen + _PREFIX.size <= HEAD_SLOT
        if inline and view is not None and _PREFIX.size + hlen + nbytes <= HEAD_SLOT:
            head = _Array(prefix + header + view)  # a small payload rides in the head message: one UCX message
            nbytes = 0
        else:
            head = _Array(prefix + header if inline else prefix)
        requests = [(ep.tag_send(head, self._tag_head_out), head)]
        if not inline:
            extra = _Array(header)
            requests.append((ep.tag_send(extra, self._tag_data_out), extra))
        if nbytes:
            data = _Array(view)
            requests.append((ep.tag_send(data, self._tag_data_out), data))
        self._counts[0] += 1
        self._counts[2] += 0 if view is None else view.nbytes
        try:
            for request, keepalive in requests:
                await self._wait(request, keepalive, sending=True)
        except asyncio.CancelledError:  # the frame still goes whole: keep every buffer alive until UCX is done
            for request, keepalive in requests:
                if not request.completed:
                    self._progress.track(request, keepalive, False, self, True)
            raise

    async def _send_device(self, ep: Any, header: bytes, payload: Any) -> None:
        """A frame whose payload is device memory (a CUDA tensor): UCX reads it there (``cuda_copy``/``cuda_ipc``/
        GPUDirect). Never inline in the head message."""
        nbytes = payload.numel() * payload.element_size()
        if nbytes > self.transport.capabilities.max_message_size:
            raise FrameTooLargeError(f"payload of {nbytes} bytes exceeds max_message_size")
        hlen = len(header)
        inline = hlen + _PREFIX.size <= HEAD_SLOT
        prefix = _PREFIX.pack(hlen, nbytes + 1)
        head = _Array(prefix + header if inline else prefix)
        requests = [(ep.tag_send(head, self._tag_head_out), head)]
        if not inline:
            extra = _Array(header)
            requests.append((ep.tag_send(extra, self._tag_data_out), extra))
        data = _Array(payload)
        requests.append((ep.tag_send(data, self._tag_data_out), data))
        self._counts[0] += 1
        self._counts[2] += nbytes
        try:
            for request, keepalive in requests:
                await self._wait(request, (keepalive, payload), sending=True)
        except asyncio.CancelledError:
            for request, keepalive in requests:
                if not request.completed:
                    self._progress.track(request, (keepalive, payload), False, self, True)
            raise

    # ---- receive ------------------------------------------------------------------------------------

    async def recv(self, sink: PayloadSink | None = None) -> Frame:
        if self._closed:
            raise ConnectionClosedError(f"connection {self.local_address} -> {self.peer_address} is closed")
        if self._dead:
            raise PeerDeadError(f"peer {self.peer_address} is dead: {self._dead}")
        if self._broken:
            raise ConnectionClosedError(f"connection to {self.peer_address} is unusable: {self._broken}")
        if self._ep is None:
            return await self._link_recv()
        if self._head_pending is None:
            self._head_pending = self._ep.tag_recv(self._head_array, self._tag_head_in)
        await self._wait(self._head_pending, self._head_array, idle=True)
        self._head_pending = None
        hlen, plen = _PREFIX.unpack_from(self._head_buf)
        if plen == _GOODBYE:
            self._peer_closed = True
            raise ConnectionClosedError(f"peer {self.peer_address} closed the connection")
        error = self._frame_error(hlen, plen - 1 if plen else 0)
        if error:  # nothing is allocated for it; the stream is out of step from here on
            self._broken = error
            raise FrameTooLargeError(error)
        try:
            if hlen + _PREFIX.size <= HEAD_SLOT:
                header = bytes(self._head_buf[_PREFIX.size : _PREFIX.size + hlen])
            else:
                overflow = bytearray(hlen)
                await self._recv_into(overflow)
                header = bytes(overflow)
            self._counts[1] += 1
            if plen == 0:
                return Frame(header, None)
            nbytes = plen - 1
            self._counts[3] += nbytes
            inline_at = _PREFIX.size + hlen if _PREFIX.size + hlen + nbytes <= HEAD_SLOT else 0
            try:
                target = sink(header, nbytes) if sink is not None else None
            except BaseException:
                if not inline_at:
                    await self._discard(nbytes)
                raise
            if target is not None and getattr(target, "is_cuda", False):  # device staging: UCX writes it there
                return await self._recv_device(header, target, nbytes, inline_at)
            view = as_byte_view(bytearray(nbytes) if target is None else target, writable=True)
            if view.nbytes != nbytes:
                if not inline_at:
                    await self._discard(nbytes)
                raise ProtocolError(f"sink gave {view.nbytes} bytes for a {nbytes}-byte payload")
            if inline_at:
                view[:] = self._head_buf[inline_at : inline_at + nbytes]
            elif nbytes:
                await self._recv_into(view)
            return Frame(header, view)
        except asyncio.CancelledError:
            self._broken = "a receive was cancelled in the middle of a frame"
            raise

    async def _recv_device(self, header: bytes, target: Any, nbytes: int, inline_at: int) -> Frame:
        if target.numel() * target.element_size() != nbytes:
            if not inline_at:
                await self._discard(nbytes)
            raise ProtocolError(f"sink gave {target.numel() * target.element_size()} bytes for a {nbytes}-byte payload")
        if inline_at:  # a small payload rode in the head message: up to the device
            import torch

            target.copy_(torch.frombuffer(bytearray(self._head_buf[inline_at : inline_at + nbytes]), dtype=torch.uint8))
            torch.cuda.current_stream(target.device).synchronize()  # a few KiB: in place before any stream reads it
        else:
            await self._recv_into(target)
        return Frame(header, target)

    async def _recv_into(self, buffer: Any) -> None:
        array = _Array(buffer)
        await self._wait(self._ep.tag_recv(array, self._tag_data_in), array)

    async def _discard(self, nbytes: int) -> None:
        if nbytes > DISCARD_LIMIT:  # consuming it would allocate what the peer names: the stream ends here
            self._broken = f"a refused {nbytes}-byte payload was not consumed"
        elif nbytes:
            if len(self._scratch) < nbytes:
                self._scratch = bytearray(nbytes)
            await self._recv_into(memoryview(self._scratch)[:nbytes])

    def statistics(self) -> ConnectionStatistics:
        return ConnectionStatistics(*self._counts)

    def link_info(self) -> dict[str, Any]:
        return {"same_host": self.same_host, "ucx_transports": self.ucx_transports, "peer": self.peer_address}

    # ---- close --------------------------------------------------------------------------------------

    async def aclose(self) -> None:
        if self._closed:
            return
        if not self._dead and not self._peer_closed and self._ep is not None:
            with contextlib.suppress(Exception):
                goodbye = _Array(_PREFIX.pack(0, _GOODBYE))
                request = self._ep.tag_send(goodbye, self._tag_head_out)
                if not request.completed:
                    future = self._progress.track(request, goodbye)
                    async with asyncio.timeout(1.0):
                        await future
        self._closed = True
        self._progress.fail(self._waiting, ConnectionClosedError(f"connection to {self.peer_address} closed"))
        if self._ep is None:
            await self._link.close()  # before the handshake the link carries frames: no goodbye byte
        else:
            await self._link.goodbye()
        self._close_endpoint()
        self.transport._connections.discard(self)

    def abort(self) -> None:
        """Die abruptly, as a killed process would: reset the link, drop the endpoint, say nothing."""
        self._closed = True
        self._link.abort()
        self._progress.fail(self._waiting, ConnectionClosedError("aborted"))
        self._close_endpoint()
        self.transport._connections.discard(self)


class _WorkerSlot:
    """A UCX context and worker, which may outlive the transport that made them (parked, see below)."""

    __slots__ = ("context", "worker")

    def __init__(self, context: Any, worker: Any) -> None:
        self.context, self.worker = context, worker


# Workers that UCX cannot release: a same-host peer died with sends in flight, and an endpoint without peer
# error handling never finishes them (nor lets ucxx free the worker). Such a worker is still healthy for
# everyone else, so the next transport with the same UCX options adopts it instead of opening another:
# deaths cost at most one parked worker per option set, not one worker (~16 descriptors) per death.
_PARKED: dict[tuple[tuple[str, str], ...], list[_WorkerSlot]] = {}


def _slot_key(options: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """Workers are interchangeable only between transports whose UCX contexts have the same options (given, and
    ``UCX_*`` variables of the environment they were made in)."""
    environment = {f"env:{k}": v for k, v in os.environ.items() if k.startswith("UCX_")}
    return tuple(sorted({**options, **environment}.items()))


def _env_default(name: str, value: str) -> dict[str, str]:
    return {} if f"UCX_{name}" in os.environ else {name: value}


def environment_before_ucxx() -> dict[str, str]:
    """This process's environment as its user gave it (ucxx's own ``UCX_*`` settings were taken back out at
    import): for a child that runs another UCX program (NIXL's bundled UCX), which must run as its users run it."""
    return dict(os.environ)


def cuda_support(tls: str | None) -> bool:
    """Whether UCX may move CUDA memory here: its CUDA transport library is installed, the transports allowed
    (``tls``, else ``UCX_TLS``) include ``cuda_copy``, and torch sees a CUDA device (imported only if already in
    this process: nothing registers CUDA memory without it). Once the context exists, its resources decide
    (:func:`context_info`): without a ``cuda_copy`` resource the transport declares host memory only."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return False
    allowed = tls if tls is not None else os.environ.get("UCX_TLS", "all")
    names = [t.strip() for t in allowed.split(",") if t.strip()]
    if allowed.startswith("^"):
        if {"cuda", "cuda_copy"} & {n.lstrip("^") for n in names}:
            return False
    elif not {"all", "cuda", "cuda_copy"} & set(names):
        return False
    try:
        import libucx
    except ImportError:
        return False
    return any(
        name.startswith("libuct_cuda.so") for name in os.listdir(os.path.join(os.path.dirname(libucx.__file__), "lib", "ucx"))
    )


def parked_workers() -> int:
    """UCX workers parked in this process after a same-host peer died with sends in flight (see above)."""
    return sum(len(slots) for slots in _PARKED.values())


class UcxTransport(Transport):
    """UCX transport. ``tls`` sets ``UCX_TLS`` for this transport's context (``None``: the environment or
    UCX's default); ``locality`` forces the endpoint kind (``auto``, ``local`` or ``remote``)."""

    name: ClassVar[str] = "ucx"
    capabilities: TransportCapabilities = TransportCapabilities(
        memory_kinds=frozenset({"cpu"}), ordered=True, max_message_size=1 << 40, zero_copy=True
    )

    def __init__(
        self,
        *,
        tls: str | None = None,
        progress_mode: ProgressMode | str = ProgressMode.BLOCKING,
        host: str = "127.0.0.1",
        port: int = 0,
        heartbeat_interval_s: float = 1.0,
        peer_timeout_s: float = 10.0,
        connect_timeout_s: float = 10.0,
        locality: str = "auto",
        options: dict[str, str] | None = None,
    ) -> None:
        if locality not in ("auto", "local", "remote"):
            raise ConfigError(f"locality={locality!r} must be auto, local or remote")
        self.tls = tls
        self.progress_mode = ProgressMode(progress_mode)
        self.host, self.port = host, port
        self.heartbeat_interval_s, self.peer_timeout_s = heartbeat_interval_s, peer_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.locality = locality
        self.options = dict(options or {})
        self.profile: TransportProfile | None = None  # set by from_config
        self.host_id = host_identity()
        if cuda_support(tls):  # device KV goes from and lands in device memory (cuda_copy, cuda_ipc, GPUDirect)
            self.capabilities = msgspec.structs.replace(UcxTransport.capabilities, memory_kinds=frozenset({"cpu", "cuda"}))
        self._slot: _WorkerSlot | None = None
        self._worker: Any = None
        self._progress: WorkerProgress | None = None
        self._connections: set[UcxConnection] = set()
        self._listeners: list[ServerListener] = []

    @classmethod
    def from_config(cls, config: KVTransportConfig) -> UcxTransport:
        """A transport set up by this host's :class:`~sage_transport.hw.TransportProfile` for ``config``:
        UCX transports (shared memory and CMA for same-host peers, RDMA or TCP for remote ones), the RDMA
        rails nearest this process, the rendezvous threshold; ``UCX_*`` variables already in the
        environment win over the profile."""
        from ..hw import TopologyManager, TransportProfile

        profile = TransportProfile.derive(TopologyManager(vendors=(), measure_memory=False).probe(), config)
        options = profile.ucx_options()
        if "NET_DEVICES" not in options and "UCX_NET_DEVICES" not in os.environ and not is_loopback(config.listen_host):
            # UCX's own TCP sockets listen on the interface we were told to use, not on every interface. (Not for a
            # loopback listen_host: such a channel may still connect out to other hosts, which lo cannot reach.)
            interface = interface_of(config.listen_host)
            if interface is not None:
                options["NET_DEVICES"] = interface
        transport = cls(
            tls=options.pop("TLS", None),
            progress_mode=config.progress_mode,
            host=config.listen_host,
            port=config.listen_port,
            heartbeat_interval_s=config.heartbeat_interval_s,
            peer_timeout_s=config.peer_timeout_s,
            connect_timeout_s=config.connect_timeout_s,
            locality=config.ucx_endpoint,
            options=options,
        )
        transport.profile = profile
        return transport

    def __repr__(self) -> str:
        return f"<UcxTransport tls={self.tls or 'default'} progress={self.progress_mode.value}>"

    # ---- worker -------------------------------------------------------------------------------------

    def _progress_driver(self) -> WorkerProgress:
        if self._progress is None:
            options = self._context_options()
            parked = _PARKED.get(_slot_key(options))
            if parked:
                self._slot = parked.pop()
            else:
                try:
                    context = _ucx.UCXContext(options, feature_flags=(_ucx.Feature.TAG, _ucx.Feature.WAKEUP))
                    worker = _ucx.UCXWorker(context, enable_delayed_submission=False, enable_python_future=False)
                except _ucx.UCXError as exc:
                    raise UnsupportedError(f"UCX could not start with TLS={self.tls!r}: {exc}") from exc
                self._slot = _WorkerSlot(context, worker)
            self._worker = self._slot.worker
            if "cuda" in self.capabilities.memory_kinds and "cuda_copy/" not in context_info(self._slot.context):
                # the library is there but UCX loaded no CUDA transport (driver, TLS): device KV is staged instead
                self.capabilities = UcxTransport.capabilities
                log.info("ucx_cuda_unavailable", reason="UCX's context has no cuda_copy resource", fallback="pinned staging")
            self._progress = WorkerProgress(self._worker, self.progress_mode is ProgressMode.POLLING)
        return self._progress

    def _context_options(self) -> dict[str, str]:
        # shared memory with peer error handling (see the module docstring); UCX_MM_ERROR_HANDLING wins.
        # Not for forced remote endpoints: error handling is what keeps those off shared memory
        shared = _env_default("MM_ERROR_HANDLING", "y") if self.locality != "remote" else {}
        options = {**_UCXX_DEFAULTS, **shared, **self.options}
        if "UCX_MEMTYPE_CACHE" in os.environ:  # ucxx was imported before us and left its setting, which UCX flags
            options.update(_env_default("WARN_UNUSED_ENV_VARS", "n"))
        if self.tls:
            options["TLS"] = self.tls
        return options

    def _intro(self, recv_tag: int) -> bytes:
        self._progress_driver()
        return msgspec.msgpack.encode(_Intro(_INTRO_VERSION, self._worker.address.tobytes(), self.host_id, recv_tag, os.getpid()))

    def _open_endpoint(self, conn: UcxConnection, intro: _Intro, recv_tag: int) -> None:
        """Make ``conn``'s endpoint to the worker ``intro`` describes and start the link's heartbeats."""
        peer, link = conn.peer_address, conn._link
        if intro.version != _INTRO_VERSION:
            raise ProtocolError(f"{peer} speaks UCX bootstrap version {intro.version}, we speak {_INTRO_VERSION}")
        local = self.locality == "local" or (self.locality == "auto" and intro.host == self.host_id)
        address = _ucx.UCXAddress.create_from_buffer(intro.worker_address)
        # a peer in this very process cannot die alone: it keeps UCX's zero-copy CMA rendezvous, which
        # peer error handling rules out (and which stalls between two workers of one process without it)
        same_process = local and intro.host == self.host_id and intro.pid == os.getpid()
        endpoint = _ucx.UCXEndpoint.create_from_worker_address(self._worker, address, not same_process)
        conn._attach(endpoint, intro.recv_tag, recv_tag, local, not same_process)
        conn.ucx_transports = parse_protocol_table(endpoint_info(endpoint))
        self._check_transports(conn)
        link.watch(self.heartbeat_interval_s, self.peer_timeout_s, conn._on_dead, conn._on_goodbye)

    def _check_transports(self, conn: UcxConnection) -> None:
        lanes = {lane.split("/")[0] for lanes in conn.ucx_transports.values() for lane in lanes}
        allowed = set(_SHARED_MEMORY_TLS) if self.tls is None else {t.strip() for t in self.tls.split(",")}
        expects_shared_memory = bool(allowed & set(_SHARED_MEMORY_TLS)) or bool({"sm", "shm", "all"} & allowed)
        if conn.same_host and expects_shared_memory and lanes and not lanes & set(_SHARED_MEMORY_TLS):
            log.warning(
                "ucx_same_host_peer_without_shared_memory",
                peer=conn.peer_address,
                transports=sorted(lanes),
                hint="UCX picked no shared-memory transport for a same-host peer; check UCX_TLS / ucx_tls",
            )

    # ---- connect / listen ---------------------------------------------------------------------------

    async def connect(self, address: str) -> Connection:
        host, port = parse_host_port(address)
        link = await open_link(host, port, self.connect_timeout_s)
        conn = UcxConnection(self, link, f"{host}:{port}")  # UCX's endpoint comes once the peer authenticated
        self._connections.add(conn)
        return conn

    async def listen(self, address: str | None = None) -> Listener:
        host, port = parse_host_port(address, "listen address") if address else (self.host, self.port)
        self._progress_driver()

        def start(offer: Any) -> Any:
            def on_link(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                link = Link(reader, writer)
                conn = UcxConnection(self, link, link.peer_address)  # nothing is disclosed before the handshake
                self._connections.add(conn)
                offer(conn)

            return asyncio.start_server(on_link, host, port)

        listener = await ServerListener.open(start, host, port)
        self._listeners.append(listener)
        return listener

    async def aclose(self) -> None:
        for listener in self._listeners:
            await listener.aclose()
        for conn in list(self._connections):
            await conn.aclose()
        if self._progress is not None:
            await self._progress.drain(1.0)
            died = self._progress.peer_died
            if self._progress.close() and self._slot is not None:
                _PARKED.setdefault(_slot_key(self._context_options()), []).append(self._slot)
                if died:
                    log.info("ucx_worker_parked", reason="a same-host peer died with sends in flight", parked=parked_workers())
                else:  # an endpoint closed with a receive posted: ucxx keeps the cancelled request, so the worker
                    log.debug("ucx_worker_parked", reason="an endpoint closed with requests posted", parked=parked_workers())
            self._progress = None
        self._worker = self._slot = None


def _secret_tag() -> int:
    """A random even 64-bit tag (its odd twin carries overflow headers and payloads)."""
    return secrets.randbits(63) << 1


def interface_of(host: str) -> str | None:
    """The network interface that holds address ``host`` (``lo`` for loopback); ``None`` for a wildcard, a host
    name or an address no interface holds."""
    if is_loopback(host):
        return "lo" if os.path.exists("/sys/class/net/lo") else None
    try:
        packed = socket.inet_aton(host)
    except OSError:
        return None  # IPv6, a name or a wildcard: UCX picks
    if packed == b"\0\0\0\0":
        return None
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for _, name in socket.if_nameindex():
            try:
                answer = fcntl.ioctl(probe.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
            except OSError:
                continue
            if answer[20:24] == packed:
                return name
    finally:
        probe.close()
    return None


def _decode_intro(data: bytes, peer: str) -> _Intro:
    try:
        return _intro_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"{peer} sent a malformed UCX bootstrap message: {exc}") from exc
