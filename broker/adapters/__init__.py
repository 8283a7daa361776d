"""The protocols clients speak, each an adapter behind one session interface
(``broker.adapters.session``): ``native`` (PROTOCOL.md §1) and, later,
``socketio`` (§4). A new protocol is a new folder here, not a change to the shard."""
