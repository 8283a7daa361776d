"""Several shards on one host: routing, ordering, crashes, the cluster view."""
import asyncio
import json
import os
import signal
import threading
import time
from collections import defaultdict

import psutil
import pytest
from websockets.asyncio.client import connect

from broker.testing import http_json

from .wsclient import NativeClient

pytestmark = pytest.mark.timeout(120)

CHANNELS = [f"bill:{i}" for i in range(6)]


class Subscriber:
    """An asyncio WebSocket client that records every publication per channel."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.offsets: dict[str, list[int]] = defaultdict(list)
        self.replies: dict[str, dict] = {}
        self.lost: list[dict] = []

    async def run(self, channels: list[str], ready: asyncio.Event, done: asyncio.Event) -> None:
        async with connect(self.url, max_size=None, max_queue=None) as ws:
            await ws.send("\n".join(json.dumps({"id": i, "op": "subscribe", "channel": c})
                                    for i, c in enumerate(channels)))
            while len(self.replies) < len(channels):
                for line in (await ws.recv()).split("\n"):
                    self._take(json.loads(line), channels)
            ready.set()
            while not done.is_set():
                try:
                    frame = await asyncio.wait_for(ws.recv(), 0.2)
                except asyncio.TimeoutError:
                    continue
                for line in frame.split("\n"):
                    self._take(json.loads(line), channels)

    def _take(self, message: dict, channels: list[str]) -> None:
        if message.get("op") == "subscribed":
            self.replies[message["channel"]] = message
        elif message.get("op") == "pub":
            self.offsets[message["channel"]].append(message["offset"])
        elif message.get("op") == "unsubscribed":
            self.lost.append(message)


def shard_pids(broker) -> dict[int, int]:
    status, stats = broker.api("GET", "/api/stats")
    assert status == 200
    return {s["id"]: s["pid"] for s in stats["shards"]}


def publish_concurrently(broker, per_thread: int, threads: int) -> dict[str, list[int]]:
    """Publishers on several threads (several HTTP connections, so several shards)."""
    acked: dict[str, list[int]] = defaultdict(list)
    lock = threading.Lock()

    def work(seed: int) -> None:
        for i in range(per_thread):
            channel = CHANNELS[(seed + i) % len(CHANNELS)]
            status, reply = broker.api("POST", "/api/publish", {"channel": channel, "data": {"t": seed, "i": i}})
            assert status == 200, reply
            with lock:
                acked[channel].append(reply["offset"])

    pool = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return acked


async def _settle(subs: list[Subscriber], acked: dict[str, list[int]], within: float = 20.0) -> None:
    """Wait until every subscriber has caught up with what was acknowledged."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if all(not s.offsets[c] or s.offsets[c][-1] >= max(acked.get(c, [0]))
               for s in subs for c in s.replies if c not in {m["channel"] for m in s.lost}):
            return
        await asyncio.sleep(0.05)


async def _run_subscribers(url: str, count: int, during, acked=None) -> list[Subscriber]:
    subs = [Subscriber(url) for _ in range(count)]
    done = asyncio.Event()
    readies = [asyncio.Event() for _ in subs]
    tasks = [asyncio.create_task(s.run(CHANNELS[i % 3:i % 3 + 4], r, done))
             for i, (s, r) in enumerate(zip(subs, readies))]
    try:
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 30)
        await asyncio.to_thread(during)
        await _settle(subs, acked) if acked is not None else asyncio.sleep(1.0)
        await asyncio.sleep(0.2)
    finally:  # release the subscribers whatever happened, or the test hangs
        done.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    return subs


def test_hundreds_of_clients_on_three_shards_see_every_publication_in_order(broker_factory):
    broker = broker_factory("--shards", "3", "--allow-anonymous")
    acked: dict[str, list[int]] = {}

    def during() -> None:
        stats = broker.api("GET", "/api/stats")[1]
        assert sum(1 for s in stats["shards"] if s["connections"] > 0) >= 2, "clients spread over shards"
        acked.update(publish_concurrently(broker, per_thread=40, threads=6))

    subs = asyncio.run(_run_subscribers(broker.ws_url, 300, during, acked))
    for channel, offsets in acked.items():
        assert sorted(offsets) == list(range(1, len(offsets) + 1)), "offsets unique and gapless"
    for sub in subs:
        assert not sub.lost
        for channel, reply in sub.replies.items():
            expected = [o for o in range(reply["offset"] + 1, len(acked.get(channel, [])) + 1)]
            assert sub.offsets[channel] == expected, f"{channel}: in order, no gaps, no duplicates"
    stats = broker.api("GET", "/api/stats")[1]
    assert stats["published"] == 240
    assert stats["delivered"] == sum(len(s.offsets[c]) for s in subs for c in s.offsets)


