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
import sys

from .adapters.socketio.handoff import Handoff
from .adapters.socketio.session import PATH as SOCKETIO_PATH
from .config import Config
from .engine.base import Engine
from .engine.cluster import ClusterEngine
from .fdlimit import log_capacity, raise_nofile_limit
from .engine.journal import Journal
from .engine.redis import RedisEngine, shard_presence
from .engine.memory import MemoryEngine
from .router import Endpoints, Router
from .runtime import configure_logging, new_loop
from .server import serve_shard
from .shard import Shard

__all__ = ["main", "load_spec", "ORPHAN_CHECK"]

log = logging.getLogger("broker.worker")

ORPHAN_CHECK = 1.0  # seconds between checks that the supervisor is alive


def load_spec(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "cluster.json"), encoding="utf-8") as fh:
        return json.load(fh)


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
        # Redis sequences every channel: no home shards, no journal. ZeroMQ
        # still carries the supervisor's status and the shards' stats.
        return _run(shard_id_int, shards, parent, run_dir, config, loop, stop, router,
                    RedisEngine(config, loop, router), journal=None)
    state_dir = config.state_dir or run_dir
    os.makedirs(state_dir, exist_ok=True)
    # The journal's name carries the shard count: with another count the
    # channels have other homes, and old state must not be taken for current.
    path = os.path.join(state_dir, f"journal-{shard_id_int}-of-{shards}")
    try:
        journal = Journal(path)
    except BlockingIOError:
        log.error("shard %d: %s is in use by another broker; refusing to start", shard_id_int, path)
        return 3
    local = MemoryEngine(config, journal=journal)
    local.schedule = loop.call_soon
    engine = ClusterEngine(config, shard_id_int, shards, router, local)
    return _run(shard_id_int, shards, parent, run_dir, config, loop, stop, router, engine, journal)


def _run(shard_id_int: int, shards: int, parent: int, run_dir: str, config: Config,
         loop: asyncio.AbstractEventLoop, stop: asyncio.Event, router: Router,
         engine: Engine, journal: Journal | None) -> int:
    """Serve one shard with ``engine`` until ``stop``, then clean up."""
    shard = Shard(config, shard_id=shard_id_int, engine=engine, loop=loop, shards=shards,
                  ip_table_path=os.path.join(run_dir, "ip-connections"))
    shard.attach_router(router)
    if isinstance(engine, RedisEngine):
        engine.local_presence = shard_presence(shard)
    # Socket.IO: a request for a session on another shard is passed to it.
    shard.endpoints[SOCKETIO_PATH].handoff = Handoff(run_dir, shard_id_int, loop, shard.protocol_factory)

    def listening(port: int) -> None:
        router.tell_supervisor({"ready": shard_id_int, "pid": os.getpid()})

    try:
        loop.run_until_complete(serve_shard(shard, stop, listening))
    finally:
        if journal is not None:
            journal.close()
        loop.close()
    if os.getppid() != parent and config.state_dir is None:
        # Orphaned: nobody will restart us from this run dir or clean it up.
        shutil.rmtree(run_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
