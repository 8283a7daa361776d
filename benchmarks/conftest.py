"""pytest-benchmark suites: every fastpath piece, compiled vs its twin, in
the same run (compare the two rows; absolute numbers drift on shared
machines). CI runs them once each with --benchmark-disable (smoke mode)."""
import pytest

from broker._fastpath.testing import fastpath_fixture

ringbuf = fastpath_fixture("ringbuf")
frames = fastpath_fixture("frames")
subtable = fastpath_fixture("subtable")
history = fastpath_fixture("history")


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    """Timing runs (--benchmark-enable) go in one process: pytest-benchmark
    turns itself off under xdist, and parallel workers would share the cores
    they time. Smoke runs keep the suite's workers."""
    if config.getoption("benchmark_enable", False):
        config.option.numprocesses = 0
        config.option.dist = "no"
