"""Wire format: control messages as a msgspec tagged union, hard size bounds, one reused decoder.

A frame is ``header`` (one encoded message below) plus an optional raw payload that never passes
through an encoder. Every header is size-checked before it is decoded, and every variable-length
field has a length bound, so a hostile peer cannot make us allocate more than ``MAX_CONTROL_BYTES``
worth of objects. No pickle anywhere.

Connection: client ``Hello`` → server ``Welcome`` (proof over the nonces) → client ``Proof`` →
server ``Ready`` (or ``Reject``); then each side ``Attest`` → ``Attested`` (:mod:`.attest`).
Transfers: sender ``Announce`` then ``Chunk`` headers with
payloads (in the announced wire codec), or ``Placed`` headers for chunks written straight into a same-host receiver's memory after
its ``Window``; receiver ``Ack`` (batched) / ``Nack`` (bad checksum); either side ``Abort``; a sender answers
a receiver's ``Abort`` with ``Fence`` once no direct write of that transfer runs. A receiver may ask
for a transfer with ``Pull``; the sender answers with its ``Announce`` or ``PullRefused``.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated, Union

import msgspec
from msgspec import Meta

from .errors import FrameTooLargeError, ProtocolError
from .memory import KVGeometry
from .plan import BlockMapping
from .schema import KVCacheSchema

__all__ = [
    "Abort",
    "Ack",
    "Announce",
    "Attest",
    "Attested",
    "Chunk",
    "DeviceWindow",
    "Fence",
    "Hold",
    "Hello",
    "MAX_CONTROL_BYTES",
    "Message",
    "Nack",
    "PROTOCOL_VERSION",
    "Placed",
    "Presentation",
    "Proof",
    "Pull",
    "PullRefused",
    "Ready",
    "Region",
    "RegionUpdate",
    "Reject",
    "Welcome",
    "Window",
    "JoinLane",
    "MAX_LANES",
    "decode_message",
    "encode_message",
    "handshake_proof",
]

PROTOCOL_VERSION = 6  # 2: attestation after the handshake, windows on the attestation socket, fences; 3: Placed.landed;
# 4: Announce.inline_checksum (a one-chunk transfer's announcement carries its chunk); 5: Hold (fan-in priority);
# 6: lanes (Hello.lanes, Ready.lanes and lane_key, JoinLane: extra connections per peer for chunks)
MAX_LANES = 16  # connections per peer, the session's own included
MAX_CONTROL_BYTES = 4 << 20
MAX_MAPPINGS = 4096
MAX_ACK_BATCH = 1 << 16

Name = Annotated[str, Meta(min_length=1, max_length=256)]
Reason = Annotated[str, Meta(max_length=1024)]
Nonce = Annotated[bytes, Meta(min_length=16, max_length=64)]
Mac = Annotated[bytes, Meta(max_length=64)]
U32 = Annotated[int, Meta(ge=0, le=(1 << 32) - 1)]
U64 = Annotated[int, Meta(ge=0, le=(1 << 63) - 1)]
Small = Annotated[list[Annotated[str, Meta(max_length=32)]], Meta(max_length=16)]


class Hello(msgspec.Struct, frozen=True, array_like=True, tag="hello"):
    version: U32
    name: Name
    nonce: Nonce
    integrity: Small
    memory_kinds: Small
    max_chunk: U64
    codecs: Small = []  # wire dtypes and compressions the client decodes (``fp8_e4m3``, ``int4``, ``zstd``...)
    lanes: Annotated[int, Meta(ge=1, le=MAX_LANES)] = 1  # connections the client wants for this peer (its own included)


class Region(msgspec.Struct, frozen=True, array_like=True):
    """A side's registered KV memory, so the other side can plan chunks against it."""

    schema: KVCacheSchema
    geometry: KVGeometry
    kind: Annotated[str, Meta(max_length=16)] = "cpu"  # where it lives: ``cpu``, or ``cuda`` (device KV)


class Welcome(msgspec.Struct, frozen=True, array_like=True, tag="welcome"):
    version: U32
    name: Name
    nonce: Nonce
    proof: Mac
    region: Region | None


class Proof(msgspec.Struct, frozen=True, array_like=True, tag="proof"):
    proof: Mac
    region: Region | None


class RegionUpdate(msgspec.Struct, frozen=True, array_like=True, tag="region"):
    """Sent when a side registers its KV memory after the handshake."""

    region: Region


