"""The shared prefetch buffer's rules, without threads or sockets."""

from hypothesis import given
from hypothesis import strategies as st

from prefetch import HIT, JOINED, MISS, PrefetchBuffer, ranges_overlap
from shards import RelTag

REL = RelTag(1663, 5, 100)
PAGE = b"p" * 8192


def filled(buf: PrefetchBuffer, owner: int, blocks, lsn=100, nms=100):
    got = buf.reserve(owner, REL, list(blocks), lsn, nms)
    for b in got:
        buf.fill(REL, b, lsn, PAGE)
    return got


def test_lsn_rule():
    assert ranges_overlap(50, 100, 80, 120)      # b starts inside a
    assert ranges_overlap(50, 100, 10, 50)       # touching at 50
    assert not ranges_overlap(50, 100, 101, 120)  # b entirely after a
    assert not ranges_overlap(50, 100, 10, 49)    # b entirely before a


@given(st.integers(0, 1000), st.integers(0, 1000), st.integers(0, 1000), st.integers(0, 1000))
def test_lsn_rule_is_symmetric_and_means_a_common_lsn(a1, a2, b1, b2):
    na, la = sorted((a1, a2))
    nb, lb = sorted((b1, b2))
    common = max(na, nb) <= min(la, lb)
    assert ranges_overlap(na, la, nb, lb) == common == ranges_overlap(nb, lb, na, la)


def test_hit_only_when_ranges_overlap():
    buf = PrefetchBuffer(100)
    filled(buf, 1, [7], lsn=100, nms=90)
    assert buf.take(REL, 7, 200, 150) is None    # read after a newer change: no
    assert buf.take(REL, 7, 95, 80) == PAGE      # overlapping range: yes
    assert buf.take(REL, 7, 300, 100) == PAGE    # nms at lsn_a: page unchanged since
    assert buf.counters.hits == 2


def test_dedup_of_same_page():
    buf = PrefetchBuffer(100)
    assert buf.reserve(1, REL, [1, 2, 3], 100, 100) == [1, 2, 3]
    assert buf.reserve(2, REL, [2, 3, 4], 100, 100) == [4]
    assert buf.counters.deduplicated == 2 and buf.counters.issued == 4


def test_join_pending_then_fill_returns_waiter():
    buf = PrefetchBuffer(100)
    buf.reserve(1, REL, [5], 100, 100)
    kind, job = buf.lookup(REL, 5, 100, 100, ("slot", 0))
    assert kind == JOINED
    assert buf.fill(REL, 5, 100, PAGE) == [("slot", 0)]
    assert buf.counters.joins == 1 and buf.counters.late == 0
    assert buf.lookup(REL, 5, 100, 100, None) == (HIT, PAGE)


def test_discard_returns_waiters_and_counts_failure():
    buf = PrefetchBuffer(100)
    buf.reserve(1, REL, [5], 100, 100)
    buf.lookup(REL, 5, 100, 100, ("slot", 3))
    assert buf.discard(REL, 5, 100) == [("slot", 3)]
    assert buf.counters.failed == 1
    assert buf.lookup(REL, 5, 100, 100, None) == (MISS, None)


def test_late_arrival_is_counted():
    buf = PrefetchBuffer(100)
    buf.reserve(1, REL, [5], 100, 100)
    buf.note_foreground(REL, 5, 100, 100)  # read went to the server without joining
    buf.fill(REL, 5, 100, PAGE)
    assert buf.counters.late == 1


def test_waste_counted_for_unread_evicted_pages():
    buf = PrefetchBuffer(4)
    filled(buf, 1, range(4))
    filled(buf, 1, range(4, 8))  # the same backend pushes out its own unread pages
    assert buf.counters.wasted == 4
    assert len(buf) == 4


def test_consumed_pages_are_evicted_first():
    buf = PrefetchBuffer(4)
    filled(buf, 1, range(4))
    buf.take(REL, 0, 100, 100)
    buf.take(REL, 1, 100, 100)
    filled(buf, 2, [10, 11])
    assert buf.counters.wasted == 0  # only consumed pages made room
    assert buf.take(REL, 2, 100, 100) == PAGE and buf.take(REL, 10, 100, 100) == PAGE


