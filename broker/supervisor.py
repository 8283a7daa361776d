"""The supervisor: starts the shard processes, watches them, restarts the
dead, and stops them gracefully. It serves nothing on the hot path.

It owns the node's run directory (memory-backed where /dev/shm exists): the
node spec the shards read at start, the ZeroMQ ipc endpoints, and each home
shard's journal, which outlives a shard process so its replacement continues
the same channels. Shards report readiness on the control socket; the
supervisor publishes the node's status (which shard is up, its pid, whether
the node drains) on the status socket, and every shard answers /readyz from it.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import psutil
import zmq

from .config import Config
from .router import Drain, Endpoints
from .runtime import new_loop
from .sockets import bind_shared, free_port

__all__ = ["Supervisor", "make_endpoints"]

log = logging.getLogger("broker.supervisor")

WATCH_INTERVAL = 0.1      # seconds between liveness checks
STATUS_INTERVAL = 1.0     # seconds between status re-broadcasts
QUICK_DEATH = 10.0        # a shard dying sooner than this after start counts as a crash loop


def make_endpoints(transport: str, run_dir: str, shards: int) -> Endpoints:
    """ipc:// sockets in the run directory, or tcp:// on loopback ports."""
    if transport == "ipc":
        return Endpoints([f"ipc://{run_dir}/pub-{i}" for i in range(shards)],
                         [f"ipc://{run_dir}/req-{i}" for i in range(shards)],
                         f"ipc://{run_dir}/status", f"ipc://{run_dir}/control")
    ports = [free_port() for _ in range(2 * shards + 2)]
    tcp = [f"tcp://127.0.0.1:{port}" for port in ports]
    return Endpoints(tcp[:shards], tcp[shards:2 * shards], tcp[-2], tcp[-1])


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


@dataclass
class _ShardProcess:
    id: int
    process: subprocess.Popen | None = None
    pid: int = 0
    up: bool = False
    started: float = 0.0
    restarts: int = 0
    quick_deaths: int = 0
    restart_at: float | None = None
    exit_codes: list[int] = field(default_factory=list)


