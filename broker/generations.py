"""One generation of shards: the processes that run one (code, config).

The supervisor runs a serving generation and, during a deploy, a new one
beside it (docs/operations.md). Each generation is a self-contained
cluster: its own directory under the run dir (node spec ``cluster.json``,
ZeroMQ ipc endpoints), its own status PUB and control PULL, its own code
snapshot (``code/``, a copy of the ``broker`` package taken when the
generation was made, so a rollback runs the previous code and a shard
restarted mid-life runs the code it started with). Every generation's
shards accept on the ONE listening socket the supervisor owns, which they
inherit: a generation that stops accepting leaves the connections queued
in the accept queue to the other (nothing is reset, unlike closing one of
several SO_REUSEPORT listeners, whose queue dies with it).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Callable

import zmq

from .config import Config
from .router import Drain, Endpoints
from .sockets import free_port

__all__ = ["Generation", "ShardProcess", "make_endpoints", "snapshot_code", "describe_exit"]

log = logging.getLogger("broker.generations")

QUICK_DEATH = 10.0  # a shard dying sooner than this after it got ready counts as a crash loop


def make_endpoints(transport: str, run_dir: str, shards: int) -> Endpoints:
    """ipc:// sockets in the run directory, or tcp:// on loopback ports."""
    if transport == "ipc":
        return Endpoints([f"ipc://{run_dir}/pub-{i}" for i in range(shards)],
                         [f"ipc://{run_dir}/req-{i}" for i in range(shards)],
                         f"ipc://{run_dir}/status", f"ipc://{run_dir}/control")
    ports = [free_port() for _ in range(2 * shards + 2)]
    tcp = [f"tcp://127.0.0.1:{port}" for port in ports]
    return Endpoints(tcp[:shards], tcp[shards:2 * shards], tcp[-2], tcp[-1])


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def snapshot_code(target: str) -> str:
    """Copy the ``broker`` package as it is on disk now into ``target``;
    returns the directory to put first on the shards' PYTHONPATH."""
    package_file = __import__("broker").__file__
    if package_file is None:  # a namespace package: no directory to copy
        raise RuntimeError("the broker package has no __file__ to snapshot")
    source = os.path.dirname(os.path.abspath(package_file))
    shutil.copytree(source, os.path.join(target, "broker"),
                    ignore=shutil.ignore_patterns("__pycache__", "*.c", "*.html", "build"))
    return target


@dataclass
class ShardProcess:
    id: int
    process: subprocess.Popen[bytes] | None = None
    pid: int = 0
    up: bool = False
    booted: bool = False
    started: float = 0.0
    ready_at: float | None = None   # when it last said ready (None: not since its start)
    restarts: int = 0
    quick_deaths: int = 0
    restart_at: float | None = None
    exit_codes: list[int] = field(default_factory=list)
    applied: int = 0          # config version this process confirmed
    fenced: bool = False      # confirmed it writes no channel state
    migrated: bool = False    # asked every client to move
    moved: int = 0            # how many clients it asked
    health: dict[str, Any] | None = None  # its last health report while a deploy watches


