"""Baseline: a minimal websockets ``broadcast()`` server on uvloop.

    python benchmarks/baselines/websockets_server.py --port 8801 --http-port 8802

WebSocket at ws://HOST:PORT/ws (subscribe -> subscribed with the channel's
offset; ping -> pong; publish -> published); publications come in on the HTTP port
(``POST /api/publish``) or over a WebSocket (``publish``) and go out with ``websockets.asyncio.server.broadcast``
(one text frame per subscriber, the message encoded once).
"""
from __future__ import annotations

import asyncio
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from websockets.asyncio.server import ServerConnection, broadcast, serve

from _common import Channels, HttpApi, command_replies, parse_args, run


def _deliver(subscribers: set[ServerConnection], line: bytes) -> None:
    broadcast(subscribers, line, text=True)


async def main(stop: asyncio.Event) -> None:
    args = parse_args(__doc__.splitlines()[0])
    channels = Channels(_deliver)

    async def handler(ws: ServerConnection) -> None:
        subscribed: list[str] = []
        try:
            async for message in ws:
                for reply in command_replies(message, channels, ws, subscribed):
                    await ws.send(reply, text=True)
        finally:
            channels.unsubscribe_all(ws, subscribed)

    loop = asyncio.get_running_loop()
    http = await loop.create_server(lambda: HttpApi(channels), args.host, args.http_port, backlog=4096)
    async with serve(handler, args.host, args.port, backlog=4096, ping_interval=None):
        print(f"websockets baseline on ws://{args.host}:{args.port}/ws, http://{args.host}:{args.http_port}",
              flush=True)
        await stop.wait()
    http.close()


if __name__ == "__main__":
    run(main)
