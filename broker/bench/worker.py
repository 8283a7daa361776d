"""The load generator's worker processes.

Two roles, each a process of its own with its own uvloop loop, started by
``broker.bench.runner`` before any loop exists in the parent:

* receivers: picows WebSocket clients (a slice of the run's connections
  each). They subscribe, then count every publication line: per-connection
  offsets (gaps, duplicates) and the latency from the timestamp the
  publisher put in ``data.ts`` (``time.monotonic_ns()``: CLOCK_MONOTONIC is
  one clock for every process of the host).
* publisher: keep-alive HTTP/1.1 connections posting ``POST /api/publish``
  on a schedule (open loop: publication i is due at t0 + i/rate), keeping
  every channel's last acknowledged offset so receivers know what to expect.

Against NATS (``protocol`` "nats") the same roles speak the NATS protocol
instead: see ``broker.bench.natsclient``.

Parent and worker talk over a ``multiprocessing`` pipe (commands in,
reports out). Progress goes through a shared int64 array the parent polls.
Every worker arms ``SIGALRM`` with its whole budget, so it ends by itself
even if the parent dies.
"""
from __future__ import annotations

import asyncio
import collections
import functools
import json
import os
import random
import resource
import signal
import sys
import time
import zlib
from array import array
from collections import Counter
from typing import Any

__all__ = [
    "Receiver",
    "SocketIOReceiver",
    "channel_of",
    "publication_body",
    "publication_data",
    "raise_nofile_limit",
    "receiver_main",
    "publisher_main",
    "SLOT_CONNECTED", "SLOT_FAILED", "SLOT_RECEIVED", "SLOT_DISCONNECTS", "SLOT_PUBLISHED", "SLOTS",
]

# Layout of one worker's slots in the shared progress array.
SLOT_CONNECTED, SLOT_FAILED, SLOT_RECEIVED, SLOT_DISCONNECTS, SLOT_PUBLISHED, SLOT_PUB_FAILED = range(6)
SLOTS = 6

FANOUT_CHANNEL = "bill:1"
STREAM_IN_FLIGHT = 1000  # pipelined stream commands awaiting their reply, at most
_PAD = "x" * 150   # data is ~200 bytes: {"ts":<16-19 digits>,"seq":N,"pad":"xxx..."}
_PAD_BYTES = _PAD.encode()

_monotonic_ns = time.monotonic_ns


def raise_nofile_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20  # pragma: no cover - Linux caps RLIMIT_NOFILE at fs.nr_open; infinite on macOS only
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # pragma: no cover - raising soft to hard fails only past macOS's OPEN_MAX
            pass
    return soft


def channel_of(spec: dict[str, Any], index: int) -> str | None:
    """The channel connection ``index`` subscribes to (None: an idle W3 connection)."""
    if index < spec["fanout_connections"]:
        return FANOUT_CHANNEL
    index -= spec["fanout_connections"]
    if index < spec["user_connections"]:
        return f"user:{index}"
    return None


def publication_data(seq: int, ts_ns: int) -> bytes:
    """A publication's ``data`` (the whole payload for NATS): ``ts`` first so
    receivers find it right after the ``{``."""
    return b'{"ts":%d,"seq":%d,"pad":"%s"}' % (ts_ns, seq, _PAD_BYTES)


def publication_body(channel: str, seq: int, ts_ns: int) -> bytes:
    """The JSON body of one ``POST /api/publish``: the channel and ``data``."""
    return b'{"channel":"%s","data":%s}' % (channel.encode(), publication_data(seq, ts_ns))


# -- receivers -----------------------------------------------------------------------

try:  # picows is needed by the receivers only; keep the pure parts importable without it
    from picows import WSListener, WSMsgType, WSCloseCode
except ImportError:  # pragma: no cover - picows comes with the test extra, which the suite runs under
    WSListener = object  # type: ignore[misc,assignment]
    WSMsgType = WSCloseCode = None  # type: ignore[misc,assignment]

