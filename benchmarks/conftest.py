"""pytest-benchmark suites: every fastpath piece, compiled vs its twin, in
the same run (compare the two rows; absolute numbers drift on shared
machines). CI runs them once each with --benchmark-disable (smoke mode)."""
from broker._fastpath.testing import fastpath_fixture

ringbuf = fastpath_fixture("ringbuf")
frames = fastpath_fixture("frames")
subtable = fastpath_fixture("subtable")
history = fastpath_fixture("history")