class Generation:
    """The shards of one (code, config), their sockets and their state flags."""

    def __init__(self, number: int, config: Config, run_dir: str, code_dir: str,
                 ctx: zmq.Context[zmq.Socket[bytes]], loop: Any, listen_fd: int, supervisor_pid: int,
                 on_control: Callable[[Generation, dict[str, Any]], None],
                 journal_dir: str, sources: list[str], wait_for_import: bool,
                 admin_endpoint: str = "") -> None:
        self.number = number
        self.config = config
        self.dir = os.path.join(run_dir, f"gen-{number}")
        os.makedirs(self.dir, exist_ok=True)
        self.code_dir = code_dir
        self.listen_fd = listen_fd
        self.supervisor_pid = supervisor_pid
        self.journal_dir = journal_dir
        self.sources = sources
        self.admin_endpoint = admin_endpoint
        self.shards = [ShardProcess(i) for i in range(config.shards)]
        self.config_version = 1
        self.phase = "serving"
        self.restart_dead = not wait_for_import  # a candidate that dies fails the deploy instead
        self.stopping = False                    # being stopped: its exits are expected
        self.flags: dict[str, Any] = {"accepting": not wait_for_import, "fenced": False,
                                      "import": not wait_for_import, "migrate": None, "feed": None}
        self.endpoints = make_endpoints(config.cluster.transport, self.dir, config.shards)
        self.status_pub = ctx.socket(zmq.PUB)
        self.status_pub.setsockopt(zmq.LINGER, 0)
        self.status_pub.bind(self.endpoints.status)
        self.control = ctx.socket(zmq.PULL)
        self.control.setsockopt(zmq.LINGER, 0)
        self.control.bind(self.endpoints.control)
        self._drain = Drain(loop, self.control, lambda frames: on_control(self, json.loads(frames[0])))
        self.status_dirty = True
        self.write_spec()

    # ------------------------------------------------------------- spec
    def write_spec(self) -> None:
        """``cluster.json``: what every shard reads at start and on reload
        (written whole, then renamed: a reader never sees half of it)."""
        spec = {"config": self.config.to_dict(), "config_version": self.config_version,
                "endpoints": self.endpoints.to_dict(), "supervisor": self.supervisor_pid,
                "generation": self.number, "listen_fd": self.listen_fd,
                "journal_dir": self.journal_dir, "sources": self.sources, "admin": self.admin_endpoint}
        tmp = os.path.join(self.dir, "cluster.json.tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(spec, fh)
        os.replace(tmp, os.path.join(self.dir, "cluster.json"))

    # ------------------------------------------------------------ processes
    def start(self, shard: ShardProcess) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (self.code_dir, env.get("PYTHONPATH")) if p)
        # -P: the working directory must not shadow the generation's code.
        shard.process = subprocess.Popen(
            [sys.executable, "-P", "-m", "broker.worker", self.dir, str(shard.id)],
            env=env, pass_fds=(self.listen_fd,))
        shard.pid = shard.process.pid
        shard.up = shard.booted = shard.fenced = shard.migrated = False
        shard.health = None
        shard.started = time.monotonic()
        shard.ready_at = None
        shard.restart_at = None
        self.status_dirty = True
        log.info("generation %d: shard %d started (pid %d)", self.number, shard.id, shard.pid)

    def start_all(self) -> None:
        for shard in self.shards:
            self.start(shard)

    def watch(self, backoff_max: float) -> list[tuple[ShardProcess, int]]:
        """Reap dead shards (restarting them when this generation may);
        returns the deaths seen now."""
        if self.stopping:
            return []  # stop_generation reaps them
        now = time.monotonic()
        deaths = []
        for shard in self.shards:
            if shard.process is not None:
                code = shard.process.poll()
                if code is None:
                    continue
                deaths.append((shard, code))
                self._died(shard, code, now, backoff_max)
            if shard.restart_at is not None and now >= shard.restart_at and self.restart_dead:
                shard.restarts += 1
                self.start(shard)
        return deaths

    def _died(self, shard: ShardProcess, code: int, now: float, backoff_max: float) -> None:
        lived = now - shard.started
        shard.process = None
        shard.up = False
        shard.exit_codes.append(code)
        self.status_dirty = True
        # Quick means it never got ready, or died soon after: a slow start on a
        # loaded machine is not a healthy run.
        served = 0.0 if shard.ready_at is None else now - shard.ready_at
        shard.quick_deaths = shard.quick_deaths + 1 if served < QUICK_DEATH else 0
        if not self.restart_dead:
            log.error("generation %d: shard %d (pid %d) %s after %.1fs", self.number, shard.id,
                      shard.pid, describe_exit(code), lived)
            return
        # The first death restarts at once; a crash loop backs off exponentially.
        delay = 0.0 if shard.quick_deaths <= 1 else min(0.5 * 2 ** (shard.quick_deaths - 2), backoff_max)
        shard.restart_at = now + delay
        log.error("generation %d: shard %d (pid %d) %s after %.1fs; %s", self.number, shard.id,
                  shard.pid, describe_exit(code), lived, "restarting now" if delay == 0 else
                  f"crash loop ({shard.quick_deaths} quick deaths): restarting in {delay:.1f}s")

    def running(self) -> list[ShardProcess]:
        return [s for s in self.shards if s.process is not None and s.process.poll() is None]

    def signal_all(self, sig: int) -> list[ShardProcess]:
        running = self.running()
        for shard in running:
            assert shard.process is not None  # running() lists only live processes
            shard.process.send_signal(sig)
        return running

    # -------------------------------------------------------------- status
    def status(self, draining: bool) -> dict[str, Any]:
        return {"draining": draining, "supervisor": self.supervisor_pid, "generation": self.number,
                "phase": self.phase, "config_version": self.config_version, **self.flags,
                "shards": [{"id": s.id, "pid": s.pid, "up": s.up, "restarts": s.restarts}
                           for s in self.shards]}

    def publish_status(self, draining: bool) -> None:
        self.status_dirty = False
        try:
            self.status_pub.send(json.dumps(self.status(draining)).encode(), zmq.NOBLOCK)
        except zmq.Again:  # pragma: no cover - a PUB socket does not block
            pass

    def set(self, **flags: Any) -> None:
        self.flags.update(flags)
        self.status_dirty = True

    def close(self) -> None:
        self._drain.close()
        self.status_pub.close(0)
        self.control.close(0)
