"""The idle sweep on several shards (issue 7): a home shard must never sweep
a channel that another shard follows, so a subscriber whose channel is
homed on another shard keeps its stream, epoch and every publication
through any number of sweeps. Real ``broker serve`` processes, real
WebSocket clients, a sweep interval short enough to sweep many times."""
import asyncio
import json
import random
import time
from collections import defaultdict

import pytest
from websockets.asyncio.client import connect

from broker.client import AsyncPublisher
from broker.engine.cluster import home_of
from broker.errors import PublishError

from .wsclient import NativeClient

pytestmark = pytest.mark.timeout(90)


def sweeping_broker(broker_factory, tmp_path, shards: int, sweep_interval: float):
    config = tmp_path / f"sweep-{shards}.toml"
    config.write_text(f"[cluster]\nsweep_interval = {sweep_interval}\n")
    return broker_factory("--shards", str(shards), "--config", str(config))


def subscriptions_per_shard(broker) -> dict[int, int]:
    status, stats = broker.api("GET", "/api/stats")
    assert status == 200, stats
    return {s["id"]: s["subscriptions"] for s in stats["shards"]}


def engine_stats(broker) -> dict[int, dict]:
    return {s["id"]: s["engine"] for s in broker.api("GET", "/api/stats")[1]["shards"]}


def subscribe_and_locate(broker, user: int) -> tuple[NativeClient, dict, int]:
    """A client of ``user:<user>``, its subscribed reply, and the shard its
    connection landed on (the one whose subscription count went up)."""
    before = subscriptions_per_shard(broker)
    client = NativeClient(broker.ws_url, token=broker.token(str(user)))
    reply = client.subscribe(f"user:{user}")
    assert reply["op"] == "subscribed", reply
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        after = subscriptions_per_shard(broker)
        grown = [shard for shard in after if after[shard] > before.get(shard, 0)]
        if len(grown) == 1:
            return client, reply, grown[0]
        time.sleep(0.02)
    raise AssertionError(f"could not tell which shard took user:{user}: {before} -> {after}")


def test_a_channel_followed_only_by_another_shard_survives_sweeps(broker_factory, tmp_path):
    """Each user:<i> has one subscriber; for some the connection landed on
    the shard that is not the channel's home, so the home has no local
    subscriber. Nothing is published through several sweeps; then one
    publication per channel must arrive, in the epoch of the subscribe
    reply, and no stream is declared lost."""
    sweep = 0.3
    broker = sweeping_broker(broker_factory, tmp_path, shards=2, sweep_interval=sweep)
    remote: list[tuple[int, NativeClient, dict, int]] = []   # home is the other shard
    local: list[tuple[int, NativeClient, dict, int]] = []
    clients = []
    try:
        user = 0
        while len(remote) < 4 and user < 60:
            client, reply, shard = subscribe_and_locate(broker, user)
            clients.append(client)
            (remote if home_of(f"user:{user}", 2) != shard else local).append((user, client, reply, shard))
            user += 1
        assert len(remote) >= 4, "the kernel never put a client on its channel's other shard"
        time.sleep(5 * sweep)  # several sweeps on both shards, no publication yet

        for user, client, reply, shard in remote + local:
            published = broker.publish(f"user:{user}", {"note": user})
            message = client.recv(timeout=5)
            where = f"user:{user} (home shard {home_of(f'user:{user}', 2)}, subscriber on shard {shard})"
            assert message == {"op": "pub", "channel": f"user:{user}", "offset": reply["offset"] + 1,
                               "data": {"note": user}}, f"{where}: {message}"
            assert (published["epoch"], published["offset"]) == (reply["epoch"], reply["offset"] + 1), where
        for shard, engine in engine_stats(broker).items():
            assert engine["lost_streams"] == 0, f"shard {shard}: {engine}"
    finally:
        for client in clients:
            client.close()


class UserSubscriber:
    """One WebSocket connection following many user channels (its token
    lists them); records every publication and every lost stream."""

    def __init__(self, url: str, token: str, channels: list[str]) -> None:
        self.url, self.token, self.channels = url, token, channels
        self.epochs: dict[str, str] = {}
        self.offsets: dict[str, list[int]] = defaultdict(list)
        self.lost: list[dict] = []

    async def run(self, ready: asyncio.Event, done: asyncio.Event) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        async with connect(self.url, additional_headers=headers, max_size=None, max_queue=None) as ws:
            await ws.send("\n".join(json.dumps({"id": i, "op": "subscribe", "channel": c})
                                    for i, c in enumerate(self.channels)))
            while len(self.epochs) < len(self.channels):
                self._take(await ws.recv())
            ready.set()
            while not done.is_set():
                try:
                    self._take(await asyncio.wait_for(ws.recv(), 0.2))
                except TimeoutError:
                    continue

    def _take(self, frame: str) -> None:
        for line in frame.split("\n"):
            message = json.loads(line)
            op = message.get("op")
            if op == "subscribed":
                self.epochs[message["channel"]] = message["epoch"]
            elif op == "pub":
                self.offsets[message["channel"]].append(message["offset"])
            elif op == "unsubscribed":
                self.lost.append(message)
            else:
                raise AssertionError(f"unexpected message {message}")


