"""Shared pieces of the deploy tests: steady publishing that retries a 503
(a 503 means "not stored", so a retry can never duplicate), subscribers
that record every offset, and the CLI's operations as subprocesses."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

from broker import Client
from broker.client import Publisher
from broker.errors import PublishError
from broker.testing import BrokerProcess

ROOT = Path(__file__).resolve().parents[2]


def operate(broker: BrokerProcess, *args: str, env: dict[str, str] | None = None,
            timeout: float = 180) -> tuple[int, list[str], dict]:
    """``broker <args>`` against ``broker``: exit code, progress lines, result."""
    base = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-m", "broker", *args, "--url", broker.url,
                             "--api-key", broker.api_key], env={**base, **(env or {})},
                            capture_output=True, text=True, timeout=timeout)
    lines = result.stdout.strip().splitlines()
    assert lines, result.stderr
    return result.returncode, lines[:-1], json.loads(lines[-1]) | {"stderr": result.stderr}


class Background:
    """A loop (``_run``, which checks ``_stop``) in a daemon thread, from
    ``start()`` to ``stop()``."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Background:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        raise NotImplementedError


class Traffic(Background):
    """Publishes round-robin over ``channels`` from a thread, about ``rate``
    per second, retrying each publication until it is acknowledged."""

    def __init__(self, broker: BrokerProcess, channels: list[str], rate: float,
                 retry: tuple[int, ...] = (0, 503)) -> None:
        self.broker, self.channels, self.rate, self.retry = broker, channels, rate, retry
        self.acked: dict[str, list[tuple[int, int]]] = defaultdict(list)  # channel -> (offset, seq)
        self.refused = 0            # 503s (fenced or unreachable) that were retried
        self.seq = 0
        super().__init__()

    def _run(self) -> None:
        # A long timeout: a request queued in the listening socket while no
        # generation accepts waits for the next one rather than being retried.
        publisher = Publisher(self.broker.url, api_key=self.broker.api_key, timeout=60)
        while not self._stop.is_set():
            channel = self.channels[self.seq % len(self.channels)]
            while True:
                try:
                    reply = publisher.publish(channel, {"seq": self.seq})
                    break
                except PublishError as exc:
                    assert exc.status in self.retry, exc  # 0: connection closed by a retiring shard
                    self.refused += 1
                    time.sleep(0.02)
            self.acked[channel].append((reply["offset"], self.seq))
            self.seq += 1
            time.sleep(1 / self.rate)
        publisher.close()

    def last(self, channel: str) -> int:
        return max((offset for offset, _ in self.acked[channel]), default=0)


class Audience:
    """``count`` Python Clients, each subscribed to two of ``channels``."""

    def __init__(self, url: str, count: int, channels: list[str]) -> None:
        self.url, self.count, self.channels = url, count, channels
        self.clients: list[Client] = []
        self.start: dict[tuple[int, str], int] = {}
        self.received: dict[tuple[int, str], list[int]] = defaultdict(list)
        self.lost: list[tuple[int, str, str]] = []

    async def connect(self) -> None:
        async def one(n: int) -> None:
            client = Client(self.url, backoff_initial=0.05, backoff_max=0.5)
            self.clients.append(client)
            await client.connect()
            for channel in (self.channels[n % len(self.channels)], self.channels[(n + 1) % len(self.channels)]):
                reply = await client.subscribe(
                    channel, lambda pub, n=n: self.received[n, pub.channel].append(pub.offset),
                    on_lost=lambda channel, reason, n=n: self.lost.append((n, channel, reason)))
                self.start[n, channel] = reply["offset"]

        for first in range(0, self.count, 50):
            await asyncio.gather(*(one(n) for n in range(first, min(first + 50, self.count))))

    async def caught_up(self, traffic: Traffic, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all((self.received[key][-1] if self.received[key] else start) >= traffic.last(key[1])
                   for key, start in self.start.items()):
                return
            await asyncio.sleep(0.1)

    async def close(self) -> None:
        await asyncio.gather(*(client.close() for client in self.clients), return_exceptions=True)

    def check_exactly_once(self, traffic: Traffic, crashed: bool = False) -> None:
        """Every acknowledged publication reached every subscriber once, in order.
        After a crash a publication whose acknowledgment died with the process
        is retried and stored twice (at two offsets): ``crashed`` allows that."""
        assert not self.lost, f"recovery failed: {self.lost[:3]}"
        for channel, acked in traffic.acked.items():
            offsets = sorted(offset for offset, _ in acked)
            assert len(set(offsets)) == len(offsets), f"{channel}: an offset acknowledged twice"
            if not crashed:
                assert offsets == list(range(offsets[0], offsets[0] + len(offsets))), f"{channel}: gap"
        seqs = [seq for acked in traffic.acked.values() for _, seq in acked]
        assert sorted(seqs) == list(range(len(seqs)))  # each acknowledged once, none skipped
        for (n, channel), start in self.start.items():
            expected = list(range(start + 1, traffic.last(channel) + 1))
            assert self.received[n, channel] == expected, (n, channel, self.received[n, channel][-5:],
                                                           expected[-5:])

    def reconnect_times(self) -> list[tuple[float, float]]:
        return [pair for client in self.clients for pair in client.reconnected]


def peak_per_window(times: list[float], window: float) -> int:
    times = sorted(times)
    peak, low = 0, 0
    for high, t in enumerate(times):
        while times[low] < t - window:
            low += 1
        peak = max(peak, high - low + 1)
    return peak


class Prober(Background):
    """A fresh TCP connection and ``GET /healthz`` every few milliseconds from
    a thread: a connection reset or refused while generations change hands
    shows up as a failure."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ok = 0
        self.failures: list[str] = []
        super().__init__()

    def _run(self) -> None:
        import urllib.request

        while not self._stop.is_set():
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=30) as response:
                    assert response.status == 200
                self.ok += 1
            except Exception as exc:
                self.failures.append(repr(exc))
            time.sleep(0.01)