class Supervisor:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.shards = [_ShardProcess(i) for i in range(config.shards)]
        self.run_dir = ""
        self.stopping = False
        self._status_dirty = True
        self._port_guard: socket.socket | None = None

    # ------------------------------------------------------------- set-up
    def _make_run_dir(self) -> str:
        base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        return tempfile.mkdtemp(prefix="broker-", dir=base)

    def _claim_port(self) -> None:
        """Bind the port as the shards will (fails fast, with a clear message,
        when it is taken) and hold it; port 0 becomes the port picked here."""
        guard = bind_shared(self.config.host, self.config.port)
        self.config.port = guard.getsockname()[1]
        self._port_guard = guard  # bound, never listening: holds the number

    def run(self) -> int:
        try:
            self._claim_port()
        except OSError as exc:
            print(f"error: cannot listen on {self.config.host}:{self.config.port}: "
                  f"{exc.strerror or exc}", file=sys.stderr)
            return 1
        self.run_dir = self._make_run_dir()
        loop = new_loop()
        asyncio.set_event_loop(loop)
        ctx = zmq.Context()
        try:
            endpoints = make_endpoints(self.config.cluster.transport, self.run_dir, self.config.shards)
            with open(os.path.join(self.run_dir, "cluster.json"), "w", encoding="utf-8") as fh:
                json.dump({"config": self.config.to_dict(), "endpoints": endpoints.to_dict(),
                           "supervisor": os.getpid()}, fh)
            self.status_pub = ctx.socket(zmq.PUB)
            self.status_pub.setsockopt(zmq.LINGER, 0)
            self.status_pub.bind(endpoints.status)
            self.control = ctx.socket(zmq.PULL)
            self.control.setsockopt(zmq.LINGER, 0)
            self.control.bind(endpoints.control)
            Drain(loop, self.control, self._on_control)
            return loop.run_until_complete(self._main(loop))
        finally:
            ctx.destroy(linger=0)
            loop.close()
            shutil.rmtree(self.run_dir, ignore_errors=True)
            if self._port_guard is not None:
                self._port_guard.close()

    # ------------------------------------------------------------- running
    async def _main(self, loop: asyncio.AbstractEventLoop) -> int:
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        log.info("supervisor %d: %d shard(s) on http://%s:%d, run dir %s", os.getpid(),
                 len(self.shards), self.config.host, self.config.port, self.run_dir)
        for shard in self.shards:
            self._start(shard)
        last_status = 0.0
        while not stop.is_set():
            self._watch()
            now = time.monotonic()
            if self._status_dirty or now - last_status >= STATUS_INTERVAL:
                self._publish_status()
                last_status = now
            try:
                await asyncio.wait_for(stop.wait(), WATCH_INTERVAL)
            except asyncio.TimeoutError:
                pass
        return await self._stop_all()

    def _on_sighup(self) -> None:
        """SIGHUP will mean reload (PROTOCOL.md §5); until reload exists it
        is logged and ignored, never the default action (death, no drain)."""
        log.warning("supervisor: SIGHUP received; config reload is not built yet, ignored")

    def _start(self, shard: _ShardProcess) -> None:
        shard.process = subprocess.Popen(
            [sys.executable, "-m", "broker.worker", self.run_dir, str(shard.id)])
        shard.pid = shard.process.pid
        shard.up = False
        shard.started = time.monotonic()
        shard.restart_at = None
        self._status_dirty = True
        log.info("shard %d started (pid %d)", shard.id, shard.pid)

    def _watch(self) -> None:
        now = time.monotonic()
        for shard in self.shards:
            if shard.process is not None:
                code = shard.process.poll()
                if code is None:
                    continue
                self._died(shard, code, now)
            if shard.restart_at is not None and now >= shard.restart_at:
                shard.restarts += 1
                self._start(shard)

    def _died(self, shard: _ShardProcess, code: int, now: float) -> None:
        lived = now - shard.started
        shard.process = None
        shard.up = False
        shard.exit_codes.append(code)
        self._status_dirty = True
        if lived < QUICK_DEATH:
            shard.quick_deaths += 1
        else:
            shard.quick_deaths = 0
        # The first death restarts at once; a crash loop backs off exponentially.
        delay = 0.0 if shard.quick_deaths <= 1 else min(
            0.5 * 2 ** (shard.quick_deaths - 2), self.config.cluster.restart_backoff_max)
        shard.restart_at = now + delay
        log.error("shard %d (pid %d) %s after %.1fs; %s", shard.id, shard.pid, _describe_exit(code),
                  lived, "restarting now" if delay == 0 else
                  f"crash loop ({shard.quick_deaths} quick deaths): restarting in {delay:.1f}s")

    def _on_control(self, frames: list[bytes]) -> None:
        message = json.loads(frames[0])
        if "ready" in message:
            shard = self.shards[message["ready"]]
            if shard.pid == message.get("pid"):  # not a late word from a dead predecessor
                shard.up = True
                self._status_dirty = True
                log.info("shard %d (pid %d) ready", shard.id, shard.pid)

    def status(self) -> dict[str, Any]:
        return {"draining": self.stopping, "supervisor": os.getpid(),
                "shards": [{"id": s.id, "pid": s.pid, "up": s.up, "restarts": s.restarts}
                           for s in self.shards]}

    def _publish_status(self) -> None:
        self._status_dirty = False
        try:
            self.status_pub.send(json.dumps(self.status()).encode(), zmq.NOBLOCK)
        except zmq.Again:  # pragma: no cover - a PUB socket does not block
            pass

    # ------------------------------------------------------------- stopping
    async def _stop_all(self) -> int:
        """Graceful drain: every shard gets SIGTERM and drain_timeout to finish."""
        self.stopping = True
        self._publish_status()
        log.info("supervisor: draining %d shard(s)", len(self.shards))
        running = [s for s in self.shards if s.process is not None and s.process.poll() is None]
        for shard in running:
            shard.process.send_signal(signal.SIGTERM)
        procs = []
        for shard in running:
            try:
                procs.append(psutil.Process(shard.pid))
            except psutil.NoSuchProcess:
                pass
        deadline = self.config.drain_timeout + 5.0
        gone, alive = await asyncio.get_running_loop().run_in_executor(
            None, lambda: psutil.wait_procs(procs, timeout=deadline))
        for proc in alive:
            log.error("shard pid %d did not stop in %.0fs; killing it", proc.pid, deadline)
            proc.kill()
        for shard in running:
            if shard.process is not None:
                shard.process.wait()
        failed = [s.id for s in running if s.process is not None and s.process.returncode not in (0, None)]
        if failed or alive:
            log.error("shard(s) %s did not stop cleanly", failed or [p.pid for p in alive])
            return 1
        log.info("supervisor: stopped")
        return 0
