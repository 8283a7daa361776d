"""Publications forwarded between shards in batches: many publishers at once.

A shard sends the requests one loop turn produced for a peer as one ZeroMQ
message, and the peer answers a turn's requests in one message too. Many
keep-alive connections writing their requests at the same moment make
turns with several requests for the same home; every one must still get
its own answer, with its own offset, exactly once.
"""
import json
import socket
from collections import defaultdict

import pytest

pytestmark = pytest.mark.timeout(120)

CONNECTIONS = 48
ROUNDS = 6
CHANNELS = [f"bill:{i}" for i in range(10)]


def _read_response(sock: socket.socket, buffer: bytearray) -> tuple[int, dict]:
    """One HTTP/1.1 response with a Content-Length body from a keep-alive socket."""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        assert chunk, "the broker closed a keep-alive connection"
        buffer += chunk
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = next(int(line.split(":", 1)[1]) for line in lines[1:] if line.lower().startswith("content-length:"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "the broker closed a keep-alive connection"
        rest += chunk
    buffer[:] = rest[length:]
    return status, json.loads(rest[:length])


def test_publishers_at_once_through_every_shard_each_get_their_own_offset(broker_factory):
    broker = broker_factory("--shards", "2", "--allow-anonymous")
    socks = [socket.create_connection((broker.host, broker.port), timeout=30) for _ in range(CONNECTIONS)]
    buffers = [bytearray() for _ in socks]
    acked: dict[str, list[int]] = defaultdict(list)
    sent: dict[str, list[str]] = defaultdict(list)
    try:
        for round_ in range(ROUNDS):
            requests = []
            for n, sock in enumerate(socks):
                channel = CHANNELS[(n + round_) % len(CHANNELS)]
                body = json.dumps({"channel": channel, "data": {"n": n, "round": round_}}).encode()
                requests.append(channel)
                sent[channel].append(f"{n}/{round_}")
                sock.sendall(b"POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: apikey "
                             + broker.api_key.encode() + b"\r\nContent-Type: application/json\r\n"
                             + b"Content-Length: %d\r\n\r\n" % len(body) + body)
            for sock, buffer, channel in zip(socks, buffers, requests, strict=True):
                status, reply = _read_response(sock, buffer)
                assert status == 200, reply
                assert reply["channel"] == channel
                acked[channel].append(reply["offset"])
    finally:
        for sock in socks:
            sock.close()

    for channel in CHANNELS:
        offsets = acked[channel]
        # Every acknowledgement its own offset, and together exactly 1..N.
        assert sorted(offsets) == list(range(1, len(sent[channel]) + 1)), channel
        status, history = broker.api("GET", f"/api/history?channel={channel}&since=0")
        assert status == 200
        stored = {f"{p['data']['n']}/{p['data']['round']}": p["offset"] for p in history["publications"]}
        assert sorted(stored) == sorted(sent[channel]), "every publication stored once"
