from broker._fastpath.testing import fastpath_fixture

ringbuf = fastpath_fixture("ringbuf")
frames = fastpath_fixture("frames")
subtable = fastpath_fixture("subtable")
history = fastpath_fixture("history")
