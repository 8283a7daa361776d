"""ClusterEngine's stream cursor, driven directly: a real home engine behind
an in-process stand-in for the ZeroMQ router (the stream and requests are
what the tests feed, so gaps, duplicates and epoch changes are exact).
Also the idle sweep on home and following shards, and the epochs of
channels it drops (issue 7)."""
import asyncio

from broker.config import Config
from broker.engine.base import Position
from broker.engine.cluster import ClusterEngine, home_of
from broker.engine.journal import Journal
from broker.engine.memory import EPOCH_BUCKETS, MemoryEngine


class InProcessRouter:
    """What ClusterEngine needs of broker.router.Router, with no sockets."""

    def __init__(self) -> None:
        self.home: ClusterEngine | None = None
        self.subscribed: set[str] = set()
        self.forwarded: list = []
        self.followers: list[InProcessRouter] = []  # the routers of the shards that read our stream
        self.reads = 0
        self.hwm_drops = self.requests_failed = 0

    def followed(self, channel: str) -> bool:
        return any(channel in follower.subscribed for follower in self.followers)

    def read_subscriptions(self) -> None:
        self.reads += 1

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
    home_router.followers.append(router)
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


# ------------------------------------------------------------------ the idle sweep

def nobody(channel: str) -> bool:
    """``is_active`` of a shard with no local subscriber at all."""
    return False


def test_the_home_never_sweeps_a_channel_only_another_shard_follows():
    async def main():
        home, engine, delivered, lost = make()
        channel = channel_homed_on(0)
        start = await engine.position(channel)  # the follower's sync created the state on the home
        assert home.sweep(nobody) == 0 and home.router.reads == 1
        home.local.publish_now(channel, b"1")
        assert home.local.position_now(channel) == Position(start.epoch, 1)
        stream(home, engine, channel, [1])
        assert delivered == [1] and lost == [] and engine.lost_streams == 0

    asyncio.run(main())


def test_once_no_shard_follows_it_an_unpublished_channel_is_swept_and_keeps_its_epoch():
    async def main():
        home, engine, delivered, lost = make()
        channel = channel_homed_on(0)
        start = await engine.position(channel)
        engine.release(channel)                   # the follower's last subscriber left
        assert home.sweep(nobody) == 1 and home.local.stats()["channels"] == 0
        # Nothing was ever published: nothing was lost, no new epoch.
        assert await engine.position(channel) == start
        recovery = await engine.recover(channel, start.epoch, 0)
        assert recovery.recovered and recovery.publications == []
        home.local.publish_now(channel, b"1")
        stream(home, engine, channel, [1])
        assert delivered == [1] and lost == []

    asyncio.run(main())


def test_a_follower_releases_a_stream_nobody_here_subscribes_to_any_more():
    async def main():
        home, engine, delivered, lost = make()
        channel = channel_homed_on(0)
        await engine.position(channel)            # a subscribe abandoned before it joined the table
        assert engine.sweep(lambda c: c == channel) == 0 and channel in engine.router.subscribed
        assert engine.sweep(nobody) == 1 and channel not in engine.router.subscribed
        assert home.sweep(nobody) == 1            # and then its home may forget it

    asyncio.run(main())


def test_recovery_from_an_offset_the_stream_has_not_brought_here_yet_catches_up():
    async def main():
        home, engine, delivered, lost = make()
        channel = channel_homed_on(0)
        start = await engine.position(channel)
        for n in range(3):
            home.local.publish_now(channel, b"%d" % n)
        stream(home, engine, channel, [1])        # 2 and 3 are still on their way
        # The client saw offset 3 through the home shard, then reconnected
        # here: this shard's copy repairs up to the home's position rather
        # than tell the client it lost something it did not.
        recovery = await asyncio.wait_for(engine.recover(channel, start.epoch, 3), 2)
        assert recovery.recovered and recovery.publications == []
        assert recovery.position == Position(start.epoch, 3)
        stream(home, engine, channel, [2, 3])     # the stream's late copies are duplicates
        assert delivered == [1, 2, 3]
        assert not (await engine.recover(channel, start.epoch, 9)).recovered  # the home never had 9
        assert lost == []

    asyncio.run(main())


def test_a_recovery_that_outlives_its_stream_joins_the_stream_again():
    async def main():
        home, engine, delivered, lost = make()
        channel = channel_homed_on(0)
        start = await engine.position(channel)
        home.local.publish_now(channel, b"1")     # not streamed here yet
        gate = asyncio.Event()
        fetch = engine.streams.source.fetch

        async def held_fetch(*args):              # the home's history answers late
            await gate.wait()
            return await fetch(*args)

        engine.streams.source.fetch = held_fetch
        task = asyncio.create_task(engine.recover(channel, start.epoch, 1))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not task.done()
        engine._on_publication(channel.encode() + b"\0", b"other-epoch", 2, b"x")  # the stream is lost
        gate.set()
        recovery = await asyncio.wait_for(task, 2)
        # Answered from a fresh cursor, not the lost one: the home's stream
        # goes on in the same epoch at 1, so nothing after 1 was missed.
        assert lost and recovery.recovered and recovery.publications == []
        # Not left subscribed to a stream nobody follows here any more:
        assert recovery.position == Position(start.epoch, 1) and channel in engine.router.subscribed
        assert engine.stats()["remote_channels"] == 1

    asyncio.run(main())


