"""sageLLM's kv_runtime on sage_transport: its ``MigrationPlan`` as our :class:`TransferPlan`, a
``migrate_blocks(plan) -> bool`` facade, and the block pool's fragmentation and utilisation sizing chunks and the
window.

sageLLM's plan carries ``plan_id``, ``src_tier``, ``dst_tier``, ``block_ids``, ``total_bytes``, ``priority`` (lower
is more urgent), ``deadline`` and ``metadata``. The published isagellm wheels do not ship kv_runtime, so the bridge
reads those attributes from whatever object sageLLM passes (a dataclass, a pydantic model). ``metadata`` keys it
uses: ``peer`` (overrides the tier's peer), ``dst_block_ids`` (default: the same ids), ``layers`` (``[start, stop)``,
default all), ``target_dtype`` (quantise on the wire).

Which way a plan goes: ``peers`` maps tier names to connected peers. A plan whose ``dst_tier`` names a peer is
sent to it; one whose ``src_tier`` names a peer is pulled from it (:meth:`KVTransferChannel.pull`).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import time
from collections.abc import Mapping
from typing import Any

from ..channel import KVTransferChannel
from ..errors import ConfigError, PlanError, SageTransportError
from ..plan import BlockMapping, Priority, TransferPlan, TransferResult
from .loop_thread import LoopThread, shared_loop

__all__ = ["KVRuntimeBridge", "Tuning"]

_EPOCH_FLOOR = 1e9  # a deadline above this is a time.time() instant, below it seconds from now


@dataclasses.dataclass(frozen=True, slots=True)
class Tuning:
    """Chunk size and window chosen from the pool's feedback (see :meth:`KVRuntimeBridge.tune`)."""

    fragmentation: float
    utilization: float
    chunk_size: int
    peer_window: int