@pytest.mark.parametrize("shards", [2, 3])
def test_user_notifications_over_several_sweeps_all_arrive(broker_factory, tmp_path, shards):
    """The issue's load, bounded: 1,200 user channels with one subscriber
    each (40 connections of 30 channels, so the client stays light), spread
    over the shards by the kernel; notifications to random users through
    ``POST /api/publish`` for about three sweep intervals, so many channels
    get their first one only after a sweep. Every acknowledged notification
    is delivered, counted on both sides (the publishers' 200s and the
    subscribers' pubs; the shards' published and delivered counters), in
    the epoch of the subscribe reply, and no stream is lost."""
    sweep, connections, per_connection = 1.0, 40, 30
    duration, rate, publishers = 3.2 * sweep, 600.0, 4
    per_publisher = int(rate * duration / publishers)
    broker = sweeping_broker(broker_factory, tmp_path, shards=shards, sweep_interval=sweep)
    channels = [f"user:u{i}" for i in range(connections * per_connection)]
    subs = [UserSubscriber(broker.ws_url,
                           broker.token(f"load{n}", channels=channels[n * per_connection:(n + 1) * per_connection]),
                           channels[n * per_connection:(n + 1) * per_connection])
            for n in range(connections)]
    epochs: dict[str, str] = {}                 # from the subscribe replies
    acked: dict[str, list[int]] = defaultdict(list)
    refused: list[PublishError] = []
    wrong_epoch: list[tuple[str, str]] = []
    spans: list[float] = []
    stats: dict = {}    # /api/stats while every subscriber is still connected

    async def publish(seed: int) -> None:
        rng = random.Random(seed)
        async with AsyncPublisher(broker.url, api_key=broker.api_key) as publisher:
            t0 = time.monotonic()
            for i in range(per_publisher):
                delay = t0 + i * publishers / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                channel = rng.choice(channels)
                try:
                    reply = await publisher.publish(channel, {"p": seed, "i": i})
                except PublishError as exc:  # a refusal is not an acknowledgement: counted apart
                    refused.append(exc)
                    continue
                acked[channel].append(reply["offset"])
                if reply["epoch"] != epochs[channel]:
                    wrong_epoch.append((channel, reply["epoch"]))
            spans.append(time.monotonic() - t0)

    async def scenario() -> None:
        done = asyncio.Event()
        readies = [asyncio.Event() for _ in subs]
        tasks = [asyncio.create_task(s.run(r, done)) for s, r in zip(subs, readies, strict=True)]
        try:
            await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 30)
            for sub in subs:
                epochs.update(sub.epochs)
            await asyncio.gather(*(publish(seed) for seed in range(publishers)))
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                if sum(len(o) for s in subs for o in s.offsets.values()) >= sum(map(len, acked.values())):
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)  # anything extra (duplicates) would show now
            stats.update((await asyncio.to_thread(broker.api, "GET", "/api/stats"))[1])
        finally:
            done.set()
            await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(scenario())
    published = sum(map(len, acked.values()))
    received = {c: o for s in subs for c, o in s.offsets.items()}
    delivered = sum(map(len, received.values()))
    lost_streams = sum(s["engine"]["lost_streams"] for s in stats["shards"])
    print(f"\n{shards} shards, {len(channels)} user channels, sweep every {sweep} s, "
          f"publishing for {min(spans):.1f}-{max(spans):.1f} s: acknowledged {published}, "
          f"received {delivered}, refused {len(refused)}, lost streams {lost_streams}; "
          f"server published {stats['published']}, delivered {stats['delivered']}")
    assert min(spans) >= 2 * sweep, "publications must span more than one sweep"
    assert published == per_publisher * publishers and not refused, refused[:3]
    followed_elsewhere = sum(s["engine"]["remote_channels"] for s in stats["shards"])
    assert followed_elsewhere > len(channels) // 3, "most channels are followed on a shard not their home"
    assert not [m for s in subs for m in s.lost], [m for s in subs for m in s.lost][:3]
    assert not wrong_epoch, wrong_epoch[:3]
    assert lost_streams == 0
    for channel, offsets in acked.items():
        assert received.get(channel) == sorted(offsets) == list(range(1, len(offsets) + 1)), channel
    assert set(received) <= set(acked)
    assert delivered == published
    assert stats["published"] == published and stats["delivered"] == delivered
