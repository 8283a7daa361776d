"""Running a broker: ``serve`` for ``broker serve`` and the embeddable ``Broker``.

Both build the same shard on a fresh event loop (uvloop when installed) and
stop the same way: a graceful drain (every client told to reconnect, buffers
flushed, close 1012), then exit.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import sys
import threading
from typing import Any, Callable

from . import _fastpath
from .config import Config
from .fdlimit import log_capacity, raise_nofile_limit
from .runtime import configure_logging, new_loop
from .shard import Shard
from .sockets import bind_shared
from .tls import server_context

__all__ = ["serve", "Broker", "serve_shard"]

log = logging.getLogger("broker.server")


def _listen_socket(host: str, port: int) -> socket.socket:
    """This shard's listener on the port its siblings share."""
    sock = bind_shared(host, port)
    sock.listen(4096)
    sock.setblocking(False)
    return sock


async def serve_shard(shard: Shard, stop: asyncio.Event,
                      on_listening: Callable[[int], None] | None = None,
                      sock: socket.socket | None = None, gate: Any = None) -> None:
    """Listen on ``sock`` (the supervisor's, inherited) or on the config's
    host/port, serve until ``stop`` is set, then drain: the one way every
    shard runs, embedded or forked. With a ``gate`` (broker.shardops), the
    shard accepts only while the gate says so (``gate.accepting``, then
    ``gate.on_accepting(bool)``): a deploy's new generation starts accepting
    at the take-over, the old one stops."""
    config = shard.config
    sock = sock if sock is not None else _listen_socket(config.host, config.port)
    port = sock.getsockname()[1]
    shard.node_id = f"{socket.gethostname()}:{port}"
    context = server_context(config)
    server = await shard.loop.create_server(shard.protocol_factory, sock=sock, backlog=4096,
                                            ssl=context, start_serving=gate is None)
    if gate is not None:
        def accept(accepting: bool) -> None:
            if accepting:
                shard.loop.create_task(server.start_serving())
                log.info("shard %d accepting", shard.id)
            else:
                server.close()  # this process's copy only: the queue stays for the others
                log.info("shard %d stopped accepting", shard.id)

        gate.on_accepting = accept
        if gate.accepting:
            accept(True)
    scheme = "https" if context is not None else "http"
    log.info("shard %d serving on %s://%s:%d (WebSocket at /ws), fastpath: %s",
             shard.id, scheme, config.host, port, _fastpath.IMPLEMENTATION)
    if on_listening is not None:
        on_listening(port)
    try:
        await stop.wait()
    finally:
        log.info("shard %d draining %d connections (timeout %.1fs)", shard.id,
                 shard.websocket_count, config.drain_timeout)
        server.close()
        await shard.drain(config.drain_timeout)
        shard.close()
        await shard.engine.close()
        log.info("shard %d stopped", shard.id)


def serve(config: Config, sources: Any = None) -> int:
    """``broker serve``: a supervisor and its shards, until SIGTERM/SIGINT."""
    configure_logging(config.log_level)
    log_capacity(log, "supervisor", raise_nofile_limit())
    if config.api_key is None:
        log.warning("no api_key configured: the server API accepts unauthenticated requests")
    from .supervisor import Supervisor

    return Supervisor(config, sources).run()


class Broker:
    """An embedded broker (one shard) running in a background thread.

    >>> broker = Broker(port=0, api_key="k", allow_anonymous=True).start()
    >>> broker.url            # doctest: +SKIP
    'http://127.0.0.1:41234'
    >>> broker.shutdown()
    """

    def __init__(self, config: Config | None = None, **settings: Any) -> None:
        self.config = dataclasses.replace(config or Config(shards=1), **settings)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._bound: dict[str, Any] = {}
        self._error: BaseException | None = None

    @property
    def port(self) -> int:
        return self._bound.get("port", self.config.port)

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.config.host}:{self.port}/ws"

    def start(self, timeout: float = 10.0) -> "Broker":
        """Start serving; returns once the port is listening."""
        if self._thread is not None:
            raise RuntimeError("broker already started")
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="broker", daemon=True)
        self._thread.start()
        if not ready.wait(timeout) or self._error is not None:
            raise RuntimeError(f"broker did not start: {self._error!r}")
        return self

    def _run(self, ready: threading.Event) -> None:
        loop = self._loop = new_loop()
        asyncio.set_event_loop(loop)
        self._stop = asyncio.Event()
        try:
            engine = None
            if self.config.redis_url:
                from .engine.redis import RedisEngine

                engine = RedisEngine(self.config, loop)
            shard = Shard(self.config, loop=loop, engine=engine)
            if engine is not None:
                from .engine.redis import shard_presence

                engine.local_presence = shard_presence(shard)
            self._bound["shard"] = shard

            def listening(port: int) -> None:
                self._bound["port"] = port
                ready.set()

            loop.run_until_complete(serve_shard(shard, self._stop, listening))
        except BaseException as exc:  # surfaced by start()
            self._error = exc
            ready.set()
        finally:
            loop.close()

    def shutdown(self, timeout: float | None = None) -> None:
        """Drain (clients are told to reconnect) and stop the thread."""
        if self._thread is None or self._loop is None or self._stop is None:
            return
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout if timeout is not None else self.config.drain_timeout + 5)
        self._thread = None

    def stats(self) -> dict[str, Any]:
        shard = self._bound.get("shard")
        return shard.stats() if shard is not None else {}

    def __enter__(self) -> "Broker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