_NEVER = b"\x00never"


def _inflate(payload: bytes) -> bytes:
    """One permessage-deflate message (RFC 7692: the stripped tail restored)."""
    return zlib.decompressobj(-zlib.MAX_WBITS).decompress(payload + b"\x00\x00\xff\xff")


# What a browser offers (RFC 7692), for --deflate runs.
DEFLATE_OFFER = {"Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits"}


class Receiver(WSListener):
    """One client connection subscribed to (at most) one channel.

    ``feed(payload, now_ns)`` is the whole per-frame work and has no I/O,
    so tests drive it directly. The fast path matches the broker's line
    prefix ``{"op":"pub","channel":"<ch>","offset":`` (which also checks the
    channel) and takes the offset and ``"ts":`` with bytes.find; anything
    else (replies, other key orders, control messages) goes to json.loads.
    """

    __slots__ = ("channel", "prefix", "plen", "start", "last", "received", "duplicates", "gaps",
                 "missing", "latencies", "ready", "transport", "close_code", "errors", "unsubscribed",
                 "reconnects", "early", "_fragments", "_sub_command", "_loop",
                 "epoch", "after_ms", "recovering", "reopen", "reconnect_delays", "_lost_ns")

    def __init__(self, channel: str | None, latencies: array[int], ready: asyncio.Future[None] | None = None) -> None:
        self.channel = channel
        self.prefix = _NEVER
        self.plen = len(_NEVER)
        self.start: int | None = None
        self.last = 0
        self.received = 0
        self.duplicates = 0
        self.gaps = 0
        self.missing = 0
        self.latencies = latencies
        self.ready = ready
        self.transport: Any = None
        self.close_code: int | None = None
        self.errors: list[str] = []
        self.unsubscribed = 0
        self.reconnects = 0
        self.early = 0
        self._fragments: list[bytes] | None = None
        self._sub_command = (b'{"id":1,"op":"subscribe","channel":"%s"}' % channel.encode()) if channel else b""
        # Following the broker's {"op":"reconnect"} (a deploy's paced migration):
        self.epoch: str | None = None
        self.after_ms: int | None = None          # set by a reconnect op, used at the close
        self.recovering = False
        self.reopen: Any = None                   # reopen(receiver, after_ms): set by the worker
        self.reconnect_delays: list[int] = []     # ns from the close to the recovered subscribe
        self._lost_ns = 0

    # picows callbacks ------------------------------------------------------------
    def on_ws_connected(self, transport: Any) -> None:
        self.transport = transport
        self.close_code = None
        if self.channel and self.epoch is not None:  # a reconnection: recover what was missed
            self.recovering = True
            transport.send(WSMsgType.TEXT, self.recover_command())
        elif self.channel:
            transport.send(WSMsgType.TEXT, self._sub_command)
        else:
            self._resolve(None)

    def recover_command(self) -> bytes:
        return json.dumps({"id": 2, "op": "subscribe", "channel": self.channel,
                           "recover": {"epoch": self.epoch, "offset": self.last}}).encode()

    def on_ws_frame(self, transport: Any, frame: Any) -> None:
        msg_type = frame.msg_type
        if msg_type is WSMsgType.TEXT:
            if frame.rsv1:  # permessage-deflate, no context takeover: each message alone
                self.feed(_inflate(frame.get_payload_as_bytes()), _monotonic_ns())
            elif frame.fin:
                self.feed(frame.get_payload_as_bytes(), _monotonic_ns())
            else:
                self._fragments = [frame.get_payload_as_bytes()]
        elif msg_type is WSMsgType.CONTINUATION:
            if self._fragments is not None:
                self._fragments.append(frame.get_payload_as_bytes())
                if frame.fin:
                    payload = b"".join(self._fragments)
                    self._fragments = None
                    self.feed(payload, _monotonic_ns())
        elif msg_type is WSMsgType.CLOSE:
            self.close_code = frame.get_close_code().value if frame.payload_size >= 2 else 1005
            try:
                transport.send_close(WSCloseCode.OK)
            finally:
                transport.disconnect()

    def on_ws_disconnected(self, transport: Any) -> None:
        if self.close_code is None:
            self.close_code = 1006
        self._resolve(ConnectionError(f"disconnected ({self.close_code})"))
        self.disconnected(_monotonic_ns())

    def disconnected(self, now_ns: int) -> None:
        """After a reconnect op, come back (as the Python Client does) once
        ``after_ms`` has passed; the worker's ``reopen`` adds jitter and retries."""
        after, self.after_ms = self.after_ms, None
        if after is not None and self.reopen is not None and self.epoch is not None:
            self._lost_ns = now_ns
            self.reopen(self, after)

    # pure part ---------------------------------------------------------------------
    def feed(self, payload: bytes, now_ns: int) -> None:
        """Account one text message (one or more ``\\n``-separated lines)."""
        prefix = self.prefix
        plen = self.plen
        append = self.latencies.append
        for line in (payload.split(b"\n") if b"\n" in payload else (payload,)):
            if line.startswith(prefix):
                comma = line.find(b",", plen)
                if not self._count(int(line[plen:comma])):
                    continue
                ts_at = line.find(b'"ts":', comma)
                if ts_at > 0:
                    end = line.find(b",", ts_at)
                    try:
                        append(now_ns - int(line[ts_at + 5:end]))
                    except ValueError:  # "ts" last in its object, or not an int
                        pass
            elif line:
                self._slow_line(line, now_ns)

    def _count(self, offset: int) -> bool:
        """Account one publication's offset: False for a duplicate (ignore
        it), True otherwise, counting any gap it reveals."""
        last = self.last
        if offset <= last:
            self.duplicates += 1
            return False
        if offset > last + 1:
            self.gaps += 1
            self.missing += offset - last - 1
        self.last = offset
        self.received += 1
        return True

    def _slow_line(self, line: bytes, now_ns: int) -> None:
        try:
            msg = json.loads(line)
        except ValueError:
            self.errors.append(f"bad json: {line[:80]!r}")
            return
        if not isinstance(msg, dict):
            self.errors.append(f"not an object: {line[:80]!r}")
            return
        op = msg.get("op")
        if op == "pub":
            if msg.get("channel") != self.channel:
                self.errors.append(f"pub on unexpected channel {msg.get('channel')!r}")
                return
            if self.start is None:
                self.early += 1
                return
            if not self._count(int(msg.get("offset", -1))):
                return
            data = msg.get("data")
            if isinstance(data, dict) and isinstance(data.get("ts"), int):
                self.latencies.append(now_ns - data["ts"])
        elif op == "subscribed" and msg.get("channel") == self.channel and self.recovering:
            self.recovering = False
            self.reconnect_delays.append(now_ns - self._lost_ns)
            if msg.get("recovered") is not True or msg.get("epoch") != self.epoch:
                self.errors.append(f"not recovered after a reconnect: {msg}")
        elif op == "subscribed" and msg.get("channel") == self.channel:
            self.epoch = msg.get("epoch")
            self.start = self.last = int(msg.get("offset", 0))
            self.prefix = b'{"op":"pub","channel":"%s","offset":' % self.channel.encode()  # type: ignore[union-attr]
            self.plen = len(self.prefix)
            self._resolve(None)
        elif op == "error":
            self.errors.append(f"error {msg.get('code')}: {msg.get('message')}")
            self._resolve(RuntimeError(f"error {msg.get('code')}: {msg.get('message')}"))
        elif op == "unsubscribed":
            self.unsubscribed += 1
            self.errors.append(f"unsubscribed: {msg.get('reason')}")
        elif op == "reconnect":
            self.reconnects += 1
            after_ms = msg.get("after_ms")
            self.after_ms = int(after_ms) if isinstance(after_ms, (int, float)) else 0
        # pong and anything else: ignored

    def _resolve(self, exc: BaseException | None) -> None:
        ready = self.ready
        if ready is not None and not ready.done():
            if exc is None:
                ready.set_result(None)
            else:
                ready.set_exception(exc)

    def report(self, final: int | None) -> dict[str, int]:
        """This connection's counters; ``final`` is the channel's last offset."""
        expected = 0
        if self.start is not None and final is not None:
            expected = max(0, final - self.start)
        return {"expected": expected, "received": self.received, "duplicates": self.duplicates,
                "gaps": self.gaps, "missing": self.missing, "unsubscribed": self.unsubscribed,
                "reconnects": self.reconnects, "reconnected": len(self.reconnect_delays),
                "early": self.early}


