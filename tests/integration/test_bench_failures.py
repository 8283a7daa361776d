"""``broker bench`` runs that go wrong, run in-process (``run_bench``) so each
failure can be timed exactly: a spawned broker killed in the middle of the
publish phase, a target that cannot start, a workload that needs a secret it
was not given, worker processes that are gone or answer out of turn."""
from __future__ import annotations

import io
import multiprocessing as mp
import os
import signal

import psutil
import pytest

from broker.bench.report import run_bench
from broker.bench.runner import RunOptions, _expect, _Workers, run_workload, workload
from broker.bench.targets import Target
from broker.testing import free_port

pytestmark = pytest.mark.timeout(120)


class KillOnPublish(io.StringIO):
    """Progress output that kills the spawned ``broker serve`` as soon as
    the publish phase reports."""

    def __init__(self) -> None:
        super().__init__()
        self.killed: int | None = None

    def isatty(self) -> bool:   # progress updates every 0.2 s, as on a terminal
        return True

    def write(self, text: str) -> int:
        if self.killed is None and "] publish [" in text:
            [serve] = [p for p in psutil.Process().children() if "serve" in p.cmdline()]
            os.kill(serve.pid, signal.SIGKILL)
            self.killed = serve.pid
        return super().write(text)


def test_a_broker_killed_while_publishing_fails_the_run_with_notes():
    progress, out = KillOnPublish(), io.StringIO()
    code = run_bench(workloads=["w1-1k"], targets=["broker"], spawn=True, connections=4, rate=5, duration=2,
                     workers=1, progress=progress, out=out)
    assert code == 1 and progress.killed is not None
    notes = out.getvalue().split("notes:")[1]
    assert "run failed: RuntimeError: broker died during the run" in notes
    assert f"server exit code {-signal.SIGKILL}" in notes
    assert "FAILED: RuntimeError" in progress.getvalue()


def test_a_target_that_cannot_start_is_reported_on_the_progress_stream():
    progress, out = io.StringIO(), io.StringIO()
    url = f"http://127.0.0.1:{free_port()}"
    code = run_bench(workloads=["w3"], targets=["broker-socketio"], url=url, connections=2, progress=progress,
                     out=out)
    assert code == 1
    assert f"[broker-socketio w3] could not start: {url}/readyz does not answer 200" in progress.getvalue()


def test_w2_without_a_jwt_secret_is_refused_before_any_worker_starts():
    target = Target("broker", "ws://127.0.0.1:1/ws", "http://127.0.0.1:1", os.getpid())
    with pytest.raises(ValueError, match="needs --jwt-secret"):
        run_workload(target, workload("w2", 4, 10, 1), RunOptions(workers=1, jwt_secret=None, progress=None))


def _out_of_turn(conn, progress, base, params) -> None:
    conn.send(("connected", {}))   # instead of "ready"
    conn.recv()                    # then silent until told to exit


def test_workers_that_are_gone_or_answer_out_of_turn():
    ctx = mp.get_context("fork")
    workers = _Workers(ctx, 1)
    workers.receivers.append(workers.start(_out_of_turn, {}, 0))
    proc, pipe = workers.receivers[0]
    with pytest.raises(RuntimeError, match="answered 'connected', expected 'ready'"):
        _expect(pipe, "ready", 10)
    with pytest.raises(TimeoutError, match="did not answer 'report' within 0s"):
        _expect(pipe, "report", 0.05)
    workers.stop()
    assert not proc.is_alive() and proc.exitcode == 0   # it took the "exit"
    assert workers.cpu_seconds() == 0.0                 # gone: nothing to count

