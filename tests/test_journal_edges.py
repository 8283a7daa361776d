"""The journal's refusals and its replay of records whose crc is right but
whose content is not: each stops replay there, keeps what came before and
cuts the file back (a writer that crashed mid-record, or a bug, never makes
a shard refuse to start)."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile

import pytest

from broker.engine import journal as jm
from broker.engine.journal import ChannelLog, Journal


@pytest.fixture
def path():
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    folder = tempfile.mkdtemp(prefix="broker-journal-edges-", dir=base)
    yield os.path.join(folder, "j")
    shutil.rmtree(folder, ignore_errors=True)


def names(channel: str, epoch: str) -> bytes:
    return jm._names(channel, epoch)


MALFORMED = {
    "unknown type": jm._HDR.pack(jm._MAGIC, 9, 4, 0) + b"abcd",
    "shorter than its names": jm._record(jm._T_PUB, b"\x01"),
    "names past the end": jm._record(jm._T_PUB, jm._NAMES.pack(100, 1) + b"ab"),
    "names not utf-8": jm._record(jm._T_CHANNEL, jm._NAMES.pack(1, 1) + b"\xffE" + jm._CHAN.pack(0)),
    "publication cut short": jm._record(jm._T_PUB, names("a", "E1") + b"\x00"),
    "channel record of the wrong size": jm._record(jm._T_CHANNEL, names("a", "E1") + b"\x00"),
    "drop record with a tail": jm._record(jm._T_DROP, names("a", "E1") + b"x"),
}


@pytest.mark.parametrize("kind", MALFORMED)
def test_a_well_framed_but_malformed_record_stops_replay_there(path, caplog, kind):
    with Journal(path) as j:
        j.record_channel("a", "E1", 0)
        j.record_publication("a", "E1", 1, b'"one"', 5.0)
        good = j.size
    with open(path, "ab") as f:
        f.write(MALFORMED[kind])
        f.write(jm._record(jm._T_PUB, names("a", "E1") + jm._PUB.pack(2, 6.0) + b'"two"'))  # never replayed
    expected_reason = "unknown record type 9" if kind == "unknown type" else "malformed record"
    with caplog.at_level(logging.WARNING, logger="broker.journal"), Journal(path) as j:
        assert j.load() == {"a": ChannelLog("a", "E1", 1, [(1, b'"one"', 5.0)])}
        assert j.size == good and os.path.getsize(path) == good
    assert expected_reason in caplog.text


def test_refusals_name_the_problem(path):
    with pytest.raises(ValueError, match="max_bytes must be > 0"):
        Journal(path, max_bytes=0)
    j = Journal(path)
    assert not j.closed and repr(j) == f"<Journal {path!r} size=8 closed=False>"
    with pytest.raises(ValueError, match="at most 65535 bytes"):
        j.record_channel("x" * 70_000, "E1", 0)
    j.close()
    assert j.closed and "closed=True" in repr(j)
    with pytest.raises(ValueError, match="journal is closed"):
        j.load()
    with pytest.raises(ValueError, match="journal is closed"):
        j.rewrite([])


def test_a_rewrite_larger_than_one_write_chunk_reads_back_whole(path):
    data = b'"' + b"x" * 4000 + b'"'
    channels = [ChannelLog(f"c{n}", "E1", 100, [(o, data, float(o)) for o in range(1, 101)]) for n in range(4)]
    assert sum(len(c.publications) * len(data) for c in channels) > 1 << 20  # several chunks
    with Journal(path) as j:
        j.rewrite(channels)
        j.record_publication("c0", "E1", 101, b"1", 101.0)
    with Journal(path) as j:
        state = j.load()
    assert state["c1"] == channels[1]
    assert state["c0"].last_offset == 101 and state["c0"].publications[-1] == (101, b"1", 101.0)