class SocketIOReceiver(Receiver):
    """A Receiver speaking Engine.IO 4 / Socket.IO 5 over the WebSocket
    transport (one packet per frame): it answers the open packet with a
    CONNECT (``auth.token`` when it has one), subscribes with an ack once
    connected, answers pings, and counts ``42["pub",{"channel":..,"offset":..``
    packets with the same byte-level fast path as the native receiver."""

    __slots__ = ("token",)

    def __init__(self, channel: str | None, latencies: array[int], ready: asyncio.Future[None] | None = None,
                 token: str | None = None) -> None:
        super().__init__(channel, latencies, ready)
        self.token = token
        self._sub_command = (b'420["subscribe",{"channel":"%s"}]' % channel.encode()) if channel else b""

    def on_ws_connected(self, transport: Any) -> None:
        self.transport = transport    # the open packet comes first

    def _send(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.send(WSMsgType.TEXT, data)

    def _slow_line(self, line: bytes, now_ns: int) -> None:
        kind = line[:2]
        if line == b"2":
            self._send(b"3")
        elif line[:1] == b"0":                     # Engine.IO open: join "/"
            self._send(b"40" + (json.dumps({"token": self.token}).encode() if self.token else b""))
        elif kind == b"40":                        # Socket.IO CONNECT answer
            if self.channel:
                self._send(self._sub_command)
            else:
                self._resolve(None)
        elif kind == b"44":
            self.errors.append(f"connect refused: {line[2:82]!r}")
            self._resolve(RuntimeError(f"connect refused: {line[2:82]!r}"))
        elif line.startswith(b"430["):             # the subscribe ack
            ack = json.loads(line[3:])[0]
            if not ack.get("ok"):
                self.errors.append(f"error {ack.get('code')}: {ack.get('message')}")
                self._resolve(RuntimeError(f"error {ack.get('code')}: {ack.get('message')}"))
                return
            self.start = self.last = int(ack.get("offset", 0))
            self.prefix = b'42["pub",{"channel":"%s","offset":' % self.channel.encode()  # type: ignore[union-attr]
            self.plen = len(self.prefix)
            self._resolve(None)
        elif line.startswith(b'42["pub"'):
            self.early += 1
        elif line.startswith(b'42["unsubscribed"'):
            self.unsubscribed += 1
            self.errors.append(f"unsubscribed: {line[2:82]!r}")
        elif line.startswith(b'42["reconnect"'):
            self.reconnects += 1
        elif line[:1] not in (b"1", b"6", b"4"):
            self.errors.append(f"unexpected packet: {line[:80]!r}")


def _install_budget(seconds: float) -> None:
    """The worker's own deadline: SIGALRM's default action ends the process."""
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.alarm(max(1, int(seconds)))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle


def _new_loop() -> asyncio.AbstractEventLoop:
    loop: asyncio.AbstractEventLoop
    try:
        import uvloop
        loop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a dependency on every platform the bench runs on
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    return loop


class _Commands:
    """The parent's commands, read from the pipe inside the loop."""

    # A thread does the blocking reads: loop.add_reader would make the pipe
    # non-blocking, and then a large report could not be sent in one go.

    def __init__(self, loop: asyncio.AbstractEventLoop, conn: Any) -> None:
        import threading

        self.conn = conn
        self.loop = loop
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        threading.Thread(target=self._read, daemon=True, name="commands").start()

    def _read(self) -> None:
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                msg = ("exit",)
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, msg)
            except RuntimeError:  # loop closed
                return
            if msg[0] in ("exit", "close"):
                return

    async def next(self) -> tuple[Any, ...]:
        item: tuple[Any, ...] = await self.queue.get()
        return item


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _receivers(conn: Any, progress: Any, base: int, params: dict[str, Any]) -> None:
    from picows import ws_connect

    loop = asyncio.get_running_loop()
    commands = _Commands(loop, conn)
    spec = params["spec"]
    indices: list[int] = params["indices"]
    ws_url: str = params["ws_url"]
    secret: str | None = params.get("jwt_secret")
    latencies = array("q")
    receivers: list[Receiver] = []
    connect_errors: Counter[str] = Counter()
    state = {"connected": 0, "failed": 0}

    async def publish_progress() -> None:
        while True:
            progress[base + SLOT_CONNECTED] = state["connected"]
            progress[base + SLOT_FAILED] = state["failed"]
            progress[base + SLOT_RECEIVED] = sum(r.received for r in receivers)
            progress[base + SLOT_DISCONNECTS] = sum(1 for r in receivers if r.close_code is not None)
            await asyncio.sleep(0.25)

    ticker = loop.create_task(publish_progress())
    conn.send(("ready", os.getpid()))
    times: dict[str, float] = {}
    try:
        while True:
            cmd = await commands.next()
            if cmd[0] == "connect":
                tokens = _mint_tokens(spec, indices, secret)   # before the clock starts
                times["start"] = time.monotonic()
                await _connect_all(ws_connect, ws_url, spec, indices, tokens, latencies, receivers,
                                   connect_errors, state, params.get("concurrency", 64),
                                   bool(params.get("deflate")), params.get("protocol", "native"))
                times["end"] = time.monotonic()
                conn.send(("connected", {"connected": state["connected"], "failed": state["failed"],
                                         "start": times["start"], "end": times["end"],
                                         "errors": dict(connect_errors.most_common(5))}))
            elif cmd[0] == "drain":
                finals: dict[str, int] = cmd[1]
                await _drain(receivers, finals, cmd[2])
                parts = [r.report(finals.get(r.channel or "")) for r in receivers if r.channel]
                totals: dict[str, Any] = {}
                for part in parts:
                    for key, value in part.items():
                        totals[key] = totals.get(key, 0) + value
                errors: Counter[str] = Counter()
                for r in receivers:
                    for message in r.errors[:3]:
                        errors[message] += 1
                codes = Counter(str(r.close_code) for r in receivers if r.close_code is not None)
                conn.send(("report", {"counts": totals, "close_codes": dict(codes),
                                      "errors": dict(errors.most_common(5)),
                                      "latencies": latencies.tobytes()}))
            elif cmd[0] in ("close", "exit"):
                for r in receivers:
                    if r.transport is not None and r.close_code is None:
                        r.transport.disconnect(False)
                await asyncio.sleep(0.05)
                if cmd[0] == "close":
                    conn.send(("closed", _cpu_seconds()))
                return
    finally:
        ticker.cancel()


