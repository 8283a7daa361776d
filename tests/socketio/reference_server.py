"""A reference wiring of the Sans-I/O Socket.IO pieces, for tests only.

aiohttp carries the HTTP and WebSocket I/O; ``engine.EngineSession`` and
``events.SocketIOConnection`` decide everything; channels are a dict. It
shows, in one small file, what the shard must do with each effect, and lets
real clients (socket.io-client, python-socketio) check the state machines
before the shard serves them. It is not the broker's adapter: no shards, no
history, no fan-out tables.

    server = ReferenceServer(EngineConfig(...), tokens={"good"})
    server.start()        # a thread with its own loop, on a free port
    server.publish("bill:1", {...})
    server.stop()
"""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from broker.adapters.socketio import engine as eio
from broker.adapters.socketio import events as ev
from broker.adapters.socketio import packets as pk
from broker.errors import SocketIOError
from broker.jsoncodec import encode_json
from broker.testing import free_port

__all__ = ["ReferenceServer"]


@dataclass(eq=False)
class _Entry:
    engine: eio.EngineSession
    sio: ev.SocketIOConnection
    outbox: eio.LineOutbox
    parked: asyncio.Future | None = None
    ws: web.WebSocketResponse | None = None
    probe: web.WebSocketResponse | None = None
    channels: set[str] = field(default_factory=set)


