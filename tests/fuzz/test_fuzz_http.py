"""Fuzz the HTTP layer: httptools with the broker's limits, directly, and
through a real `broker serve` socket (request heads and bodies of any shape,
split anywhere): every request gets a well-formed HTTP answer or a close,
never a hang past the handshake timeout, and the shard never dies."""
from __future__ import annotations

import os
import re
import socket
import time

import httptools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.testing import BrokerProcess, http_json

from .conftest import FUZZ_PROFILE, examples
from .strategies import chunked, client_frame, frames

settings.load_profile(FUZZ_PROFILE)
pytestmark = pytest.mark.timeout(600)

HANDSHAKE_TIMEOUT = 1.0
TOKEN = st.text(alphabet="!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
                min_size=1, max_size=12)
FIELD_BYTES = st.binary(max_size=40)
METHODS = st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "CONNECT", "BREW", "get", ""])
PATHS = st.one_of(st.sampled_from(["/healthz", "/readyz", "/metrics", "/api/stats", "/api/publish", "/ws",
                                   "/api/history?channel=bill:1&since=0&limit=5", "/api/bills/1/updates",
                                   "/api/users/u/notifications", "/api/broadcast", "*", "http://x/readyz"]),
                  st.text(max_size=30).map(lambda t: "/" + t))
KNOWN_HEADERS = st.sampled_from(["Content-Length", "Transfer-Encoding", "Connection", "Upgrade",
                                 "Sec-WebSocket-Key", "Sec-WebSocket-Version", "Sec-WebSocket-Extensions",
                                 "Authorization", "Host", "Content-Type", "Expect"])
HEADER_VALUES = st.one_of(st.sampled_from(["0", "5", "-1", "chunked", "close", "keep-alive", "Upgrade",
                                           "websocket", "13", "dGhlIHNhbXBsZSBub25jZQ==", "apikey test-api-key",
                                           "permessage-deflate", "100-continue", "99999999999"]),
                          st.text(max_size=20))


@st.composite
def requests(draw) -> bytes:
    method = draw(METHODS)
    path = draw(PATHS)
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.1x", ""]))
    head = f"{method} {path} {version}".encode("utf-8", "surrogatepass") + b"\r\n"
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.booleans()):
            name = draw(KNOWN_HEADERS).encode()
        else:
            name = draw(TOKEN).encode() if draw(st.integers(0, 4)) else draw(FIELD_BYTES)
        value = draw(HEADER_VALUES).encode("utf-8", "surrogatepass") if draw(st.integers(0, 4)) else draw(FIELD_BYTES)
        head += name + b": " + value + b"\r\n"
    body = draw(st.binary(max_size=200)) if draw(st.booleans()) else b""
    if draw(st.booleans()):
        head += b"Content-Length: %d\r\n" % len(body)
    return head + b"\r\n" + body


class _Sink:
    """httptools callbacks that keep nothing: only the parser is under test."""

    def on_url(self, url: bytes) -> None: ...
    def on_header(self, name: bytes, value: bytes) -> None: ...
    def on_body(self, body: bytes) -> None: ...


@settings(max_examples=examples(300))
@given(st.lists(requests(), min_size=1, max_size=3) | st.lists(st.binary(max_size=300), min_size=1, max_size=3),
       st.lists(st.integers(0, 2000), max_size=6))
def test_httptools_raises_only_its_parser_errors(pieces, cuts):
    parser = httptools.HttpRequestParser(_Sink())
    try:
        for chunk in chunked(b"".join(pieces), cuts):
            parser.feed_data(chunk)
    except (httptools.HttpParserError, httptools.HttpParserUpgrade):
        pass


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz-http")
    config = tmp / "fuzz.toml"
    config.write_text(f"[limits]\nhandshake_timeout = {HANDSHAKE_TIMEOUT}\nbad_command_budget = 1000\n"
                      "[namespaces.room]\nclient_publish = true\n")
    proc = BrokerProcess(args=["--shards", "1", "--allow-anonymous", "--config", str(config)],
                         log_path=str(tmp / "broker.log"))
    proc.start()
    status, stats = proc.api("GET", "/api/stats")
    proc.shard_pid = stats["shards"][0]["pid"]  # type: ignore[attr-defined]
    yield proc
    status, stats = proc.api("GET", "/api/stats")
    assert stats["shards"][0]["pid"] == proc.shard_pid, "a shard died during the fuzz run"
    assert http_json("GET", proc.url + "/readyz")[0] == 200
    log = open(proc.log_path, encoding="utf-8", errors="replace").read()
    proc.stop()
    unknown = [record for record in _records(log) if "Traceback" in record]
    assert not unknown, unknown[0][-3000:]


def _records(log: str) -> list[str]:
    """Log records (a record starts with its timestamp; tracebacks continue it)."""
    return re.split(r"\n(?=\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", log)


def _send(sock: socket.socket, chunks: list[bytes]) -> None:
    """Send what the server still reads: it may answer and close early."""
    try:
        for chunk in chunks:
            sock.sendall(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass


def _shutdown_write(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _read_all(sock: socket.socket, limit: float) -> bytes:
    deadline = time.monotonic() + limit
    out = b""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            return out
        if not chunk:
            return out
        out += chunk
    raise AssertionError(f"still open after {limit}s with {out[:200]!r}")


@settings(max_examples=examples(40))
@given(requests(), st.lists(st.integers(0, 2000), max_size=4))
def test_any_request_over_a_real_socket_gets_an_answer_or_a_close(broker, request, cuts):
    sock = socket.create_connection(("127.0.0.1", broker.port))
    try:
        _send(sock, chunked(request, cuts))
        if b"Upgrade" not in request:
            _shutdown_write(sock)
        answer = _read_all(sock, HANDSHAKE_TIMEOUT + 3)
    finally:
        sock.close()
    if answer:
        assert answer.startswith(b"HTTP/1.1 "), answer[:100]
        status = int(answer[9:12])
        assert 100 <= status < 600 and status != 500, answer[:300]


@settings(max_examples=examples(40))
@given(st.lists(frames(), min_size=1, max_size=6), st.lists(st.integers(0, 3000), max_size=4))
def test_any_frames_over_a_real_socket_end_with_a_protocol_close_code(broker, sequence, cuts):
    import base64
    import struct

    key = base64.b64encode(os.urandom(16)).decode()
    sock = socket.create_connection(("127.0.0.1", broker.port))
    try:
        sock.sendall((f"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        _send(sock, chunked(b"".join(sequence) + client_frame(0x8, struct.pack("!H", 1000)), cuts))
        answer = _read_all(sock, 8.0)
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 101 ")
    wire = answer.split(b"\r\n\r\n", 1)[1]
    codes = []
    while len(wire) >= 2:  # server frames are unmasked
        length = wire[1] & 0x7F
        at = 2
        if length == 126:
            length, at = struct.unpack("!H", wire[2:4])[0], 4
        elif length == 127:
            length, at = struct.unpack("!Q", wire[2:10])[0], 10
        if wire[0] & 0x0F == 0x8:
            codes.append(struct.unpack("!H", wire[at:at + 2])[0] if length >= 2 else None)
        wire = wire[at + length:]
    assert codes, "connection dropped without a close frame"
    assert codes[0] in {1000, 1002, 1003, 1007, 1008, 1009}, codes
