"""Flood a real broker the way an attacker would, and measure whether the
memory budget (PROTOCOL.md §3 "Memory budget") holds.

    python tools/flood.py                        # 2 shards, budget from idle RSS, 400 floods, 12 s
    python tools/flood.py --shards 2 --memory-limit-mb 220 --flood 600 --seconds 20

Spawns ``broker serve --shards N --memory-limit-mb M`` (without
``--memory-limit-mb``: a first broker's idle shard RSS / 0.6, so idle sits
at 60% of the budget on any machine), then:

- ``--flood`` raw WebSocket clients with a small receive buffer subscribe to
  one channel and never read again;
- a few healthy clients subscribed to the same channel read everything;
- a publisher posts large payloads through the HTTP API, as fast as the
  broker answers, for ``--seconds``;
- the shards' RSS is sampled (psutil; shards = the supervisor's children)
  and ``/api/stats`` polled throughout; new upgrades are tried meanwhile.

Then the flood sockets are read (close frames: 1013 or none) and closed,
the levels must fall to 0 and a new upgrade succeed. One summary line is
printed; ``tests/integration/test_flood.py`` runs the same code and asserts
on the figures.
"""
from __future__ import annotations

import argparse
import base64
import json
import math
import os
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psutil
from websockets.sync.client import connect

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from broker.testing import BrokerProcess

__all__ = ["FloodFigures", "run_flood", "idle_budget_mb", "shard_processes", "main"]

MIB = 2**20
CHANNEL = "bill:flood"
IDLE_SHARE = 0.6          # idle RSS as a fraction of the chosen budget


# --------------------------------------------------------------- processes

def shard_processes(broker: BrokerProcess) -> list[psutil.Process]:
    """The broker's shard processes: the supervisor's ``broker.worker`` children."""
    assert broker.process is not None
    children = psutil.Process(broker.process.pid).children(recursive=True)
    return [c for c in children if "broker.worker" in " ".join(c.cmdline())]


def shards_rss(processes: list[psutil.Process]) -> int:
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.Error:
            pass
    return total


