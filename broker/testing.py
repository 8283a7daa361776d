"""Helpers for tests and tools that drive a real ``broker serve`` process.

Nothing here is used by the broker itself; it lives in the package so the
test suite, the benchmarks and tools/ share one way to start a broker.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from .sockets import free_port
from dataclasses import dataclass, field

__all__ = ["free_port", "BrokerProcess", "http_json"]


def http_json(method: str, url: str, body: object | bytes | None = None,
              headers: dict[str, str] | None = None, timeout: float = 10.0) -> tuple[int, object]:
    """One HTTP request; returns (status, parsed JSON body or raw text)."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode("utf-8", "replace")


@dataclass
class BrokerProcess:
    """A ``broker serve`` subprocess on a free port; stop() sends SIGTERM."""

    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    api_key: str = "test-api-key"
    jwt_secret: str = "test-jwt-secret-long-enough-for-hs256!"
    port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"
    process: subprocess.Popen[bytes] | None = None
    log_path: str | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}/ws"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "broker", "serve", "--host", self.host,
                "--port", str(self.port), "--api-key", self.api_key,
                "--jwt-secret", self.jwt_secret, *self.args]

    def start(self, timeout: float = 20.0) -> BrokerProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(self.command(), env=env, stdout=log, stderr=subprocess.STDOUT)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"broker exited early with {self.process.returncode}")
            try:
                status, _ = http_json("GET", self.url + "/readyz", timeout=1.0)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"broker on port {self.port} not ready after {timeout}s")

    def api(self, method: str, path: str, body: object | bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, object]:
        return http_json(method, self.url + path, body,
                         {"Authorization": f"apikey {self.api_key}", **(headers or {})})

    def publish(self, channel: str, data: object) -> dict[str, Any]:
        status, reply = self.api("POST", "/api/publish", {"channel": channel, "data": data})
        if status != 200:
            raise AssertionError(f"publish failed: {status} {reply}")
        return reply  # type: ignore[return-value]

    def token(self, sub: str, ttl: float = 3600, **claims: object) -> str:
        import jwt

        payload = {"sub": sub, "exp": int(time.time() + ttl), **claims}
        return jwt.encode(payload, self.jwt_secret, algorithm="HS256")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Signal the broker and wait; returns its exit code."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise
        return self.process.returncode

    def __enter__(self) -> BrokerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
