"""Graceful stops: nothing acknowledged is lost, clients recover after reconnect."""
import asyncio
import signal
import subprocess
import sys
import time
from collections import defaultdict

import pytest
from websockets.exceptions import ConnectionClosed

from broker import Client
from broker.testing import BrokerProcess

pytestmark = pytest.mark.timeout(120)


def test_graceful_restart_with_state_dir_loses_no_acknowledged_publication(tmp_path):
    state = tmp_path / "state"
    first = BrokerProcess(args=["--shards", "2", "--allow-anonymous", "--state-dir", str(state)],
                          log_path=str(tmp_path / "first.log")).start()
    second = BrokerProcess(args=first.args, port=first.port, log_path=str(tmp_path / "second.log"))
    channels = [f"bill:{i}" for i in range(5)]
    acked: dict[str, list[int]] = defaultdict(list)
    received: dict[tuple[int, str], list[int]] = defaultdict(list)
    start: dict[tuple[int, str], int] = {}
    lost: list = []

    def publish_all(broker: BrokerProcess, rounds: int) -> None:
        for i in range(rounds):
            for channel in channels:
                reply = broker.publish(channel, {"round": i})
                acked[channel].append(reply["offset"])

    async def scenario() -> None:
        clients = [Client(first.ws_url, backoff_initial=0.05, backoff_max=0.3) for _ in range(20)]
        for n, client in enumerate(clients):
            await client.connect()
            for channel in channels[n % 2:n % 2 + 3]:
                reply = await client.subscribe(
                    channel, lambda pub, n=n: received[n, pub.channel].append(pub.offset),
                    on_lost=lambda channel, reason, n=n: lost.append((n, channel, reason)))
                start[n, channel] = reply["offset"]
        await asyncio.to_thread(publish_all, first, 10)
        assert await asyncio.to_thread(first.stop, signal.SIGTERM) == 0
        await asyncio.to_thread(second.start)
        await asyncio.to_thread(publish_all, second, 10)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not all(
                received[key] and received[key][-1] >= max(acked[key[1]]) for key in start):
            await asyncio.sleep(0.05)
        for client in clients:
            await client.close()

    try:
        asyncio.run(scenario())
    finally:
        for broker in (first, second):
            broker.stop()
    assert "reconnect" not in str(lost)
    assert not lost, f"recovery failed: {lost[:3]}"
    for (n, channel), offset in start.items():
        assert received[n, channel] == [o for o in sorted(acked[channel]) if o > offset], (n, channel)
    assert all(offsets == list(range(1, 21)) for offsets in map(sorted, acked.values()))


def test_drain_tells_every_client_on_every_shard_to_reconnect(broker_factory):
    from .wsclient import NativeClient

    broker = broker_factory("--shards", "2", "--allow-anonymous")
    clients: list[NativeClient] = []
    per_shard: list[int] = []
    # The kernel spreads connections over the two listeners; connect until both shards hold some.
    while len(clients) < 12 or (len(clients) < 60 and min(per_shard) == 0):
        clients.append(NativeClient(broker.ws_url))
        clients[-1].subscribe("bill:1")
        per_shard = [shard["connections"] for shard in broker.api("GET", "/api/stats")[1]["shards"]]
    assert len(per_shard) == 2 and min(per_shard) > 0 and sum(per_shard) == len(clients), per_shard
    broker.publish("bill:1", "last words")
    broker.process.send_signal(signal.SIGTERM)
    for client in clients:
        assert client.pubs(1)[0]["data"] == "last words"  # flushed before the close
        message = client.recv()
        assert message["op"] == "reconnect" and message["reason"]
        assert isinstance(message["after_ms"], int) and message["after_ms"] >= 0
        with pytest.raises(ConnectionClosed) as closed:
            client.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
    assert broker.process.wait(20) == 0


def test_a_second_broker_on_the_same_state_dir_is_refused_while_the_first_runs(tmp_path):
    state = tmp_path / "state"
    first = BrokerProcess(args=["--shards", "1", "--allow-anonymous", "--state-dir", str(state)],
                          log_path=str(tmp_path / "first.log")).start()
    try:
        first.publish("bill:1", {"n": 1})
        second = subprocess.run([sys.executable, "-m", "broker", "serve", "--port", "0", "--shards", "1",
                                 "--state-dir", str(state)], capture_output=True, text=True, timeout=60)
        assert second.returncode == 1
        assert f"state dir {state} is in use by another broker (supervisor pid {first.process.pid})" \
            in second.stderr
        assert first.publish("bill:1", {"n": 2})["offset"] == 2   # the first one's journal is still its own
    finally:
        assert first.stop(signal.SIGTERM) == 0
    # once the first has stopped, the directory is free again and its state carries on
    third = BrokerProcess(args=["--shards", "1", "--allow-anonymous", "--state-dir", str(state)],
                          log_path=str(tmp_path / "third.log")).start()
    try:
        assert third.publish("bill:1", {"n": 3})["offset"] == 3
    finally:
        third.stop(signal.SIGTERM)
