"""Unit tests of geryon.watch: filter translation, the bounded watcher queue
and the hub, alone and fed by a real store (SQLite, no network)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geryon import watch
from geryon.errors import ResourceExhausted, Unavailable
from geryon.model import Caller, Event, EventType, Filter, Service
from geryon.store.sqlite import SQLiteStore
from geryon.watch import DEFAULT_BACKLOG, Hub, Watcher, translate

EXAMPLES = int(os.environ.get("GERYON_PROPERTY_EXAMPLES", "50"))
PUT, DELETE = EventType.PUT, EventType.DELETE
ALICE = Caller("alice", "server")


def svc(name: str, rev: int = 1, **attrs: str) -> Service:
    return Service(name, attrs, 0, "alice", 1, rev)


def put(new: Service, prev: Service | None = None) -> Event:
    return Event(PUT, new, prev, new.mod_revision)


def delete(s: Service, rev: int) -> Event:
    return Event(DELETE, s, s, rev)


def rev_events(rev: int, n: int, **attrs: str) -> tuple[Event, ...]:
    """One revision of ``n`` PUTs of new services."""
    return tuple(put(svc(f"r{rev}-{i}", rev, **attrs)) for i in range(n))


# ---- translate -------------------------------------------------------------------

TCP = Filter({"proto": "tcp"})


def test_translate_put_inside_the_filter() -> None:
    new = put(svc("a", 1, proto="tcp"))
    assert translate(TCP, [new]) == [new]
    changed = put(svc("a", 2, proto="tcp", port="1"), svc("a", 1, proto="tcp"))
    assert translate(TCP, [changed]) == [changed]


def test_translate_put_leaving_the_filter_is_a_delete_with_the_new_state() -> None:
    before, after = svc("a", 1, proto="tcp"), svc("a", 2, proto="udp")
    (out,) = translate(TCP, [put(after, before)])
    assert out == Event(DELETE, after, before, 2)


def test_translate_put_entering_the_filter_is_a_put() -> None:
    e = put(svc("a", 2, proto="tcp"), svc("a", 1, proto="udp"))
    assert translate(TCP, [e]) == [e]
    gained = put(svc("a", 2, proto="tcp"), svc("a", 1))  # the attribute was added
    assert translate(TCP, [gained]) == [gained]


def test_translate_put_outside_the_filter_is_dropped() -> None:
    assert translate(TCP, [put(svc("a", 1, proto="udp"))]) == []
    assert translate(TCP, [put(svc("a", 2, proto="il"), svc("a", 1, proto="udp"))]) == []


def test_translate_delete() -> None:
    inside, outside = svc("a", 1, proto="tcp"), svc("b", 1, proto="udp")
    assert translate(TCP, [delete(inside, 2)]) == [delete(inside, 2)]
    assert translate(TCP, [delete(outside, 2)]) == []


def test_translate_keeps_order_and_the_empty_filter_passes_all() -> None:
    a, b, c = svc("a", 3, proto="tcp"), svc("b", 3, proto="udp"), svc("c", 3, proto="tcp")
    events = [delete(a, 3), put(b), put(c), delete(b, 3)]
    assert translate(Filter(), events) == events
    assert translate(TCP, events) == [delete(a, 3), put(c)]


def test_translate_by_prefix_and_wildcard() -> None:
    f = Filter({"port": "*"}, prefix="tcp!")
    keep = put(svc("tcp!h0!1", 1, port=""))
    assert translate(f, [keep, put(svc("udp!h0!1", 1, port="1"))]) == [keep]
    lost = put(svc("tcp!h0!1", 2), svc("tcp!h0!1", 1, port=""))
    assert translate(f, [lost]) == [Event(DELETE, lost.service, lost.prev, 2)]


# Random histories over a few names: a watcher replaying its translated events
# always holds exactly what Find would answer with the same filter.
OPS = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c"]),
        st.one_of(
            st.none(),  # delete
            st.dictionaries(st.sampled_from(["x", "y"]), st.sampled_from(["", "1", "2"])),
        ),
    ),
    max_size=25,
)
FILTERS = st.builds(
    Filter,
    st.dictionaries(st.sampled_from(["x", "y"]), st.sampled_from(["", "1", "*"]), max_size=2),
    st.sampled_from(["", "a", "b"]),
)


@settings(max_examples=EXAMPLES, deadline=None)
@given(ops=OPS, flt=FILTERS)
def test_replayed_watch_equals_find(
    ops: list[tuple[str, dict[str, str] | None]], flt: Filter
) -> None:
    state: dict[str, Service] = {}
    seen: dict[str, Service] = {}
    for rev, (name, attrs) in enumerate(ops, 1):
        prev = state.get(name)
        if attrs is None:
            if prev is None:
                continue
            event = delete(prev, rev)
            del state[name]
        else:
            state[name] = Service(name, attrs, 0, "o", prev.create_revision if prev else rev, rev)
            event = put(state[name], prev)
        for e in translate(flt, [event]):
            if e.type is PUT:
                seen[e.service.name] = e.service
            else:
                del seen[e.service.name]  # never a DELETE for what it did not hold
        assert seen == {n: s for n, s in state.items() if flt.matches(s)}


# ---- the watcher ----------------------------------------------------------------


def test_offer_queues_matching_revisions_and_skips_old_ones() -> None:
    w = Watcher(Filter({"k": "v"}), after=5, backlog=100)
    w.offer(5, rev_events(5, 1, k="v"))  # at or before ``after``: already seen
    w.offer(4, rev_events(4, 1, k="v"))
    assert not w.pending and w.seen == 5 and not w.wakeup.is_set()
    w.offer(6, rev_events(6, 2, k="w"))  # nothing matches: seen moves, no wakeup
    assert not w.pending and w.seen == 6 and not w.wakeup.is_set()
    w.offer(7, rev_events(7, 2, k="v"))
    assert w.seen == 7 and w.pending_events == 2 and w.wakeup.is_set()
    w.offer(7, rev_events(7, 2, k="v"))  # the same revision again: ignored
    assert w.pending_events == 2
    assert w.take(100) == list(rev_events(7, 2, k="v"))
    assert w.delivered == 7 and not w.wakeup.is_set()


def test_take_never_splits_a_revision() -> None:
    w = Watcher(Filter(), after=0, backlog=100)
    for rev, n in [(1, 2), (2, 3), (3, 1), (4, 5), (5, 1)]:
        w.offer(rev, rev_events(rev, n))
    sizes = []
    while w.pending:
        got = w.take(4)
        revs = [e.revision for e in got]
        sizes.append((sorted(set(revs)), len(got)))
    # Up to four events, but whole revisions; at least one even when larger.
    assert sizes == [([1], 2), ([2, 3], 4), ([4], 5), ([5], 1)]
    assert w.pending_events == 0 and w.delivered == 5
    assert w.take(4) == []


def test_take_respects_max_events_but_takes_at_least_one_revision() -> None:
    w = Watcher(Filter(), after=0, backlog=100)
    w.offer(1, rev_events(1, 3))
    w.offer(2, rev_events(2, 1))
    assert len(w.take(1)) == 3 and w.delivered == 1
    assert w.wakeup.is_set()  # revision 2 still waits
    assert len(w.take(0)) == 1 and w.delivered == 2


def test_seen_and_delivered_for_progress() -> None:
    w = Watcher(Filter({"k": "v"}), after=10, backlog=100)
    assert (w.seen, w.delivered) == (10, 10)
    w.offer(11, rev_events(11, 1, k="v"))
    w.offer(12, rev_events(12, 1, k="v"))
    w.offer(13, rev_events(13, 1, k="other"))
    assert (w.seen, w.delivered) == (13, 10)
    w.take(1)
    # Part of the backlog is out: only what was taken counts as delivered.
    assert (w.seen, w.delivered) == (13, 11)
    w.take(1)
    # All out: every matching event up to ``seen`` is delivered, the
    # non-matching revision 13 included.
    assert (w.seen, w.delivered) == (13, 13)
    w.offer(14, rev_events(14, 1, k="other"))
    assert (w.seen, w.delivered) == (14, 13)
    assert w.take(10) == [] and w.delivered == 14


def test_overflow_cuts_the_watcher_off_with_the_revision_to_resume_from() -> None:
    w = Watcher(Filter(), after=3, backlog=4)
    w.offer(4, rev_events(4, 2))
    w.offer(5, rev_events(5, 2))
    assert w.take(2) == list(rev_events(4, 2)) and w.delivered == 4
    w.offer(6, rev_events(6, 2))  # 4 pending: at the bound, not past it
    assert w.error is None and w.pending_events == 4
    w.wakeup.clear()
    w.offer(7, rev_events(7, 1))
    err = w.error
    assert isinstance(err, ResourceExhausted) and err.code == "RESOURCE_EXHAUSTED"
    assert err.resume_revision == 5  # delivered + 1: nothing is lost
    assert "resume from revision 5" in str(err)
    assert not w.pending and w.pending_events == 0 and w.wakeup.is_set()
    w.offer(8, rev_events(8, 1))  # a cut-off watcher queues nothing more
    assert not w.pending and w.error is err


def test_overflow_before_anything_was_taken() -> None:
    w = Watcher(Filter(), after=9, backlog=2)
    w.offer(10, rev_events(10, 3))  # one revision alone past the bound
    assert w.error is not None and w.error.resume_revision == 10 and not w.pending


def test_non_matching_events_do_not_count_against_the_bound() -> None:
    w = Watcher(Filter({"k": "v"}), after=0, backlog=2)
    for rev in range(1, 50):
        w.offer(rev, rev_events(rev, 5, k="other"))
    assert w.error is None and w.seen == 49


def test_replay_bypasses_the_bound() -> None:
    w = Watcher(Filter(), after=0, backlog=2)
    for rev in range(1, 6):
        w.offer(rev, rev_events(rev, 2), replay=True)
    assert w.error is None and w.pending_events == 10
    w.offer(6, rev_events(6, 1))  # live: the bound holds again
    assert isinstance(w.error, ResourceExhausted) and w.error.resume_revision == 1


def test_fail_keeps_the_first_error() -> None:
    w = Watcher(Filter(), after=0, backlog=10)
    w.offer(1, rev_events(1, 2))
    w.wakeup.clear()
    first = Unavailable("registryd: shutting down")
    w.fail(first)
    w.fail(ResourceExhausted("later"))
    assert w.error is first and not w.pending and w.pending_events == 0
    assert w.wakeup.is_set()


async def test_wakeup_tells_a_waiting_stream() -> None:
    w = Watcher(Filter(), after=0, backlog=10)
    got: list[list[Event]] = []

    async def stream() -> None:
        while w.error is None:
            await w.wakeup.wait()
            if w.pending:
                got.append(w.take(10))

    task = asyncio.create_task(stream())
    await asyncio.sleep(0)
    w.offer(1, rev_events(1, 2))
    await asyncio.sleep(0)
    w.offer(2, rev_events(2, 1))
    await asyncio.sleep(0)
    w.fail(Unavailable("registryd: shutting down"))
    await task
    assert got == [list(rev_events(1, 2)), list(rev_events(2, 1))]


# ---- the hub -------------------------------------------------------------------


def test_hub_fans_out_through_each_filter() -> None:
    hub = Hub(backlog=7)
    tcp = hub.subscribe(TCP, after=0, owner="alice")
    everything = hub.subscribe(Filter(), after=0, owner="bob")
    late = hub.subscribe(Filter(), after=1, owner="alice")
    assert tcp.backlog_limit == 7 and Hub().backlog == DEFAULT_BACKLOG
    assert (hub.count("alice"), hub.count("bob"), hub.count("carol")) == (2, 1, 0)
    a, b = svc("a", 1, proto="tcp"), svc("b", 1, proto="udp")
    hub.publish(1, (put(a), put(b)))
    hub.publish(2, (delete(a, 2),))
    assert tcp.take(100) == [put(a), delete(a, 2)]
    assert everything.take(100) == [put(a), put(b), delete(a, 2)]
    assert late.take(100) == [delete(a, 2)]
    hub.unsubscribe(late)
    hub.unsubscribe(late)  # twice is harmless
    hub.publish(3, (put(svc("c", 3)),))
    assert not late.pending and late.seen == 2
    assert len(everything.take(100)) == 1


def test_a_slow_watcher_does_not_hold_up_the_others() -> None:
    hub = Hub(backlog=3)
    slow = hub.subscribe(Filter(), after=0)
    fast = hub.subscribe(Filter(), after=0)
    for rev in range(1, 10):
        hub.publish(rev, rev_events(rev, 1))
        assert len(fast.take(100)) == 1
    assert slow.error is not None and slow.error.resume_revision == 1
    assert fast.error is None and fast.delivered == 9


def test_close_all() -> None:
    hub = Hub()
    ws = [hub.subscribe(Filter(), after=0) for _ in range(3)]
    ws[0].offer(1, rev_events(1, 1))
    err = Unavailable("registryd: shutting down")
    hub.close_all(err)
    assert all(w.error is err and not w.pending and w.wakeup.is_set() for w in ws)


async def test_an_idle_hub_wakes_its_watchers_at_once() -> None:
    hub = Hub()
    w = hub.subscribe(Filter(), after=0)
    hub.publish(1, rev_events(1, 1))
    assert w.wakeup.is_set()


async def test_a_busy_hub_coalesces_revisions_into_the_next_round() -> None:
    """Revisions published while a round's messages are being sent wait for
    the next round, and then go out together: whole revisions, in order."""
    hub = Hub()
    a, b = hub.subscribe(Filter(), after=0), hub.subscribe(Filter(), after=0)
    hub.publish(1, rev_events(1, 1))
    assert a.wakeup.is_set() and b.wakeup.is_set()
    assert a.take(100) == b.take(100) == list(rev_events(1, 1))
    for rev in (2, 3, 4):  # while a and b are still sending revision 1
        hub.publish(rev, rev_events(rev, rev))
    assert not a.wakeup.is_set() and not b.wakeup.is_set()
    hub.sent(a)
    assert not a.wakeup.is_set()  # b is not back: the round is still open
    hub.sent(b)
    await asyncio.wait_for(asyncio.gather(a.wakeup.wait(), b.wakeup.wait()), 5)
    want = [e for rev in (2, 3, 4) for e in rev_events(rev, rev)]
    assert a.take(100) == b.take(100) == want
    assert a.delivered == b.delivered == 4


async def test_a_stuck_watcher_holds_up_one_round_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watch, "ROUND_MAX_S", 0.05)
    hub = Hub()
    fast, stuck = hub.subscribe(Filter(), after=0), hub.subscribe(Filter(), after=0)
    hub.publish(1, rev_events(1, 1))
    fast.take(100)
    stuck.take(100)  # and never comes back: its reader does not read
    hub.sent(fast)
    hub.publish(2, rev_events(2, 1))
    await asyncio.wait_for(fast.wakeup.wait(), 5)  # once the round is overdue
    assert fast.take(100) == list(rev_events(2, 1))
    assert hub.woken == {fast}  # the stuck one, still writing, is not waited for
    hub.sent(fast)
    hub.publish(3, rev_events(3, 1))
    await asyncio.wait_for(fast.wakeup.wait(), 5)
    assert fast.take(100) == list(rev_events(3, 1)) and hub.woken == {fast}
    assert [r for r, _ in stuck.pending] == [2, 3]
    hub.sent(fast)
    hub.sent(stuck)  # its reader read at last: it is woken for what it holds
    await asyncio.wait_for(stuck.wakeup.wait(), 5)
    assert [e.revision for e in stuck.take(100)] == [2, 3]


async def test_a_progress_request_sends_out_of_turn() -> None:
    """A watcher woken by a progress request sends what it holds at once; the
    hub does not wake it again for events it already sent."""
    hub = Hub()
    a, b = hub.subscribe(Filter(), after=0), hub.subscribe(Filter(), after=0)
    hub.publish(1, rev_events(1, 1))
    b.take(100)  # b is still sending: the round stays open
    a.take(100)
    hub.sent(a)
    hub.publish(2, rev_events(2, 1))
    a.wakeup.set()  # its progress request
    assert a.take(100) == list(rev_events(2, 1))
    hub.sent(a)
    assert a not in hub.held
    hub.sent(b)  # b still has revision 2: the next round is for b alone
    await asyncio.wait_for(b.wakeup.wait(), 5)
    assert b.take(100) == list(rev_events(2, 1)) and not a.wakeup.is_set()


# ---- fed by a real store ----------------------------------------------------------


async def test_watchers_fed_by_the_store(tmp_path: Path) -> None:
    store = await SQLiteStore.open(tmp_path)
    hub = Hub()
    store.on_commit.append(hub.publish)
    try:
        tcp = hub.subscribe(TCP, after=store.durable_revision)
        lease = (await store.grant(1000, caller=ALICE)).value
        for name, proto in [("a", "tcp"), ("b", "udp"), ("c", "tcp")]:
            await store.register(
                name, {"proto": proto}, lease=lease.id, persist=False, caller=ALICE
            )
        await store.update("a", {"proto": "udp"}, [], expected_mod_revision=0, caller=ALICE)
        await store.update("b", {"proto": "tcp"}, [], expected_mod_revision=0, caller=ALICE)
        await store.revoke(lease.id, caller=ALICE)
        got = [(e.type, e.service.name, e.revision) for e in tcp.take(100)]
        assert got == [
            (PUT, "a", 1),
            (PUT, "c", 3),
            (DELETE, "a", 4),  # left the filter
            (PUT, "b", 5),  # entered it
            (DELETE, "b", 6),  # the lease's end: one revision for both
            (DELETE, "c", 6),
        ]

        # A watcher resuming from revision 3: history first, then live, and
        # nothing twice even when a live revision is offered again.
        resumed = hub.subscribe(TCP, after=2)
        for revision, events in store.history_since(3):
            resumed.offer(revision, events, replay=True)
        resumed.seen = max(resumed.seen, store.durable_revision)
        await store.register("d", {"proto": "tcp"}, lease=0, persist=True, caller=ALICE)
        hub.publish(7, store.history[-1][1])  # already delivered: ignored
        got = [(e.type, e.service.name, e.revision) for e in resumed.take(100)]
        assert got == [
            (PUT, "c", 3),
            (DELETE, "a", 4),
            (PUT, "b", 5),
            (DELETE, "b", 6),
            (DELETE, "c", 6),
            (PUT, "d", 7),
        ]
        assert resumed.delivered == 7
    finally:
        await store.close()


@pytest.mark.parametrize("backlog", [1, 2])
async def test_a_stalled_watcher_is_cut_off_and_can_resume(tmp_path: Path, backlog: int) -> None:
    store = await SQLiteStore.open(tmp_path)
    hub = Hub(backlog=backlog)
    store.on_commit.append(hub.publish)
    try:
        w = hub.subscribe(Filter(), after=0)
        await store.register("s0", {}, lease=0, persist=True, caller=ALICE)
        seen = {e.service.name for e in w.take(100)}
        assert seen == {"s0"} and w.delivered == 1
        for i in range(1, 10):  # nobody takes these
            await store.register(f"s{i}", {}, lease=0, persist=True, caller=ALICE)
        assert isinstance(w.error, ResourceExhausted)
        assert w.error.resume_revision == 2 and w.pending_events == 0
        # Resuming from there rebuilds exactly what Find answers.
        again = Watcher(Filter(), after=w.error.resume_revision - 1, backlog=backlog)
        for revision, events in store.history_since(w.error.resume_revision):
            again.offer(revision, events, replay=True)
        seen |= {e.service.name for e in again.take(1000)}
        assert sorted(seen) == [s.name for s in store.find(Filter())]
    finally:
        await store.close()
