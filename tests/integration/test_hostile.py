"""The hostile input catalogue (docs/hostile-input.md), one test per entry,
against a real `broker serve` over raw sockets.

Entries already covered elsewhere are referenced in the catalogue, not
repeated here (tests/integration/test_wire.py, test_native.py, test_api.py).
Every test ends by checking that the shard survived: same pid, /readyz 200.
Tests marked ``xfail(strict=True)`` pin a bug found by this catalogue: they
fail (as expected) today and turn into a failure of the suite the day the
bug is fixed, so the marker is removed with the fix.
"""
from __future__ import annotations

import base64
import json
import socket
import struct
import time
import zlib

import jwt
import psutil
import pytest
from websockets.exceptions import ConnectionClosed

from broker.testing import BrokerProcess, http_json

from .wsclient import NativeClient, RawSocket, handshake_request

pytestmark = [pytest.mark.timeout(120), pytest.mark.filterwarnings("ignore::jwt.InsecureKeyLengthWarning")]

F = RawSocket.frame
CLOSE_1000 = F(0x8, struct.pack("!H", 1000))
DEFLATE = "Sec-WebSocket-Extensions: permessage-deflate\r\n"
HANDSHAKE_TIMEOUT = 1.0
BAD_COMMAND_BUDGET = 100


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    config = tmp / "hostile.toml"
    config.write_text(f"[limits]\nhandshake_timeout = {HANDSHAKE_TIMEOUT}\n"
                      f"bad_command_budget = {BAD_COMMAND_BUDGET}\n"
                      "[namespaces.room]\nsubscribe = \"authenticated\"\nclient_publish = true\n")
    proc = BrokerProcess(args=["--shards", "1", "--allow-anonymous", "--config", str(config)],
                         log_path=str(tmp / "broker.log"))
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture(autouse=True)
def shard_survives(broker):
    """No hostile input may crash a shard (it would restart with a new pid)."""
    before = _shard_pid(broker)
    yield
    assert _shard_pid(broker) == before, "the shard died and was restarted"
    assert http_json("GET", broker.url + "/readyz")[0] == 200


def _shard_pid(broker: BrokerProcess) -> int:
    status, stats = broker.api("GET", "/api/stats")
    assert status == 200
    return stats["shards"][0]["pid"]


def _log(broker: BrokerProcess) -> str:
    with open(broker.log_path, encoding="utf-8", errors="replace") as fh:
        return fh.read()


def http_answer(broker: BrokerProcess, data: bytes) -> tuple[int, dict, bool]:
    """Send raw bytes, read one HTTP answer: (status, JSON body, closed after)."""
    raw = RawSocket(broker.port)
    try:
        raw.send(data)
        status, _, body = raw.read_head()
        try:
            closed = raw.sock.recv(1) == b""
        except (TimeoutError, ConnectionResetError):
            closed = True
        return status, json.loads(body) if body else {}, closed
    finally:
        raw.close()


def upgraded(broker: BrokerProcess, extra: str = "") -> tuple[RawSocket, dict[str, str]]:
    raw = RawSocket(broker.port)
    raw.send(handshake_request(broker.port, extra=extra))
    status, headers, _ = raw.read_head()
    assert status == 101
    return raw, headers


def frames_until_end(raw: RawSocket) -> list[tuple[int, bytes]]:
    """Every frame the server sends until it closes the TCP connection."""
    frames = []
    try:
        while True:
            frames.append(raw.read_frame())
    except (EOFError, ConnectionResetError):
        pass
    return frames


def texts(frames: list[tuple[int, bytes]]) -> list[dict]:
    """The JSON lines of the text frames, in order."""
    return [json.loads(line) for op, payload in frames if op == 0x1 for line in payload.split(b"\n")]


def close_of(frames: list[tuple[int, bytes]]) -> tuple[int, str]:
    payloads = [payload for op, payload in frames if op == 0x8]
    assert payloads, f"no close frame in {frames}"
    return struct.unpack("!H", payloads[0][:2])[0], payloads[0][2:].decode()


