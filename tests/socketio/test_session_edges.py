"""The Socket.IO session's less travelled paths against a real ``broker
serve``: client publish and token refresh over acks, a non-string
auth.token, expiry mid-session, the rate limit and the bad-command budget,
and the Engine.IO upgrade probe failing, closing or colliding. One broker
serves the module (each test has sessions of its own)."""
from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.error
import urllib.request
from http.client import HTTPConnection

import psutil
import pytest
import socketio
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from broker.engine.cluster import home_of
from broker.testing import BrokerProcess, self_signed_cert

from .test_broker import http

pytestmark = pytest.mark.timeout(90)

CONFIG = """
allow_anonymous = true
[limits]
commands_per_second = 20
bad_command_budget = 5
[namespaces.bill]
client_publish = true
"""


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sio-edges")
    (directory / "broker.toml").write_text(CONFIG)
    process = BrokerProcess(args=["--shards", "1", "--config", str(directory / "broker.toml")],
                            log_path=str(directory / "broker.log"))
    process.start()
    yield process
    assert process.stop() == 0




def wait_for(condition, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} in {timeout}s"
        time.sleep(0.05)


def test_client_publish_and_refresh_are_acknowledged(broker, pyclient):
    sio = pyclient()
    sio.connect(broker.url, token=broker.token("alice", ttl=60))
    assert sio.call("subscribe", {"channel": "bill:p1"})["ok"] is True
    assert sio.call("publish", {"channel": "bill:p1", "data": {"n": 1}}) == {"ok": True, "offset": 1}
    assert sio.wait_pubs(1)[0] == {"channel": "bill:p1", "offset": 1, "data": {"n": 1}}
    later = int(time.time()) + 3600
    reply = sio.call("refresh", {"token": broker.token("alice", ttl=3600)})
    assert reply["ok"] is True and later - 5 <= reply["exp"] <= later + 5
    refused = sio.call("refresh", {"token": broker.token("mallory", ttl=3600)})
    assert refused["ok"] is False and refused["code"] in (401, 403)
    assert sio.call("publish", {"channel": "bill:p1", "data": 2})["offset"] == 2


def test_a_non_string_auth_token_is_refused(broker, pyclient):
    sio = pyclient()
    with pytest.raises(socketio.exceptions.ConnectionError):
        sio.run(sio.client.connect(broker.url, auth={"token": 5}, transports=["websocket"], wait_timeout=5))
    message = next(data for name, data in sio.events if name == "connect_error")["message"]
    assert message == "auth.token must be a string (a JWT)"


def test_a_token_expiring_mid_session_ends_it(broker, pyclient):
    sio = pyclient()
    sio.connect(broker.url, token=broker.token("alice", ttl=2))
    assert sio.call("subscribe", {"channel": "bill:x1"})["ok"] is True

    async def disconnected() -> None:
        while not any(name == "disconnect" for name, _ in sio.events):
            await asyncio.sleep(0.05)
    sio.run(disconnected(), timeout=15)


def test_a_command_flood_is_rate_limited_then_cut(broker, pyclient):
    sio = pyclient()
    sio.connect(broker.url)

    async def flood() -> list:
        calls = [sio.client.call("subscribe", {"channel": f"bill:f{i}"}, timeout=2) for i in range(60)]
        return await asyncio.gather(*calls, return_exceptions=True)
    replies = sio.run(flood(), timeout=20)
    limited = [r for r in replies if isinstance(r, dict) and r.get("code") == 429]
    assert limited and "rate limited" in limited[0]["message"]

    async def disconnected() -> None:
        while not any(name == "disconnect" for name, _ in sio.events):
            await asyncio.sleep(0.05)
    sio.run(disconnected(), timeout=10)   # more bad commands than the budget: closed (1008)


# -- Engine.IO requests and the upgrade probe, raw ---------------------------------

def open_polling(broker: BrokerProcess) -> str:
    """A polling session, connected to "/"; its sid."""
    status, body = http("GET", broker.url + "/socket.io/?EIO=4&transport=polling")
    assert status == 200, body
    sid = json.loads(body[1:])["sid"]
    assert http("POST", polling_url(broker, sid), b"40") == (200, b"ok")
    assert http("GET", polling_url(broker, sid))[1].startswith(b"40{")
    return sid


def polling_url(broker: BrokerProcess, sid: str) -> str:
    return f"{broker.url}/socket.io/?EIO=4&transport=polling&sid={sid}"


def probe(broker: BrokerProcess, sid: str):
    return connect(f"ws://127.0.0.1:{broker.port}/socket.io/?EIO=4&transport=websocket&sid={sid}",
                   open_timeout=10)


