"""One shard process: ``python -m broker.worker RUN_DIR SHARD_ID``.

Started by the supervisor. Everything that must not cross a fork is made
here: the event loop, the ZeroMQ context, the engine. The node's spec
(config, endpoints, shard count) is read from ``RUN_DIR/cluster.json``.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import sys
from typing import Any

from .adapters.socketio.handoff import Handoff
from .adapters.socketio.session import PATH as SOCKETIO_PATH
from .adapters.socketio.session import SocketIOEndpoint
from .config import Config
from .engine.base import Engine
from .engine.cluster import ClusterEngine
from .engine.journal import Journal
from .engine.memory import MemoryEngine
from .engine.redis import RedisEngine, shard_presence
from .fdlimit import log_capacity, raise_nofile_limit
from .gcpause import GcPauses, freeze
from .handover import import_state, is_fresh, journal_path
from .router import Endpoints, Router
from .runtime import configure_logging, new_loop
from .server import serve_shard
from .shard import Shard
from .shardops import ShardOperations

__all__ = ["main", "load_spec", "ORPHAN_CHECK"]

log = logging.getLogger("broker.worker")

ORPHAN_CHECK = 1.0  # seconds between checks that the supervisor is alive


def load_spec(run_dir: str) -> dict[str, Any]:
    with open(os.path.join(run_dir, "cluster.json"), encoding="utf-8") as fh:
        spec: dict[str, Any] = json.load(fh)
    return spec


def main(argv: list[str] | None = None) -> int:
    run_dir, shard_id = (argv or sys.argv[1:])[:2]
    shard_id_int = int(shard_id)
    spec = load_spec(run_dir)
    config = Config.from_dict(spec["config"])
    configure_logging(config.log_level)
    log_capacity(log, f"shard {shard_id_int}", raise_nofile_limit())
    loop = new_loop()
    asyncio.set_event_loop(loop)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # A hangup (the terminal closing, a SIGHUP to the process group) is the
    # supervisor's to act on; by default it would kill the shard.
    loop.add_signal_handler(signal.SIGHUP, lambda: log.info("shard %d: SIGHUP ignored", shard_id_int))
    # The supervisor's pid comes from the spec, not getppid(): a shard started
    # just as its supervisor died is already adopted by init at birth.
    parent = spec["supervisor"]

    def watch_parent() -> None:
        if os.getppid() != parent:  # the supervisor died: do not serve unsupervised
            log.error("shard %d: supervisor %d is gone; draining", shard_id_int, parent)
            stop.set()
            return
        loop.call_later(ORPHAN_CHECK, watch_parent)

    watch_parent()
    if stop.is_set():
        return 1
    endpoints = Endpoints.from_dict(spec["endpoints"])
    shards = len(endpoints.pub)
    router = Router(shard_id_int, endpoints, loop, config.cluster.high_water_mark,
                    config.cluster.request_timeout)
    if config.redis_url:
        # Redis sequences every channel: no home shards, no journal, nothing
        # to hand over in a deploy. ZeroMQ still carries the supervisor's
        # status and the shards' stats.
        router.tell_supervisor({"booted": shard_id_int, "pid": os.getpid()})
        return _run(shard_id_int, shards, parent, run_dir, spec, config, loop, stop, router,
                    RedisEngine(config, loop, router), journal=None)
    generation = spec.get("generation", 1)
    journal_dir = spec.get("journal_dir") or config.state_dir or run_dir
    os.makedirs(journal_dir, exist_ok=True)
    # The journal's name carries the generation and the shard count: with
    # another count the channels have other homes (broker.handover re-homes).
    path = journal_path(journal_dir, generation, shard_id_int, shards)
    try:
        journal = Journal(path)
    except BlockingIOError:
        log.error("shard %d: %s is in use by another broker; refusing to start", shard_id_int, path)
        router.close()
        return 3
    if is_fresh(journal) and spec.get("sources"):
        # A deploy's new generation: wait until the old one is fenced
        # (the supervisor's "import"), then take its channels over.
        go = loop.create_future()

        def on_import(status: dict[str, Any]) -> None:
            if status.get("import") and not go.done():
                go.set_result(None)

        router.on_status = on_import
        router.tell_supervisor({"booted": shard_id_int, "pid": os.getpid()})
        waiting = loop.create_task(stop.wait())
        loop.run_until_complete(asyncio.wait([go, waiting], return_when=asyncio.FIRST_COMPLETED))
        waiting.cancel()
        if stop.is_set():
            router.close()
            journal.close()
            loop.close()
            return 0
        import_state(journal, spec["sources"], shard_id_int, shards)
    else:
        router.tell_supervisor({"booted": shard_id_int, "pid": os.getpid()})
    local = MemoryEngine(config, journal=journal)
    local.schedule = loop.call_soon
    engine = ClusterEngine(config, shard_id_int, shards, router, local)
    return _run(shard_id_int, shards, parent, run_dir, spec, config, loop, stop, router, engine, journal)


def _run(shard_id_int: int, shards: int, parent: int, run_dir: str, spec: dict[str, Any], config: Config,
         loop: asyncio.AbstractEventLoop, stop: asyncio.Event, router: Router,
         engine: Engine, journal: Journal | None) -> int:
    """Serve one shard with ``engine`` until ``stop``, then clean up."""
    try:
        shard = Shard(config, shard_id=shard_id_int, engine=engine, loop=loop, shards=shards,
                      ip_table_path=os.path.join(run_dir, "ip-connections"))
        shard.attach_router(router)
        shard.gc_pauses = GcPauses()
        if isinstance(engine, RedisEngine):
            engine.local_presence = shard_presence(shard)
        # Socket.IO: a request for a session on another shard is passed to it.
        socketio = shard.endpoints[SOCKETIO_PATH]
        assert isinstance(socketio, SocketIOEndpoint)
        socketio.handoff = Handoff(run_dir, shard_id_int, loop, shard.protocol_factory)
        shard.admin_endpoint = spec.get("admin") or None
        operations = ShardOperations(shard, run_dir, router.tell_supervisor, spec.get("config_version", 0))
        follow_shard = router.on_status

        def on_status(status: dict[str, Any]) -> None:
            follow_shard(status)
            operations.follow(status)

        router.on_status = on_status

        def listening(port: int) -> None:
            # Everything made so far lives as long as this process: out of
            # the collector's sight, full collections pause far less (gcpause).
            freeze()
            router.tell_supervisor({"ready": shard_id_int, "pid": os.getpid()})

        if isinstance(engine, RedisEngine):
            # Accept nobody before the engine can store: a shard that listened
            # first answered its first publishes 503 while its sibling (and so
            # /readyz) already said ready. Redis down at start: serve anyway
            # after the wait; /readyz says why it is not ready.
            loop.run_until_complete(_engine_ready(engine, 2 * config.redis.timeout))
        listener = None
        if "listen_fd" in spec:  # the supervisor's listening socket, inherited
            listener = socket.socket(fileno=spec["listen_fd"])
            listener.setblocking(False)
        loop.run_until_complete(serve_shard(shard, stop, listening, sock=listener, gate=operations))
    finally:
        if journal is not None:
            journal.close()
        loop.close()
    if os.getppid() != parent and config.state_dir is None:
        # Orphaned: nobody will restart us from this run dir or clean it up.
        shutil.rmtree(run_dir, ignore_errors=True)
    return 0


async def _engine_ready(engine: Engine, timeout: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not engine.ready() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)


if __name__ == "__main__":
    sys.exit(main())
