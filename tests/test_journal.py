"""broker.engine.journal: replay against a model, torn tails, corruption,
compaction, write failures and a real SIGKILL in the middle of appends."""
from __future__ import annotations

import errno
import logging
import mmap
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.engine import journal as journal_mod
from broker.engine.journal import ChannelLog, Journal, JournalError

JOURNAL_PY = journal_mod.__file__
HEADER = 8  # file header size


@pytest.fixture
def jdir():
    """A fresh directory on tmpfs (/dev/shm) when there is one, as in production."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    path = tempfile.mkdtemp(prefix="broker-journal-test-", dir=base)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------ model

class Model:
    """What load() must return: channel -> ChannelLog."""

    def __init__(self) -> None:
        self.channels: dict[str, ChannelLog] = {}

    def channel(self, name: str, epoch: str, last: int) -> None:
        self.channels[name] = ChannelLog(name, epoch, last, [])

    def publish(self, name: str, data: bytes, ts: float) -> tuple[str, int]:
        log = self.channels[name]
        log.last_offset += 1
        log.publications.append((log.last_offset, data, ts))
        return log.epoch, log.last_offset

    def drop(self, name: str) -> None:
        self.channels.pop(name, None)

    def expected(self, keep=None) -> dict[str, ChannelLog]:
        out = {}
        for name, log in self.channels.items():
            pubs = list(log.publications)
            if keep is not None:
                k = keep(name)
                pubs = pubs[-k:] if k else []
            out[name] = ChannelLog(name, log.epoch, log.last_offset, pubs)
        return out

    def snapshot(self) -> list[ChannelLog]:
        return [ChannelLog(c.channel, c.epoch, c.last_offset, list(c.publications))
                for c in self.channels.values()]


def reopen(j: Journal, **kw) -> tuple[Journal, dict[str, ChannelLog]]:
    j.close()
    j = Journal(j.path, **kw)
    return j, j.load()


CHANNELS = ["a", "news:1", "ch\u00e9", "x" * 300]
EPOCHS = ["e1", "e2", "deadbeef1f", ""]

op = st.one_of(
    st.tuples(st.just("chan"), st.sampled_from(CHANNELS), st.sampled_from(EPOCHS),
              st.integers(-5, 2**40)),
    st.tuples(st.just("pub"), st.sampled_from(CHANNELS), st.binary(max_size=300),
              st.floats(allow_nan=False, allow_infinity=False)),
    st.tuples(st.just("pub"), st.sampled_from(CHANNELS), st.binary(max_size=8), st.just(1.5)),
    st.tuples(st.just("drop"), st.sampled_from(CHANNELS)),
    st.tuples(st.just("reopen"),),
    st.tuples(st.just("rewrite"),),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(op, max_size=60), keeps=st.lists(st.integers(0, 4), min_size=4, max_size=4))
def test_round_trip_matches_model(jdir, ops, keeps):
    path = os.path.join(jdir, "j")
    for suffix in ("", ".tmp"):
        if os.path.exists(path + suffix):
            os.unlink(path + suffix)
    model = Model()
    j = Journal(path)
    try:
        for step in ops:
            kind = step[0]
            if kind == "chan":
                _, name, epoch, last = step
                j.record_channel(name, epoch, last)
                model.channel(name, epoch, last)
            elif kind == "pub":
                _, name, data, ts = step
                if name not in model.channels:
                    continue
                epoch, offset = model.publish(name, data, ts)
                j.record_publication(name, epoch, offset, data, ts)
            elif kind == "drop":
                j.record_drop(step[1])
                model.drop(step[1])
            elif kind == "reopen":
                j, state = reopen(j)
                assert state == model.expected()
            else:
                j.rewrite(model.snapshot())
                assert not os.path.exists(path + ".tmp")
        j, state = reopen(j)
        assert state == model.expected()
        keep = dict(zip(CHANNELS, keeps, strict=True)).__getitem__
        assert j.load(keep=keep) == model.expected(keep)
    finally:
        j.close()


# ------------------------------------------------------------------ torn tails

def build(path: str) -> tuple[Model, list[int]]:
    """A journal with a few records; returns the model and the file size
    after each record (record boundaries)."""
    model = Model()
    bounds = []
    with Journal(path) as j:
        bounds.append(j.size)
        j.record_channel("a", "E1", 41)
        model.channel("a", "E1", 41)
        bounds.append(j.size)
        for i in range(3):
            data = bytes(range(i, i + 40))
            epoch, offset = model.publish("a", data, 10.0 + i)
            j.record_publication("a", epoch, offset, data, 10.0 + i)
            bounds.append(j.size)
        j.record_channel("b", "E2", 0)
        model.channel("b", "E2", 0)
        bounds.append(j.size)
        j.record_publication("b", "E2", 1, b"x" * 50, 3.25)
        model.publish("b", b"x" * 50, 3.25)
        bounds.append(j.size)
    assert os.path.getsize(path) == bounds[-1]
    return model, bounds


@pytest.mark.parametrize("last", ["pub", "chan", "drop"])
def test_torn_tail_at_every_byte_of_the_last_record(jdir, last):
    src = os.path.join(jdir, "src")
    model, _ = build(src)
    with Journal(src) as j:
        j.load()
        before = j.size
        if last == "pub":
            j.record_publication("a", "E1", 45, b"tail-data" * 7, 99.5)
        elif last == "chan":
            j.record_channel("a", "E9", 7)
        else:
            j.record_drop("b")
        after = j.size
    expected = model.expected()
    blob = open(src, "rb").read()
    assert len(blob) == after and after - before > 10
    path = os.path.join(jdir, "cut")
    for cut in range(before, after):
        with open(path, "wb") as f:
            f.write(blob[:cut])
        with Journal(path) as j:
            assert j.load() == expected, cut
            assert j.size == before and j.truncated == cut - before
            assert os.path.getsize(path) == before
            # appends after the repair are readable
            j.record_publication("b", "E2", 2, b"after", 4.0)
        with Journal(path) as j:
            state = j.load()
        assert state["b"].publications[-1] == (2, b"after", 4.0)
        assert state["a"] == expected["a"]
    with open(path, "wb") as f:
        f.write(blob)
    with Journal(path) as j:
        assert j.truncated == 0 and j.load() != expected  # the whole record counts


def test_torn_file_header(jdir, caplog):
    path = os.path.join(jdir, "j")
    for cut in range(HEADER):
        with open(path, "wb") as f:
            f.write(b"BRKJ\x01\x00\x00\x00"[:cut])
        with Journal(path) as j:
            assert j.load() == {}
            assert j.size == HEADER
            j.record_channel("a", "e", 0)
        with Journal(path) as j:
            assert j.load() == {"a": ChannelLog("a", "e", 0, [])}
        os.unlink(path)


def test_not_a_journal_or_other_version_raises(jdir):
    path = os.path.join(jdir, "j")
    for content in (b"hello world, not a journal", b"BRKJ\x02\x00\x00\x00", b"BRX"):
        with open(path, "wb") as f:
            f.write(content)
        with Journal(path) as j, pytest.raises(JournalError):
            j.load()
        assert open(path, "rb").read() == content  # left untouched


# ------------------------------------------------------------------ corruption

@pytest.mark.parametrize("where", ["crc", "magic", "data", "length"])
def test_corrupt_record_in_the_middle_stops_there(jdir, caplog, where):
    path = os.path.join(jdir, "j")
    model, bounds = build(path)
    # Corrupt the 2nd publication of "a" (record index 3): bounds[2]..bounds[3].
    start = bounds[2]
    blob = bytearray(open(path, "rb").read())
    if where == "crc":
        blob[start + 6] ^= 0xFF
    elif where == "magic":
        blob[start] ^= 0x01
    elif where == "data":
        blob[bounds[3] - 1] ^= 0x40
    else:
        blob[start + 2] ^= 0x01  # payload length
    with open(path, "wb") as f:
        f.write(blob)
    with caplog.at_level(logging.WARNING, logger="broker.journal"), Journal(path) as j:
        state = j.load()
        assert j.size == start and os.path.getsize(path) == start
    # Everything from the corrupt record on is dropped, including channel "b".
    assert state == {"a": ChannelLog("a", "E1", 42, [(42, bytes(range(0, 40)), 10.0)])}
    assert any("cut" in r.getMessage() for r in caplog.records)


def test_publication_that_does_not_continue_restarts_history(jdir, caplog):
    path = os.path.join(jdir, "j")
    with Journal(path) as j:
        j.record_publication("orphan", "E", 7, b"o", 1.0)      # no record_channel
        j.record_channel("a", "E1", 0)
        j.record_publication("a", "E1", 1, b"1", 1.0)
        j.record_publication("a", "E1", 3, b"3", 3.0)          # gap
        j.record_publication("a", "E2", 4, b"4", 4.0)          # other epoch
    with caplog.at_level(logging.WARNING, logger="broker.journal"), Journal(path) as j:
        state = j.load()
    assert state["orphan"] == ChannelLog("orphan", "E", 7, [(7, b"o", 1.0)])
    assert state["a"] == ChannelLog("a", "E2", 4, [(4, b"4", 4.0)])
    assert any("did not continue" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------ compaction

def test_rewrite_then_appends_then_load(jdir):
    path = os.path.join(jdir, "j")
    model = Model()
    with Journal(path, max_bytes=4096) as j:
        for name in ("a", "b", "c"):
            j.record_channel(name, "ep-" + name, 100)
            model.channel(name, "ep-" + name, 100)
        for i in range(200):
            name = "abc"[i % 3]
            data = os.urandom(i % 50)
            epoch, offset = model.publish(name, data, float(i))
            j.record_publication(name, epoch, offset, data, float(i))
        j.record_drop("c")
        model.drop("c")
        assert j.needs_compaction
        # The engine keeps the last 5 of each channel.
        for log in model.channels.values():
            del log.publications[:-5]
        big = j.size
        j.rewrite(model.snapshot())
        assert j.size < big and j.size == os.path.getsize(path)
        assert not j.needs_compaction
        assert not os.path.exists(path + ".tmp")
        for i in range(20):
            epoch, offset = model.publish("a", b"more%d" % i, 500.0 + i)
            j.record_publication("a", epoch, offset, b"more%d" % i, 500.0 + i)
        j.record_channel("d", "ep-d", 0)
        model.channel("d", "ep-d", 0)
        assert j.load() == model.expected()
    with Journal(path) as j:
        assert j.load() == model.expected()


def test_needs_compaction_is_not_stuck_when_the_state_is_large(jdir):
    path = os.path.join(jdir, "j")
    with Journal(path, max_bytes=1000) as j:
        logs = [ChannelLog("a", "e", 10, [(i, b"x" * 100, 0.0) for i in range(1, 11)])]
        j.rewrite(logs)
        assert j.size > 1000 and not j.needs_compaction
        while j.size <= 2 * 1000 + 1400:
            j.record_channel("b", "e", 0)
        assert j.needs_compaction


def test_rewrite_failure_keeps_the_old_file_in_use(jdir, monkeypatch):
    path = os.path.join(jdir, "j")
    model, _ = build(path)
    with Journal(path) as j:
        assert j.load() == model.expected()
        with pytest.raises(ValueError):  # not contiguous
            j.rewrite([ChannelLog("a", "E1", 9, [(5, b"", 0.0)])])

        def boom(src, dst):
            raise OSError(errno.ENOSPC, "no space")
        monkeypatch.setattr(journal_mod.os, "replace", boom)
        with pytest.raises(OSError):
            j.rewrite(model.snapshot())
        monkeypatch.undo()
        assert not os.path.exists(path + ".tmp")
        j.record_publication("b", "E2", 2, b"still", 5.0)
        model.publish("b", b"still", 5.0)
    with Journal(path) as j:
        assert j.load() == model.expected()


def test_stale_tmp_from_a_crashed_rewrite_is_ignored(jdir):
    path = os.path.join(jdir, "j")
    model, _ = build(path)
    with open(path + ".tmp", "wb") as f:  # a rewrite killed half-way
        f.write(open(path, "rb").read()[:30])
    with Journal(path) as j:
        assert not os.path.exists(path + ".tmp")
        assert j.load() == model.expected()


# ------------------------------------------------------------------ failures, lock

def test_failed_write_is_cut_back_and_raises(jdir, monkeypatch):
    path = os.path.join(jdir, "j")
    model, _ = build(path)
    real_write = os.write
    calls = []

    def short_then_enospc(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data)[: len(data) // 2])  # partial record
        raise OSError(errno.ENOSPC, "No space left on device")

    with Journal(path) as j:
        j.load()
        size = j.size
        monkeypatch.setattr(journal_mod, "_write", short_then_enospc)
        with pytest.raises(OSError) as info:
            j.record_publication("b", "E2", 2, b"y" * 500, 9.0)
        assert info.value.errno == errno.ENOSPC
        assert j.size == size and os.path.getsize(path) == size
        monkeypatch.setattr(journal_mod, "_write", lambda fd, data: (_ for _ in ()).throw(
            OSError(errno.ENOSPC, "full")))
        with pytest.raises(OSError):
            j.record_channel("z", "e", 0)
        monkeypatch.undo()
        j.record_publication("b", "E2", 2, b"ok", 9.0)  # the retry, once there is room
        model.publish("b", b"ok", 9.0)
    with Journal(path) as j:
        assert j.load() == model.expected() and j.truncated == 0


def test_appends_refused_before_load_and_after_close(jdir):
    path = os.path.join(jdir, "j")
    build(path)
    j = Journal(path)
    with pytest.raises(OSError, match="load"):
        j.record_publication("b", "E2", 2, b"", 0.0)
    j.load()
    j.record_publication("b", "E2", 2, b"", 0.0)
    j.close()
    j.close()
    with pytest.raises(OSError, match="closed"):
        j.record_drop("b")


def test_one_writer_at_a_time(jdir):
    path = os.path.join(jdir, "j")
    j = Journal(path)
    with pytest.raises(BlockingIOError):
        Journal(path)
    j.close()
    Journal(path).close()


def test_keep_bounds_publications_per_channel(jdir):
    path = os.path.join(jdir, "j")
    with Journal(path) as j:
        j.record_channel("a", "e", 0)
        j.record_channel("b", "e", 0)
        j.record_channel("none", "e", 0)
        for i in range(1, 101):
            for name in ("a", "b", "none"):
                j.record_publication(name, "e", i, b"%d" % i, float(i))
        j.record_channel("a", "e2", 100)  # reset: keep applies to the new state
        j.record_publication("a", "e2", 101, b"101", 101.0)
    asked = []

    def keep(channel):
        asked.append(channel)
        return {"a": 3, "b": 10, "none": 0}[channel]

    with Journal(path) as j:
        state = j.load(keep=keep)
    assert state["a"] == ChannelLog("a", "e2", 101, [(101, b"101", 101.0)])
    assert [p[0] for p in state["b"].publications] == list(range(91, 101))
    assert state["none"] == ChannelLog("none", "e", 100, [])
    assert sorted(asked) == ["a", "a", "b", "none"]


# ------------------------------------------------------------------ a real crash

CHILD = r"""
import importlib.util, mmap, os, struct, sys
spec = importlib.util.spec_from_file_location("journal", sys.argv[1])
journal = importlib.util.module_from_spec(spec)
sys.modules["journal"] = journal
spec.loader.exec_module(journal)
path, ackpath = sys.argv[2], sys.argv[3]