def aged_engine(tmp_path=None):
    """A memory engine whose ``bill`` history ages out after 10 s of a fake clock."""
    config = Config(shards=1)
    config.namespaces["bill"].history_ttl = 10.0
    clock = [0.0]
    journal = Journal(str(tmp_path / "journal")) if tmp_path is not None else None
    return config, clock, MemoryEngine(config, clock=lambda: clock[0], journal=journal)


def two_buckets() -> tuple[str, str]:
    """Two channel names whose epochs come from different generation buckets."""
    first = "bill:busy"
    quiet = next(f"bill:q{i}" for i in range(100)
                 if hash(f"bill:q{i}") % EPOCH_BUCKETS != hash(first) % EPOCH_BUCKETS)
    return first, quiet


def test_a_swept_channel_that_had_publications_comes_back_in_a_new_epoch():
    busy, quiet = two_buckets()
    _, clock, engine = aged_engine()
    unpublished = engine.position_now(quiet)
    first = engine.publish_now(busy, b"1")
    clock[0] = 11.0                               # its history aged out
    assert engine.sweep(nobody) == 2
    again = engine.position_now(busy)
    assert again.epoch != first.epoch and again.offset == 0, "offset 1 is never reused in an epoch"
    assert not engine.recover_now(busy, first.epoch, 1).recovered
    assert engine.position_now(quiet) == unpublished
    assert engine.recover_now(quiet, unpublished.epoch, 0).recovered


def test_the_journal_replays_swept_and_recreated_channels(tmp_path):
    busy, quiet = two_buckets()
    config, clock, engine = aged_engine(tmp_path)
    unpublished = engine.position_now(quiet)
    engine.publish_now(busy, b"1")
    clock[0] = 11.0
    assert engine.sweep(nobody) == 2
    assert engine.position_now(quiet) == unpublished
    recreated = engine.publish_now(busy, b"2")
    engine._journal.close()
    replacement = MemoryEngine(config, clock=lambda: clock[0], journal=Journal(str(tmp_path / "journal")))
    assert replacement.position_now(quiet) == unpublished
    assert replacement.position_now(busy) == recreated
    assert replacement.history_now(busy, 0, 10)[1] == [(1, b"2")]


def test_client_ahead_of_the_cursor_is_recovered_once_the_copy_catches_up():
    async def main():
        home, engine, delivered, lost = make()
        channel = channel_homed_on(0)
        start = await engine.position(channel)
        for n in range(5):
            home.local.publish_now(channel, b"%d" % n)
        stream(home, engine, channel, [1, 2])         # this shard delivered 2; 3..5 in flight
        # The client saw 4 before it moved here: not a failed recovery (the
        # cursor repairs from the home's history instead of waiting).
        recovery = await engine.recover(channel, start.epoch, 4)
        assert recovery.recovered and recovery.position.offset == 5
        assert [offset for offset, _ in recovery.publications] == [5]
        assert delivered == [1, 2, 3, 4, 5] and lost == []
        assert not (await engine.recover(channel, start.epoch, 9)).recovered  # beyond the home itself

    asyncio.run(main())


def test_a_broadcast_sends_each_home_one_request_carrying_all_its_items():
    home, engine, _, _ = make()
    router = engine.router
    sent: list[tuple[bytes, int]] = []
    original = router.request

    async def counting(peer, verb, *args, timeout=None):
        sent.append((verb, len(args) // 2))
        return await original(peer, verb, *args, timeout=timeout)

    router.request = counting
    remote = [f"bill:{i}" for i in range(100) if home_of(f"bill:{i}", 2) == 0][:5]
    local = [f"bill:{i}" for i in range(100) if home_of(f"bill:{i}", 2) == 1][:3]
    items = [(c, b'{"n":1}') for c in remote + local] + [(remote[0], b'{"n":2}')]
    positions = asyncio.run(engine.publish_many(items))
    assert sent == [(b"PUBM", 6)]  # one message for the other home; local ones need none
    assert [p.offset for p in positions] == [1] * 8 + [2]  # the same channel twice: in order
    assert home.local.history_now(remote[0], 0, 10)[1] == [(1, b'{"n":1}'), (2, b'{"n":2}')]
