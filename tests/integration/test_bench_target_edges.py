"""The bench's targets at their edges: a broker that exits while it starts,
a process tree whose root is gone, the Socket.IO address of a server, and
the climb to the serve process stopping at the top of the process tree."""
from __future__ import annotations

import subprocess
import sys

import psutil
import pytest

from broker.bench.targets import SOCKETIO_QUERY, ProcessTree, _serve_root, socketio_url, spawn_broker

pytestmark = pytest.mark.timeout(60)


def test_a_broker_that_exits_while_starting_is_reported_and_leaves_nothing_running():
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(RuntimeError, match="exited early"):
        spawn_broker(extra=["--no-such-option"])
    after = {p.pid for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE}
    assert after <= before


def test_a_tree_whose_root_is_gone_measures_what_it_remembers():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    tree = ProcessTree(proc.pid)
    proc.wait()
    assert [p.pid for p in tree.processes()] == [proc.pid]   # its children cannot be listed any more
    assert tree.rss_bytes() == 0 and tree.count() == 0


def test_socketio_url_and_the_top_of_the_process_tree():
    assert socketio_url("http://127.0.0.1:8765") == "ws://127.0.0.1:8765" + SOCKETIO_QUERY
    assert socketio_url("https://example.org") == "wss://example.org" + SOCKETIO_QUERY
    assert _serve_root(1) == 1    # nothing above init
