"""What a transfer is: :class:`TransferPlan` in, :class:`KVChunk` descriptions, :class:`TransferResult` out."""

from __future__ import annotations

import enum
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec

from .errors import PlanError
from .schema import DType, KVCacheSchema

__all__ = [
    "BlockMapping",
    "IntegrityStatus",
    "KVChunk",
    "Priority",
    "TransferPlan",
    "TransferResult",
]

MAX_BLOCK_ID = (1 << 40) - 1


class Priority(enum.IntEnum):
    """Scheduling class; a lower value always goes first, at chunk granularity."""

    DECODE_CRITICAL = 0
    NORMAL = 1
    BULK = 2

    @classmethod
    def parse(cls, value: Any) -> Priority:
        if isinstance(value, cls):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            try:
                return cls(value)
            except ValueError:
                pass
        elif isinstance(value, str):
            key = value.strip().upper().replace("-", "_")
            if key in cls.__members__:
                return cls[key]
        choices = ", ".join(p.name.lower() for p in cls)
        raise PlanError(f"priority={value!r} is not a priority; choose one of {choices}")


def _block_tuple(field: str, values: Any) -> tuple[int, ...]:
    if isinstance(values, tuple) and all(type(v) is int for v in values):
        blocks = values
    else:
        try:
            blocks = tuple(int(v) for v in values)
        except (TypeError, ValueError) as exc:
            raise PlanError(f"{field} must be a sequence of block ids, got {values!r:.80}") from exc
    if blocks and (min(blocks) < 0 or max(blocks) > MAX_BLOCK_ID):
        bad = next(b for b in blocks if b < 0 or b > MAX_BLOCK_ID)
        raise PlanError(f"{field} holds block id {bad}, outside 0..{MAX_BLOCK_ID}")
    return blocks


class BlockMapping(msgspec.Struct, frozen=True, array_like=True):
    """Source block ``src_blocks[i]`` goes to destination block ``dst_blocks[i]`` for layers ``[layer_start, layer_stop)``."""

    layer_start: int
    layer_stop: int
    src_blocks: tuple[int, ...]
    dst_blocks: tuple[int, ...]

    def __post_init__(self) -> None:
        if not (isinstance(self.layer_start, int) and isinstance(self.layer_stop, int)):
            raise PlanError(f"layer range [{self.layer_start!r}, {self.layer_stop!r}) must be integers")
        if not 0 <= self.layer_start < self.layer_stop:
            raise PlanError(f"layer range [{self.layer_start}, {self.layer_stop}) is empty or negative")
        msgspec.structs.force_setattr(self, "src_blocks", _block_tuple("src_blocks", self.src_blocks))
        msgspec.structs.force_setattr(self, "dst_blocks", _block_tuple("dst_blocks", self.dst_blocks))
        if len(self.src_blocks) != len(self.dst_blocks):
            raise PlanError(
                f"src_blocks has {len(self.src_blocks)} ids but dst_blocks has {len(self.dst_blocks)}; "
                "they must pair up one to one"
            )
        if not self.src_blocks:
            raise PlanError(f"mapping for layers [{self.layer_start}, {self.layer_stop}) has no blocks")
        if len(set(self.dst_blocks)) != len(self.dst_blocks):
            seen: set[int] = set()
            dup = next(b for b in self.dst_blocks if b in seen or seen.add(b))  # type: ignore[func-returns-value]
            raise PlanError(f"dst_blocks names block {dup} twice: two sources would land on one destination")


