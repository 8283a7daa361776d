"""The NATS target: a ``nats-server`` this run starts on free ports (never
one already running), with WebSocket enabled for the receivers and its TCP
client port for the publisher.

Light at import (os, shutil): the CLI asks ``nats_server_path()`` to decide
whether ``--compare`` includes NATS.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .targets import Target

__all__ = ["nats_server_path", "nats_config", "spawn_nats"]

#: where distributions put it when it is not on PATH (Debian: /usr/sbin)
_FALLBACKS = ("/usr/sbin/nats-server", "/usr/local/bin/nats-server", "/usr/bin/nats-server")


def nats_server_path() -> str | None:
    """``$NATS_SERVER``, else ``nats-server`` on PATH, else a usual place; None if none."""
    explicit = os.environ.get("NATS_SERVER")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    found = shutil.which("nats-server")
    if found:
        return found
    return next((p for p in _FALLBACKS if os.access(p, os.X_OK)), None)


def nats_config(port: int, ws_port: int) -> str:
    """A config with the client port and a plain WebSocket listener on
    127.0.0.1. No WebSocket compression: NATS does not negotiate
    permessage-deflate then, as picows does not. No JetStream (core NATS
    pub/sub is what the broker's fan-out is compared with)."""
    return (f'listen: "127.0.0.1:{port}"\n'
            "max_payload: 1048576\n"
            "max_connections: 1000000\n"
            "max_pending: 67108864\n"
            'write_deadline: "30s"\n'
            "websocket {\n"
            f'  listen: "127.0.0.1:{ws_port}"\n'
            "  no_tls: true\n"
            "  compression: false\n"
            "}\n")


def _raise_nofile() -> None:   # in the child, before exec: 5,000 WebSockets need the fds
    from .worker import raise_nofile_limit
    raise_nofile_limit()


def _answers(port: int, expect_info: bool) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
            if not expect_info:
                return True
            return sock.recv(5) == b"INFO "
    except OSError:
        return False


def spawn_nats(log_path: str | None = None, timeout: float = 20.0) -> Target:
    """Start ``nats-server -c <config>`` on free ports and wait until both
    listeners answer. The Target's ws_url is the WebSocket listener, its
    http_url (``nats://``) the client port the publisher uses."""
    from broker.testing import free_port

    from .targets import Target

    binary = nats_server_path()
    if binary is None:
        raise FileNotFoundError("nats-server not found (install it, put it on PATH, or set NATS_SERVER)")
    port, ws_port = free_port(), free_port()
    while ws_port == port:
        ws_port = free_port()
    config = tempfile.NamedTemporaryFile("w", prefix="bench-nats-", suffix=".conf", delete=False)
    with config:
        config.write(nats_config(port, ws_port))
    try:
        proc = _popen(binary, config.name, log_path)
        if not _wait_ready(proc, port, ws_port, timeout):
            raise RuntimeError(f"nats-server exited early with {proc.returncode}"
                               + (f" (log: {log_path})" if log_path else ""))
    finally:
        os.unlink(config.name)   # read at start; nothing reloads it
    return Target("nats", f"ws://127.0.0.1:{ws_port}/", f"nats://127.0.0.1:{port}", proc.pid,
                  spawned=proc, log_path=log_path, protocol="nats", stop_signal=signal.SIGINT)


def _popen(binary: str, config: str, log_path: str | None) -> subprocess.Popen[bytes]:
    log = open(log_path, "wb") if log_path else None
    try:
        return subprocess.Popen([binary, "-c", config], stdout=log or subprocess.DEVNULL,
                                stderr=subprocess.STDOUT, preexec_fn=_raise_nofile)
    finally:
        if log is not None:
            log.close()   # the child has its own copy


def _wait_ready(proc: subprocess.Popen[bytes], port: int, ws_port: int, timeout: float) -> bool:
    """True once both listeners answer, False if the server exited; a
    server not ready in time is killed (TimeoutError)."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False
            if _answers(port, True) and _answers(ws_port, False):
                return True
            time.sleep(0.05)
        raise TimeoutError(f"nats-server not ready after {timeout}s")
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        raise
