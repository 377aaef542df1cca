"""Wire format: round trips, hard bounds, and a decoder that only ever raises ProtocolError."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sage_transport import BlockMapping, FrameTooLargeError, KVCacheSchema, KVGeometry, Layout, ProtocolError
from sage_transport.wire import (
    MAX_CONTROL_BYTES,
    Abort,
    Ack,
    Announce,
    Chunk,
    Hello,
    Nack,
    Proof,
    Ready,
    Region,
    Reject,
    Welcome,
    decode_message,
    encode_message,
    handshake_proof,
)

SCHEMA = KVCacheSchema.for_model("qwen2.5-7b")
SAMPLES = [
    Hello(1, "prefill-0", b"n" * 32, ["xxh3"], ["cpu"], 1 << 30),
    Welcome(1, "decode-0", b"m" * 32, b"p" * 32, Region(SCHEMA, KVGeometry(Layout.LAYER_KV_BLOCK, 100))),
    Proof(b"", None),
    Ready(),
    Reject("auth failed"),
    Announce(
        wire_id=1,
        transfer_id="t",
        schema=SCHEMA,
        src_geometry=KVGeometry(Layout.BLOCK_LAYER_KV, 10, 0),
        mappings=[BlockMapping(0, 28, (1, 2), (3, 4))],
        chunk_size=1 << 20,
        gather=True,
        progressive=False,
        priority=0,
        deadline_s=None,
        integrity="xxh3",
        num_chunks=3,
        total_bytes=99,
        digest=5,
        ack_every=4,
    ),
    Chunk(7, 123456, 1, (1 << 63) - 1),
    Ack(7, [1, 2, 3]),
    Nack(7, 3, 0, "checksum mismatch"),
    Abort(7, True, "deadline"),
]


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(message: object) -> None:
    assert decode_message(encode_message(message)) == message


def test_chunk_header_is_small() -> None:
    assert len(encode_message(Chunk(1, 100_000, 0, (1 << 63) - 1))) <= 20


def test_oversized_message_is_refused_before_decoding() -> None:
    with pytest.raises(FrameTooLargeError, match=str(MAX_CONTROL_BYTES)):
        decode_message(b"\x00" * (MAX_CONTROL_BYTES + 1))


def test_length_bounds_are_enforced() -> None:
    too_many = msgspec.msgpack.encode(["a", 1, list(range(70000))])
    with pytest.raises(ProtocolError, match="length"):
        decode_message(too_many)
    long_name = msgspec.msgpack.encode(["hello", 1, "x" * 300, b"n" * 32, [], [], 0])
    with pytest.raises(ProtocolError):
        decode_message(long_name)


def test_hostile_array_length_does_not_allocate() -> None:
    # an Ack claiming 2**32-1 sequence numbers in a 20-byte message
    hostile = b"\x93\xa1a\x01\xdd\xff\xff\xff\xff" + b"\x01" * 10
    with pytest.raises(ProtocolError):
        decode_message(hostile)


def test_plan_validation_applies_to_decoded_announces() -> None:
    raw = msgspec.msgpack.encode(msgspec.to_builtins(SAMPLES[5]))
    bad = raw.replace(msgspec.msgpack.encode([3, 4]), msgspec.msgpack.encode([3, 3]))
    with pytest.raises(ProtocolError, match="twice"):
        decode_message(bad)


def test_unknown_tag_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        decode_message(msgspec.msgpack.encode(["pickle", b"cos\nsystem\n"]))


def test_proofs_bind_token_role_and_nonces() -> None:
    base = handshake_proof("token-123456", b"server", b"a" * 32, b"b" * 32, ("x", "y"))
    assert base != handshake_proof("token-123457", b"server", b"a" * 32, b"b" * 32, ("x", "y"))
    assert base != handshake_proof("token-123456", b"client", b"a" * 32, b"b" * 32, ("x", "y"))
    assert base != handshake_proof("token-123456", b"server", b"b" * 32, b"a" * 32, ("x", "y"))
    assert handshake_proof(None, b"server", b"a" * 32, b"b" * 32, ("x", "y")) == b""


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=256))
def test_random_bytes_never_escape_as_other_errors(data: bytes) -> None:
    try:
        decode_message(data)
    except ProtocolError:
        pass


@settings(max_examples=1000, deadline=None)
@given(st.sampled_from(SAMPLES), st.data())
def test_mutated_messages_never_escape(message: object, data: st.DataObject) -> None:
    raw = bytearray(encode_message(message))
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(raw) - 1))
        raw[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    try:
        decode_message(bytes(raw[:cut]))
    except ProtocolError:
        pass