class TransferPlan(msgspec.Struct, frozen=True, kw_only=True):
    """One KV transfer to one peer.

    ``deadline_s`` is relative to submission; ``target_dtype`` is the wire dtype (``None``: as stored);
    ``chunk_size`` overrides the channel's; ``progressive`` means layers become ready one by one
    (``mark_layer_ready``), so their chunks go as soon as they can.
    """

    transfer_id: str
    peer: str
    schema: KVCacheSchema
    mappings: tuple[BlockMapping, ...]
    priority: Priority = Priority.NORMAL
    deadline_s: float | None = None
    target_dtype: DType | None = None
    chunk_size: int | None = None
    progressive: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.transfer_id, str) or not 0 < len(self.transfer_id) <= 256:
            raise PlanError(f"transfer_id={self.transfer_id!r} must be a non-empty string of at most 256 chars")
        if not isinstance(self.peer, str) or not self.peer:
            raise PlanError(f"peer={self.peer!r} must name a connected peer")
        if not isinstance(self.schema, KVCacheSchema):
            raise PlanError(f"schema must be a KVCacheSchema, got {type(self.schema).__name__}")
        msgspec.structs.force_setattr(self, "priority", Priority.parse(self.priority))
        if self.target_dtype is not None:
            msgspec.structs.force_setattr(self, "target_dtype", DType.parse(self.target_dtype, "target_dtype"))
        if self.deadline_s is not None and not (isinstance(self.deadline_s, (int, float)) and self.deadline_s > 0):
            raise PlanError(f"deadline_s={self.deadline_s!r} must be a positive number of seconds")
        if self.chunk_size is not None and (
            isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 512
        ):
            raise PlanError(f"chunk_size={self.chunk_size!r} must be an integer of at least 512 bytes")
        mappings = tuple(self.mappings)
        msgspec.structs.force_setattr(self, "mappings", mappings)
        if not mappings:
            raise PlanError(f"transfer {self.transfer_id}: mappings is empty")
        for m in mappings:
            if not isinstance(m, BlockMapping):
                raise PlanError(f"transfer {self.transfer_id}: mappings must hold BlockMapping, got {m!r:.80}")
            if m.layer_stop > self.schema.num_layers:
                raise PlanError(
                    f"transfer {self.transfer_id}: layer range [{m.layer_start}, {m.layer_stop}) exceeds "
                    f"num_layers={self.schema.num_layers}"
                )
        _check_no_shared_destination(self.transfer_id, mappings)

    @property
    def num_pages(self) -> int:
        """Pages (block × layer × plane) the plan moves."""
        return sum(len(m.src_blocks) * (m.layer_stop - m.layer_start) for m in self.mappings) * self.schema.kv_planes

    @property
    def total_bytes(self) -> int:
        """Bytes the plan moves, as stored (before any wire codec)."""
        return self.num_pages * self.schema.page_bytes

    @classmethod
    def for_blocks(
        cls,
        peer: str,
        schema: KVCacheSchema,
        src_blocks: Sequence[int] | Iterable[int],
        dst_blocks: Sequence[int] | Iterable[int],
        *,
        transfer_id: str | None = None,
        layers: tuple[int, int] | None = None,
        **options: Any,
    ) -> TransferPlan:
        """Plan moving ``src_blocks`` to ``dst_blocks`` for every layer (or ``layers=(start, stop)``)."""
        start, stop = layers if layers is not None else (0, schema.num_layers)
        mapping = BlockMapping(start, stop, tuple(src_blocks), tuple(dst_blocks))
        return cls(
            transfer_id=transfer_id or uuid.uuid4().hex,
            peer=peer,
            schema=schema,
            mappings=(mapping,),
            **options,
        )


def _check_no_shared_destination(transfer_id: str, mappings: tuple[BlockMapping, ...]) -> None:
    for i, a in enumerate(mappings):
        for b in mappings[i + 1 :]:
            if a.layer_start < b.layer_stop and b.layer_start < a.layer_stop:
                shared = set(a.dst_blocks).intersection(b.dst_blocks)
                if shared:
                    raise PlanError(
                        f"transfer {transfer_id}: destination block {min(shared)} is written by two mappings "
                        f"with overlapping layers [{a.layer_start}, {a.layer_stop}) and [{b.layer_start}, {b.layer_stop})"
                    )


class KVChunk(msgspec.Struct, frozen=True, array_like=True):
    """Description of one message of a transfer (never a copy of the data): one row of the planner's chunk table,
    built on demand (``TransferHandle.chunk(seq)``, ``ChunkTable.chunk(seq)``) to see what a chunk a trace or a log
    names covers. The hot path reads the table's columns instead; a chunk's checksum belongs to each copy sent (the
    wire header), not to its description.

    ``src_runs``/``dst_runs`` are ``(segment, byte_offset, length)`` triples in the registered memory of each
    side; a chunk with one run each is moved zero-copy, more runs are gathered into one staging buffer.
    ``offset`` is the chunk's byte position in the transfer's stream.
    """

    transfer_id: str
    seq: int
    layer_start: int
    layer_stop: int
    src_runs: tuple[tuple[int, int, int], ...]
    dst_runs: tuple[tuple[int, int, int], ...]
    offset: int
    nbytes: int
    priority: Priority
    wire_dtype: DType

    @property
    def zero_copy(self) -> bool:
        return len(self.src_runs) == 1


class IntegrityStatus(str, enum.Enum):
    """Whether the receiver checked every chunk's checksum."""

    VERIFIED = "verified"
    UNCHECKED = "unchecked"


class TransferResult(msgspec.Struct, frozen=True, kw_only=True):
    """Outcome of a transfer, on either side. ``phases`` holds seconds per phase (plan, queue, transfer).

    ``bytes`` is the KV moved as stored; ``wire_bytes`` what its chunks took on the wire (quantised and
    compressed, acknowledged copies only); ``kv_dtype`` the KV dtype on the wire and ``compression`` its
    lossless compression (``none``)."""

    transfer_id: str
    peer: str
    bytes: int
    wire_bytes: int
    chunks: int
    wall_s: float
    retries: int = 0
    integrity: IntegrityStatus = IntegrityStatus.VERIFIED
    phases: dict[str, float] = msgspec.field(default_factory=dict)
    kv_dtype: str = ""
    compression: str = "none"

    @property
    def wire_ratio(self) -> float:
        """Wire bytes per stored byte (1.0 unquantised and uncompressed)."""
        return self.wire_bytes / self.bytes if self.bytes else 1.0

    @property
    def gbps(self) -> float:
        """Payload gigabytes (10^9 B) per second of wall time."""
        return self.bytes / self.wall_s / 1e9 if self.wall_s > 0 else 0.0