def _mint_tokens(spec: dict[str, Any], indices: list[int], secret: str | None) -> dict[int, str]:
    """An HS256 JWT (sub = <i>) for every connection on user:<i>."""
    tokens: dict[int, str] = {}
    if spec["user_connections"] and secret:
        import warnings

        import jwt
        warnings.filterwarnings("ignore", category=getattr(jwt, "InsecureKeyLengthWarning", UserWarning))
        exp = int(time.time()) + 3600
        for index in indices:
            channel = channel_of(spec, index)
            if channel and channel.startswith("user:"):
                tokens[index] = jwt.encode({"sub": channel[5:], "exp": exp}, secret, algorithm="HS256")
    return tokens


async def _connect_all(ws_connect: Any, ws_url: str, spec: dict[str, Any], indices: list[int],
                       tokens: dict[int, str], latencies: array[int], receivers: list[Receiver],
                       errors: Counter[str], state: dict[str, int], concurrency: int,
                       deflate: bool = False, protocol: str = "native") -> None:
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(max(1, concurrency))

    socketio = "/socket.io/" in ws_url
    nats = protocol == "nats"
    if nats:
        from .natsclient import NatsReceiver

    async def one(index: int) -> None:
        channel = channel_of(spec, index)
        url = ws_url if index not in tokens or socketio or nats else f"{ws_url}?token={tokens[index]}"
        async with gate:
            ready = loop.create_future()
            receiver: Receiver
            if socketio:
                receiver = SocketIOReceiver(channel, latencies, ready, tokens.get(index))
            elif nats:
                receiver = NatsReceiver(channel, latencies, ready)
            else:
                receiver = Receiver(channel, latencies, ready)
            try:
                await ws_connect(lambda: receiver, url, websocket_handshake_timeout=15,
                                 read_buffer_init_size=4096, extra_headers=DEFLATE_OFFER if deflate else None)
                await asyncio.wait_for(ready, 15)
            except Exception as exc:
                state["failed"] += 1
                errors[f"{type(exc).__name__}: {str(exc)[:80]}"] += 1
                if receiver.transport is not None:
                    receiver.transport.disconnect(False)
                return
            receiver.reopen = lambda r, after_ms, url=url: reopen(r, after_ms, url)
            receivers.append(receiver)
            state["connected"] += 1

    def reopen(receiver: Receiver, after_ms: int, url: str) -> None:
        # About after_ms plus jitter, then up to 8 attempts with backoff.
        async def again() -> None:
            await asyncio.sleep(after_ms / 1000 + random.uniform(0, max(0.05, after_ms / 4000)))
            for attempt in range(8):
                try:
                    await ws_connect(lambda: receiver, url, websocket_handshake_timeout=15,
                                     read_buffer_init_size=4096)
                    return
                except Exception as exc:
                    errors[f"reconnect {type(exc).__name__}: {str(exc)[:60]}"] += 1
                    await asyncio.sleep(min(2.0, 0.05 * 2 ** attempt))
        loop.create_task(again())

    await asyncio.gather(*(one(i) for i in indices))


