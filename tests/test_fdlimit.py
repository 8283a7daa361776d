"""broker.fdlimit: the soft RLIMIT_NOFILE is raised to the hard limit, in a
child process started with a low soft limit (this one's stays untouched)."""
import json
import resource
import subprocess
import sys
from pathlib import Path

from broker.fdlimit import EmfileReporter

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, resource
from broker.fdlimit import raise_nofile_limit
cap = raise_nofile_limit()
print(json.dumps([cap.before, cap.soft, cap.hard, cap.raised, resource.getrlimit(resource.RLIMIT_NOFILE)[0]]))
"""


def _run_with_soft_limit(soft: int) -> list:
    def lower() -> None:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    out = subprocess.run([sys.executable, "-c", CHILD], preexec_fn=lower, capture_output=True,
                         text=True, timeout=30, cwd=ROOT, env={"PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_soft_limit_is_raised_to_the_hard_limit():
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    before, soft, reported_hard, raised, actual = _run_with_soft_limit(256)
    assert before == 256 and raised
    assert soft == actual == reported_hard
    if hard != resource.RLIM_INFINITY:
        assert soft == hard


def test_already_at_the_hard_limit_changes_nothing():
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        return  # covered above: the ceiling is nr_open
    before, soft, _, raised, _ = _run_with_soft_limit(hard)
    assert (before, soft, raised) == (hard, hard, False)


def test_emfile_reporter_logs_once_per_interval_and_counts_all():
    reporter = EmfileReporter(interval=10.0)
    decisions = [reporter.record(t) for t in (0.0, 0.1, 5.0, 9.9, 10.0, 10.5, 25.0)]
    assert decisions == [True, False, False, False, True, False, True]
    assert reporter.count == 7
    reporter2 = EmfileReporter(interval=1.0)
    reporter2.record(0.0)
    assert reporter2.since_last_log() == 1
    for t in (0.1, 0.2, 1.5):
        reporter2.record(t)
    assert reporter2.since_last_log() == 3
