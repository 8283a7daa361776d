"""broker.pressure: rate limit, degradation levels, the shared per-IP table,
liveness and the inbound gate, with injected clocks and numbers."""
import multiprocessing
import os

import numpy as np
import pytest

from broker.pressure import (
    Degradation,
    InboundGate,
    IpConnectionTable,
    Liveness,
    MemoryThresholds,
    TokenBucket,
    ip_slot,
    liveness,
    next_liveness_check,
    shard_budget,
)

MIB = 2**20


# ------------------------------------------------------------- TokenBucket

def test_bucket_allows_a_burst_of_rate_then_refuses():
    bucket = TokenBucket(100, now=0.0)
    assert all(bucket.take(0.0) for _ in range(100))
    assert not bucket.take(0.0)
    assert not bucket.take(0.005)  # half a token back: still refused


def test_bucket_refills_at_rate_and_never_past_burst():
    bucket = TokenBucket(10, now=0.0)
    for _ in range(10):
        bucket.take(0.0)
    assert bucket.take(0.1) and not bucket.take(0.1)  # one token per 0.1 s
    assert sum(bucket.take(1000.0) for _ in range(50)) == 10  # a long rest refills only to burst


def test_bucket_sustained_rate_is_the_rate():
    bucket = TokenBucket(50, now=0.0)
    allowed = sum(bucket.take(i * 0.001) for i in range(10_000))  # 1000 attempts/s for 10 s
    assert abs(allowed - (50 + 50 * 10)) <= 1  # burst + rate × time


def test_bucket_clock_going_back_refills_nothing():
    bucket = TokenBucket(1, now=10.0)
    assert bucket.take(10.0)
    assert not bucket.take(5.0)
    assert not bucket.take(10.5)


def test_bucket_rejects_nonsense():
    with pytest.raises(ValueError):
        TokenBucket(0)
    with pytest.raises(ValueError):
        TokenBucket(1, burst=0.5)


# ------------------------------------------------------------- Degradation

def test_levels_rise_at_thresholds_and_report_each_change_once():
    d = Degradation(100 * MIB)
    assert d.update(50 * MIB) is None and d.level == 0
    t = d.update(76 * MIB)
    assert (t.old, t.new, t.rising) == (0, 1, True)
    assert d.update(77 * MIB) is None  # same level: nothing to report
    assert d.update(86 * MIB).new == 2
    t = d.update(95 * MIB)
    assert t.new == 3 and "2 (high) -> 3 (critical)" in t.message() and "95%" in t.message()
    assert d.update(99 * MIB) is None


def test_a_jump_is_one_transition():
    d = Degradation(100 * MIB)
    t = d.update(100 * MIB)
    assert (t.old, t.new) == (0, 3)
    t = d.update(10 * MIB)
    assert (t.old, t.new, t.rising) == (3, 0, False)


def test_hysteresis_keeps_a_level_until_rss_falls_below_threshold_minus_gap():
    d = Degradation(100 * MIB, MemoryThresholds(0.75, 0.85, 0.95, hysteresis=0.05))
    d.update(86 * MIB)
    assert d.level == 2
    assert d.update(84 * MIB) is None and d.level == 2   # below 0.85 but above 0.80
    assert d.update(int(80.5 * MIB)) is None and d.level == 2
    t = d.update(79 * MIB)
    assert (t.old, t.new) == (2, 1)
    # hovering around the level-2 threshold does not flap
    changes = [d.update(int(x * MIB)) for x in (84, 85.5, 84, 85.5, 81, 86)]
    assert [c.new for c in changes if c] == [2]
    assert d.update(69 * MIB).new == 0


def test_no_budget_is_always_level_0():
    d = Degradation(0)
    assert d.update(10**12) is None and d.level == 0


def test_reconfigure_redecides_from_the_last_measurement():
    d = Degradation(100 * MIB)
    d.update(80 * MIB)
    t = d.reconfigure(200 * MIB, MemoryThresholds())
    assert (t.old, t.new) == (1, 0)


def test_thresholds_are_validated():
    for bad in [(0.9, 0.8, 0.95, 0.05), (0.0, 0.5, 0.9, 0.0), (0.5, 0.6, 0.7, 0.5), (0.5, 0.6, 0.7, -0.1)]:
        with pytest.raises(ValueError):
            MemoryThresholds(*bad)


def test_shard_budget_splits_the_host_budget():
    assert shard_budget(None, 4) == 0
    assert shard_budget(400, 4) == 100 * MIB
    assert shard_budget(3, 2) == 3 * MIB // 2


# -------------------------------------------------------- IpConnectionTable

def test_ip_slot_is_stable_and_maps_v4_mapped_v6_to_v4():
    # A fixed value: every process (and every Python hash seed) must agree.
    assert ip_slot("10.0.0.1", 65536) == ip_slot("10.0.0.1", 65536)
    assert ip_slot("::ffff:10.0.0.1", 65536) == ip_slot("10.0.0.1", 65536)
    assert ip_slot("fe80::1%eth0", 1 << 16) == ip_slot("fe80::1", 1 << 16)
    assert 0 <= ip_slot("not an address", 7) < 7


def test_table_counts_and_limits_in_one_process():
    table = IpConnectionTable(None, 0, 1, slots=1024)
    assert all(table.try_acquire("1.2.3.4", 3) for _ in range(3))
    assert not table.try_acquire("1.2.3.4", 3)
    assert table.count("1.2.3.4") == 3 and table.local("1.2.3.4") == 3
    table.release("1.2.3.4")
    assert table.try_acquire("1.2.3.4", 3)
    table.release("9.9.9.9")  # never counted: stays 0, no underflow
    assert table.count("9.9.9.9") == 0