def test_cluster_stats_metrics_and_readyz_cover_every_shard(broker_factory):
    broker = broker_factory("--shards", "2", "--allow-anonymous")
    pids = shard_pids(broker)
    assert sorted(pids) == [0, 1] and len(set(pids.values())) == 2
    for pid in pids.values():
        assert psutil.Process(pid).ppid() == broker.process.pid
    with NativeClient(broker.ws_url) as client:  # something to count and to time
        client.subscribe("bill:m")
        broker.publish("bill:m", 1)
        client.pubs(1)
        status, text = http_json("GET", broker.url + "/metrics")
    assert status == 200
    for shard in ("0", "1"):
        assert f'broker_shard_up{{shard="{shard}"}} 1.0' in text
        for series in ("broker_connections", "broker_subscriptions", "broker_publications_total",
                       "broker_deliveries_total", "broker_bytes_out_total", "broker_rss_bytes",
                       "broker_slow_consumer_drops_total", "broker_zmq_hwm_drops_total",
                       "broker_degradation_level", "broker_batch_lines_count",
                       "broker_publish_to_flush_seconds_count"):
            assert f'{series}{{shard="{shard}"}}' in text, series
    assert 'broker_batch_lines_bucket{le="1.0",shard=' in text
    assert sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("broker_deliveries_total{")) == 1


def _wait_replaced(broker, shard: int, old_pid: int, within: float) -> tuple[dict[int, int], bool]:
    """Poll until ``shard`` runs under a new pid and /readyz is 200; also
    report whether /readyz said 503 meanwhile."""
    started, saw_unready = time.monotonic(), False
    while time.monotonic() - started < within:
        try:  # a connection queued on the dying shard's listener is reset: retry, as a client would
            status, _ = http_json("GET", broker.url + "/readyz")
            saw_unready |= status == 503
            if status == 200:
                pids = shard_pids(broker)
                if pids.get(shard) not in (None, old_pid):
                    return pids, saw_unready
        except OSError:
            pass
        time.sleep(0.01)
    pytest.fail(f"shard {shard} was not replaced within {within} s")


def test_sigkill_of_a_shard_is_repaired_and_readyz_recovers(broker_factory):
    broker = broker_factory("--shards", "2", "--allow-anonymous")
    pids = shard_pids(broker)
    os.kill(pids[1], signal.SIGKILL)
    replaced, _ = _wait_replaced(broker, 1, pids[1], within=10)
    assert replaced[0] == pids[0], "the other shard was untouched"
    # Dying again at once is a crash loop: the restart backs off, and
    # meanwhile the node says it is not ready.
    os.kill(replaced[1], signal.SIGKILL)
    deadline, saw_unready = time.monotonic() + 5, False
    while not saw_unready and time.monotonic() < deadline:
        try:
            saw_unready = http_json("GET", broker.url + "/readyz")[0] == 503
        except OSError:
            pass
    assert saw_unready, "/readyz said 503 while the shard was down"
    _wait_replaced(broker, 1, replaced[1], within=10)
    log = open(broker.log_path).read()
    assert "killed by SIGKILL" in log and "crash loop" in log