def payload(i):
    if i % 150 == 0:
        return bytes([i % 256]) * (96 << 10)   # a big record now and then: more torn tails
    return (b"%d:" % i) * (1 + i % 60)

j = journal.Journal(path)
j.load()
ack = mmap.mmap(os.open(ackpath, os.O_RDWR), 8)
j.record_channel("c", "epoch-1", 0)
print("go", flush=True)
i = 0
while True:
    i += 1
    j.record_publication("c", "epoch-1", i, payload(i), float(i))
    ack[:8] = struct.pack("<q", i)   # acknowledged: the write returned
"""


def _payload(i: int) -> bytes:
    if i % 150 == 0:
        return bytes([i % 256]) * (96 << 10)
    return (b"%d:" % i) * (1 + i % 60)


def test_sigkill_in_the_middle_of_appends_leaves_a_contiguous_prefix(jdir):
    rng = random.Random(1234)
    for round_ in range(3):
        path = os.path.join(jdir, f"crash{round_}")
        ackpath = path + ".ack"
        with open(ackpath, "wb") as f:
            f.write(b"\0" * 8)
        child = subprocess.Popen([sys.executable, "-c", CHILD, JOURNAL_PY, path, ackpath],
                                 stdout=subprocess.PIPE)
        try:
            assert child.stdout.readline() == b"go\n"
            time.sleep(rng.uniform(0.03, 0.15))
            child.send_signal(signal.SIGKILL)
            assert child.wait(10) == -signal.SIGKILL
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            child.stdout.close()
        with open(ackpath, "rb") as f:
            acked = struct.unpack("<q", mmap.mmap(f.fileno(), 8, access=mmap.ACCESS_READ)[:8])[0]
        assert acked > 0
        with Journal(path) as j:
            state = j.load()
        log = state["c"]
        assert log.epoch == "epoch-1"
        # every acknowledged publication is there (the one in flight may be too)
        assert log.last_offset in (acked, acked + 1)
        assert [p[0] for p in log.publications] == list(range(1, log.last_offset + 1))
        for offset, data, ts in log.publications:
            assert data == _payload(offset) and ts == float(offset)