class ReferenceServer:
    def __init__(self, config: eio.EngineConfig, tokens: set[str] | None = None) -> None:
        self.config = config
        self.tokens = tokens            # None: anyone; else the accepted tokens
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.sessions: dict[str, _Entry] = {}
        self.subscribers: dict[str, set[_Entry]] = {}
        self.offsets: dict[str, int] = {}
        self.closed: list[tuple[str, int]] = []     # (reason, code) of every ended session
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="reference-sio")
        self._runner: web.AppRunner | None = None
        self._ticker: asyncio.Task | None = None

    # -- lifecycle (called from the test's thread) ---------------------------
    def start(self) -> ReferenceServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/socket.io/", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        self._ticker = asyncio.ensure_future(self._tick())

    def stop(self) -> None:
        async def _stop() -> None:
            if self._ticker is not None:
                self._ticker.cancel()
            if self._runner is not None:
                await self._runner.cleanup()
        asyncio.run_coroutine_threadsafe(_stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def call(self, fn: Any, *args: Any) -> Any:
        """Run ``fn(*args)`` on the server's loop and return its result."""
        async def run() -> Any:
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def publish(self, channel: str, data: Any) -> int:
        return self.call(self._publish, channel, data)

    def close_all(self, reason: str, after_ms: int) -> None:
        """Drain: the ``reconnect`` event, then the Engine.IO session closes."""
        self.call(self._close_all, reason, after_ms)

    # -- the wiring ----------------------------------------------------------
    def _now(self) -> float:
        return self.loop.time()

    def _publish(self, channel: str, data: Any) -> int:
        offset = self.offsets.get(channel, 0) + 1
        self.offsets[channel] = offset
        packet = pk.pub_packet(channel, offset, encode_json(data)) + pk.PACKET_END   # once
        for entry in list(self.subscribers.get(channel, ())):
            if not entry.outbox.append(packet):
                self._apply(entry, entry.engine.close(self._now(), "slow consumer", 1013))
                continue
            self._apply(entry, entry.engine.flush_poll())
            self._flush_ws(entry)
        return offset

    def _close_all(self, reason: str, after_ms: int) -> None:
        for entry in list(self.sessions.values()):
            self._apply(entry, entry.engine.queue(ev.reconnect_event(reason, after_ms), self._now()))
            self._apply(entry, entry.engine.close(self._now(), reason, 1012))

    def _queue(self, entry: _Entry, packet: bytes) -> None:
        self._apply(entry, entry.engine.queue(packet, self._now()))
        self._flush_ws(entry)

    def _flush_ws(self, entry: _Entry) -> None:
        if entry.engine.transport == eio.WEBSOCKET and entry.ws is not None and len(entry.outbox):
            for packet in pk.split_pending(entry.outbox.take()):
                asyncio.ensure_future(entry.ws.send_str(packet.decode()))

    def _apply(self, entry: _Entry, effects: list[eio.Effect]) -> eio.HttpResponse | None:
        """Carry out the effects; returns the answer to the current request."""
        reply = None
        for effect in effects:
            if isinstance(effect, eio.Reply):
                reply = effect.response
            elif isinstance(effect, eio.AnswerPoll):
                assert entry.parked is not None
                entry.parked.set_result(effect.response)
                entry.parked = None
            elif isinstance(effect, eio.ProbeSend):
                asyncio.ensure_future(entry.probe.send_str(effect.data.decode()))
            elif isinstance(effect, eio.ProbeClose):
                if entry.probe is not None:
                    asyncio.ensure_future(entry.probe.close())
                entry.probe = None
            elif isinstance(effect, eio.Upgraded):
                entry.ws, entry.probe = entry.probe, None
                self._flush_ws(entry)
            elif isinstance(effect, eio.Message):
                self._on_socketio(entry, effect.data)
            elif isinstance(effect, eio.Closed):
                self.closed.append((effect.reason, effect.code))
                for channel in entry.channels:
                    self.subscribers.get(channel, set()).discard(entry)
                if entry.ws is not None:
                    self._flush_ws(entry)
                    asyncio.ensure_future(entry.ws.close(code=effect.code))
            elif isinstance(effect, eio.Released):
                self.sessions.pop(entry.engine.sid, None)
            # Park: the caller holds the GET (see _handle)
        return reply

    def _on_socketio(self, entry: _Entry, text: str) -> None:
        outcome = entry.sio.on_message(text)
        now = self._now()
        if isinstance(outcome, ev.Connect):
            if self.tokens is None or outcome.token in self.tokens:
                self._queue(entry, entry.sio.accept(eio.new_socket_id()))
            else:
                self._queue(entry, entry.sio.refuse("invalid token"))
        elif isinstance(outcome, ev.Request):
            if outcome.event == "subscribe":
                if outcome.channel in entry.channels:
                    answer = ev.ack_error(outcome.ack_id, 409, "already subscribed") if outcome.ack_id is not None \
                        else None
                else:
                    entry.channels.add(outcome.channel)
                    self.subscribers.setdefault(outcome.channel, set()).add(entry)
                    answer = ev.ack_subscribed(outcome.ack_id, "ref", self.offsets.get(outcome.channel, 0)) \
                        if outcome.ack_id is not None else None
            elif outcome.event == "unsubscribe":
                entry.channels.discard(outcome.channel)
                self.subscribers.get(outcome.channel, set()).discard(entry)
                answer = ev.ack_ok(outcome.ack_id) if outcome.ack_id is not None else None
            else:
                answer = ev.ack_error(outcome.ack_id, 400, "not in the reference server") \
                    if outcome.ack_id is not None else None
            if answer is not None:
                self._queue(entry, answer)
        elif isinstance(outcome, ev.Refused):
            if outcome.ack_id is not None:
                self._queue(entry, ev.ack_error(outcome.ack_id, outcome.code, outcome.message))
        elif isinstance(outcome, ev.Send):
            self._queue(entry, outcome.packet)
        else:   # Leave, Violation
            self._apply(entry, entry.engine.close(now, getattr(outcome, "message", "client left"), 1000))

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(0.02)
            now = self._now()
            for entry in list(self.sessions.values()):
                if entry.sio.connect_overdue(now):
                    self._apply(entry, entry.engine.close(now, "no CONNECT in time", 1008))
                    continue
                deadline = entry.engine.next_deadline()
                if deadline is not None and now >= deadline:
                    self._apply(entry, entry.engine.tick(now))
                    self._flush_ws(entry)

    @staticmethod
    def _response(response: eio.HttpResponse) -> web.Response:
        return web.Response(status=response.status, body=response.body,
                            headers={"Content-Type": response.content_type.decode()})

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
        try:
            req = eio.parse_request(request.method, request.query_string, upgrade)
        except SocketIOError as exc:
            return self._response(eio.error_response(exc.engine_code, exc.message))
        now = self._now()
        if req.sid is None:   # handshake
            outbox = eio.LineOutbox(1 << 20)
            entry = _Entry(eio.EngineSession(eio.new_sid(0), req.transport, self.config, outbox, now),
                           ev.SocketIOConnection(now), outbox)
            self.sessions[entry.engine.sid] = entry
            if req.transport == eio.POLLING:
                return self._response(self._apply(entry, entry.engine.on_poll(now)))
            ws = web.WebSocketResponse(max_msg_size=self.config.max_payload)
            await ws.prepare(request)
            entry.ws = ws
            self._flush_ws(entry)
            await self._read_ws(entry, ws, probe=False)
            return ws
        entry = self.sessions.get(req.sid)
        if entry is None:
            return self._response(eio.error_response(eio.UNKNOWN_SID))
        if upgrade:
            refusal = self._apply(entry, entry.engine.on_probe_open(now))
            if refusal is not None:
                return self._response(refusal)
            ws = web.WebSocketResponse(max_msg_size=self.config.max_payload)
            await ws.prepare(request)
            entry.probe = ws
            await self._read_ws(entry, ws, probe=True)
            return ws
        if request.method == "GET":
            effects = entry.engine.on_poll(now)
            if any(isinstance(e, eio.Park) for e in effects):
                entry.parked = self.loop.create_future()
                waiting = entry.parked
                self._apply(entry, effects)
                return self._response(await waiting)
            return self._response(self._apply(entry, effects))
        body = await request.read()
        return self._response(self._apply(entry, entry.engine.on_post(body, self._now())))

    async def _read_ws(self, entry: _Entry, ws: web.WebSocketResponse, probe: bool) -> None:
        async for message in ws:
            now = self._now()
            data = message.data if message.type == WSMsgType.TEXT else bytes(message.data) \
                if message.type == WSMsgType.BINARY else None
            if data is None:
                break
            if ws is entry.probe:
                self._apply(entry, entry.engine.on_probe_message(data, now))
            elif ws is entry.ws:
                self._apply(entry, entry.engine.on_ws_message(data, now))
            self._flush_ws(entry)
        if ws is entry.probe:
            self._apply(entry, entry.engine.on_probe_closed(self._now()))
        elif ws is entry.ws:
            self._apply(entry, entry.engine.on_transport_closed(self._now()))
