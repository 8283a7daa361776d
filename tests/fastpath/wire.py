"""A real WebSocket client at the far end of a socketpair, for flush tests.

websockets' Sans-I/O ``ClientProtocol`` makes the browser's usual offer
(``permessage-deflate; client_max_window_bits``, plus a server window when
asked) and websockets' ``ServerProtocol`` answers it with the broker's
settings (no context takeover either way), so the client decodes what the
outbound table writes exactly as it would after a real opening handshake.
"""
from __future__ import annotations

import socket

from websockets.client import ClientProtocol
from websockets.extensions.permessage_deflate import (
    ClientPerMessageDeflateFactory,
    ServerPerMessageDeflateFactory,
)
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

__all__ = ["Peer", "read_all"]


def read_all(sock: socket.socket) -> bytes:
    """Everything the socket holds right now (non-blocking)."""
    sock.setblocking(False)
    out = bytearray()
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return bytes(out)
        if not chunk:
            return bytes(out)
        out += chunk


def _open_client(compress: bool, server_max_window_bits: int | None) -> ClientProtocol:
    offer = ([ClientPerMessageDeflateFactory(server_max_window_bits=server_max_window_bits,
                                             client_max_window_bits=True)]
             if compress else None)
    client = ClientProtocol(parse_uri("ws://127.0.0.1/ws"), extensions=offer, max_size=None)
    client.send_request(client.connect())
    server = ServerProtocol(extensions=[ServerPerMessageDeflateFactory(
        server_no_context_takeover=True, client_no_context_takeover=True)])
    server.receive_data(b"".join(client.data_to_send()))
    (request,) = server.events_received()
    server.send_response(server.accept(request))
    client.receive_data(b"".join(server.data_to_send()))
    client.events_received()  # the 101 response
    assert client.state is State.OPEN
    return client


class Peer:
    """One connection: ``fd`` is the server's end (give it to ``set_fd``);
    ``frames()`` decodes what arrived at the client's end."""

    def __init__(self, compress: bool = False, server_max_window_bits: int | None = None,
                 sndbuf: int | None = None) -> None:
        self.server_sock, self.client_sock = socket.socketpair()
        self.server_sock.setblocking(False)
        if sndbuf is not None:
            self.server_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        self.client = _open_client(compress, server_max_window_bits)
        self.raw = b""

    @property
    def fd(self) -> int:
        return self.server_sock.fileno()

    @property
    def window_bits(self) -> int:
        """The server window the handshake agreed (0: no compression)."""
        if not self.client.extensions:
            return 0
        return self.client.extensions[0].remote_max_window_bits or 15

    def frames(self, extra: bytes = b"") -> list[Frame]:
        """Decode what arrived (plus ``extra``, e.g. an unsent tail)."""
        data = read_all(self.client_sock) + extra
        self.raw += data
        self.client.receive_data(data)
        frames = self.client.events_received()
        assert self.client.state is State.OPEN, self.client.parser_exc
        assert all(f.opcode is Opcode.TEXT and f.fin for f in frames)
        return frames

    def messages(self, extra: bytes = b"") -> list[bytes]:
        return [f.data for f in self.frames(extra)]

    def close(self) -> None:
        self.server_sock.close()
        self.client_sock.close()
