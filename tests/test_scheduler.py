"""The scheduler as a state machine: priorities, windows, progressive layers, resends, release."""

from __future__ import annotations

import pytest

from sage_transport import Priority, Scheduler
from sage_transport.scheduler import AckOutcome


def drain(s: Scheduler, peer: str) -> list[tuple[object, int]]:
    picks = []
    while (pick := s.next_for(peer)) is not None:
        picks.append(pick)
    return picks


def test_window_bounds_inflight_per_peer_and_acks_free_slots() -> None:
    s = Scheduler(window=3, max_inflight=100)
    s.add("t", "p", 10)
    assert drain(s, "p") == [("t", 0), ("t", 1), ("t", 2)]
    assert s.inflight("p") == 3
    assert s.ack("t", 1) is AckOutcome.ACCEPTED
    assert drain(s, "p") == [("t", 3)]
    assert s.ack("t", 1) is AckOutcome.DUPLICATE


def test_global_limit_spans_peers() -> None:
    s = Scheduler(window=4, max_inflight=5)
    s.add("a", "p1", 10)
    s.add("b", "p2", 10)
    assert len(drain(s, "p1")) == 4
    assert len(drain(s, "p2")) == 1
    s.ack("a", 0)
    assert drain(s, "p2") == [("b", 1)]


def test_decode_critical_overtakes_bulk_at_chunk_granularity() -> None:
    s = Scheduler(window=2, max_inflight=100)
    s.add("bulk", "p", 100, priority=Priority.BULK)
    assert drain(s, "p") == [("bulk", 0), ("bulk", 1)]
    s.add("critical", "p", 3, priority=Priority.DECODE_CRITICAL)
    s.add("normal", "p", 2, priority=Priority.NORMAL)
    order = []
    for seq in (0, 1):
        s.ack("bulk", seq)
    for _ in range(7):
        pick = s.next_for("p")
        assert pick is not None
        order.append(pick[0])
        s.ack(*pick)
    assert order == ["critical", "critical", "critical", "normal", "normal", "bulk", "bulk"]


def test_same_class_is_first_come_first_served() -> None:
    s = Scheduler(window=10, max_inflight=10)
    s.add("first", "p", 2)
    s.add("second", "p", 2)
    assert [k for k, _ in drain(s, "p")] == ["first", "first", "second", "second"]


def test_progressive_transfer_sends_only_ready_layers_lowest_first() -> None:
    s = Scheduler(window=100, max_inflight=100)
    layers = [(0, 2), (2, 4), (4, 6)]  # two chunks per layer
    s.add("t", "p", 6, layer_ranges=layers)
    assert drain(s, "p") == []
    assert s.mark_layer_ready("t", 2)
    assert s.mark_layer_ready("t", 0)
    assert not s.mark_layer_ready("t", 0)
    assert [seq for _, seq in drain(s, "p")] == [0, 1, 4, 5]
    s.mark_layer_ready("t", 1)
    assert [seq for _, seq in drain(s, "p")] == [2, 3]
    with pytest.raises(IndexError):
        s.mark_layer_ready("t", 3)


def test_resend_goes_first_and_complete_is_reported_once() -> None:
    s = Scheduler(window=2, max_inflight=2)
    s.add("t", "p", 3)
    drain(s, "p")
    assert s.resend("t", 1)
    assert s.next_for("p") == ("t", 1)
    assert s.ack("t", 0) is AckOutcome.ACCEPTED
    assert s.ack("t", 1) is AckOutcome.ACCEPTED
    assert drain(s, "p") == [("t", 2)]
    assert s.ack("t", 2) is AckOutcome.COMPLETE
    assert not s.resend("t", 2)


def test_overdue_inflight_chunks_all_go_again() -> None:
    s = Scheduler(window=4, max_inflight=4)
    s.add("t", "p", 4)
    drain(s, "p")
    s.ack("t", 2)
    assert s.resend_inflight("p") == 3
    assert s.inflight("p") == 0
    assert [seq for _, seq in drain(s, "p")] == [0, 1, 3]


def test_remove_releases_every_slot_and_queue() -> None:
    s = Scheduler(window=4, max_inflight=6)
    s.add("a", "p", 10)
    s.add("b", "q", 10)
    drain(s, "p")
    drain(s, "q")
    assert s.inflight() == 6
    assert s.remove("a") == 4
    assert s.inflight() == 2 and s.inflight("p") == 0
    assert not s.has_work("p") and "a" not in s
    stats = s.statistics()
    assert stats.transfers == 1 and stats.inflight == 2 and stats.inflight_by_peer == {"q": 2}
    assert stats.queued_chunks == 8
    assert s.ack("a", 0) is AckOutcome.DUPLICATE


def test_duplicate_keys_are_refused() -> None:
    s = Scheduler(window=1, max_inflight=1)
    s.add("t", "p", 1)
    with pytest.raises(KeyError):
        s.add("t", "p", 1)


def test_chunks_smaller_on_the_wire_take_their_share_of_a_window_slot() -> None:
    """A quantised transfer (int4: 0.28 of its stored bytes) fills the window with ~1/0.28 as many chunks, so the
    bytes on the wire in flight stay what ``window`` says; a full-size chunk then waits for a whole slot."""
    s = Scheduler(window=4, max_inflight=100)
    s.add("int4", "p", 100, cost=0.25)
    s.add("raw", "p", 10)
    assert drain(s, "p") == [("int4", i) for i in range(16)]
    assert s.inflight("p") == 16
    for seq in range(3):
        s.ack("int4", seq)
    assert drain(s, "p") == [("int4", 16), ("int4", 17), ("int4", 18)]
    s.remove("int4")
    assert s.inflight("p") == 0
    assert drain(s, "p") == [("raw", i) for i in range(4)]
    with pytest.raises(ValueError, match=r"cost=0 must be in \(0, 1\]"):
        s.add("bad", "p", 1, cost=0)


def test_a_held_class_waits_in_its_queue_while_the_others_go() -> None:
    from sage_transport.fan_in import BULK_HELD

    s = Scheduler(window=8, max_inflight=64)
    s.add("bulk", "p", 4, priority=Priority.BULK)
    s.add("normal", "p", 1, priority=Priority.NORMAL)
    s.hold("p", BULK_HELD)
    assert s.held("p") == BULK_HELD
    assert s.next_for("p") == ("normal", 0)
    assert s.next_for("p") is None  # bulk is held: nothing else goes, though the window has room
    s.add("critical", "p", 1, priority=Priority.DECODE_CRITICAL)
    assert s.next_for("p") == ("critical", 0)
    s.hold("p", 0)
    assert [s.next_for("p") for _ in range(4)] == [("bulk", i) for i in range(4)]
    s.add("bulk-q", "q", 1, priority=Priority.BULK)
    assert s.next_for("q") == ("bulk-q", 0)  # holds are per peer