def test_engine_requests_that_name_no_shard_or_a_bad_version(broker):
    assert http("GET", polling_url(broker, "no-shard-here")) == (400, b'{"code":1,"message":"Session ID unknown"}')
    with pytest.raises(InvalidStatus) as info:
        connect(f"ws://127.0.0.1:{broker.port}/socket.io/?EIO=3&transport=websocket", open_timeout=10)
    assert info.value.response.status_code == 400
    # An upgrade request without Sec-WebSocket-Key: refused by the WebSocket handshake.
    with socket.create_connection(("127.0.0.1", broker.port), timeout=10) as raw:
        raw.sendall(b"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: x\r\n"
                    b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n")
        assert raw.recv(4096).startswith(b"HTTP/1.1 400")


def test_a_second_probe_is_refused_and_a_bad_probe_message_fails_the_upgrade(broker):
    sid = open_polling(broker)
    with probe(broker, sid) as first:
        with pytest.raises(InvalidStatus) as info:
            probe(broker, sid)
        assert info.value.response.status_code == 400
        assert b"already upgraded or upgrading" in info.value.response.body
        first.send("4not a probe")
        with pytest.raises(ConnectionClosed) as closed:
            first.recv(timeout=10)
        assert closed.value.rcvd is not None and closed.value.rcvd.reason == "upgrade failed"
    # the session goes on over polling
    assert http("POST", polling_url(broker, sid), b'420["subscribe",{"channel":"bill:u1"}]') == (200, b"ok")
    assert json.loads(http("GET", polling_url(broker, sid))[1][3:])[0]["ok"] is True


def test_a_probe_closed_by_the_client_leaves_the_session_on_polling(broker):
    sid = open_polling(broker)
    with probe(broker, sid) as ws:
        ws.send("2probe")
        assert ws.recv(timeout=10) == "3probe"
    # The probe is gone before "5": a new probe may start, and polling still works.
    wait_for(lambda: http("POST", polling_url(broker, sid), b'420["subscribe",{"channel":"bill:u2"}]') == (200, b"ok"))
    assert json.loads(http("GET", polling_url(broker, sid))[1][3:])[0]["ok"] is True
    with probe(broker, sid) as again:
        again.send("2probe")
        assert again.recv(timeout=10) == "3probe"


def test_a_session_ended_by_the_server_during_its_probe_fails_the_upgrade(broker):
    sid = open_polling(broker)
    with probe(broker, sid) as ws:
        ws.send("2probe")
        assert ws.recv(timeout=10) == "3probe"
        # A malformed Socket.IO packet: the server ends the session, probe included.
        http("POST", polling_url(broker, sid), b'42["subscribe",')
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
        assert closed.value.rcvd is not None and closed.value.rcvd.reason == "upgrade failed"
    assert http("GET", polling_url(broker, sid)) == (400, b'{"code":1,"message":"Session ID unknown"}')


def test_a_full_shard_refuses_new_sessions_with_503(broker_factory, tmp_path):
    """max_connections per shard: with both shards full, a new session over
    polling or WebSocket is refused (503) and the sessions held go on."""
    config = tmp_path / "full.toml"
    config.write_text("allow_anonymous = true\ndrain_timeout = 3\n[limits]\nmax_connections = 1\n")
    full = broker_factory("--shards", "2", "--config", str(config))
    opened: list[str] = []
    refusals = 0
    for _ in range(60):
        status, body = http("GET", full.url + "/socket.io/?EIO=4&transport=polling")
        if status == 200:
            opened.append(json.loads(body[1:])["sid"])
            if len(opened) == 2:
                break
        else:
            assert (status, json.loads(body)["message"]) == (503, "overloaded: too many sessions on this shard")
            refusals += 1
    assert len(opened) == 2 and {sid.partition(".")[0] for sid in opened} == {"0", "1"}
    status, body = http("GET", full.url + "/socket.io/?EIO=4&transport=polling")
    assert status == 503
    with pytest.raises(InvalidStatus) as info:
        connect(f"ws://127.0.0.1:{full.port}/socket.io/?EIO=4&transport=websocket", open_timeout=10)
    assert info.value.response.status_code == 503
    for sid in opened:   # each is answered wherever its requests land (handed to its shard)
        for _ in range(4):
            assert http("POST", polling_url(full, sid), b"6") == (200, b"ok")
    assert full.stop() == 0


def test_a_sid_naming_a_shard_that_does_not_exist_drops_the_connection(broker):
    """The request is handed to shard 7's socket, which no process holds: the
    connection is let go (the client reconnects) and the shard serves on."""
    with socket.create_connection(("127.0.0.1", broker.port), timeout=10) as raw:
        raw.sendall(b"GET /socket.io/?EIO=4&transport=polling&sid=7.aaaaaaaaaaaaaaaaaaaa HTTP/1.1\r\n"
                    b"Host: x\r\n\r\n")
        assert raw.recv(4096) == b""   # closed, unanswered
    sid = open_polling(broker)
    assert http("POST", polling_url(broker, sid), b"6") == (200, b"ok")


def test_through_tls_a_request_for_another_shards_session_is_unknown_there(broker_factory, tmp_path):
    """docs/socketio.md: a TLS connection cannot move to the owner shard, so
    a polling request that lands on the other shard is answered "Session ID
    unknown" there; on the owner it is served, and the session lives on."""
    cert, key = self_signed_cert(str(tmp_path))
    tls = broker_factory("--shards", "2", "--allow-anonymous", "--tls-cert", cert, "--tls-key", key, tls_ca=cert)
    context = tls.ssl_context

    def request(method: str, url: str, body: bytes | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(url, data=body, method=method)
        try:
            with urllib.request.urlopen(req, timeout=10, context=context) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    status, body = request("GET", tls.url + "/socket.io/?EIO=4&transport=polling")
    assert status == 200
    url = f"{tls.url}/socket.io/?EIO=4&transport=polling&sid={json.loads(body[1:])['sid']}"
    answers = {request("POST", url, b"6") for _ in range(30)}   # each on a new connection, on either shard
    assert answers == {(200, b"ok"), (400, b'{"code":1,"message":"Session ID unknown"}')}


def test_a_stalled_home_shard_costs_503s_and_acts_on_no_late_request(broker_factory, tmp_path):
    """The home of the channel is stopped (SIGSTOP): on the other shard a
    Socket.IO subscribe is acked 503 after cluster.request_timeout, and so
    is a publish over the backend stream; once the home resumes, the
    subscribe succeeds and the late publication was never stored."""
    config = tmp_path / "cluster.toml"
    config.write_text("allow_anonymous = true\n[cluster]\nrequest_timeout = 0.5\n")
    cluster = broker_factory("--shards", "2", "--config", str(config))
    channel = next(f"bill:{i}" for i in range(100) if home_of(f"bill:{i}", 2) == 1)
    shards = {int(child.cmdline()[-1]): child for child in psutil.Process(cluster.process.pid).children()
              if "broker.worker" in child.cmdline()}
    shards[1].suspend()
    try:
        for _ in range(40):   # new connections until one is on shard 0 (those on shard 1 hang)
            try:
                ws = connect(f"ws://127.0.0.1:{cluster.port}/socket.io/?EIO=4&transport=websocket", open_timeout=1)
            except TimeoutError:
                continue
            break
        else:
            raise AssertionError("no connection reached shard 0")
        with ws:
            assert ws.recv(timeout=10).startswith("0{")
            ws.send("40")
            assert ws.recv(timeout=10).startswith("40{")
            ws.send("421" + json.dumps(["subscribe", {"channel": channel}]))
            ack = json.loads(ws.recv(timeout=10)[3:])[0]
            assert ack["ok"] is False and ack["code"] == 503 and "did not answer" in ack["message"], ack
            # A publication forwarded to the stalled home: 503 too, and never stored (the
            # home finds the request past its deadline when it resumes).
            for _ in range(40):
                try:
                    stream = connect(f"ws://127.0.0.1:{cluster.port}/api/stream", open_timeout=1,
                                     additional_headers={"Authorization": f"apikey {cluster.api_key}"})
                except TimeoutError:
                    continue
                break
            else:
                raise AssertionError("no stream reached shard 0")
            with stream:
                stream.send(json.dumps({"op": "publish", "id": 1, "channel": channel, "data": 1}))
                reply = json.loads(stream.recv(timeout=10))
            assert reply["op"] == "error" and reply["code"] == 503, reply
            shards[1].resume()
            deadline = time.monotonic() + 20
            while True:
                ws.send("422" + json.dumps(["subscribe", {"channel": channel}]))
                ack = json.loads(ws.recv(timeout=10)[3:])[0]
                if ack["ok"]:
                    break
                assert ack["code"] == 503 and time.monotonic() < deadline, ack
                time.sleep(0.1)
            assert ack["offset"] == 0   # the late publication was not acted on
    finally:
        shards[1].resume()


def test_a_wave_of_abandoned_polling_sessions_is_reclaimed(broker_factory, tmp_path):
    """300 polling sessions whose clients vanish: each ends at its ping
    timeout and the shard's count returns to zero (the watch then hands the
    freed heap back, as after any wave of a few hundred)."""
    config = tmp_path / "fast.toml"
    config.write_text("allow_anonymous = true\n[limits]\nping_interval = 1.0\nping_timeout = 1.0\n")
    fast = broker_factory("--shards", "1", "--config", str(config))
    conn = HTTPConnection("127.0.0.1", fast.port, timeout=10)
    for _ in range(300):
        conn.request("GET", "/socket.io/?EIO=4&transport=polling")
        response = conn.getresponse()
        assert response.status == 200 and response.read().startswith(b'0{"sid":"0.')
    conn.close()

    def connections() -> int:
        status, stats = fast.api("GET", "/api/stats")
        return sum(shard["connections"] for shard in stats["shards"])
    assert connections() >= 300
    wait_for(lambda: connections() == 0, timeout=20, what="reclaimed sessions")
