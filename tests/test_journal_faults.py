"""The journal when the operating system fails it: a write that stops
making progress, a cut-back that itself fails, a lock or an open that
fails while the writer starts, a rewrite whose temporary file cannot be
removed, records past the format's 32-bit length; and read_journal on files
that are not journals. OS failures are injected where the journal calls the
OS (``_write``, ``os.*``, ``fcntl.flock``), as in tests/test_journal.py."""
from __future__ import annotations

import errno
import os
import shutil
import tempfile

import pytest

from broker.engine import journal as jm
from broker.engine.journal import ChannelLog, Journal, JournalError, read_journal


@pytest.fixture
def path():
    folder = tempfile.mkdtemp(prefix="broker-journal-faults-")
    yield os.path.join(folder, "j")
    shutil.rmtree(folder, ignore_errors=True)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_write_that_stops_making_progress_is_cut_back(path, monkeypatch):
    real_write = os.write
    calls: list[int] = []

    def half_then_nothing(fd: int, data: bytes) -> int:
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data)[: len(data) // 2])
        return 0

    with Journal(path) as j:
        j.record_channel("a", "E1", 0)
        size = j.size
        monkeypatch.setattr(jm, "_write", half_then_nothing)
        with pytest.raises(OSError, match="no progress") as info:
            j.record_publication("a", "E1", 1, b"x" * 100, 1.0)
        assert info.value.errno == errno.EIO
        monkeypatch.undo()
        assert os.path.getsize(path) == size == j.size
        j.record_publication("a", "E1", 1, b"ok", 1.0)
    with Journal(path) as j:
        assert j.load() == {"a": ChannelLog("a", "E1", 1, [(1, b"ok", 1.0)])} and j.truncated == 0


def test_a_failed_cut_back_refuses_appends_until_a_rewrite(path, monkeypatch):
    with Journal(path) as j:
        j.record_channel("a", "E1", 0)
        monkeypatch.setattr(jm, "_write", lambda fd, data: (_ for _ in ()).throw(OSError(errno.EIO, "io")))

        def no_truncate(fd: int, size: int) -> None:
            raise OSError(errno.EIO, "cannot truncate")
        monkeypatch.setattr(jm.os, "ftruncate", no_truncate)
        with pytest.raises(OSError, match="io"):
            j.record_publication("a", "E1", 1, b"x", 1.0)
        monkeypatch.undo()
        with pytest.raises(OSError, match="rewrite\\(\\) needed"):   # a later record would follow a torn one
            j.record_publication("a", "E1", 1, b"x", 1.0)
        j.rewrite([ChannelLog("a", "E1", 0)])
        j.record_publication("a", "E1", 1, b"y", 2.0)
    with Journal(path) as j:
        assert j.load() == {"a": ChannelLog("a", "E1", 1, [(1, b"y", 2.0)])}


def test_a_rewrite_that_fails_and_cannot_remove_its_temporary_file_keeps_the_old_one(path, monkeypatch):
    with Journal(path) as j:
        j.record_channel("a", "E1", 0)
        j.record_publication("a", "E1", 1, b"kept", 1.0)
        monkeypatch.setattr(jm, "_write", lambda fd, data: 0)

        def no_unlink(name: str) -> None:
            raise OSError(errno.EACCES, "cannot unlink")
        monkeypatch.setattr(jm.os, "unlink", no_unlink)
        with pytest.raises(OSError, match="no progress"):
            j.rewrite([ChannelLog("a", "E1", 5)])
        monkeypatch.undo()
        assert os.path.exists(path + ".tmp")     # left behind; the next writer removes it
        j.record_publication("a", "E1", 2, b"more", 2.0)
    with Journal(path) as j:
        assert not os.path.exists(path + ".tmp")
        assert j.load() == {"a": ChannelLog("a", "E1", 2, [(1, b"kept", 1.0), (2, b"more", 2.0)])}


def test_a_lock_that_fails_otherwise_than_busy_leaks_nothing(path, monkeypatch):
    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "no locks available")
    before = open_fds()
    monkeypatch.setattr(jm.fcntl, "flock", no_locks)
    with pytest.raises(OSError, match="no locks"):
        Journal(path)
    monkeypatch.undo()
    assert open_fds() == before
    Journal(path).close()


def test_a_journal_that_cannot_be_opened_releases_its_lock(path):
    os.mkdir(path)                      # the journal's name is taken by a directory
    before = open_fds()
    with pytest.raises(IsADirectoryError):
        Journal(path)
    assert open_fds() == before
    os.rmdir(path)
    Journal(path).close()               # the lock was released


def test_records_past_the_formats_length_limit_are_refused(path, monkeypatch):
    with Journal(path) as j:
        j.record_channel("a", "E1", 0)
        monkeypatch.setattr(jm, "_MAX_PAYLOAD", 64)   # 4 GiB in the format: lowered to test the check
        with pytest.raises(ValueError, match="too large"):
            j.record_publication("a", "E1", 1, b"x" * 100, 1.0)
        with pytest.raises(ValueError, match="too large"):
            j.record_channel("c" * 80, "E1", 0)
        with pytest.raises(ValueError, match="too large"):
            j.rewrite([ChannelLog("a", "E1", 1, [(1, b"x" * 100, 1.0)])])
        monkeypatch.undo()
        assert not os.path.exists(path + ".tmp")
        j.record_publication("a", "E1", 1, b"fits", 1.0)
    assert read_journal(path) == {"a": ChannelLog("a", "E1", 1, [(1, b"fits", 1.0)])}


def test_read_journal_of_a_short_file_or_another_format(path):
    with open(path, "wb") as f:
        f.write(b"BR")
    assert read_journal(path) == {}
    with open(path, "wb") as f:
        f.write(b"not a journal at all")
    with pytest.raises(JournalError, match="not a broker journal"):
        read_journal(path)


def test_a_short_write_is_completed(path, monkeypatch):
    real_write = os.write
    calls: list[int] = []

    def half_first(fd: int, data: bytes) -> int:
        calls.append(len(data))
        return real_write(fd, bytes(data)[: max(1, len(data) // 2)] if len(calls) == 1 else data)

    with Journal(path) as j:
        j.record_channel("a", "E1", 0)
        monkeypatch.setattr(jm, "_write", half_first)
        j.record_publication("a", "E1", 1, b"x" * 100, 1.0)
        monkeypatch.undo()
        assert len(calls) == 2 and os.path.getsize(path) == j.size
    assert read_journal(path) == {"a": ChannelLog("a", "E1", 1, [(1, b"x" * 100, 1.0)])}
