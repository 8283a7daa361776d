"""The embeddable Broker, driven through its public import only."""
import asyncio

import pytest

import broker
from broker import Broker, Client, Publisher

pytestmark = pytest.mark.timeout(60)


def test_public_api_is_what_the_docs_say():
    documented = {"__version__", "Broker", "Publisher", "AsyncPublisher", "Client", "Publication",
                  "Config", "load_config", "BrokerError", "ConfigError", "AuthError",
                  "ProtocolViolation", "EngineUnavailable", "PublishError", "RecoveryFailed"}
    assert set(broker.__all__) == documented
    text = open("docs/api.md", encoding="utf-8").read()
    for name in documented:
        assert f"`{name}`" in text, f"{name} is not documented in docs/api.md"


def test_embedded_broker_start_publish_receive_shutdown():
    with Broker(port=0, api_key="k", allow_anonymous=True) as embedded:
        assert embedded.port != 0

        async def scenario() -> list:
            received: list = []
            got_all = asyncio.Event()

            def on_pub(pub) -> None:
                received.append((pub.channel, pub.offset, pub.data))
                if len(received) == 3:
                    got_all.set()

            async with Client(embedded.ws_url) as client:
                await client.subscribe("bill:HB1", on_pub)
                with Publisher(embedded.url, api_key="k") as pub:
                    await asyncio.to_thread(pub.broadcast_bill_update, "HB1", {"v": 1})
                    await asyncio.to_thread(pub.broadcast_bill_update, "HB1", {"v": 2})
                    await asyncio.to_thread(pub.publish, "bill:HB1", {"v": 3})
                    stats = await asyncio.to_thread(pub.get_stats)
                    assert stats["published"] == 3
                await asyncio.wait_for(got_all.wait(), 10)
            return received

        received = asyncio.run(scenario())
        assert received == [("bill:HB1", 1, {"v": 1}), ("bill:HB1", 2, {"v": 2}),
                            ("bill:HB1", 3, {"v": 3})]
        assert embedded.stats()["delivered"] == 3
