"""broker.peerlink: the framing, and two shards' links over real sockets
(Unix and TCP), including a peer that is not listening yet and one that
restarts."""
from __future__ import annotations

import asyncio
import os
import socket

import pytest

from broker.peerlink import Decoder, PeerLinks, encode


def test_messages_survive_any_split_of_the_stream():
    messages = [[b"", b"3", b"17", b"PUB", b"x" * 70_000], [b"one"], [b"", b""], [b"a", b"", b"bc"]]
    wire = b"".join(encode(m) for m in messages)
    for step in (1, 2, 3, 7, 8, 9, 64, 4096, len(wire)):
        decoder, got = Decoder(), []
        for i in range(0, len(wire), step):
            got += decoder.feed(wire[i:i + step])
        assert got == messages, step
        assert decoder.feed(b"") == []


def _addresses(tmp_path, kind: str) -> list[str]:
    if kind == "ipc":
        return [f"ipc://{tmp_path}/req-{i}" for i in range(2)]
    ports = []
    for _ in range(2):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
    return [f"tcp://127.0.0.1:{port}" for port in ports]


async def _until(predicate, seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


@pytest.mark.parametrize("kind", ["ipc", "tcp"])
def test_requests_reach_the_peer_and_answers_come_back_in_order(tmp_path, kind):
    addresses = _addresses(tmp_path, kind)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        replies: list[list[bytes]] = []
        asker = PeerLinks(0, addresses, loop, serve=lambda frames: None, on_reply=replies.append)
        # The peer is not listening yet: sends fail (the caller retries) until it is.
        assert asker.send(1, [b"early"]) is False
        await asyncio.sleep(0.05)
        assert asker.send(1, [b"early"]) is False
        answerer = PeerLinks(1, addresses, loop, serve=lambda frames: [b"re", *frames], on_reply=replies.append)
        try:
            sent = 0

            async def send_when_connected() -> None:
                nonlocal sent
                while not asker.send(1, [b"%d" % sent, b"x" * sent]):
                    await asyncio.sleep(0.01)
                sent += 1

            await send_when_connected()
            for _ in range(199):
                await send_when_connected()
            await _until(lambda: len(replies) == 200)
            assert replies == [[b"re", b"%d" % i, b"x" * i] for i in range(200)]
            assert asker.peers == [1] and answerer.peers == [0]
        finally:
            asker.close()
            answerer.close()

    asyncio.run(main())


def test_a_link_to_a_listening_peer_is_made_before_the_first_request(tmp_path):
    """The links are made at start (and after a failure, on use): the first
    request to a peer never waits for a retry timer, and the owner hears of
    each connection so what waits for it can go at once."""
    addresses = _addresses(tmp_path, "ipc")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        answerer = PeerLinks(1, addresses, loop, serve=lambda frames: [b"ok"], on_reply=lambda frames: None)
        connected: list[int] = []
        replies: list[list[bytes]] = []
        asker = PeerLinks(0, addresses, loop, serve=lambda frames: None, on_reply=replies.append,
                          on_connected=connected.append)
        try:
            await _until(lambda: connected == [1], seconds=1.0)
            assert asker.send(1, [b"first"]) is True  # no request was needed to open it
            await _until(lambda: replies == [[b"ok"]], seconds=1.0)
        finally:
            asker.close()
            answerer.close()

    asyncio.run(main())


def test_a_restarted_peer_is_reached_again(tmp_path):
    addresses = _addresses(tmp_path, "ipc")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        replies: list[list[bytes]] = []
        asker = PeerLinks(0, addresses, loop, serve=lambda frames: None, on_reply=replies.append)
        try:
            for generation in (b"first", b"second"):
                answerer = PeerLinks(1, addresses, loop, serve=lambda frames, g=generation: [g],
                                     on_reply=replies.append)
                await _until(lambda: asker.send(1, [b"ping"]))
                await _until(lambda: replies and replies[-1] == [generation])
                answerer.close()  # the peer dies; its socket file stays behind
                assert os.path.exists(addresses[1][len("ipc://"):])
                await _until(lambda: asker.send(1, [b"ping"]) is False)
        finally:
            asker.close()

    asyncio.run(main())
