"""The fan-out write cost of TLS against plain, per delivery: one batch frame
written to 200 connections. Plain: one send per connection (what the C
flush does). TLS: the same frame through each connection's own
``ssl.SSLObject`` (the object asyncio's and uvloop's TLS transports use),
then one send of the ciphertext. Both send into a real kernel socket (one
socketpair whose far end is drained every 64 sends, so neither row blocks);
the ratio of the two rows is the cost of TLS per delivery relative to a
plain one. Each call covers 200 deliveries."""
import socket
import ssl

import pytest

from broker.testing import self_signed_cert
from broker.tls import load_server_context

CONNS = 200
FRAME = b"\x81\x7e\x00\xa8" + b'{"op":"pub","channel":"bill:1","offset":1,"data":{"status":"passed","text":"' \
    + b"x" * 88 + b'"}}'


class Sink:
    """A kernel socket to send into; its peer is drained so sends never block."""

    def __init__(self) -> None:
        self.a, self.b = socket.socketpair()
        self.b.setblocking(False)
        self.sent = 0

    def send(self, data: bytes) -> None:
        self.a.send(data)
        self.sent += 1
        if self.sent % 64 == 0:
            try:
                while self.b.recv(1 << 20):
                    pass
            except BlockingIOError:
                pass

    def close(self) -> None:
        self.a.close()
        self.b.close()


@pytest.fixture(scope="module")
def sink():
    out = Sink()
    yield out
    out.close()


def _pump(src: ssl.MemoryBIO, dst: ssl.MemoryBIO) -> None:
    data = src.read()
    if data:
        dst.write(data)


def _tls_pair(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> tuple[ssl.SSLObject, ssl.MemoryBIO]:
    """A server SSLObject after a full handshake with an in-memory client."""
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="127.0.0.1")
    for _ in range(10):
        for side in (client, server):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
        _pump(c_out, s_in)
        _pump(s_out, c_in)
        try:
            server.do_handshake()
            client.do_handshake()
            break
        except ssl.SSLWantReadError:
            continue
    _pump(s_out, c_in)
    return server, s_out


@pytest.fixture(scope="module")
def tls_connections(tmp_path_factory):
    cert, key = self_signed_cert(str(tmp_path_factory.mktemp("tls")))
    server_ctx = load_server_context(cert, key)
    client_ctx = ssl.create_default_context(cafile=cert)
    return [_tls_pair(server_ctx, client_ctx) for _ in range(CONNS)]


def test_fanout_plain_200(benchmark, sink):
    def cycle():
        for _ in range(CONNS):
            sink.send(FRAME)

    benchmark.group = "fan-out write: TLS vs plain"
    benchmark(cycle)


def test_fanout_tls_200(benchmark, sink, tls_connections):
    def cycle():
        for server, outgoing in tls_connections:
            server.write(FRAME)
            sink.send(outgoing.read())

    benchmark.group = "fan-out write: TLS vs plain"
    benchmark(cycle)
    server, outgoing = tls_connections[0]
    server.write(FRAME)
    assert len(outgoing.read()) > len(FRAME)  # ciphertext, with its record header and tag