class Ready(msgspec.Struct, frozen=True, array_like=True, tag="ready"):
    """The server accepted the client's proof; only now does it describe its KV memory (``region``)."""

    region: Region | None = None
    codecs: Small = []  # wire dtypes and compressions the server decodes
    lanes: Annotated[int, Meta(ge=1, le=MAX_LANES)] = 1  # connections granted (the client opens ``lanes - 1`` more)
    lane_key: Mac = b""  # what each extra connection presents in its JoinLane (random, this session's only)


class JoinLane(msgspec.Struct, frozen=True, array_like=True, tag="lane"):
    """The first message of an extra connection (instead of ``Hello``): it joins the session whose ``Ready`` gave
    ``key`` as lane ``index`` (1 .. lanes - 1). The server answers ``Ready()`` or ``Reject``."""

    version: U32
    key: Nonce
    index: Annotated[int, Meta(ge=1, le=MAX_LANES - 1)]


class Reject(msgspec.Struct, frozen=True, array_like=True, tag="reject"):
    reason: Reason


class Announce(msgspec.Struct, frozen=True, array_like=True, tag="announce"):
    """A transfer's plan, so the receiver can compute the same chunk table (checked by ``digest``)."""

    wire_id: U32
    transfer_id: Name
    schema: KVCacheSchema
    src_geometry: KVGeometry
    mappings: Annotated[list[BlockMapping], Meta(min_length=1, max_length=MAX_MAPPINGS)]
    chunk_size: U64
    gather: bool
    progressive: bool
    priority: U32
    deadline_s: float | None
    integrity: Annotated[str, Meta(max_length=32)]
    num_chunks: U64
    total_bytes: U64
    digest: U64
    ack_every: U32
    wire_dtype: Annotated[str, Meta(max_length=32)] = ""  # quantised on the wire ("": as stored)
    group_size: U32 = 0  # elements per quantisation scale
    compression: Annotated[str, Meta(max_length=32)] = "none"
    #: set when this announcement is the header of its transfer's only chunk (seq 0, attempt 0): the frame's
    #: payload is that chunk and this is its checksum. One frame instead of two for a small transfer
    inline_checksum: U64 | None = None


class Chunk(msgspec.Struct, frozen=True, array_like=True, tag="c"):
    """Header of one chunk payload."""

    wire_id: U32
    seq: U64
    attempt: U32
    checksum: U64


class Ack(msgspec.Struct, frozen=True, array_like=True, tag="a"):
    """Chunks verified and placed by the receiver."""

    wire_id: U32
    seqs: Annotated[list[U64], Meta(max_length=MAX_ACK_BATCH)]


class Nack(msgspec.Struct, frozen=True, array_like=True, tag="n"):
    """A chunk failed verification; the sender resends it or fails the transfer."""

    wire_id: U32
    seq: U64
    attempt: U32
    reason: Reason


class DeviceWindow(msgspec.Struct, frozen=True, array_like=True):
    """Device KV a same-host peer may write (:mod:`.device.ipc`): ``kind`` (``cuda``; ``emulated`` in tests), the
    device's ``uuid``, one CUDA IPC handle per allocation holding the buffers, and per buffer ``[allocation,
    offset, nbytes]``. An emulated window's buffers come as memfds instead of handles."""

    kind: Annotated[str, Meta(max_length=16)]
    uuid: Annotated[str, Meta(max_length=64)]
    handles: Annotated[list[Annotated[bytes, Meta(max_length=64)]], Meta(max_length=4096)]
    segments: Annotated[list[Annotated[list[U64], Meta(min_length=3, max_length=3)]], Meta(min_length=1, max_length=4096)]


class Window(msgspec.Struct, frozen=True, array_like=True):
    """The registered memory a side lets a same-host peer write directly: its host identity, each buffer's
    address and size (for CMA, into the process the kernel attested) and whether the buffers are shared
    memory, in which case one memfd per buffer is handed over with ``SCM_RIGHTS``. Never sent on a
    connection: it rides in a :class:`Presentation` on the peer's attestation socket (:mod:`.attest`)."""

    host: Annotated[str, Meta(max_length=512)]
    buffers: Annotated[list[Annotated[list[U64], Meta(min_length=2, max_length=2)]], Meta(min_length=1, max_length=4096)]
    shared: bool = False
    device: DeviceWindow | None = None  # device memory: written through CUDA IPC, never CMA


