"""Transfers this side sends: codec choice, layers made ready, deadlines, acknowledgements, completion and failure."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from .channel_core import (
    _AUTO_MIN_BYTES,
    _AUTO_REPROBE,
    _RAW,
    ChannelCore,
    _choice,
    _wire_form,
    log,
)
from .config import Compression, Integrity
from .device.checksum import fletcher64
from .device.runtime import wait
from .errors import (
    ChecksumError,
    ConfigError,
    PlanError,
    TransferAbortedError,
    TransferTimeoutError,
    UnsupportedError,
)
from .plan import IntegrityStatus, TransferPlan, TransferResult
from .scheduler import AckOutcome
from .schema import DType
from .session import PeerSession
from .transfers import Outgoing
from .wire import Abort, Fence
from .wire_codec import QUANTISED, ChunkCodec, codec_throughput, local_codecs


class SendingSide(ChannelCore):
    """What happens to a transfer this side sends, from its first chunk to its result."""

    def _on_device(self, session: PeerSession) -> bool:
        """Whether a transfer to ``session``'s peer reads or writes device KV (ours or the peer's)."""
        return self._device is not None or (session.region is not None and session.region.kind != "cpu")

    def _checksum_for(self, session: PeerSession) -> tuple[Integrity, Callable[[Any], int] | None]:
        """The checksum a transfer to ``session``'s peer carries: the configured one, or fletcher64 where either
        end's KV is on a device (computed there: :mod:`.device.checksum`)."""
        mode = self.config.integrity
        if mode is not Integrity.NONE and self._on_device(session):
            return Integrity.FLETCHER64, fletcher64
        return mode, self._checksum

    def _codec_for(self, plan: TransferPlan, session: PeerSession) -> ChunkCodec | None:
        """The wire codec of a new transfer (``None``: chunks go as stored), checked against what the peer accepts."""
        tid, stored = plan.transfer_id, plan.schema.dtype
        wire = plan.target_dtype or self.config.target_dtype
        if wire == stored:
            wire = None
        if wire is not None and wire not in QUANTISED:
            choices = ", ".join(d.value for d in QUANTISED)
            raise UnsupportedError(
                f"transfer {tid}: target_dtype={wire.value} is neither the stored {stored.value} nor a quantised wire dtype "
                f"({choices})"
            )
        compression = self.config.compression
        if compression is not Compression.NONE and self._on_device(session):  # compressors run on the host only
            if self.config.codec_policy == "always":
                raise UnsupportedError(
                    f"transfer {tid}: compression={compression.value} runs on the host and this transfer moves device KV; "
                    "quantise on the device (target_dtype) or set compression=none"
                )
            compression = Compression.NONE
        if wire is None and compression is Compression.NONE:
            return None
        wanted = [n for n in (wire.value if wire else "", "" if compression is Compression.NONE else compression.value) if n]
        missing = [n for n in wanted if n not in session.peer_codecs]
        if self.config.codec_policy == "auto":  # only where both ends can run it and the link is slower than the codec
            if missing or not local_codecs().issuperset(wanted) or not self._codec_pays(session, wire, compression):
                return None
        if missing:
            accepts = ", ".join(sorted(session.peer_codecs)) or "only KV as stored"
            raise UnsupportedError(
                f"transfer {tid}: peer {session.peer!r} does not decode {' and '.join(missing)} (it accepts: {accepts}); "
                "send as stored (target_dtype=none, compression=none) or install the codec there"
            )
        try:
            return ChunkCodec(stored, wire, self.config.codec_group_size, compression)
        except ConfigError as exc:
            raise UnsupportedError(f"transfer {tid}: {exc}") from None

    def _codec_pays(self, session: PeerSession, wire: DType | None, compression: Compression) -> bool:
        """``codec_policy=auto``: the codec only where it makes transfers faster. Same-host peers (shared memory,
        CMA, loopback) and RDMA / NVLink lanes are faster than any CPU codec. On other links it is measured: each
        large transfer (8 MiB and more) records its rate with the codec or without; once both are known the faster
        one is used, and every ``_AUTO_REPROBE``-th choice measures the other again (links and loads change). Before
        that, the codec goes first where the link (if measured) is slower than the codec encodes, and a link known
        only with the codec is measured once without it."""
        link = session.conn.link_info()
        if link.get("same_host"):
            return False
        lanes = {lane.split("/")[0] for lanes in (link.get("ucx_transports") or {}).values() for lane in lanes}
        if any(lane.startswith(("rc", "dc", "ud", "cuda", "gdr")) for lane in lanes):
            return False
        raw, coded = session.rates.get(_RAW), session.rates.get(_choice(wire, compression))
        session.auto_choices += 1
        if raw is not None and coded is not None:
            faster = coded > raw
            return not faster if session.auto_choices % _AUTO_REPROBE == 0 else faster
        if coded is not None:
            return False  # measure the link without the codec once
        if raw is None:
            return True
        threads = max(1, min(self.config.send_lanes, os.cpu_count() or 1))
        return raw < codec_throughput(wire, compression) * threads

    def _mark_ready_after(self, out: Outgoing, layers: tuple[int, ...], event: Any) -> None:
        """``layers`` become ready once ``event`` (the engine's, on its compute stream) has fired, polled here."""
        for layer in layers:
            if not 0 <= layer < out.plan.schema.num_layers:
                raise PlanError(f"transfer {out.plan.transfer_id}: layer {layer} is outside 0..{out.plan.schema.num_layers - 1}")

        async def when_fired() -> None:
            await wait(event.query)
            self._mark_ready(out, layers)

        self._spawn(when_fired(), f"sage-layers-{out.plan.transfer_id}")

    def _mark_ready(self, out: Outgoing, layers: Iterable[int]) -> None:
        if out.future.done() or not out.plan.progressive:
            return
        woke = False
        for layer in layers:
            try:
                woke |= self._scheduler.mark_layer_ready(out, layer)
            except IndexError:
                raise PlanError(
                    f"transfer {out.plan.transfer_id}: layer {layer} is outside 0..{out.plan.schema.num_layers - 1}"
                ) from None
        if woke:
            out.session.wake.set()

    def _on_deadline(self, out: Outgoing, deadline: float) -> None:
        acked = out.chunks_verified
        self._fail_outgoing(
            out,
            TransferTimeoutError(
                f"transfer {out.plan.transfer_id} to {out.session.peer} missed its {deadline:g}s deadline with "
                f"{acked}/{len(out.table)} chunks verified"
            ),
            notify=True,
        )

    def _cancel_outgoing(self, out: Outgoing, reason: str) -> None:
        self._fail_outgoing(
            out, TransferAbortedError(f"transfer {out.plan.transfer_id} to {out.session.peer}: {reason}"), notify=True
        )

    def _on_ack(self, session: PeerSession, out: Outgoing, seqs: list[int]) -> None:
        scheduler = self._scheduler
        was_full = scheduler.inflight() >= scheduler.max_inflight
        nbytes = out.lists.chunk_nbytes
        out.accepted = True
        sent_at = out.sent_at
        now = time.perf_counter() if sent_at is not None or self.tracer is not None else 0.0
        for seq in seqs:
            outcome = scheduler.ack(out, seq)
            if outcome is AckOutcome.DUPLICATE:
                continue
            if sent_at is not None:
                self._chunk_latency.observe(now - sent_at[seq])
            if self.tracer is not None:
                self.tracer.acked(session.peer, out.plan.transfer_id, seq, now)
            out.bytes_verified += nbytes[seq]
            out.chunks_verified += 1
            if outcome is AckOutcome.COMPLETE:
                self._complete_outgoing(out)
                break
        session.wake.set()
        if was_full:
            for other in self._sessions.values():
                other.wake.set()

    def _on_nack(self, session: PeerSession, out: Outgoing, seq: int, attempt: int) -> None:
        if not 0 <= seq < len(out.attempts) or min(attempt + 1, 255) != out.attempts[seq]:
            # stale: about an attempt we already sent again (its ack was late), or one never sent. Acting on it
            # would free the window slot of the copy still in flight and count a retry twice
            self._counters["stale_messages"] += 1
            return
        bad = out.bad_copies = out.bad_copies or {}
        failures, last = bad.get(seq, (0, -1))
        if last == attempt:  # the same copy NACKed twice (it arrived twice): one failure, one resend
            self._counters["stale_messages"] += 1
            return
        out.retries += 1
        self._counters["retries"] += 1
        failures += 1  # copies resent only because an ack was late do not count
        bad[seq] = (failures, attempt)
        if failures > self.config.max_retries:
            self._fail_outgoing(
                out,
                ChecksumError(
                    f"chunk {seq} of transfer {out.plan.transfer_id} to {session.peer} failed its checksum "
                    f"{failures} times (max_retries={self.config.max_retries})"
                ),
                notify=True,
            )
            return
        if self._scheduler.resend(out, seq):
            session.wake.set()

    def _release_outgoing(self, out: Outgoing) -> None:
        if out.counted:
            out.counted = False
            self.telemetry.comm_end()
        self._scheduler.remove(out)
        out.session.outgoing.pop(out.wire_id, None)
        if self._outgoing.get(out.plan.transfer_id) is out:
            del self._outgoing[out.plan.transfer_id]

    def _complete_outgoing(self, out: Outgoing) -> None:
        self._release_outgoing(out)
        now = time.perf_counter()
        loop_now = asyncio.get_running_loop().time()
        wall = now - out.submitted_at
        sent_for = loop_now - out.first_send_at if out.first_send_at else 0.0
        codec = out.codec
        total = out.table.total_bytes
        if total >= _AUTO_MIN_BYTES and sent_for > 0:  # what codec_policy=auto decides by
            key = _RAW if codec is None else _choice(codec.wire_dtype, codec.compression)
            out.session.rates[key] = total / sent_for
        kv_dtype, compression = _wire_form(codec, out.plan.schema.dtype)
        result = TransferResult(
            transfer_id=out.plan.transfer_id,
            peer=out.session.peer,
            bytes=total,
            wire_bytes=sum(out.wire_bytes) if out.wire_bytes is not None else total,
            kv_dtype=kv_dtype,
            compression=compression,
            chunks=len(out.table),
            wall_s=wall,
            retries=out.retries,
            integrity=IntegrityStatus.UNCHECKED if self._checksum is None else IntegrityStatus.VERIFIED,
            phases={
                "plan_s": out.planned_at - out.submitted_at,
                "queue_s": max(0.0, wall - sent_for - (out.planned_at - out.submitted_at)),
                "transfer_s": sent_for,
            },
        )
        self._counters["transfers_completed"] += 1
        if self._measure:
            self._transfer_seconds["sent"].observe(wall)
            self.telemetry.recent_transfer_seconds.append(wall)
        out.finish(result, None)
        if self.on_sent is not None:
            self.on_sent(result.transfer_id, result, None)
        log.info(
            "transfer.sent", transfer_id=result.transfer_id, peer=result.peer, bytes=result.bytes, chunks=result.chunks,
            seconds=round(wall, 6), gbps=round(result.gbps, 3), retries=result.retries,
        )  # fmt: skip

    def _fail_outgoing(self, out: Outgoing, exc: BaseException, *, notify: bool) -> None:
        if out.future.done():
            return
        out.stopped = True  # placement threads start no further write of it
        self._release_outgoing(out)
        if notify and not out.session.closed:
            if out.announce is not None:  # never sent with its chunk: the peer hears of it (a pull waits for it), then of its end
                out.session.post(out.announce)
                out.announce = None
            self._post_when_fenced(out, Abort(out.wire_id, True, str(exc)[:1024]))
        self._counters["transfers_failed"] += 1
        self._failures[type(exc).__name__] += 1
        out.finish(None, exc)
        if self.on_sent is not None:
            self.on_sent(out.plan.transfer_id, None, exc)
        log.warning("transfer.failed", transfer_id=out.plan.transfer_id, peer=out.session.peer, error=str(exc))

    def _post_when_fenced(self, out: Outgoing, message: Abort | Fence) -> None:
        """Post ``message`` once no direct write of ``out`` runs (at once when none does): the receiver may
        reuse the blocks of an aborted transfer as soon as it reads it."""
        if out.placing:
            out.fence_pending = message
        else:
            out.session.post(message)

    def _on_fence(self, session: PeerSession, wire_id: int) -> None:
        entry = session.fencing.pop(wire_id, None)
        if entry is not None:
            exp, exc, timer = entry
            timer.cancel()
            self._finish_expectation(exp, None, exc)

    def _fence_late(self, session: PeerSession, wire_id: int) -> None:
        entry = session.fencing.pop(wire_id, None)
        if entry is not None:
            tid, waited = entry[0].transfer_id, self.config.ack_timeout_s
            log.warning("transfer.fence_late", peer=session.peer, transfer_id=tid, waited_s=waited)
            self._finish_expectation(entry[0], None, entry[1])