def test_rows_are_per_shard_and_reads_sum_them(tmp_path):
    path = str(tmp_path / "ips")
    a = IpConnectionTable(path, 0, 2, slots=64)
    b = IpConnectionTable(path, 1, 2, slots=64)
    assert a.try_acquire("1.1.1.1", 2)
    assert b.try_acquire("1.1.1.1", 2)
    assert not a.try_acquire("1.1.1.1", 2) and not b.try_acquire("1.1.1.1", 2)
    assert a.count("1.1.1.1") == b.count("1.1.1.1") == 2
    assert a.local("1.1.1.1") == 1
    b.close()  # shard 1 gone: its connections no longer count
    assert a.count("1.1.1.1") == 1


def test_a_replacement_shard_starts_with_an_empty_row(tmp_path):
    path = str(tmp_path / "ips")
    old = IpConnectionTable(path, 1, 2, slots=64)
    for _ in range(5):
        old.try_acquire("2.2.2.2", 100)
    # the old process died without closing: its row still says 5
    new = IpConnectionTable(path, 1, 2, slots=64)
    assert new.count("2.2.2.2") == 0


def test_a_table_of_another_shape_is_refused(tmp_path):
    path = str(tmp_path / "ips")
    IpConnectionTable(path, 0, 2, slots=64)
    with pytest.raises(ValueError):
        IpConnectionTable(path, 0, 3, slots=64)
    with pytest.raises(ValueError):
        IpConnectionTable(path, 2, 2, slots=64)


def _shard_process(path: str, shard_id: int, ip: str, n: int, limit: int,
                   ready, go, result) -> None:
    table = IpConnectionTable(path, shard_id, 2, slots=4096)
    ready.set()
    go.wait(10)
    result.put((shard_id, sum(table.try_acquire(ip, limit) for _ in range(n)),
                table.count(ip)))


def test_two_processes_share_one_table(tmp_path):
    """Two real processes (spawned: separate interpreters and hash seeds)
    count into their own rows of one file; each sees the other's."""
    ctx = multiprocessing.get_context("spawn")
    path = str(tmp_path / "ips")
    ready = [ctx.Event(), ctx.Event()]
    go = ctx.Event()
    result = ctx.Queue()
    procs = [ctx.Process(target=_shard_process, args=(path, i, "203.0.113.9", 30, 1000, ready[i], go, result))
             for i in range(2)]
    for p in procs:
        p.start()
    for r in ready:
        assert r.wait(30)
    go.set()
    answers = sorted(result.get(timeout=30) for _ in procs)
    for p in procs:
        p.join(10)
        assert p.exitcode == 0
    assert [a[1] for a in answers] == [30, 30]
    assert max(a[2] for a in answers) == 60  # the later reader saw both rows
    # the parent reads the file as a third shard would: both rows, 60
    data = np.fromfile(path, dtype=np.uint32, offset=64).reshape(2, 4096)
    assert int(data[:, ip_slot("203.0.113.9", 4096)].sum()) == 60
    assert os.path.getsize(path) == 64 + 2 * 4096 * 4


def _acquire_until_refused(path: str, shard_id: int, limit: int, go, result) -> None:
    table = IpConnectionTable(path, shard_id, 2, slots=128)
    go.wait(10)
    result.put(sum(table.try_acquire("198.51.100.1", limit) for _ in range(limit)))


def test_two_processes_together_respect_the_limit(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    path = str(tmp_path / "ips")
    IpConnectionTable(path, 0, 2, slots=128)  # created before either starts
    go = ctx.Event()
    result = ctx.Queue()
    procs = [ctx.Process(target=_acquire_until_refused, args=(path, i, 50, go, result)) for i in range(2)]
    for p in procs:
        p.start()
    go.set()
    admitted = [result.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(10)
    # each may see room for one more at the same moment: at most shards - 1 over
    assert 50 <= sum(admitted) <= 51


# ---------------------------------------------------------------- liveness

def test_liveness_pings_after_interval_then_drops_after_timeout():
    assert liveness(100.0, None, 124.9, 25, 20) is Liveness.NOTHING
    assert liveness(100.0, None, 125.0, 25, 20) is Liveness.PING
    assert liveness(100.0, 125.0, 130.0, 25, 20) is Liveness.NOTHING
    assert liveness(100.0, 125.0, 145.0, 25, 20) is Liveness.DROP


def test_any_frame_after_the_ping_counts_as_alive():
    assert liveness(126.0, 125.0, 150.0, 25, 20) is Liveness.NOTHING
    assert liveness(126.0, 125.0, 151.0, 25, 20) is Liveness.PING


def test_a_pong_read_at_the_same_clock_reading_as_its_ping_counts():
    # uvloop's loop.time() has millisecond steps: a loopback pong often
    # arrives at the same reading as the ping it answers.
    assert liveness(125.0, 125.0, 145.0, 25, 20) is Liveness.NOTHING
    assert liveness(125.0, 125.0, 150.0, 25, 20) is Liveness.PING
    assert next_liveness_check(125.0, 125.0, 25, 20) == 150.0


def test_a_late_check_pings_first_and_gives_the_full_timeout():
    assert liveness(0.0, None, 1000.0, 25, 20) is Liveness.PING


def test_next_liveness_check():
    assert next_liveness_check(100.0, None, 25, 20) == 125.0
    assert next_liveness_check(100.0, 125.5, 25, 20) == 145.5
    assert next_liveness_check(130.0, 125.5, 25, 20) == 155.0


# ------------------------------------------------------------- InboundGate

def test_gate_pauses_at_high_and_resumes_at_low():
    gate = InboundGate(8)
    assert [gate.update(n) for n in (1, 7, 8, 9, 5, 4, 3, 8)] == [None, None, True, None, None, False, None, True]
    with pytest.raises(ValueError):
        InboundGate(4, low=4)