async def _drain(receivers: list[Receiver], finals: dict[str, int], timeout: float) -> None:
    """Wait until every live connection saw its channel's final offset, or until
    nothing arrived for a while, or ``timeout``."""
    deadline = time.monotonic() + timeout
    last_total, quiet_since = -1, time.monotonic()
    while time.monotonic() < deadline:
        pending = [r for r in receivers if r.channel and r.close_code is None and r.start is not None
                   and r.last < finals.get(r.channel, r.start)]
        if not pending:
            return
        total = sum(r.received for r in receivers)
        now = time.monotonic()
        if total != last_total:
            last_total, quiet_since = total, now
        elif now - quiet_since > 3.0:
            return
        await asyncio.sleep(0.05)


def _process_main(main: Any, conn: Any, progress: Any, base: int, params: dict[str, Any]) -> None:
    """Run one load-generator process's coroutine under its time budget, then
    exit without the interpreter's teardown of thousands of transports."""
    _install_budget(params["budget"])
    raise_nofile_limit()
    loop = _new_loop()
    try:
        loop.run_until_complete(main(conn, progress, base, params))
    finally:  # no KeyboardInterrupt to catch: _install_budget ignores SIGINT here
        try:
            conn.close()
        except OSError:
            pass
    sys.stdout.flush()
    os._exit(0)


