"""ClusterEngine's stream cursor, driven directly: a real home engine behind
an in-process stand-in for the ZeroMQ router (the stream and requests are
what the tests feed, so gaps, duplicates and epoch changes are exact)."""
import asyncio

from broker.config import Config
from broker.engine.cluster import ClusterEngine, home_of


class InProcessRouter:
    """What ClusterEngine needs of broker.router.Router, with no sockets."""

    def __init__(self) -> None:
        self.home: ClusterEngine | None = None
        self.subscribed: set[str] = set()
        self.forwarded: list = []

    def publish(self, *args) -> None:
        self.forwarded.append(args)

    def subscribe(self, channel: str) -> None:
        self.subscribed.add(channel)

    def unsubscribe(self, channel: str) -> None:
        self.subscribed.discard(channel)

    def sync(self, home: int, channel: str):
        future = asyncio.get_running_loop().create_future()
        future.set_result(self.home._on_sync_request(home, channel))
        return future

    async def request(self, peer: int, verb: bytes, *args: bytes, timeout=None) -> list[bytes]:
        reply = self.home._on_request(verb, list(args))
        assert reply[0] == b"ok", reply
        return reply[1:]


def channel_homed_on(shard: int) -> str:
    return next(f"bill:{i}" for i in range(100) if home_of(f"bill:{i}", 2) == shard)


def make(history_size: int = 100):
    config = Config(shards=2)
    config.namespaces["bill"].history_size = history_size
    home_router, router = InProcessRouter(), InProcessRouter()
    home = ClusterEngine(config, 0, 2, home_router)
    engine = ClusterEngine(config, 1, 2, router)
    router.home = home
    delivered: list[int] = []
    lost: list[str] = []
    engine.deliver = lambda channel, offset, data: delivered.append(offset)
    engine.lost = lambda channel, reason: lost.append(reason)
    return home, engine, delivered, lost


def stream(home: ClusterEngine, engine: ClusterEngine, channel: str, offsets) -> None:
    """Deliver the home's publications with these offsets as the SUB would."""
    epoch = home.local.position_now(channel).epoch.encode()
    for offset in offsets:
        _, data = home.local.history_now(channel, offset - 1, 1)[1][0]
        engine._on_publication(channel.encode() + b"\0", epoch, offset, data)


def test_gap_is_filled_from_history_before_anything_newer():
    async def main():
        home, engine, delivered, lost = make()
        channel = channel_homed_on(0)
        position = await engine.position(channel)
        assert position.offset == 0
        for n in range(8):
            home.local.publish_now(channel, b'{"n":%d}' % n)
        stream(home, engine, channel, [1, 2, 5, 6])  # 3 and 4 dropped on the way
        stream(home, engine, channel, [7])           # arrives while repairing
        for _ in range(5):
            await asyncio.sleep(0)
        stream(home, engine, channel, [6, 8])        # a duplicate, then live again
        assert delivered == [1, 2, 3, 4, 5, 6, 7, 8]
        assert lost == [] and engine.repairs == 1

    asyncio.run(main())


def test_gap_beyond_the_history_ends_the_stream():
    async def main():
        home, engine, delivered, lost = make(history_size=2)
        channel = channel_homed_on(0)
        await engine.position(channel)
        for n in range(6):
            home.local.publish_now(channel, b"%d" % n)
        stream(home, engine, channel, [6])  # 1..5 missed; only 5 and 6 are retained
        for _ in range(5):
            await asyncio.sleep(0)
        assert delivered == [] and lost == ["missed publications are no longer in the history"]
        assert channel not in engine.router.subscribed

    asyncio.run(main())


def test_another_epoch_on_the_stream_ends_it():
    async def main():
        home, engine, delivered, lost = make()
        channel = channel_homed_on(0)
        await engine.position(channel)
        engine._on_publication(channel.encode() + b"\0", b"other-epoch", 1, b"1")
        assert delivered == [] and lost and "epoch" in lost[0]

    asyncio.run(main())


def test_recovery_covers_up_to_the_cursor():
    async def main():
        home, engine, delivered, lost = make()
        channel = channel_homed_on(0)
        start = await engine.position(channel)
        for n in range(5):
            home.local.publish_now(channel, b"%d" % n)
        stream(home, engine, channel, [1, 2, 3])      # the cursor is at 3; 4, 5 in flight
        recovery = await engine.recover(channel, start.epoch, 1)
        assert recovery.recovered and recovery.position.offset == 3
        assert [offset for offset, _ in recovery.publications] == [2, 3]
        assert not (await engine.recover(channel, "stale", 0)).recovered

    asyncio.run(main())


def test_client_ahead_of_the_cursor_is_recovered_once_the_copy_catches_up():
    async def main():
        home, engine, delivered, lost = make()
        channel = channel_homed_on(0)
        start = await engine.position(channel)
        for n in range(5):
            home.local.publish_now(channel, b"%d" % n)
        stream(home, engine, channel, [1, 2])         # this shard delivered 2; 3..5 in flight
        # The client saw 4 before it moved here: not a failed recovery.
        recovery = await engine.recover(channel, start.epoch, 4)
        assert recovery.recovered and recovery.position.offset == 5
        assert [offset for offset, _ in recovery.publications] == [5]
        assert delivered == [1, 2, 3, 4, 5] and lost == []
        assert not (await engine.recover(channel, start.epoch, 9)).recovered  # beyond the home itself

    asyncio.run(main())
