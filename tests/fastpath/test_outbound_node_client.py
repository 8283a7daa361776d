"""What the C flush writes, read by a browser's WebSocket API: Node's
WHATWG WebSocket makes the browsers' usual offer
(``permessage-deflate; client_max_window_bits``), the broker's handshake
answers it, and the client must decode the compressed frames of both
WebSocket framing kinds. Node is a test dependency: under CI=true its
absence is a failure."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from broker.config import Config
from broker.handshake import Accepted, negotiate
from broker.httpmsg import Request

CLIENT = Path(__file__).with_name("ws_receive.mjs")


def node_command() -> list[str]:
    node = shutil.which("node")
    if node is None:
        if os.environ.get("CI") == "true":
            pytest.fail("node is required under CI=true")
        pytest.skip("node is not installed")
    has_websocket = subprocess.run(
        [node, "-e", "process.exit(typeof WebSocket === 'function' ? 0 : 1)"],
        capture_output=True, timeout=30).returncode == 0
    return [node] if has_websocket else [node, "--experimental-websocket"]


def accept_upgrade(conn: socket.socket) -> Accepted:
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = conn.recv(4096)
        assert chunk, "the client closed during the handshake"
        head += chunk
    request_line, *header_lines = head.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    method, target, _ = request_line.split(" ")
    accepted = negotiate(Request(method, target, "", headers), Config(allow_anonymous=True))
    assert isinstance(accepted, Accepted), accepted
    assert headers["sec-websocket-extensions"] == "permessage-deflate; client_max_window_bits"
    conn.sendall(accepted.response)
    return accepted


def test_a_browser_client_decodes_compressed_frames(ringbuf):
    command = node_command()
    native = [b'{"n":1}', b'{"n":2}', b'{"op":"pub","data":"' + b"abcdefgh" * 600 + b'"}']
    packets = [b'42["pub",{"offset":1}]', b'42["pub",{"offset":2}]']
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(20)
        port = server.getsockname()[1]
        client = subprocess.Popen(
            [*command, str(CLIENT), f"ws://127.0.0.1:{port}/ws", str(1 + len(packets))],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            conn, _ = server.accept()
            with conn:
                conn.settimeout(20)
                accepted = accept_upgrade(conn)
                assert accepted.deflate is not None and accepted.window_bits == 15
                table = ringbuf.OutboundTable(1 << 20)
                table.open(1)
                table.set_framing(1, ringbuf.FRAMING_NATIVE, accepted.window_bits)
                table.set_fd(1, conn.fileno())
                for line in native:
                    table.append(1, line + b"\n")
                assert table.flush() == ([], [])
                table.set_framing(1, ringbuf.FRAMING_EIO_WS, accepted.window_bits)
                for packet in packets:
                    table.append(1, packet + b"\n")
                assert table.flush() == ([], [])
                assert table.compressions == 3
                # The client closes once it has every message: answer its
                # close frame with ours (1000) for a clean close.
                assert conn.recv(1024)[:1] == b"\x88"
                conn.sendall(b"\x88\x02\x03\xe8")
            out, err = client.communicate(timeout=30)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait()
    events = [json.loads(line) for line in out.splitlines()]
    assert events[0] == {
        "extensions": "permessage-deflate; server_no_context_takeover; client_no_context_takeover"}, err
    messages = [e["message"].encode() for e in events if "message" in e]
    assert messages == [b"\n".join(native), *packets], err
    assert events[-1] == {"close": 1000}, err
