"""The supervisor: starts the shard processes, watches them, restarts the
dead, runs the operations (reload, deploy, rollback) and stops gracefully.
It serves nothing on the hot path.

It owns the node's run directory (memory-backed where /dev/shm exists) and
the ONE listening socket every shard of every generation inherits. The
shards of a generation (broker.generations) read their spec from
``gen-N/cluster.json``, report readiness on their generation's control
socket and answer /readyz from the status the supervisor publishes.
Operations arrive on the admin socket (a ROUTER the shards' admin API asks,
broker.admin) or as SIGHUP (a reload); broker.operations runs them.
"""
from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from typing import IO, Any

import psutil
import zmq

from .config import Config
from .generations import Generation, make_endpoints, snapshot_code
from .handover import generation_journals, latest_generation
from .operations import Operator
from .reload import ConfigSources
from .router import Drain
from .runtime import new_loop
from .sockets import bind_shared, free_port

__all__ = ["Supervisor", "make_endpoints"]

log = logging.getLogger("broker.supervisor")

WATCH_INTERVAL = 0.1      # seconds between liveness checks
STATUS_INTERVAL = 1.0     # seconds between status re-broadcasts


class Supervisor:
    def __init__(self, config: Config, sources: ConfigSources | None = None) -> None:
        self.config = config
        self.sources = sources or ConfigSources()
        self.run_dir = ""
        self.stopping = False
        self.listener: socket.socket | None = None
        self._state_lock: IO[str] | None = None  # held while this broker owns --state-dir
        self.generations: dict[int, Generation] = {}
        self.serving: Generation | None = None
        self.history: list[tuple[str, Config]] = []   # (code dir, config) of each serving generation
        self.ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.next_number = 1
        self.leftover: list[str] = []    # journals of an earlier run, until taken over
        self.operator = Operator(self)

    # ------------------------------------------------------------- set-up
    def _make_run_dir(self) -> str:
        base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        return tempfile.mkdtemp(prefix="broker-", dir=base)

    def _listen(self) -> None:
        """Bind and listen once, here: every shard of every generation
        accepts on this socket (inherited), so the accept queue outlives any
        generation; port 0 becomes the port picked here."""
        sock = bind_shared(self.config.host, self.config.port)
        sock.listen(4096)
        sock.set_inheritable(True)
        self.config.port = sock.getsockname()[1]
        self.listener = sock

    def settle(self, config: Config) -> Config:
        """What a new config means here: port 0 is the port we hold, and a
        relative state_dir is made absolute (shards run elsewhere)."""
        if config.port == 0:
            config.port = self.config.port
        if config.state_dir is not None:
            config.state_dir = os.path.abspath(config.state_dir)
        return config

    def allocate(self) -> int:
        """The next generation number (never reused, even after a failed deploy)."""
        self.next_number += 1
        return self.next_number - 1

    def new_generation(self, number: int, config: Config, code_dir: str, sources: list[str],
                       wait_for_import: bool) -> Generation:
        assert self.ctx is not None and self.loop is not None and self.listener is not None
        generation = Generation(number, config, self.run_dir, code_dir, self.ctx, self.loop,
                                self.listener.fileno(), os.getpid(), self.operator.on_control,
                                config.state_dir or self.run_dir, sources, wait_for_import,
                                self.admin_endpoint)
        self.generations[number] = generation
        return generation

    def snapshot(self, number: int) -> str:
        return snapshot_code(os.path.join(self.run_dir, "code", f"g{number}"))

    def _lock_state_dir(self) -> str | None:
        """Hold ``state_dir`` for this broker's lifetime (an flock on
        ``state_dir/.lock``): a second broker on the same directory would
        take the first one's journals over while it still writes them.
        Returns why it cannot, or None."""
        state_dir = self.config.state_dir
        if state_dir is None:
            return None
        try:
            os.makedirs(state_dir, exist_ok=True)
            lock = open(os.path.join(state_dir, ".lock"), "a+")
        except OSError as exc:
            return f"cannot use the state dir {state_dir}: {exc.strerror or exc}"
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            lock.close()
            return f"the state dir {state_dir} is in use by another broker (supervisor pid {holder})"
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        self._state_lock = lock  # released when this process exits
        return None

    def run(self) -> int:
        if self.config.state_dir is not None:
            self.config.state_dir = os.path.abspath(self.config.state_dir)
        refusal = self._lock_state_dir()
        if refusal is not None:
            print(f"error: {refusal}", file=sys.stderr)
            return 1
        try:
            self._listen()
        except OSError as exc:
            print(f"error: cannot listen on {self.config.host}:{self.config.port}: "
                  f"{exc.strerror or exc}", file=sys.stderr)
            return 1
        self.run_dir = self._make_run_dir()
        loop = self.loop = new_loop()
        asyncio.set_event_loop(loop)
        self.ctx = zmq.Context()
        try:
            self.admin_endpoint = (f"ipc://{self.run_dir}/admin" if self.config.cluster.transport == "ipc"
                                   else f"tcp://127.0.0.1:{free_port()}")
            self.admin = self.ctx.socket(zmq.ROUTER)
            self.admin.setsockopt(zmq.LINGER, 0)
            self.admin.bind(self.admin_endpoint)
            self._admin_drain = Drain(loop, self.admin, self.operator.on_admin)
            return loop.run_until_complete(self._main(loop))
        finally:
            for generation in self.generations.values():
                generation.close()
            self.ctx.destroy(linger=0)
            loop.close()
            shutil.rmtree(self.run_dir, ignore_errors=True)
            if self.listener is not None:
                self.listener.close()

    def reply_admin(self, frames: list[bytes]) -> None:
        self.admin.send_multipart(frames)
        self._admin_drain.kick()

    # ------------------------------------------------------------- running
    async def _main(self, loop: asyncio.AbstractEventLoop) -> int:
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.operator.on_sighup)  # a reload (PROTOCOL.md §5)
        # State left by an earlier run in --state-dir is taken over like a deploy's.
        state_dir = self.config.state_dir
        previous = latest_generation(state_dir) if state_dir else 0
        self.next_number = previous + 1
        self.leftover = generation_journals(state_dir, previous) if state_dir and previous else []
        number = self.allocate()
        first = self.new_generation(number, self.config, self.snapshot(number), self.leftover, False)
        self.serving = first
        self.history.append((first.code_dir, self.config))
        log.info("supervisor %d: generation %d, %d shard(s) on http://%s:%d, run dir %s", os.getpid(),
                 first.number, len(first.shards), self.config.host, self.config.port, self.run_dir)
        first.start_all()
        last_status = 0.0
        while not stop.is_set():
            now = time.monotonic()
            refresh = now - last_status >= STATUS_INTERVAL
            for generation in list(self.generations.values()):
                self.operator.deaths(generation, generation.watch(self.config.cluster.restart_backoff_max))
                if generation.status_dirty or refresh:
                    generation.publish_status(self.stopping)
            if refresh:
                last_status = now
            try:
                await asyncio.wait_for(stop.wait(), WATCH_INTERVAL)
            except TimeoutError:
                pass
        return await self._stop_all()

    def status(self) -> dict[str, Any]:
        assert self.serving is not None
        return self.serving.status(self.stopping)

    # ------------------------------------------------------------- stopping
    async def stop_generation(self, generation: Generation, timeout: float) -> bool:
        """SIGTERM (a graceful drain) and wait; True when every shard exited 0."""
        generation.restart_dead = False
        generation.stopping = True
        running = generation.signal_all(signal.SIGTERM)
        procs = []
        for shard in running:
            try:
                procs.append(psutil.Process(shard.pid))
            except psutil.NoSuchProcess:
                pass
        gone, alive = await asyncio.get_running_loop().run_in_executor(
            None, lambda: psutil.wait_procs(procs, timeout=timeout))
        for proc in alive:
            log.error("shard pid %d did not stop in %.0fs; killing it", proc.pid, timeout)
            proc.kill()
        for shard in running:
            if shard.process is not None:
                shard.process.wait()
        failed = [s.id for s in running if s.process is not None and s.process.returncode not in (0, None)]
        if failed or alive:
            log.error("generation %d: shard(s) %s did not stop cleanly", generation.number,
                      failed or [p.pid for p in alive])
            return False
        return True

    async def _stop_all(self) -> int:
        """Graceful drain: every shard gets SIGTERM and drain_timeout to finish."""
        self.stopping = True
        await self.operator.cancel()
        for generation in self.generations.values():
            generation.publish_status(True)
        log.info("supervisor: draining %d generation(s)", len(self.generations))
        results = await asyncio.gather(*(self.stop_generation(g, self.config.drain_timeout + 5.0)
                                         for g in list(self.generations.values())))
        if not all(results):
            return 1
        log.info("supervisor: stopped")
        return 0