class Presentation(msgspec.Struct, frozen=True, array_like=True):
    """What a same-host peer sends on this side's attestation socket: the nonce of this side's ``Attest`` and,
    if it lets this side write its memory, its ``Window``."""

    nonce: Nonce
    window: Window | None = None


class Attest(msgspec.Struct, frozen=True, array_like=True, tag="t"):
    """Right after the handshake, each side's invitation: connect to abstract Unix socket ``socket`` (empty:
    none) and present ``nonce``; the kernel then tells us who you are."""

    socket: Annotated[str, Meta(max_length=100)]
    nonce: Nonce


class Attested(msgspec.Struct, frozen=True, array_like=True, tag="d"):
    """The answer to an ``Attest``: whether this side presented itself on the peer's socket."""

    presented: bool


class Hold(msgspec.Struct, frozen=True, array_like=True, tag="h"):
    """Receiver → sender: start no chunk of the priority classes whose bits are set in ``held`` (bit ``p``: class
    ``p``, see :class:`~sage_transport.plan.Priority`) until the next ``Hold``; ``0`` releases. A receiver fed by
    several senders sends it so a decode-critical transfer from one overtakes bulk transfers from the others."""

    held: U32


class Fence(msgspec.Struct, frozen=True, array_like=True, tag="f"):
    """Sender → receiver after the receiver aborted transfer ``wire_id``: none of its direct writes runs any
    more or will start; the receiver may reuse the blocks."""

    wire_id: U32


class Placed(msgspec.Struct, frozen=True, array_like=True, tag="p"):
    """A chunk the sender wrote straight into the receiver's memory. ``checksum`` is of the source pages;
    ``landed``, where the writer checksummed the pages where they landed in the same pass (``None``: it did
    not, the receiver verifies in place)."""

    wire_id: U32
    seq: U64
    attempt: U32
    checksum: U64
    landed: U64 | None = None


class Pull(msgspec.Struct, frozen=True, array_like=True, tag="q"):
    """Receiver → sender: send me transfer ``transfer_id`` (``src_blocks`` are yours, ``dst_blocks`` mine). The
    sender answers with an ``Announce`` and the chunks, or a ``PullRefused``."""

    transfer_id: Name
    schema: KVCacheSchema
    mappings: Annotated[list[BlockMapping], Meta(min_length=1, max_length=MAX_MAPPINGS)]
    priority: U32
    deadline_s: float | None
    target_dtype: Annotated[str, Meta(max_length=32)] = ""


class PullRefused(msgspec.Struct, frozen=True, array_like=True, tag="r"):
    """The answer to a ``Pull`` that will not be sent, and why."""

    transfer_id: Name
    reason: Reason


class Abort(msgspec.Struct, frozen=True, array_like=True, tag="x"):
    """The transfer is over on one side; the other releases it too. ``from_sender`` tells whose ``wire_id``
    it is (each side numbers the transfers it sends)."""

    wire_id: U32
    from_sender: bool
    reason: Reason


Message = Union[
    Hello,
    JoinLane,
    Welcome,
    Proof,
    Ready,
    Reject,
    RegionUpdate,
    Announce,
    Chunk,
    Ack,
    Nack,
    Abort,
    Placed,
    Hold,
    Pull,
    PullRefused,
    Attest,
    Attested,
    Fence,
]

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)
encode_message = _encoder.encode


def decode_message(data: bytes | bytearray | memoryview) -> Message:
    """Decode one header; raise ``FrameTooLargeError`` or ``ProtocolError`` on anything malformed."""
    if len(data) > MAX_CONTROL_BYTES:
        raise FrameTooLargeError(f"control message of {len(data)} bytes exceeds the {MAX_CONTROL_BYTES}-byte bound")
    try:
        message: Message = _decoder.decode(data)
        return message
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"malformed control message ({len(data)} bytes): {exc}") from None


def handshake_proof(token: str | None, role: bytes, first: bytes, second: bytes, names: tuple[str, str]) -> bytes:
    """HMAC-SHA256 over both nonces and names, keyed by the shared token (empty without a token)."""
    if token is None:
        return b""
    message = b"sage-transport/1|" + role + b"|" + first + b"|" + second + b"|" + "|".join(names).encode()
    return hmac.new(token.encode(), message, hashlib.sha256).digest()