def outcome(broker: BrokerProcess, data: bytes, extra: str = "") -> tuple[list[dict], int, str]:
    """Upgrade, send ``data``, answer the server's close: the replies and
    the close code and reason the server gave."""
    raw, _ = upgraded(broker, extra)
    try:
        raw.send(data)
        frames = []
        while True:
            frame = raw.read_frame()
            frames.append(frame)
            if frame[0] == 0x8:
                break
        code, reason = close_of(frames)
        return texts(frames), code, reason
    finally:
        raw.close()


def replies(broker: BrokerProcess, text: bytes) -> list[dict]:
    """Send one text message, then a close; every reply before the server's close."""
    raw, _ = upgraded(broker)
    try:
        raw.send(F(0x1, text))
        got: list[dict] = []
        deadline = time.monotonic() + 5
        expected = sum(1 for line in text.split(b"\n") if line.strip())
        while len(got) < expected and time.monotonic() < deadline:
            op, payload = raw.read_frame()
            if op == 0x1:
                got.extend(json.loads(line) for line in payload.split(b"\n"))
            elif op == 0x8:
                break
        raw.send(CLOSE_1000)
        return got
    finally:
        raw.close()


def deflate(payload: bytes) -> bytes:
    """permessage-deflate of one message (RFC 7692 §7.2.1)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    data = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert data.endswith(b"\x00\x00\xff\xff")
    return data[:-4]


# --------------------------------------------------------------- HTTP layer

MALFORMED_HTTP = {
    "content-length-not-a-number": b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    "content-length-negative": b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    "content-length-overflow": (b"POST /api/publish HTTP/1.1\r\nHost: x\r\n"
                                b"Content-Length: 99999999999999999999999\r\n\r\n"),
    "content-length-and-chunked": (b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                                   b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    "bad-chunk-size": b"POST /api/publish HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n",
    "nul-in-path": b"GET /ready\x00z HTTP/1.1\r\nHost: x\r\n\r\n",
    "unknown-method": b"BREW /readyz HTTP/1.1\r\nHost: x\r\n\r\n",
    "obsolete-line-folding": b"GET /readyz HTTP/1.1\r\nHost: x\r\nX-A: a\r\n  b\r\n\r\n",
    "header-without-colon": b"GET /readyz HTTP/1.1\r\nHost x\r\n\r\n",
    "http2-preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "garbage-request-line": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # a TLS hello on a plain port
}


@pytest.mark.parametrize("data", MALFORMED_HTTP.values(), ids=MALFORMED_HTTP.keys())
def test_malformed_http_is_400_with_a_json_error_then_closed(broker, data):
    status, body, closed = http_answer(broker, data)
    assert status == 400 and "error" in body
    assert closed


def test_request_line_over_the_head_limit_is_431(broker):
    status, body, closed = http_answer(broker, b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 431 and closed


def test_requests_pipelined_after_connection_close_get_no_answer(broker):
    raw = RawSocket(broker.port)
    raw.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
             b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert raw.read_head()[0] == 200
    assert raw.buffer == b"" and raw.sock.recv(100) == b""
    raw.close()


# ---------------------------------------------------------- upgrade headers

def _without(header: bytes, request: bytes) -> bytes:
    return b"\r\n".join(line for line in request.split(b"\r\n") if not line.startswith(header))


BAD_UPGRADES = {
    "no-key": (lambda p: _without(b"Sec-WebSocket-Key", handshake_request(p)), 400),
    "two-keys": (lambda p: handshake_request(p, extra="Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"), 400),
    "key-not-base64": (lambda p: handshake_request(p, key="!!!!!!!!!!!!!!!!!!!!!!=="), 400),
    "key-15-bytes": (lambda p: handshake_request(p, key=base64.b64encode(b"x" * 15).decode()), 400),
    "post": (lambda p: handshake_request(p).replace(b"GET", b"POST", 1), 405),
    "upgrade-h2c": (lambda p: handshake_request(p).replace(b"Upgrade: websocket", b"Upgrade: h2c"), 426),
    "connection-keep-alive": (lambda p: handshake_request(p).replace(b"Connection: Upgrade",
                                                                      b"Connection: keep-alive"), 426),
    "version-list": (lambda p: handshake_request(p, version="13, 8"), 426),
    "no-version": (lambda p: _without(b"Sec-WebSocket-Version", handshake_request(p)), 426),
    "other-path": (lambda p: handshake_request(p, path="/other"), 404),
    "garbage-extensions": (lambda p: handshake_request(p, extra="Sec-WebSocket-Extensions: ;;;===\r\n"), 400),
}


@pytest.mark.parametrize("make, status", BAD_UPGRADES.values(), ids=BAD_UPGRADES.keys())
def test_bad_upgrade_is_refused_with_json_and_nothing_upgraded(broker, make, status):
    got, body, closed = http_answer(broker, make(broker.port))
    assert got == status and "error" in body
    assert closed


def test_unacceptable_deflate_parameters_upgrade_without_compression(broker):
    raw, headers = upgraded(broker, "Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=99\r\n")
    assert "sec-websocket-extensions" not in headers
    raw.send(F(0x1, b'{"id":1,"op":"ping"}'))
    assert raw.read_frame() == (0x1, b'{"id":1,"op":"pong"}')
    raw.close()


def test_frames_sent_with_the_upgrade_request_are_read(broker):
    raw = RawSocket(broker.port)
    raw.send(handshake_request(broker.port) + F(0x1, b'{"id":1,"op":"ping"}'))
    assert raw.read_head()[0] == 101
    assert raw.read_frame() == (0x1, b'{"id":1,"op":"pong"}')
    raw.close()


# ------------------------------------------------------------------- frames

def test_a_frame_announcing_2_63_bytes_is_1009_at_once(broker):
    _, code, _ = outcome(broker, bytes([0x81, 0xFF]) + struct.pack("!Q", 2**63 - 1) + b"mask")
    assert code == 1009


@pytest.mark.parametrize("payload", [
    b'{"op":"ping","x":"\xc0\x80"}',          # overlong encoding of NUL
    b'{"op":"ping","x":"\xed\xa0\x80"}',      # an encoded UTF-16 surrogate
    b'{"op":"ping","x":"\xf4\x90\x80\x80"}',  # beyond U+10FFFF
], ids=["overlong", "surrogate", "beyond-unicode"])
def test_invalid_utf8_variants_close_1007(broker, payload):
    assert outcome(broker, F(0x1, payload))[1] == 1007


def test_utf8_split_across_fragments(broker):
    raw, _ = upgraded(broker)
    raw.send(F(0x1, b'{"id":1,"op":"ping","x":"\xc3', fin=False) + F(0x0, b'\xa9"}'))
    assert raw.read_frame() == (0x1, b'{"id":1,"op":"pong"}')  # valid once reassembled
    raw.close()
    _, code, _ = outcome(broker, F(0x1, b'{"op":"ping","x":"\xc3', fin=False) + F(0x0, b'\x28"}'))
    assert code == 1007


def test_a_thousand_tiny_fragments_are_one_message(broker):
    message = F(0x1, b"{", fin=False) + b"".join(F(0x0, b" ", fin=False) for _ in range(1000)) \
        + F(0x0, b'"id":1,"op":"ping"}')
    raw, _ = upgraded(broker)
    raw.send(message)
    assert raw.read_frame() == (0x1, b'{"id":1,"op":"pong"}')
    raw.close()


@pytest.mark.parametrize("frame, code", [
    (F(0x8, b"\x03"), 1002),                                        # close payload of one byte
    (F(0x8, struct.pack("!H", 999)), 1002),                         # close code below 1000
    (F(0x8, struct.pack("!H", 1005)), 1002),                        # a code that must never be sent
    (F(0x8, struct.pack("!H", 1000) + b"\xff"), 1007),              # close reason not UTF-8
    (F(0x1, b'{"op":', fin=False) + F(0x8, struct.pack("!H", 1000)), 1002),  # close inside a message
    (F(0x1, b'{"op":', fin=False) + F(0x1, b'{"op":"ping"}'), 1002),  # new message before the last ended
    (F(0x1, b'{"op":"ping"}', rsv=0b100), 1002),                     # RSV1 without permessage-deflate
], ids=["close-1-byte", "close-999", "close-1005", "close-reason-not-utf8", "close-mid-message",
        "text-mid-message", "rsv1-without-deflate"])
def test_control_frames_out_of_place_and_bad_close_frames(broker, frame, code):
    assert outcome(broker, frame)[1] == code


def test_unsolicited_pong_is_ignored(broker):
    raw, _ = upgraded(broker)
    raw.send(F(0xA, b"surprise") + F(0x1, b'{"id":1,"op":"ping"}'))
    assert raw.read_frame() == (0x1, b'{"id":1,"op":"pong"}')
    raw.close()


def test_a_client_that_closes_gets_no_answer_to_later_frames(broker):
    raw, _ = upgraded(broker)
    raw.send(CLOSE_1000 + F(0x1, b'{"id":1,"op":"ping"}'))
    frames = frames_until_end(raw)
    assert frames == [(0x8, struct.pack("!H", 1000))]
    raw.close()


# --------------------------------------------------------- compressed bombs

def test_a_small_deflate_frame_inflating_past_the_limit_is_1009(broker):
    bomb = deflate(b" " * 2_000_000)
    assert len(bomb) < 4096  # 2 MB of spaces in a few KB
    _, code, _ = outcome(broker, F(0x1, bomb, rsv=0b100), DEFLATE)
    assert code == 1009


def test_a_fragmented_deflate_bomb_is_1009(broker):
    bomb = deflate(b" " * 200_000)
    half = len(bomb) // 2
    data = F(0x1, bomb[:half], rsv=0b100, fin=False) + F(0x0, bomb[half:])
    assert outcome(broker, data, DEFLATE)[1] == 1009


def test_invalid_deflate_data_is_1002(broker):
    assert outcome(broker, F(0x1, b"\xff\xff\xff\xff", rsv=0b100), DEFLATE)[1] == 1002


def test_a_valid_compressed_command_is_answered(broker):
    raw, _ = upgraded(broker, DEFLATE)
    raw.send(F(0x1, deflate(b'{"id":3,"op":"ping"}'), rsv=0b100))
    opcode, payload = raw.read_frame()
    assert opcode == 0x1  # our reply may be compressed (RSV1) or not; it decodes to the pong
    assert b"pong" in payload or b"pong" in zlib.decompressobj(-15).decompress(payload + b"\x00\x00\xff\xff")
    raw.close()


# --------------------------------------------------------------------- JSON

@pytest.mark.parametrize("line, message", [
    (b"[" * 30000 + b"]" * 30000, "nested too deeply"),
    (b'{"id":1,"op":"publish","channel":"room:1","data":' + b"9" * 5000 + b"}", "invalid JSON"),
    (b'{"id":1,"op":"publish","channel":"room:1","data":1e999}', "invalid JSON"),
    (b'{"id":1,"op":"publish","channel":"room:1","data":NaN}', "invalid JSON"),
    (b'{"id":1,"op":"publish","channel":"room:1","data":"\\ud800"}', "invalid JSON"),
    (b'{"id":1,"op":"subscribe","channel":"bill:\\ud800"}', "channel"),
    (b'\xef\xbb\xbf{"id":1,"op":"ping"}', "invalid JSON"),
    (b'{"id":1.5,"op":"ping"}', "id must be an integer"),
    (b'{"id":true,"op":"ping"}', "id must be an integer"),
    (b'{"id":"1","op":"ping"}', "id must be an integer"),
    (b'{"id":1,"op":"ping","op":"pingx"}', "unknown op"),    # duplicate keys: the last wins
    (b'"just a string"', "must be a JSON object"),
    (b'{"id":1,"op":"subscribe","channel":"bill:1","recover":[1]}', "recover"),
    (b'{"id":1,"op":"subscribe","channel":"bill:1","recover":{"epoch":"e","offset":-1}}', "recover"),
    (b'{"id":1,"op":"publish","channel":"room:1"}', "needs data"),
], ids=["deep", "huge-int", "1e999", "NaN", "lone-surrogate-data", "lone-surrogate-channel", "bom",
        "id-float", "id-bool", "id-string", "duplicate-keys", "not-an-object", "recover-list",
        "recover-negative", "publish-without-data"])
def test_bad_json_and_bad_commands_are_400_and_the_connection_stays(broker, line, message):
    got = replies(broker, line + b'\n{"id":99,"op":"ping"}')
    assert got[0]["op"] == "error" and got[0]["code"] == 400 and message in got[0]["message"], got
    assert got[-1] == {"id": 99, "op": "pong"}


def test_a_huge_integer_id_is_echoed(broker):
    big = int("9" * 200)
    assert replies(broker, b'{"id":%d,"op":"ping"}' % big) == [{"id": big, "op": "pong"}]


@pytest.mark.parametrize("op", [b'["subscribe"]', b"{}"], ids=["list", "object"])
def test_an_op_that_is_not_a_string_is_400(broker, op):
    got = replies(broker, b'{"id":1,"op":%s}\n{"id":2,"op":"ping"}' % op)
    assert got and got[0]["code"] == 400 and got[-1] == {"id": 2, "op": "pong"}, got


# ---------------------------------------------------------------- channels

@pytest.mark.parametrize("channel, code", [
    ("bill", 400), ("", 400), (":x", 400), ("bill:é", 400), ("bill:a b", 400), ("bill:a\u0000", 400),
    ('bill:a"b', 400), ("bill:a\\b", 400), ("bill:a\nb", 400), (5, 400), (None, 400), (["bill:1"], 400),
    ({"name": "bill:1"}, 400), ("nope:1", 404), ("bill:" + "a" * 251, 400),
], ids=["no-colon", "empty", "no-namespace", "non-ascii", "space", "nul", "quote", "backslash",
        "newline", "number", "null", "list", "object", "unknown-namespace", "256-bytes"])
def test_odd_channel_names_are_refused(broker, channel, code):
    got = replies(broker, json.dumps({"id": 1, "op": "subscribe", "channel": channel}).encode())
    assert got == [got[0]] and got[0]["op"] == "error" and got[0]["code"] == code


def test_the_longest_and_the_emptiest_valid_names_work(broker):
    longest = "bill:" + "a" * 250
    got = replies(broker, b"\n".join(json.dumps({"id": i, "op": "subscribe", "channel": c}).encode()
                                     for i, c in enumerate([longest, "bill:", "bill:a:b.c-d_e@f"])))
    assert [g["op"] for g in got] == ["subscribed"] * 3


# ------------------------------------------------------------------ tokens

def _refused(broker: BrokerProcess, token: str) -> tuple[int, str]:
    status, body, _ = http_answer(broker, handshake_request(broker.port, extra=f"Authorization: Bearer {token}\r\n"))
    return status, body.get("error", "")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned(header: dict, claims: dict) -> str:
    """A JWT with no signature, as an attacker would write it by hand."""
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}."


@pytest.mark.parametrize("make, says", [
    (lambda b: jwt.encode({"sub": "u", "exp": time.time() + 60}, "another-secret-of-sufficient-length!!"),
     "signature"),
    (lambda b: _unsigned({"alg": "none", "typ": "JWT"}, {"sub": "u", "exp": 9e9}), "unsigned"),
    (lambda b: _unsigned({"alg": "NoNe"}, {"sub": "u", "exp": 9e9}), "unsigned"),
    (lambda b: jwt.encode({"sub": "u", "exp": time.time() + 60}, b.jwt_secret, algorithm="HS512"), "not accepted"),
    (lambda b: jwt.encode({"sub": "u"}, b.jwt_secret), "exp"),
    (lambda b: jwt.encode({"sub": 42, "exp": time.time() + 60}, b.jwt_secret), "sub"),
    (lambda b: jwt.encode({"exp": time.time() + 60}, b.jwt_secret), "sub"),
    (lambda b: jwt.encode({"sub": "u", "exp": time.time() + 60, "channels": "user:x"}, b.jwt_secret), "channels"),
    (lambda b: jwt.encode({"sub": "u", "exp": time.time() + 60, "nbf": time.time() + 3600}, b.jwt_secret),
     "not yet valid"),
    (lambda b: "a.b", "malformed"),
    (lambda b: "x" * 8000, "malformed"),
], ids=["forged", "alg-none", "alg-none-mixed-case", "alg-not-configured", "no-exp", "sub-not-string",
        "no-sub", "channels-not-list", "not-yet-valid", "two-segments", "8k-garbage"])
def test_bad_tokens_are_401_with_the_reason(broker, make, says):
    status, error = _refused(broker, make(broker))
    assert status == 401 and says in error.lower(), error


def test_a_token_in_the_query_string_is_checked_the_same_way(broker):
    forged = jwt.encode({"sub": "u", "exp": time.time() + 60}, "another-secret-of-sufficient-length!!")
    status, body, _ = http_answer(broker, handshake_request(broker.port, path=f"/ws?token={forged}"))
    assert status == 401


def test_another_users_token_cannot_take_their_channel(broker):
    with NativeClient(broker.ws_url, token=broker.token("mallory")) as c:
        assert c.subscribe("user:alice")["code"] == 403
        assert c.request("publish", channel="user:alice", data=1)["code"] == 403


# ---------------------------------------------------------------- storms

def test_a_subscribe_unsubscribe_storm_is_answered_in_order_and_hurts_no_one(broker_factory, tmp_path):
    config = tmp_path / "storm.toml"
    config.write_text("[limits]\ncommands_per_second = 100000\n")  # the storm is legal here
    broker = broker_factory("--shards", "1", "--allow-anonymous", "--config", str(config))
    n = 900  # under limits.subscriptions_per_connection, so the storm is legal
    with NativeClient(broker.ws_url) as bystander, NativeClient(broker.ws_url) as storm:
        bystander.subscribe("bill:bystander")
        commands = [{"id": i, "op": "subscribe", "channel": f"bill:storm-{i}"} for i in range(n)]
        commands += [{"id": n + i, "op": "unsubscribe", "channel": f"bill:storm-{i}"} for i in range(n)]
        for start in range(0, len(commands), 300):  # 300 commands per message, under the size limit
            storm.send(*commands[start:start + 300])
        broker.publish("bill:bystander", "during the storm")
        got = [storm.recv(timeout=20) for _ in range(2 * n)]
        assert [g["id"] for g in got] == list(range(2 * n))
        assert [g["op"] for g in got] == ["subscribed"] * n + ["unsubscribed"] * n
        assert bystander.pubs(1)[0]["data"] == "during the storm"
        _, stats = broker.api("GET", "/api/stats")
        assert stats["subscriptions"] == 1  # only the bystander's


def test_a_storm_over_the_command_rate_gets_429_then_1008_and_hurts_no_one(broker):
    """limits.commands_per_second (default 100, burst 100): each command
    beyond it is answered 429, and refusals spend the bad-command budget."""
    with NativeClient(broker.ws_url) as bystander, NativeClient(broker.ws_url) as storm:
        bystander.subscribe("bill:bystander")
        storm.send(*[{"id": i, "op": "ping"} for i in range(100 + BAD_COMMAND_BUDGET + 5)])
        got = []
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                got.append(storm.recv(timeout=10))
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
        answered = next(i for i, g in enumerate(got) if g["op"] != "pong")
        assert 100 <= answered <= 102  # the burst (plus what refilled meanwhile)
        refused = got[answered:]
        assert len(refused) > BAD_COMMAND_BUDGET
        assert all(g["op"] == "error" and g["code"] == 429 for g in refused)
        assert [g["id"] for g in refused] == list(range(answered, answered + len(refused)))
        broker.publish("bill:bystander", "still here")
        assert bystander.pubs(1)[0]["data"] == "still here"


# ------------------------------------------------------------- slowloris

def _hung_up_within(raw: RawSocket, trickle: bytes, seconds: float) -> float:
    """Send ``trickle`` one byte every 0.1 s; return when the server hung up."""
    started = time.monotonic()
    raw.sock.settimeout(0.1)
    for byte in trickle:
        try:
            raw.sock.send(bytes([byte]))
            if raw.sock.recv(1) == b"":
                return time.monotonic() - started
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            return time.monotonic() - started
        if time.monotonic() - started > seconds:
            break
    raise AssertionError(f"still connected after {time.monotonic() - started:.1f}s")


@pytest.mark.parametrize("trickle", [
    b"GET /api/stats HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 200,
    handshake_request(0)[:-2] + b"X-Slow: " + b"a" * 200,
    b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n" + b"{" * 500,
], ids=["api-head", "upgrade-head", "api-body"])
def test_slowloris_is_cut_at_the_handshake_timeout(broker, trickle):
    raw = RawSocket(broker.port)
    took = _hung_up_within(raw, trickle, seconds=HANDSHAKE_TIMEOUT + 4)
    assert HANDSHAKE_TIMEOUT * 0.8 <= took <= HANDSHAKE_TIMEOUT + 2
    raw.close()


def test_an_idle_keep_alive_connection_is_closed(broker):
    raw = RawSocket(broker.port)
    raw.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert raw.read_head()[0] == 200
    started = time.monotonic()
    assert raw.sock.recv(1) == b""
    assert time.monotonic() - started <= HANDSHAKE_TIMEOUT + 2
    raw.close()


# ------------------------------------------------------------- floods

def test_a_ping_flood_from_a_client_that_never_reads_stays_bounded(broker):
    shard = psutil.Process(_shard_pid(broker))
    before = shard.memory_info().rss
    raw, _ = upgraded(broker)
    raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and never read
    raw.sock.settimeout(3)
    batch = F(0x9, b"p" * 125) * 1000
    sent = 0
    try:
        for _ in range(400):  # up to 52 MB of pings asking for 50 MB of pongs
            raw.sock.sendall(batch)
            sent += len(batch)
    except TimeoutError:
        pass  # the server stopped reading: TCP pushes back on the flooder
    grown = shard.memory_info().rss - before
    raw.close()
    assert grown < 32 * 2**20, f"shard grew {grown >> 20} MB after {sent >> 20} MB of pings"


# ----------------------------------------------------------- close order

def test_nothing_is_written_after_the_close_frame(broker):
    raw, _ = upgraded(broker)
    raw.send(F(0x1, b'{"id":1,"op":"ping"}') + CLOSE_1000)
    frames = frames_until_end(raw)
    raw.close()
    closes = [i for i, (op, _) in enumerate(frames) if op == 0x8]
    assert closes and closes[0] == len(frames) - 1, frames


@pytest.mark.parametrize("first", [
    F(0x1, b"\n".join(b"{bad" for _ in range(BAD_COMMAND_BUDGET + 1))),  # bad-command budget: 1008
    F(0x2, b"binary"),                                                    # binary: 1003
    F(0x1, b"\xff"),                                                      # invalid UTF-8: 1007
], ids=["budget-1008", "binary-1003", "utf8-1007"])
def test_a_server_close_racing_the_clients_close_is_clean(broker, first):
    with open(broker.log_path, "rb") as fh:
        offset = len(fh.read())
    raw, _ = upgraded(broker)
    raw.send(first + CLOSE_1000)  # one write: both frames arrive in one read
    frames = frames_until_end(raw)
    raw.close()
    time.sleep(0.3)
    with open(broker.log_path, "rb") as fh:
        new_log = fh.read()[offset:].decode("utf-8", "replace")
    assert "Traceback" not in new_log, new_log
    assert any(op == 0x8 for op, _ in frames), "no close frame"
