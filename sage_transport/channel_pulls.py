"""Pulls: asking a peer for its KV, and serving, deferring or refusing what peers ask of ours."""

from __future__ import annotations

import asyncio
import contextlib

from .channel_core import (
    _MAX_PULLS_PER_PEER,
    _UNTRUSTED,
    ChannelCore,
    _plan_pages,
    _registered_pages,
    log,
)
from .errors import (
    PlanError,
    SageTransportError,
    TransferAbortedError,
    TransferTimeoutError,
)
from .plan import Priority, TransferPlan, TransferResult
from .schema import DType
from .session import PeerSession
from .transfers import TransferHandle
from .wire import Pull, PullRefused


class PullSide(ChannelCore):
    """Receiver-initiated transfers, both ways."""

    async def pull(self, plan: TransferPlan) -> TransferResult:
        """Ask peer ``plan.peer`` to send ``plan`` to us (``src_blocks`` are the peer's, ``dst_blocks`` ours) and
        return once every chunk arrived here and was verified: the receiver-initiated transfer a decode instance
        uses to fetch a prefill's KV. The peer must allow it (``allow_pull``); a refusal raises
        :class:`TransferAbortedError` with the peer's reason, a missed ``deadline_s`` :class:`TransferTimeoutError`.
        Cancelling this call aborts the transfer at both ends."""
        session = self._session_for(plan, "pulling into it")
        tid = plan.transfer_id
        exp = self._expect.get(tid)
        if tid in session.pulls or (exp is not None and exp.announced) or tid in self._recent:
            raise PlanError(f"transfer {tid} is already being received or was received; pull it under a new id")
        exp = self._expectation(tid)
        session.pulls[tid] = exp
        session.pull_destinations[tid] = sorted((m.layer_start, m.layer_stop, m.dst_blocks) for m in plan.mappings)
        wire = plan.target_dtype.value if plan.target_dtype is not None else ""
        session.post(Pull(tid, plan.schema, list(plan.mappings), int(plan.priority), plan.deadline_s, wire))
        try:
            async with asyncio.timeout(plan.deadline_s):
                return await self.wait_received(tid)
        except TimeoutError:
            err = TransferTimeoutError(f"transfer {tid} pulled from {plan.peer} missed its {plan.deadline_s:g}s deadline")
            self._abandon_pull(session, tid, err)
            if not exp.done.done():  # the sender may be writing our memory directly: wait for its fence
                with contextlib.suppress(BaseException):
                    async with asyncio.timeout(self.config.ack_timeout_s + 1):
                        await asyncio.shield(exp.done)
            raise err from None
        except asyncio.CancelledError:
            self._abandon_pull(session, tid, TransferAbortedError(f"transfer {tid} pulled from {plan.peer}: cancelled"))
            raise

    def _abandon_pull(self, session: PeerSession, tid: str, exc: BaseException) -> None:
        exp = session.pulls.pop(tid, None)
        session.pull_destinations.pop(tid, None)
        for inc in list(session.incoming.values()):
            if inc.transfer_id == tid:  # announced: abort it at the sender too
                self._fail_incoming(session, inc, exc, notify=True)
                return
        if exp is not None:
            self._finish_expectation(exp, None, exc)

    def _on_pull(self, session: PeerSession, msg: Pull) -> None:
        """A peer asks for a transfer of our KV: submit it to that peer (through :attr:`pull_resolver` when set),
        or refuse with the reason."""
        if not self.config.allow_pull:
            return self._refuse_pull(session, msg.transfer_id, "pulls are refused here (allow_pull=false)")
        if not session.trusted:
            self._counters["untrusted_refusals"] += 1
            return self._refuse_pull(session, msg.transfer_id, _UNTRUSTED)
        if self._memory is not None:
            pages, registered = _plan_pages(msg.schema, msg.mappings), _registered_pages(self._memory)
            if pages > registered:
                return self._refuse_pull(session, msg.transfer_id, f"{pages} pages asked for, {registered} registered here")
            active = len(session.outgoing) + sum(1 for asker, _ in self._deferred_pulls.values() if asker is session)
            if active >= _MAX_PULLS_PER_PEER:
                return self._refuse_pull(session, msg.transfer_id, f"{active} transfers already asked for by {session.peer}")
        try:
            plan = TransferPlan(
                transfer_id=msg.transfer_id, peer=session.peer, schema=msg.schema, mappings=tuple(msg.mappings),
                priority=Priority.parse(msg.priority), deadline_s=msg.deadline_s,
                target_dtype=DType.parse(msg.target_dtype, "target_dtype") if msg.target_dtype else None,
            )  # fmt: skip
            if self.pull_resolver is not None:
                if msg.transfer_id in self._deferred_pulls or msg.transfer_id in self._outgoing:
                    raise PlanError(f"transfer {msg.transfer_id} is already asked for or being sent")
                self._deferred_pulls[msg.transfer_id] = (session, plan)
                try:
                    resolved = self.pull_resolver(session.peer, plan)
                except SageTransportError:
                    raise
                except Exception as exc:  # the application's bug must not end the session
                    log.exception("pull.resolver_failed", transfer_id=msg.transfer_id, peer=session.peer)
                    raise PlanError(f"the pull resolver failed: {type(exc).__name__}: {exc}") from exc
                if resolved is not None and msg.transfer_id in self._deferred_pulls:
                    with contextlib.suppress(SageTransportError):  # serve_pull refused it with the reason
                        self.serve_pull(msg.transfer_id, resolved)
                return None  # served, deferred, or served or refused by the resolver itself
            self.submit(plan)
            self._counters["pulls_served"] += 1
        except SageTransportError as exc:
            self._deferred_pulls.pop(msg.transfer_id, None)
            self._refuse_pull(session, msg.transfer_id, str(exc))
        return None

    def _refuse_pull(self, session: PeerSession, transfer_id: str, reason: str) -> None:
        self._counters["transfers_refused"] += 1
        session.post(PullRefused(transfer_id, f"refused by {self.name}: {reason}"[:1024]))
        log.warning("pull.refused", transfer_id=transfer_id, peer=session.peer, reason=reason)

    @property
    def deferred_pulls(self) -> dict[str, TransferPlan]:
        """Pulls peers asked for that :attr:`pull_resolver` deferred, by transfer id (the plans as asked)."""
        return {tid: plan for tid, (_, plan) in self._deferred_pulls.items()}

    def serve_pull(self, transfer_id: str, plan: TransferPlan | None = None) -> TransferHandle:
        """Send a deferred pull: ``plan`` (default: as the peer asked) must keep its transfer id, peer and
        destination blocks; its source blocks, priority and ``progressive`` are ours to choose."""
        entry = self._deferred_pulls.pop(transfer_id, None)
        if entry is None:
            raise PlanError(f"no pull of transfer {transfer_id} is waiting here")
        session, asked = entry
        plan = plan or asked
        try:
            if (plan.transfer_id, plan.peer) != (asked.transfer_id, asked.peer):
                raise PlanError(
                    f"pull {transfer_id}: served as transfer {plan.transfer_id} to {plan.peer}, "
                    f"asked as {asked.transfer_id} by {asked.peer}"
                )
            destinations = sorted((m.layer_start, m.layer_stop, m.dst_blocks) for m in plan.mappings)
            if destinations != sorted((m.layer_start, m.layer_stop, m.dst_blocks) for m in asked.mappings):
                raise PlanError(f"pull {transfer_id}: the plan served writes other destination blocks than the peer asked for")
            handle = self.submit(plan)
        except SageTransportError as exc:
            if not session.closed:
                self._refuse_pull(session, transfer_id, str(exc))
            raise
        self._counters["pulls_served"] += 1
        return handle

    def refuse_pull(self, transfer_id: str, reason: str) -> None:
        """Refuse a deferred pull; the peer's ``pull`` raises :class:`TransferAbortedError` with ``reason``."""
        entry = self._deferred_pulls.pop(transfer_id, None)
        if entry is not None and not entry[0].closed:
            self._refuse_pull(entry[0], transfer_id, reason)

    def _on_pull_refused(self, session: PeerSession, msg: PullRefused) -> None:
        exp = session.pulls.pop(msg.transfer_id, None)
        session.pull_destinations.pop(msg.transfer_id, None)
        if exp is not None:
            err = TransferAbortedError(f"peer {session.peer} will not send transfer {msg.transfer_id}: {msg.reason}")
            self._counters["transfers_failed"] += 1
            self._failures[type(err).__name__] += 1
            self._finish_expectation(exp, None, err)
