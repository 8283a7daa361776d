"""Baseline: a minimal picows server on uvloop (a plain broadcast loop).

    python benchmarks/baselines/picows_server.py --port 8801 --http-port 8802

WebSocket at ws://HOST:PORT/ws (subscribe -> subscribed with the channel's
offset; ping -> pong; publish -> published); publications come in on the HTTP port
(``POST /api/publish``) or over a WebSocket (``publish``) and go out as one ``transport.send`` (one text frame,
one write) per subscriber.
"""
from __future__ import annotations

import asyncio
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from picows import WSListener, WSMsgType, WSTransport, WSUpgradeRequest, ws_create_server

from _common import Channels, HttpApi, command_replies, parse_args, run

_TEXT = WSMsgType.TEXT


def _deliver(subscribers: set[WSTransport], line: bytes) -> None:
    for transport in subscribers:
        transport.send(_TEXT, line)


async def main(stop: asyncio.Event) -> None:
    args = parse_args(__doc__.splitlines()[0])
    channels = Channels(_deliver)

    class Client(WSListener):
        def __init__(self) -> None:
            self.subscribed: list[str] = []

        def on_ws_frame(self, transport: WSTransport, frame) -> None:  # type: ignore[no-untyped-def]
            if frame.msg_type == WSMsgType.TEXT:
                for reply in command_replies(frame.get_payload_as_bytes(), channels, transport, self.subscribed):
                    transport.send(_TEXT, reply)
            elif frame.msg_type == WSMsgType.CLOSE:
                transport.send_close(frame.get_close_code())
                transport.disconnect()

        def on_ws_disconnected(self, transport: WSTransport) -> None:
            channels.unsubscribe_all(transport, self.subscribed)

    def factory(request: WSUpgradeRequest) -> WSListener | None:
        return Client() if request.path.split(b"?", 1)[0] == b"/ws" else None

    loop = asyncio.get_running_loop()
    http = await loop.create_server(lambda: HttpApi(channels), args.host, args.http_port, backlog=4096)
    server = await ws_create_server(factory, args.host, args.port, backlog=4096)
    print(f"picows baseline on ws://{args.host}:{args.port}/ws, http://{args.host}:{args.http_port}", flush=True)
    await stop.wait()
    server.close()
    http.close()


if __name__ == "__main__":
    run(main)
