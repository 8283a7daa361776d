"""Publish for a long time while clients keep losing their connections:
every acknowledged publication reaches every subscriber once, in order."""
from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import defaultdict

import pytest

from broker import Client, Publication, Publisher

pytestmark = [pytest.mark.soak, pytest.mark.timeout(0)]

CHANNELS = [f"bill:{n}" for n in range(6)]


def test_clients_that_keep_reconnecting_miss_nothing(broker_factory, soak_seconds):
    broker = broker_factory("--shards", "2", "--allow-anonymous")
    acked: dict[str, list[int]] = defaultdict(list)
    stop = threading.Event()

    def publish() -> None:
        with Publisher(broker.url, api_key=broker.api_key) as publisher:
            n = 0
            while not stop.is_set():
                channel = CHANNELS[n % len(CHANNELS)]
                acked[channel].append(publisher.publish(channel, {"n": n})["offset"])
                n += 1
                time.sleep(0.002)

    async def scenario() -> tuple[dict[tuple[int, str], list[int]], dict[tuple[int, str], int], list, int]:
        received: dict[tuple[int, str], list[int]] = defaultdict(list)
        start: dict[tuple[int, str], int] = {}
        lost: list = []
        rng = random.Random(7)
        clients = [Client(broker.ws_url, backoff_initial=0.02, backoff_max=0.2) for _ in range(16)]
        for i, client in enumerate(clients):
            await client.connect()
            for channel in CHANNELS[i % 3::2]:
                def record(pub: Publication, i: int = i) -> None:
                    received[i, pub.channel].append(pub.offset)
                reply = await client.subscribe(channel, record,
                                               on_lost=lambda ch, reason, i=i: lost.append((i, ch, reason)))
                start[i, channel] = reply["offset"]
        publisher = threading.Thread(target=publish, daemon=True)
        publisher.start()
        breaks = 0
        deadline = time.monotonic() + soak_seconds
        while time.monotonic() < deadline:
            await asyncio.sleep(rng.uniform(0.05, 0.3))
            victim = rng.choice(clients)
            if victim._ws is not None:
                victim._ws.transport.abort()  # a broken network, not a goodbye
                breaks += 1
        stop.set()
        await asyncio.to_thread(publisher.join, 10)
        settle = time.monotonic() + 20
        while time.monotonic() < settle and not all(
                received[key] and received[key][-1] >= max(acked[key[1]], default=0) for key in start):
            await asyncio.sleep(0.05)
        for client in clients:
            await client.close()
        return received, start, lost, breaks

    received, start, lost, breaks = asyncio.run(scenario())
    assert breaks > 0 and sum(map(len, acked.values())) > 0
    assert lost == []
    for (i, channel), offset in start.items():
        expected = [o for o in sorted(acked[channel]) if o > offset]
        assert received[i, channel] == expected, f"client {i} {channel}: in order, no loss, no duplicates"
