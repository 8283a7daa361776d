"""The servers under load: the broker (spawned or already running) and the
baselines of benchmarks/baselines/, plus their process tree's CPU and RSS
(psutil, summed over the server pid and its children).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil

from broker.testing import BrokerProcess, free_port


def process_cpu_seconds(proc: psutil.Process) -> float:
    """user+system seconds of one process, to the nanosecond where Linux says.

    /proc/PID/stat counts in clock ticks (10 ms): a short run of a fast
    server can round to zero. The scheduler's per-thread run time
    (/proc/PID/task/*/schedstat, ns) is exact but forgets threads that
    ended, so the larger of the two is taken."""
    times = proc.cpu_times()
    coarse = times.user + times.system
    exact = 0
    try:
        for task in os.listdir(f"/proc/{proc.pid}/task"):
            with open(f"/proc/{proc.pid}/task/{task}/schedstat") as f:
                exact += int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return coarse
    return max(coarse, exact / 1e9)


__all__ = ["Target", "ProcessTree", "RedisProcess", "spawn_broker", "spawn_redis", "spawn_baseline", "attach",
           "BASELINES", "baselines_dir", "SOCKETIO_QUERY", "socketio_url", "npm_ci", "process_cpu_seconds"]

BASELINES = ("picows", "websockets", "socketio-node")
#: where a Socket.IO client opens a WebSocket session directly (Engine.IO 4)
SOCKETIO_QUERY = "/socket.io/?EIO=4&transport=websocket"


def socketio_url(http_url: str) -> str:
    """The Engine.IO WebSocket URL of a server at ``http_url``."""
    return "ws" + http_url[len("http"):] + SOCKETIO_QUERY


def baselines_dir() -> Path:
    """benchmarks/baselines/ of the source tree this package runs from."""
    here = Path(__file__).resolve().parent.parent.parent / "benchmarks" / "baselines"
    return Path(os.environ.get("BROKER_BENCH_BASELINES", here))


class ProcessTree:
    """CPU-seconds and RSS of a root pid and all its descendants."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self._procs: dict[int, psutil.Process] = {pid: self.root}
        self._dead_cpu = 0.0
        self._last_cpu: dict[int, float] = {}

    def processes(self) -> list[psutil.Process]:
        try:
            children = self.root.children(recursive=True)
        except psutil.Error:
            children = []
        for child in children:
            self._procs.setdefault(child.pid, child)
        return list(self._procs.values())

    def cpu_seconds(self) -> float:
        """user+system of every process of the tree (a process that exited keeps
        the last value seen for it)."""
        total = 0.0
        for proc in self.processes():
            try:
                value = process_cpu_seconds(proc)
                self._last_cpu[proc.pid] = value
            except psutil.Error:
                value = self._last_cpu.get(proc.pid, 0.0)
            total += value
        return total

    def rss_bytes(self) -> int:
        total = 0
        for proc in self.processes():
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass
        return total

    def count(self) -> int:
        return sum(1 for p in self.processes() if p.is_running())


class RssSampler(threading.Thread):
    """Samples a tree's RSS every ``interval`` seconds; ``peak`` since reset()."""

    def __init__(self, tree: ProcessTree, interval: float = 0.2) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.tree = tree
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def reset(self) -> None:
        self.peak = self.tree.rss_bytes()

    def run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.peak = max(self.peak, self.tree.rss_bytes())
            except Exception:
                pass

    def stop(self) -> None:
        self._stop.set()


@dataclass
class Target:
    """One server under test."""

    name: str
    ws_url: str
    http_url: str
    pid: int
    spawned: Any = None          # BrokerProcess | subprocess.Popen | None
    tree: ProcessTree = field(init=False)
    log_path: str | None = None
    redis: RedisProcess | None = None   # a Redis this run started for the server (stopped after it)
    protocol: str = "native"     # what the load speaks: "native" (PROTOCOL.md) or "nats"
    stop_signal: int = signal.SIGTERM   # nats-server exits 0 on SIGINT, 1 on SIGTERM

    def __post_init__(self) -> None:
        self.tree = ProcessTree(self.pid)

    def alive(self) -> bool:
        try:
            return self.tree.root.is_running() and self.tree.root.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def stop(self) -> int | None:
        """Stop the server if this run started it (``stop_signal``, SIGKILL if it does not end)."""
        spawned, self.spawned = self.spawned, None
        try:
            return _stop(spawned, self.stop_signal)
        finally:
            redis, self.redis = self.redis, None
            if redis is not None:
                redis.stop()


def _stop(spawned: Any, sig: int = signal.SIGTERM) -> int | None:
    """Stop a server this run started (SIGTERM, then SIGKILL)."""
    if spawned is None:
        return None
    if isinstance(spawned, BrokerProcess):
        try:
            return spawned.stop(timeout=20)
        except subprocess.TimeoutExpired:
            return -9
    proc: subprocess.Popen[bytes] = spawned
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


class RedisProcess:
    """A redis-server for one run: a free loopback port (never 6379), no
    persistence, its files in a temporary directory; its CPU is measured
    apart from the broker's."""

    def __init__(self, log_path: str | None = None, timeout: float = 10.0) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server not found (install Redis 7, or pass --redis URL)")
        self.port = free_port()
        while self.port == 6379:
            self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="bench-redis-")
        log = open(log_path, "ab") if log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.dir, "--protected-mode", "no"], stdout=log, stderr=subprocess.STDOUT)
        self.tree = ProcessTree(self.process.pid)
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def _answers(self) -> bool:
        import socket

        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


def spawn_redis(log_path: str | None = None) -> RedisProcess:
    """Start a redis-server for a ``broker-redis`` run."""
    return RedisProcess(log_path)


def _ready(http_url: str, path: str = "/readyz") -> bool:
    try:
        with urllib.request.urlopen(http_url + path, timeout=1.0) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def spawn_broker(shards: int = 1, api_key: str = "bench-key", jwt_secret: str = "bench-secret",
                 log_path: str | None = None, extra: list[str] | None = None, timeout: float = 30.0,
                 redis_url: str | None = None) -> Target:
    """Start ``broker serve`` on a free port and wait for /readyz; with
    ``redis_url``, on the Redis engine (under a prefix of its own, so a
    shared Redis starts every run with fresh channels).

    Every load client comes from 127.0.0.1, so the per-IP connection limit
    (PROTOCOL.md §1, default 1,000) is lifted for the run."""
    config = tempfile.NamedTemporaryFile("w", prefix="bench-", suffix=".toml", delete=False)
    with config:
        config.write("[limits]\nconnections_per_ip = 1000000\n")
        if redis_url is not None:
            config.write(f'[redis]\nprefix = "bench-{os.urandom(4).hex()}"\n')
    if redis_url is not None:
        extra = ["--redis", redis_url, *(extra or [])]
    proc = BrokerProcess(args=["--allow-anonymous", "--shards", str(shards), "--log-level", "warning",
                               "--config", config.name, *(extra or [])],
                         api_key=api_key, jwt_secret=jwt_secret, log_path=log_path)
    try:
        proc.start(timeout=timeout)
    except BaseException:
        proc.stop(signal.SIGKILL, timeout=5)
        raise
    assert proc.process is not None
    return Target("broker", proc.ws_url, proc.url, proc.process.pid, spawned=proc, log_path=log_path)


def npm_ci(folder: Path) -> None:
    """A folder's npm packages, installed once from its lockfile (``npm
    install`` without one). A file lock makes concurrent callers (parallel
    test workers, two bench runs) wait for one install instead of racing
    in the same node_modules."""
    import fcntl

    with open(folder / ".npm-install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (folder / "node_modules").is_dir():
            return
        command = ["npm", "ci" if (folder / "package-lock.json").exists() else "install",
                   "--no-audit", "--no-fund", "--loglevel=error"]
        result = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} in {folder} failed ({result.returncode}): "
                               f"{result.stderr[-2000:]}")


def spawn_baseline(kind: str, log_path: str | None = None, timeout: float = 20.0) -> Target:
    """Start benchmarks/baselines/<kind>_server.py on free ports (WebSocket
    and HTTP) and wait for its /readyz."""
    if kind not in BASELINES:
        raise ValueError(f"unknown baseline {kind!r} (one of {', '.join(BASELINES)})")
    node = kind == "socketio-node"
    script = baselines_dir() / ("socketio_server.js" if node else f"{kind}_server.py")
    if node:
        npm_ci(baselines_dir())
    if not script.exists():
        raise FileNotFoundError(f"{script} not found (run from a source checkout, or set BROKER_BENCH_BASELINES)")
    ws_port, http_port = free_port(), free_port()
    while http_port == ws_port:
        http_port = free_port()
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(["node" if node else sys.executable, str(script), "--host", "127.0.0.1",
                             "--port", str(ws_port), "--http-port", str(http_port)],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    http_url = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"baseline {kind} exited early with {proc.returncode}"
                               + (f" (log: {log_path})" if log_path else ""))
        if _ready(http_url):
            ws_url = (socketio_url(f"http://127.0.0.1:{ws_port}") if node else f"ws://127.0.0.1:{ws_port}/ws")
            return Target(kind, ws_url, http_url, proc.pid, spawned=proc, log_path=log_path)
        time.sleep(0.05)
    proc.kill()
    proc.wait(5)
    raise TimeoutError(f"baseline {kind} not ready after {timeout}s")


def _listening_pid(port: int) -> int | None:
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return conn.pid
    except (psutil.AccessDenied, PermissionError):
        return None
    return None


def _serve_root(pid: int) -> int:
    """Climb from a listening shard to the ``broker serve`` process that owns it."""
    proc = psutil.Process(pid)
    while True:
        parent = proc.parent()
        if parent is None:
            return proc.pid
        try:
            argv = parent.cmdline()
        except psutil.Error:
            return proc.pid
        program = os.path.basename(argv[0]) if argv else ""
        if ("python" in program or program == "broker") and "broker" in " ".join(argv) and "serve" in argv:
            proc = parent
        else:
            return proc.pid


def attach(url: str, http_url: str | None = None, pid: int | None = None, name: str = "broker") -> Target:
    """A server already running at ``url`` (the runner does not stop it). Its
    pid is ``pid`` or the process listening on the URL's port."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "ws") or not parts.hostname:
        raise ValueError(f"--url must be http://HOST:PORT, not {url!r}")
    port = parts.port or 80
    http_url = (http_url or f"http://{parts.hostname}:{port}").rstrip("/")
    ws_url = f"ws://{parts.hostname}:{port}/ws"
    if not _ready(http_url):
        raise RuntimeError(f"{http_url}/readyz does not answer 200")
    if pid is None:
        found = _listening_pid(port)
        if found is None:
            raise RuntimeError(f"no process found listening on port {port}; pass --pid")
        pid = _serve_root(found)
    return Target(name, ws_url, http_url, pid)