def test_fast_backend_cannot_flush_slow_backends_share():
    buf = PrefetchBuffer(100)
    filled(buf, 1, range(50))  # slow backend: 50 unread pages, its fair share
    for start in range(1000, 3000, 50):  # fast backend keeps prefetching and reading
        got = filled(buf, 2, range(start, start + 50))
        for b in got:
            buf.take(REL, b, 100, 100)
    assert all(buf.take(REL, b, 100, 100) == PAGE for b in range(50))
    assert buf.counters.wasted == 0


def test_runaway_prefetcher_gets_back_pressure():
    buf = PrefetchBuffer(100)
    filled(buf, 1, range(50))
    got = filled(buf, 2, range(1000, 1200))  # never reads: capped near its share
    assert len(got) < 200
    assert buf.counters.dropped > 0
    assert all(buf.take(REL, b, 100, 100) == PAGE for b in range(50))


def test_pending_entries_are_never_evicted():
    buf = PrefetchBuffer(2)
    buf.reserve(1, REL, [1, 2], 100, 100)
    assert buf.reserve(1, REL, [3], 100, 100) == []
    assert buf.counters.dropped == 1


def test_backend_leaving_frees_its_share():
    buf = PrefetchBuffer(10)
    filled(buf, 1, range(10))
    buf.forget_owner(1)
    assert filled(buf, 2, range(100, 110)) == list(range(100, 110))


def test_zero_capacity_drops_everything():
    buf = PrefetchBuffer(0)
    assert buf.reserve(1, REL, [1], 100, 100) == []
    assert buf.counters.dropped == 1


def test_different_lsn_replaces_ready_entry():
    buf = PrefetchBuffer(10)
    filled(buf, 1, [1], lsn=100, nms=100)
    assert buf.reserve(1, REL, [1], 300, 300) == [1]
    buf.fill(REL, 1, 300, b"n" * 8192)
    assert buf.take(REL, 1, 300, 300) == b"n" * 8192
    assert buf.take(REL, 1, 100, 100) is None


def test_joined_entry_in_flight_is_never_evicted():
    buf = PrefetchBuffer(2)
    buf.reserve(1, REL, [1], 100, 100)
    assert buf.lookup(REL, 1, 100, 100, ("slot", 0))[0] == JOINED  # consumed, still pending
    filled(buf, 2, [2])
    buf.take(REL, 2, 100, 100)
    filled(buf, 2, [3])  # room is made from the READY consumed page 2, not from 1
    assert buf.fill(REL, 1, 100, PAGE) == [("slot", 0)]


def test_full_of_joined_inflight_pages_drops_instead_of_failing():
    buf = PrefetchBuffer(2)
    buf.reserve(1, REL, [0, 1], 100, 100)
    buf.lookup(REL, 0, 100, 100, ("slot", 0))
    buf.lookup(REL, 1, 100, 100, ("slot", 1))
    assert buf.reserve(2, REL, [5], 100, 100) == []
    assert buf.counters.dropped == 1


def test_a_long_prefetch_into_a_full_buffer_gives_up_once_not_per_block(monkeypatch):
    # the buffer's lock is what every reader needs: once an owner has no room left,
    # the rest of its call is dropped without scanning for room again, block by block
    buf = PrefetchBuffer(64)
    calls = []
    real = buf._evict_oldest
    monkeypatch.setattr(buf, "_evict_oldest", lambda owner: calls.append(owner) or real(owner))
    assert len(buf.reserve(1, "r", list(range(10_000)), 10, 10)) == 64
    assert buf.counters.issued == 64 and buf.counters.dropped == 10_000 - 64
    assert len(calls) <= 1
    # once the pages have landed, the owner's next prefetch makes room again
    buf.fill_many("r", tuple(range(64)), 10, [b"p"] * 64)
    assert 5 in buf.reserve(1, "r", [5, 70], 20, 20)