def test_sigkill_under_traffic_loses_no_acknowledged_publication(broker_factory):
    """Clients (the project's reconnecting Client) on every shard, publishers
    entering through every shard, one shard SIGKILLed mid-traffic: every
    acknowledged publication reaches every subscriber, in order, once."""
    from broker import Client

    broker = broker_factory("--shards", "2", "--allow-anonymous")
    pids = shard_pids(broker)
    acked: dict[str, list[int]] = defaultdict(list)
    received: dict[tuple[int, str], list[int]] = defaultdict(list)
    first: dict[tuple[int, str], int] = {}
    lost: list[tuple[int, str, str]] = []

    def traffic() -> None:
        stop = threading.Event()

        def publisher(seed: int) -> None:
            i = 0
            while not stop.is_set():
                channel = CHANNELS[(seed + i) % len(CHANNELS)]
                try:
                    status, reply = broker.api("POST", "/api/publish", {"channel": channel, "data": i})
                except OSError:
                    status = 0  # the connection hit the dying shard: not acknowledged
                if status == 200:
                    acked[channel].append(reply["offset"])
                i += 1
                time.sleep(0.003)

        threads = [threading.Thread(target=publisher, args=(n,)) for n in range(3)]
        for t in threads:
            t.start()
        time.sleep(0.7)
        os.kill(pids[1], signal.SIGKILL)
        time.sleep(3.0)
        stop.set()
        for t in threads:
            t.join()

    async def scenario() -> None:
        clients = [Client(broker.ws_url, backoff_initial=0.05, backoff_max=0.5) for _ in range(30)]
        for n, client in enumerate(clients):
            await client.connect()
            for channel in CHANNELS[:4]:
                def on_pub(pub, n=n):
                    received[n, pub.channel].append(pub.offset)

                def on_lost(channel, reason, n=n):
                    lost.append((n, channel, reason))

                reply = await client.subscribe(channel, on_pub, on_lost=on_lost)
                first[n, channel] = reply["offset"]
        await asyncio.to_thread(traffic)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if all(received[key] and received[key][-1] >= max(acked[key[1]]) for key in first):
                break
            await asyncio.sleep(0.05)
        for client in clients:
            await client.close()

    asyncio.run(scenario())
    assert not lost, f"streams lost although the journal kept them: {lost[:3]}"
    for (n, channel), start in first.items():
        got = received[n, channel]
        assert got == sorted(set(got)), "in order, once"
        expected = [o for o in sorted(acked[channel]) if o > start]
        assert set(expected) <= set(got), f"client {n} {channel}: missing {sorted(set(expected) - set(got))[:5]}"
    assert shard_pids(broker)[1] != pids[1]


def test_the_same_routing_works_over_tcp(broker_factory, tmp_path):
    config = tmp_path / "tcp.toml"
    config.write_text('[cluster]\ntransport = "tcp"\n')
    broker = broker_factory("--shards", "2", "--allow-anonymous", "--config", str(config))
    acked: dict[str, list[int]] = {}

    def during() -> None:
        acked.update(publish_concurrently(broker, per_thread=20, threads=4))

    subs = asyncio.run(_run_subscribers(broker.ws_url, 40, during, acked))
    for sub in subs:
        for channel, reply in sub.replies.items():
            assert sub.offsets[channel] == list(range(reply["offset"] + 1, len(acked.get(channel, [])) + 1))
    run_dir = open(broker.log_path).read().split("run dir ")[1].split()[0]
    with open(f"{run_dir}/gen-1/cluster.json") as fh:
        assert json.load(fh)["endpoints"]["pub"][0].startswith("tcp://127.0.0.1:")


def test_shards_stop_when_their_supervisor_is_killed(broker_factory):
    broker = broker_factory("--shards", "2", "--allow-anonymous")
    pids = list(shard_pids(broker).values())
    broker.process.kill()
    broker.process.wait()
    gone, alive = psutil.wait_procs([psutil.Process(pid) for pid in pids], timeout=10)
    assert not alive, "orphaned shards kept serving"


def test_a_tiny_high_water_mark_never_costs_a_subscriber_a_publication(broker_factory, tmp_path):
    """With a ZeroMQ high-water mark of 4, concurrent joins (each a burst of
    subscription messages) and batched publishing still reach every
    subscriber in order: subscriptions are never subject to the mark, stream
    drops are repaired from history (tests/test_cluster_engine.py drives the
    repair itself)."""
    from broker import Publisher

    config = tmp_path / "hwm.toml"
    config.write_text("[cluster]\nhigh_water_mark = 4\n")
    broker = broker_factory("--shards", "2", "--allow-anonymous", "--config", str(config))
    acked: dict[str, list[int]] = defaultdict(list)

    def during() -> None:
        with Publisher(broker.url, api_key=broker.api_key) as publisher:
            for round_ in range(4):
                batch = [(CHANNELS[i % len(CHANNELS)], {"r": round_, "i": i}) for i in range(300)]
                for result in publisher.publish_batch(batch)["results"]:
                    acked[result["channel"]].append(result["offset"])

    subs = asyncio.run(_run_subscribers(broker.ws_url, 60, during, acked))
    for sub in subs:
        assert not sub.lost and len(sub.replies) == 4
        for channel, reply in sub.replies.items():
            assert sub.offsets[channel] == list(range(reply["offset"] + 1, len(acked[channel]) + 1))
