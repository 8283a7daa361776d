"""The embedded Broker's misuse and its admin API: it has no supervisor, so
deploys and reloads are answered 501; without an api_key the admin API
answers loopback only (403 otherwise)."""
from __future__ import annotations

import asyncio
import socket
import time

import pytest

from broker import Broker, Client, Publisher
from broker.testing import http_json

from ..redis_helpers import RedisServer

pytestmark = pytest.mark.timeout(60)


def non_loopback_address() -> str:
    """This machine's address on its default route (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("203.0.113.1", 9))  # a documentation address
        address = probe.getsockname()[0]
    assert not address.startswith("127."), "the test needs an address other than loopback"
    return str(address)


def test_admin_api_of_an_embedded_broker_without_api_key():
    with Broker(host="0.0.0.0", port=0, api_key=None, allow_anonymous=True) as embedded:
        status, body = http_json("POST", f"http://127.0.0.1:{embedded.port}/api/admin/reload", {"config": None})
        assert status == 501 and body["error"] == "no supervisor: operations need `broker serve`"
        address = non_loopback_address()
        status, body = http_json("POST", f"http://{address}:{embedded.port}/api/admin/deploy", {"config": None})
        assert status == 403 and "loopback only" in body["error"]


def test_start_twice_bad_host_and_shutdown_before_start():
    never = Broker(port=0)
    never.shutdown()   # nothing started: nothing to stop
    with Broker(port=0, api_key="k") as embedded:
        with pytest.raises(RuntimeError, match="already started"):
            embedded.start()
    with pytest.raises(RuntimeError, match="did not start"):
        Broker(host="256.0.0.1", port=0).start()


def test_an_embedded_broker_on_the_redis_engine_publishes_and_delivers(tmp_path):
    redis = RedisServer(tmp_path).start()
    try:
        with Broker(port=0, api_key="k", allow_anonymous=True, redis_url=redis.url) as embedded:
            deadline = time.monotonic() + 15   # ready once the engine reaches Redis
            while http_json("GET", embedded.url + "/readyz")[0] != 200:
                assert time.monotonic() < deadline, "the embedded broker never became ready"
                time.sleep(0.05)
            async def scenario() -> tuple[int, object]:
                got: asyncio.Queue = asyncio.Queue()
                async with Client(embedded.ws_url) as client:
                    await client.subscribe("bill:R1", got.put_nowait)
                    with Publisher(embedded.url, api_key="k") as publisher:
                        reply = await asyncio.to_thread(publisher.publish, "bill:R1", {"v": 1})
                    pub = await asyncio.wait_for(got.get(), 10)
                    return reply["offset"], pub.data
            assert asyncio.run(scenario()) == (1, {"v": 1})
        assert "bill:R1" in redis.cli("KEYS", "*")  # the channel's state lives in Redis
    finally:
        redis.stop()
