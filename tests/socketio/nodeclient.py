"""Real Socket.IO peers in Node for the adapter's tests: socket.io-client
(``node/client.js``) and the socket.io server baseline
(``benchmarks/baselines/socketio_server.js``).

``ensure_node_packages`` installs a folder's npm dependencies once (when its
``node_modules`` is missing: ``npm ci`` from the lockfile). Without node or
npm the tests are skipped, except under ``CI=true``, where that is a failure.
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from broker.bench.targets import npm_ci
from broker.testing import free_port

__all__ = ["NODE_DIR", "BASELINES_DIR", "ensure_node_packages", "NodeClient", "NodeBaseline"]

NODE_DIR = Path(__file__).resolve().parent / "node"
BASELINES_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "baselines"


def _missing(what: str) -> None:
    message = f"{what} is needed for the Socket.IO tests with a real client"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message + " (CI=true: a missing dependency is a failure)")
    pytest.skip(message)


def ensure_node_packages(folder: Path) -> Path:
    """``npm ci`` (or ``npm install`` without a lockfile) in ``folder`` unless
    its node_modules is already there; returns the folder."""
    if shutil.which("node") is None:
        _missing("node")
    if shutil.which("npm") is None:
        _missing("npm")
    try:
        npm_ci(folder)
    except RuntimeError as exc:
        pytest.fail(str(exc))
    return folder


class NodeClient:
    """One ``node client.js`` process; its stdout JSON lines become events."""

    def __init__(self, url: str, options: dict[str, Any] | None = None, log_path: str | None = None) -> None:
        ensure_node_packages(NODE_DIR)
        self.url = url
        self.options = dict(options or {})
        self.events: list[dict[str, Any]] = []      # every event seen, in order
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._stderr = open(log_path, "w") if log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(
            ["node", str(NODE_DIR / "client.js"), url, json.dumps(self.options)],
            cwd=NODE_DIR, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
            text=True, bufsize=1)
        self._reader = threading.Thread(target=self._read, daemon=True, name="node-client-reader")
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "unparsed", "line": line.rstrip("\n")}
            self._queue.put(event)
        self._queue.put(None)   # end of output

    def next_event(self, timeout: float = 10.0) -> dict[str, Any]:
        """The next event; AssertionError when none comes in time or the client ended."""
        try:
            event = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no event from the Socket.IO client within {timeout}s; "
                                 f"seen: {self.events[-10:]}") from None
        if event is None:
            self._queue.put(None)
            raise AssertionError(f"the Socket.IO client ended (exit {self.process.poll()}); "
                                 f"seen: {self.events[-10:]}")
        self.events.append(event)
        return event

    def wait_for(self, name: str, timeout: float = 10.0,
                 where: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
        """Read events until one named ``name`` (matching ``where``) arrives."""
        deadline = time.monotonic() + timeout
        while True:
            event = self.next_event(max(0.0, deadline - time.monotonic()))
            if event.get("event") == name and (where is None or where(event)):
                return event

    def emit(self, event: str, data: Any) -> None:
        """Emit ``event`` with ``data`` and an ack (its answer arrives as an "ack" event)."""
        self._command({"emit": event, "data": data})

    def _command(self, command: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()

    def close(self, timeout: float = 5.0) -> int:
        """Ask the client to leave, then make sure it has; returns its exit code."""
        if self.process.poll() is None:
            try:
                self._command({"close": True})
            except (BrokenPipeError, OSError):
                pass
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self.process.stdin is not None:
            self.process.stdin.close()
        if self._stderr is not subprocess.DEVNULL:
            self._stderr.close()
        return self.process.returncode


class NodeBaseline:
    """``benchmarks/baselines/socketio_server.js`` on free ports, ready."""

    def __init__(self, log_path: str | None = None, timeout: float = 20.0) -> None:
        ensure_node_packages(BASELINES_DIR)
        self.port, self.http_port = free_port(), free_port()
        while self.http_port == self.port:
            self.http_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.http_url = f"http://127.0.0.1:{self.http_port}"
        self._log = open(log_path, "w") if log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(
            ["node", str(BASELINES_DIR / "socketio_server.js"), "--host", "127.0.0.1",
             "--port", str(self.port), "--http-port", str(self.http_port)],
            cwd=BASELINES_DIR, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self.process.poll() is not None:
                raise RuntimeError(f"socketio_server.js exited early with {self.process.returncode}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"socketio_server.js not ready after {timeout}s")
            time.sleep(0.05)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.http_url + "/readyz", timeout=1.0) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def publish(self, channel: str, data: Any) -> dict[str, Any]:
        request = urllib.request.Request(self.http_url + "/api/publish", method="POST",
                                         data=json.dumps({"channel": channel, "data": data}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=5.0) as response:
            return json.loads(response.read())

    def stop(self) -> int | None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self._log is not subprocess.DEVNULL:
            self._log.close()
        return self.process.returncode