def receiver_main(conn: Any, progress: Any, base: int, params: dict[str, Any]) -> None:
    """Entry point of a receiver process."""
    _process_main(_receivers, conn, progress, base, params)


# -- publisher ---------------------------------------------------------------------------

class _HttpConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 client connection, one request in flight."""

    def __init__(self) -> None:
        import httptools
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.body: list[bytes] = []
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except Exception as exc:
            self._fail(exc)

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        body = b"".join(self.body)
        self.body = []
        if not self.parser.should_keep_alive():
            self.closed = True
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result((status, body))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(exc or ConnectionError("connection closed"))

    def _fail(self, exc: BaseException) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def request(self, raw: bytes) -> asyncio.Future[tuple[int, bytes]]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return self.waiter


class _BackendStream(WSListener):
    """A backend's publishing WebSocket: the broker's backend stream
    (``GET /api/stream``) or a baseline's ``publish`` command. Pipelined,
    as ``AsyncPublisher(stream=True)`` is: each publication is sent when it
    is due, without waiting for the replies before it (answered in command
    order, matched first in, first out)."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.waiters: collections.deque[asyncio.Future[tuple[int, bytes]]] = collections.deque()
        self.closed = False

    def on_ws_connected(self, transport: Any) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: Any, frame: Any) -> None:
        if frame.msg_type is WSMsgType.CLOSE:
            self.closed = True
            transport.disconnect()
            return
        if frame.msg_type is not WSMsgType.TEXT:
            return
        for payload in frame.get_payload_as_bytes().split(b"\n"):
            if not payload.strip() or not self.waiters:
                continue
            # a "published" reply answers like a 200 from /api/publish
            status = 200 if b'"op":"published"' in payload else 503
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result((status, payload))

    def on_ws_disconnected(self, transport: Any) -> None:
        self.closed = True
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ConnectionError("backend stream closed"))

    def request(self, body: bytes) -> asyncio.Future[tuple[int, bytes]]:
        waiter: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        self.transport.send(WSMsgType.TEXT, b'{"op":"publish",' + body[1:])
        return waiter