class KVRuntimeBridge:
    """Runs sageLLM kv_runtime migration plans on ``channel`` (its registered KV memory is the plans' schema).

    ``feedback``: an object with ``get_fragmentation()`` and ``get_utilization()`` (fractions 0–1 of the block pool
    the KV lands in), read before every plan. ``loop``: the loop thread the channel runs on, for the synchronous
    :meth:`migrate_blocks` (default: the process's shared one).
    """

    def __init__(
        self,
        channel: KVTransferChannel,
        *,
        peers: Mapping[str, str] | None = None,
        feedback: Any = None,
        loop: LoopThread | None = None,
    ) -> None:
        self.channel = channel
        self.peers = {str(getattr(k, "value", k)): v for k, v in (peers or {}).items()}
        self.feedback = feedback
        self._loop = loop
        self.base_chunk_size = channel.config.chunk_size
        self.base_peer_window = channel.config.peer_window
        self.tuning: Tuning | None = None
        self.last_result: TransferResult | None = None
        self.last_error: BaseException | None = None

    # ---- plan translation --------------------------------------------------------------------------------

    def to_transfer_plan(self, plan: Any) -> tuple[TransferPlan, bool]:
        """(our plan, whether it is pulled). Bad input raises :class:`PlanError` naming the field and value."""
        memory = self.channel.memory
        if memory is None:
            raise PlanError("register the KV memory with the channel before migrating blocks")
        schema = memory.schema
        plan_id = str(_field(plan, "plan_id"))
        metadata = _field(plan, "metadata", {}) or {}
        if not isinstance(metadata, Mapping):
            raise PlanError(f"plan {plan_id}: metadata={metadata!r:.80} is not a mapping")
        src_tier, dst_tier = _tier(_field(plan, "src_tier")), _tier(_field(plan, "dst_tier"))
        pulled = False
        peer = metadata.get("peer")
        if peer is None:
            if dst_tier in self.peers:
                peer = self.peers[dst_tier]
            elif src_tier in self.peers:
                peer, pulled = self.peers[src_tier], True
            else:
                known = ", ".join(f"{t}→{p}" for t, p in sorted(self.peers.items())) or "none"
                raise PlanError(f"plan {plan_id}: neither src_tier={src_tier!r} nor dst_tier={dst_tier!r} has a peer ({known})")
        else:
            pulled = bool(metadata.get("pull", False))
        blocks = _field(plan, "block_ids")
        if blocks is None or isinstance(blocks, (str, bytes)):
            raise PlanError(f"plan {plan_id}: block_ids={blocks!r:.80} is not a sequence of block ids")
        src_blocks = list(blocks)
        dst_blocks = list(metadata.get("dst_block_ids", src_blocks))
        start, stop = metadata.get("layers", (0, schema.num_layers))
        mapping = BlockMapping(int(start), int(stop), tuple(src_blocks), tuple(dst_blocks))
        total = _field(plan, "total_bytes", 0) or 0
        expected = len(src_blocks) * (mapping.layer_stop - mapping.layer_start) * schema.kv_planes * schema.page_bytes
        if total and int(total) != expected:
            raise PlanError(
                f"plan {plan_id}: total_bytes={total} but {len(src_blocks)} blocks of layers [{start}, {stop}) hold "
                f"{expected} bytes ({schema.kv_planes} planes of {schema.page_bytes}-byte pages)"
            )
        priority = _priority(plan_id, _field(plan, "priority", 1))
        deadline = _deadline(plan_id, _field(plan, "deadline", None))
        tuning = self.tune()
        return TransferPlan(
            transfer_id=plan_id, peer=str(peer), schema=schema, mappings=(mapping,), priority=priority, deadline_s=deadline,
            target_dtype=metadata.get("target_dtype"), chunk_size=tuning.chunk_size if tuning else None,
        ), pulled  # fmt: skip

    # ---- feedback ---------------------------------------------------------------------------------------

    def tune(self) -> Tuning | None:
        """Chunk size and window from the pool's feedback (``None`` without feedback):

        * fragmentation ``f``: a fragmented destination pool scatters each chunk over many short runs, so chunks
          shrink to ``chunk_size × (1 − 0.75 f)`` (never under one page): a chunk's scatter list stays short and
          decode-critical chunks overtake bulk ones sooner;
        * utilisation ``u``: a nearly full pool leaves little memory for staging, so the window of chunks in
          flight shrinks to ``peer_window × (1 − u)`` (at least 2; applied to the live channel).
        """
        if self.feedback is None:
            return None
        fragmentation = _fraction("get_fragmentation", self.feedback.get_fragmentation())
        utilization = _fraction("get_utilization", self.feedback.get_utilization())
        memory = self.channel.memory
        page = memory.schema.page_bytes if memory is not None else 512
        chunk = max(page, 512, int(self.base_chunk_size * (1 - 0.75 * fragmentation)) // page * page)
        window = max(2, math.floor(self.base_peer_window * (1 - utilization)))
        if self.channel.config.peer_window != window:
            self.channel.reconfigure(peer_window=window)
        self.tuning = Tuning(fragmentation, utilization, chunk, window)
        return self.tuning

    # ---- migration --------------------------------------------------------------------------------------

    async def amigrate_blocks(self, plan: Any) -> bool:
        """Move ``plan``'s blocks; ``True`` once every chunk was verified at the receiver, ``False`` when the
        transfer failed (the error is in :attr:`last_error`; nothing acknowledged is lost). A malformed plan
        raises instead."""
        ours, pulled = self.to_transfer_plan(plan)
        try:
            self.last_result = await (self.channel.pull(ours) if pulled else self.channel.transfer(ours))
        except (PlanError, ConfigError):
            raise
        except SageTransportError as exc:
            self.last_error = exc
            return False
        self.last_error = None
        return True

    def migrate_blocks(self, plan: Any) -> bool:
        """:meth:`amigrate_blocks` from a synchronous caller (the channel runs on the loop thread)."""
        loop = self._loop or shared_loop()
        return loop.call(self.amigrate_blocks(plan))

    # sageLLM's feedback names, for callers that read them through the bridge
    def get_fragmentation(self) -> float:
        return self.tuning.fragmentation if self.tuning else 0.0

    def get_utilization(self) -> float:
        return self.tuning.utilization if self.tuning else 0.0


def _field(plan: Any, name: str, default: Any = ...) -> Any:
    if isinstance(plan, Mapping):
        value = plan.get(name, default)
    else:
        value = getattr(plan, name, default)
    if value is ...:
        raise PlanError(f"migration plan has no {name!r} field: {plan!r:.120}")
    return value


def _tier(value: Any) -> str:
    return str(value.value if isinstance(value, enum.Enum) else value)


def _priority(plan_id: str, value: Any) -> Priority:
    """sageLLM: lower is more urgent. 0 and below → decode-critical, 1 → normal, 2 and above → bulk."""
    raw = value.value if isinstance(value, enum.Enum) else value
    if isinstance(raw, str):
        return Priority.parse(raw)
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise PlanError(f"plan {plan_id}: priority={value!r} is not a number (lower is more urgent)")
    return Priority.DECODE_CRITICAL if raw <= 0 else Priority.NORMAL if raw < 2 else Priority.BULK


def _deadline(plan_id: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise PlanError(f"plan {plan_id}: deadline={value!r} must be a positive number (seconds, or a time.time() instant)")
    if value < _EPOCH_FLOOR:
        return float(value)
    left = value - time.time()
    if left <= 0:
        raise PlanError(f"plan {plan_id}: deadline={value} passed {-left:.3f}s ago")
    return left


def _fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ConfigError(f"{name}() returned {value!r}: expected a fraction in 0..1")
    return float(value)