class RssSampler(threading.Thread):
    """Sums the shards' RSS every ``interval`` seconds; keeps the peak."""

    def __init__(self, processes: list[psutil.Process], interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.processes = processes
        self.interval = interval
        self.peak = 0
        self.samples: list[tuple[float, int]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            rss = shards_rss(self.processes)
            self.samples.append((time.monotonic(), rss))
            self.peak = max(self.peak, rss)
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


def idle_budget_mb(shards: int) -> int:
    """A budget for ``shards`` shards with idle RSS at ``IDLE_SHARE`` of it,
    measured on a broker started (and stopped) for the purpose."""
    broker = BrokerProcess(args=["--shards", str(shards), "--allow-anonymous"])
    broker.start()
    try:
        processes = shard_processes(broker)
        time.sleep(0.5)
        idle = max(shards_rss(processes) for _ in range(3))
    finally:
        broker.stop()
    return math.ceil(idle / IDLE_SHARE / MIB)


# ----------------------------------------------------------------- clients

def _upgrade_bytes(port: int, path: str = "/ws") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\n\r\n").encode()


def _masked_text(payload: bytes) -> bytes:
    mask = os.urandom(4)
    head = bytes([0x81])
    if len(payload) < 126:
        head += bytes([0x80 | len(payload)])
    else:
        head += bytes([0x80 | 126]) + struct.pack("!H", len(payload))
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def upgrade_status(port: int, timeout: float = 5.0) -> tuple[int, bytes]:
    """One new upgrade at /ws: its status and body (the connection is closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(_upgrade_bytes(port))
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return status, body[:length]


class FloodSocket:
    """A client that upgrades, subscribes, reads the reply, then never reads:
    a small receive buffer, so the kernel's buffers fill and the broker's
    must take the rest."""

    def __init__(self, port: int, channel: str, rcvbuf: int = 4096) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(10)
        sock.connect(("127.0.0.1", port))
        self.sock = sock
        sock.sendall(_upgrade_bytes(port))
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed during the upgrade")
            data += chunk
        head, _, self.buffer = data.partition(b"\r\n\r\n")
        self.status = int(head.split(b" ", 2)[1])
        self.body = b""
        if self.status != 101:
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            while len(self.buffer) < length:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                self.buffer += chunk
            self.body = self.buffer[:length]
        else:
            sock.sendall(_masked_text(json.dumps({"id": 1, "op": "subscribe", "channel": channel}).encode()))
            while b'"subscribed"' not in self.buffer:
                chunk = sock.recv(4096)
                if not chunk:
                    raise ConnectionError("closed before the subscribe reply")
                self.buffer += chunk

    def close_code(self, timeout: float = 3.0) -> str:
        """Read everything the broker sent until it ended the connection:
        the close frame's code, "ended" (EOF or reset without a close frame
        read) or "open" (nothing for ``timeout`` seconds)."""
        self.sock.settimeout(timeout)
        data = self.buffer
        pos = 0
        try:
            while True:
                while True:  # parse the complete frames in ``data``
                    if len(data) - pos < 2:
                        break
                    opcode, length, offset = data[pos] & 0x0F, data[pos + 1] & 0x7F, 2
                    if length == 126:
                        if len(data) - pos < 4:
                            break
                        length, offset = struct.unpack_from("!H", data, pos + 2)[0], 4
                    elif length == 127:
                        if len(data) - pos < 10:
                            break
                        length, offset = struct.unpack_from("!Q", data, pos + 2)[0], 10
                    if len(data) - pos < offset + length:
                        break
                    if opcode == 0x8:
                        payload = data[pos + offset: pos + offset + length]
                        return str(struct.unpack("!H", payload[:2])[0]) if len(payload) >= 2 else "ended"
                    pos += offset + length
                data, pos = data[pos:], 0
                chunk = self.sock.recv(1 << 20)
                if not chunk:
                    return "ended"
                data += chunk
        except TimeoutError:
            return "open"
        except OSError:
            return "ended"

    def close(self) -> None:
        self.sock.close()


class HealthyClient(threading.Thread):
    """A client that reads everything: the offsets and sequence numbers of
    the publications it receives on ``channel``, in arrival order."""

    def __init__(self, url: str, channel: str) -> None:
        super().__init__(daemon=True)
        self._connect = connect(url, compression=None, open_timeout=10, max_size=None, max_queue=None)
        self.ws = self._connect.__enter__()
        self.ws.send(json.dumps({"id": 1, "op": "subscribe", "channel": channel}))
        reply = json.loads(self.ws.recv(timeout=10).split("\n")[0])
        assert reply["op"] == "subscribed", reply
        self.start_offset: int = reply["offset"]
        self.received: list[tuple[int, int]] = []   # (offset, seq)
        self.other: list[dict[str, Any]] = []       # anything but a pub (unsubscribed, ...)
        self.close_code: int | None = None
        self.close_reason = ""
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                frame = self.ws.recv(timeout=0.2)
            except TimeoutError:
                continue
            except Exception as exc:
                rcvd = getattr(exc, "rcvd", None)
                self.close_code = rcvd.code if rcvd is not None else -1
                self.close_reason = rcvd.reason if rcvd is not None else repr(exc)
                return
            for line in str(frame).split("\n"):
                message = json.loads(line)
                if message.get("op") == "pub":
                    self.received.append((message["offset"], message["data"]["seq"]))
                else:
                    self.other.append(message)

    def wait_for(self, last_offset: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.close_code is not None or (self.received and self.received[-1][0] >= last_offset):
                return self.close_code is None
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        self._halt.set()
        self.join(5)
        self.ws.close()


# ------------------------------------------------------------------ figures

@dataclass
class FloodFigures:
    """What a flood run measured."""

    shards: int
    budget_bytes: int
    idle_rss: int = 0
    peak_rss: int = 0
    flood: int = 0                       # flood connections opened before publishing (101)
    reflood: int = 0                     # more accepted while publishing (attackers come back)
    flood_refused: int = 0               # flood upgrades refused (503 at level 3)
    max_level: int = 0
    memory_cuts: int = 0                 # closed 1013 at level 2 (stats)
    slow_consumers: int = 0              # closed 1013 with a full buffer (stats)
    close_frames: dict[str, int] = field(default_factory=dict)  # code (or "none") -> flood sockets
    level3_refusals: list[str] = field(default_factory=list)   # JSON error bodies of 503 upgrades
    level3_seen: bool = False
    refused_memory: int = 0              # upgrades refused at level 3 (stats)
    publish_503: int = 0
    published: list[tuple[int, int]] = field(default_factory=list)  # (offset, seq) answered 200
    healthy: list[int] = field(default_factory=list)                 # publications each received
    healthy_in_order: bool = False
    healthy_closed: list[int | None] = field(default_factory=list)
    healthy_reasons: list[str] = field(default_factory=list)
    back_to_level0_s: float | None = None
    reaccepted: bool = False
    seconds: float = 0.0

    @property
    def peak_ratio(self) -> float:
        return self.peak_rss / self.budget_bytes if self.budget_bytes else 0.0

    def summary(self) -> str:
        frames = ", ".join(f"{k}: {v}" for k, v in sorted(self.close_frames.items()))
        return (f"flood: {self.shards} shards, budget {self.budget_bytes / MIB:.0f} MiB, "
                f"idle {self.idle_rss / MIB:.0f} MiB, peak summed shard RSS {self.peak_rss / MIB:.0f} MiB "
                f"= {self.peak_ratio:.2f} x budget; max level {self.max_level}; "
                f"{self.flood} + {self.reflood} flood connections ({self.flood_refused} refused), cut 1013: "
                f"{self.memory_cuts} at level 2 + {self.slow_consumers} slow consumers "
                f"(close frames read: {frames or '-'}); upgrades refused at level 3: {self.refused_memory} "
                f"(503 JSON seen: {len(self.level3_refusals)}); level 0 again after "
                f"{self.back_to_level0_s if self.back_to_level0_s is None else round(self.back_to_level0_s, 1)} s, "
                f"re-accepted: {self.reaccepted}; publications 200: {len(self.published)} "
                f"(503: {self.publish_503}); healthy clients received {self.healthy}, "
                f"all in order: {self.healthy_in_order}, closed: {self.healthy_closed} "
                f"{self.healthy_reasons}; {self.seconds:.0f} s")


def _stats(broker: BrokerProcess) -> list[dict[str, Any]]:
    status, body = broker.api("GET", "/api/stats")
    if status != 200 or not isinstance(body, dict):
        return []
    shards: list[dict[str, Any]] = body.get("shards", [])
    return shards


class StatsPoller(threading.Thread):
    """Polls /api/stats; keeps the highest level any shard reported, and
    tries a new upgrade whenever a shard is at level 3."""

    def __init__(self, broker: BrokerProcess, figures: FloodFigures, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.broker = broker
        self.figures = figures
        self.interval = interval
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                shards = _stats(self.broker)
            except OSError:
                shards = []
            levels = [s.get("degradation", 0) for s in shards]
            if levels:
                self.figures.max_level = max(self.figures.max_level, *levels)
            if 3 in levels:
                self.figures.level3_seen = True
                for _ in range(4):  # a new upgrade lands on either shard
                    try:
                        status, body = upgrade_status(self.broker.port)
                    except OSError:
                        continue
                    if status == 503:
                        self.figures.level3_refusals.append(json.loads(body)["error"])
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


class Reflooder(threading.Thread):
    """Attackers come back: new flood connections every ``interval`` while
    the publisher runs. Those refused at level 3 are the figures' 503s."""

    def __init__(self, port: int, figures: FloodFigures, floods: list[FloodSocket],
                 interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.figures = figures
        self.floods = floods
        self.interval = interval
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                sock = FloodSocket(self.port, CHANNEL)
            except OSError:
                continue
            if sock.status == 101:
                self.floods.append(sock)
            else:
                self.figures.flood_refused += 1
                if sock.status == 503:
                    self.figures.level3_refusals.append(json.loads(sock.body)["error"])
                sock.close()
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


# --------------------------------------------------------------------- run

def _publisher(broker: BrokerProcess, figures: FloodFigures, payload_bytes: int,
               until: float, rate: float) -> None:
    """Publish at ``rate`` per second (a pace the healthy clients keep up
    with: a client slower than the publisher is a slow consumer, cut too)."""
    filler = base64.b64encode(os.urandom(payload_bytes * 3 // 4 + 3)).decode()[:payload_bytes]
    seq = 0
    start = time.monotonic()
    while (now := time.monotonic()) < until:
        ahead = start + seq / rate - now
        if ahead > 0:
            time.sleep(ahead)
        seq += 1
        try:
            status, reply = broker.api("POST", "/api/publish",
                                       {"channel": CHANNEL, "data": {"seq": seq, "fill": filler}})
        except OSError:
            continue
        if status == 200 and isinstance(reply, dict):
            figures.published.append((reply["offset"], seq))
        elif status == 503:
            figures.publish_503 += 1
            time.sleep(0.01)


def run_flood(broker: BrokerProcess, budget_mb: int, shards: int, flood: int = 400,
              seconds: float = 12.0, healthy: int = 4, payload_bytes: int = 16384, rate: float = 100.0,
              sample_close: int = 40) -> FloodFigures:
    """Flood ``broker`` (started with ``--memory-limit-mb budget_mb``) and
    measure; see the module docstring."""
    started = time.monotonic()
    figures = FloodFigures(shards=shards, budget_bytes=budget_mb * MIB)
    processes = shard_processes(broker)
    figures.idle_rss = shards_rss(processes)
    sampler = RssSampler(processes)
    sampler.start()
    readers = [HealthyClient(broker.ws_url, CHANNEL) for _ in range(healthy)]
    for reader in readers:
        reader.start()
    floods: list[FloodSocket] = []
    for _ in range(flood):
        sock = FloodSocket(broker.port, CHANNEL)
        if sock.status == 101:
            floods.append(sock)
        else:
            figures.flood_refused += 1
            sock.close()
    first_wave = len(floods)
    poller = StatsPoller(broker, figures)
    poller.start()
    reflooder = Reflooder(broker.port, figures, floods)
    reflooder.start()
    _publisher(broker, figures, payload_bytes, time.monotonic() + seconds, rate)
    reflooder.stop()
    poller.stop()
    figures.flood = first_wave
    figures.reflood = len(floods) - first_wave
    # What the flood sockets saw: read a sample to the end (a close frame or none).
    codes: dict[str, int] = {}
    for sock in floods[max(0, first_wave - sample_close):first_wave]:  # the first wave: all were cut
        code = sock.close_code()
        codes[code] = codes.get(code, 0) + 1
    figures.close_frames = codes
    for sock in floods:
        sock.close()
    last = figures.published[-1][0] if figures.published else 0
    for reader in readers:
        reader.wait_for(last, timeout=20)
    for reader in readers:
        reader.stop()
    figures.healthy = [len(r.received) for r in readers]
    figures.healthy_closed = [r.close_code for r in readers]
    figures.healthy_reasons = [r.close_reason for r in readers if r.close_code is not None]
    expected = figures.published
    figures.healthy_in_order = all(r.received == expected for r in readers)
    # The flood is gone: the levels must fall back to 0 and upgrades be accepted.
    gone = time.monotonic()
    deadline = gone + 20
    while time.monotonic() < deadline:
        shards_now = _stats(broker)
        if shards_now and all(s.get("degradation", 0) == 0 for s in shards_now):
            figures.back_to_level0_s = time.monotonic() - gone
            break
        time.sleep(0.1)
    sampler.stop()
    figures.peak_rss = sampler.peak
    final = _stats(broker)
    figures.memory_cuts = sum(s.get("memory_cuts", 0) for s in final)
    figures.slow_consumers = sum(s.get("slow_consumers", 0) for s in final)
    figures.refused_memory = sum(s.get("upgrades_refused_memory", 0) for s in final)
    figures.reaccepted = all(upgrade_status(broker.port)[0] == 101 for _ in range(4))
    figures.seconds = time.monotonic() - started
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--memory-limit-mb", type=int, default=None,
                        help="the budget (default: idle shard RSS / 0.6, measured first)")
    parser.add_argument("--flood", type=int, default=400, help="connections that never read")
    parser.add_argument("--seconds", type=float, default=12.0, help="how long the publisher runs")
    parser.add_argument("--healthy", type=int, default=4, help="clients that read everything")
    parser.add_argument("--payload-bytes", type=int, default=16384)
    parser.add_argument("--rate", type=float, default=100.0, help="publications per second")
    parser.add_argument("--outbound-buffer-bytes", type=int, default=None,
                        help="[limits] outbound_buffer_bytes (default: the broker's, 1 MiB)")
    parser.add_argument("--log", default=None, help="write the broker's log here")
    args = parser.parse_args(argv)
    budget = args.memory_limit_mb or idle_budget_mb(args.shards)
    extra: list[str] = []
    config_path = None
    if args.outbound_buffer_bytes is not None:
        import tempfile

        fd, config_path = tempfile.mkstemp(suffix=".toml")
        os.write(fd, f"[limits]\noutbound_buffer_bytes = {args.outbound_buffer_bytes}\n".encode())
        os.close(fd)
        extra = ["--config", config_path]
    broker = BrokerProcess(args=["--shards", str(args.shards), "--allow-anonymous",
                                 "--memory-limit-mb", str(budget), *extra], log_path=args.log)
    broker.start()
    try:
        figures = run_flood(broker, budget, args.shards, flood=args.flood, seconds=args.seconds,
                            healthy=args.healthy, payload_bytes=args.payload_bytes, rate=args.rate)
    finally:
        broker.stop()
        if config_path:
            os.unlink(config_path)
    print(figures.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