class _Stream:
    """One publication schedule: ``total`` publications at ``rate`` per second."""

    def __init__(self, name: str, rate: float, total: int, channels: int, http_conns: int, seed: int,
                 seconds: float | None = None) -> None:
        self.name = name
        self.rate = rate                 # 0: no schedule, as fast as the server answers
        self.seconds = seconds           # publish for this long (flood), else until ``total``
        self.total = total
        self.channels = channels         # 0: the fan-out channel; N: user:<random below N>
        self.http_conns = http_conns
        self.next = 0
        self.rng = random.Random(seed)

    def channel(self) -> str:
        if not self.channels:
            return FANOUT_CHANNEL
        return f"user:{self.rng.randrange(self.channels)}"


async def _publisher(conn: Any, progress: Any, base: int, params: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    commands = _Commands(loop, conn)
    host, port, api_key = params["http_host"], params["http_port"], params.get("api_key") or ""
    head = (f"POST /api/publish HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Authorization: apikey {api_key}\r\nContent-Type: application/json\r\n"
            "Content-Length: %d\r\n\r\n").encode()
    streams = [_Stream(**s) for s in params["streams"]]
    finals: dict[str, int] = {}
    statuses: Counter[str] = Counter()
    state = {"ok": 0, "failed": 0}

    async def publish_progress() -> None:
        while True:
            progress[base + SLOT_PUBLISHED] = state["ok"]
            progress[base + SLOT_PUB_FAILED] = state["failed"]
            await asyncio.sleep(0.25)

    over_stream = params.get("publish_over") == "stream"

    async def connect() -> Any:
        if over_stream:
            from picows import ws_connect

            url = params.get("stream_url") or f"ws://{host}:{port}/api/stream"
            _, listener = await ws_connect(_BackendStream, url,
                                           extra_headers={"Authorization": f"apikey {api_key}"})
            return listener
        _, proto = await loop.create_connection(_HttpConnection, host, port)
        return proto

    def settle(channel: str, status: int, reply: bytes) -> None:
        if status != 200:
            state["failed"] += 1
            statuses[f"{status} {reply[:60].decode('utf-8', 'replace')}"] += 1
            return
        state["ok"] += 1
        try:
            offset = int(json.loads(reply)["offset"])
        except (ValueError, KeyError, TypeError):
            statuses["200 without offset"] += 1
            return
        if offset > finals.get(channel, 0):
            finals[channel] = offset

    def fail(exc: BaseException) -> None:
        state["failed"] += 1
        statuses[type(exc).__name__] += 1

    def settled(channel: str, future: asyncio.Future[tuple[int, bytes]]) -> None:
        """A pipelined stream command's reply (or its stream's end)."""
        if future.cancelled():
            fail(asyncio.CancelledError())
        elif future.exception() is not None:
            fail(future.exception())  # type: ignore[arg-type]
        else:
            settle(channel, *future.result())

    async def run_conn(stream: _Stream, t0: float, deadline: float) -> None:
        client: Any = None
        in_flight: set[asyncio.Future[tuple[int, bytes]]] = set()
        if stream.seconds is not None:
            deadline = min(deadline, t0 + stream.seconds)
        while stream.next < stream.total and time.monotonic() < deadline:
            seq = stream.next
            stream.next += 1
            delay = t0 + seq / stream.rate - time.monotonic() if stream.rate > 0 else 0.0
            if delay > 0:
                await asyncio.sleep(delay)
            channel = stream.channel()
            try:
                if client is None or client.closed:
                    client = await asyncio.wait_for(connect(), 10)
                body = publication_body(channel, seq, _monotonic_ns())
                if over_stream:
                    future = client.request(body)
                    in_flight.add(future)
                    future.add_done_callback(in_flight.discard)
                    future.add_done_callback(functools.partial(settled, channel))
                    if len(in_flight) >= STREAM_IN_FLIGHT:  # a bound, as a backend's would be
                        await asyncio.wait_for(asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED), 10)
                    continue
                status, reply = await asyncio.wait_for(client.request(head % len(body) + body), 10)
            except Exception as exc:
                fail(exc)
                if client is not None and client.transport is not None:
                    if over_stream:
                        client.transport.disconnect(False)
                    else:
                        client.transport.abort()
                client = None
                await asyncio.sleep(0.05)
                continue
            settle(channel, status, reply)
        if in_flight:
            await asyncio.wait(in_flight, timeout=10)
            for future in list(in_flight):
                future.cancel()  # no reply in 10 s: counted as failed
        if client is not None and client.transport is not None:
            if over_stream:
                client.transport.send_close()
                client.transport.disconnect()
            else:
                client.transport.close()

    ticker = loop.create_task(publish_progress())
    conn.send(("ready", os.getpid()))
    try:
        while True:
            cmd = await commands.next()
            if cmd[0] == "publish":
                budget = cmd[1]
                t0 = time.monotonic()
                deadline = t0 + budget
                if params.get("publish_over") == "nats":
                    from .natsclient import publish_streams
                    await publish_streams(streams, host, port, t0, deadline, state, finals, statuses)
                else:
                    await asyncio.gather(*(run_conn(s, t0, deadline)
                                           for s in streams
                                           for _ in range(1 if over_stream else s.http_conns)))
                t1 = time.monotonic()
                progress[base + SLOT_PUBLISHED] = state["ok"]
                conn.send(("published", {"ok": state["ok"], "failed": state["failed"], "start": t0, "end": t1,
                                         "finals": finals, "statuses": dict(statuses.most_common(5))}))
            elif cmd[0] in ("close", "exit"):
                if cmd[0] == "close":
                    conn.send(("closed", _cpu_seconds()))
                return
    finally:
        ticker.cancel()


def publisher_main(conn: Any, progress: Any, base: int, params: dict[str, Any]) -> None:
    """Entry point of the publisher process."""
    _process_main(_publisher, conn, progress, base, params)
