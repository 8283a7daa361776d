"""The server API (PROTOCOL.md §3) through real HTTP requests."""
import http.client
import json
import re

import pytest

from broker.testing import http_json

from .wsclient import NativeClient

pytestmark = pytest.mark.timeout(60)


def test_publish_reply_shape(broker):
    status, reply = broker.api("POST", "/api/publish", {"channel": "bill:1", "data": {"a": 1}})
    assert status == 200 and reply["channel"] == "bill:1" and reply["offset"] == 1
    assert isinstance(reply["epoch"], str) and reply["epoch"]


def test_api_key_is_required(broker):
    for headers in ({}, {"Authorization": "apikey wrong"}, {"Authorization": "Bearer x"}):
        status, body = http_json("POST", broker.url + "/api/publish",
                                 {"channel": "bill:1", "data": 1}, headers)
        assert status == 401 and "error" in body
    assert http_json("GET", broker.url + "/api/stats")[0] == 401


def test_bills_users_and_broadcast_endpoints_deliver(broker):
    with NativeClient(broker.ws_url, token=broker.token("u1")) as c:
        c.subscribe("bill:HB-12")
        c.subscribe("user:u1")
        status, reply = broker.api("POST", "/api/bills/HB-12/updates", {"status": "passed"})
        assert status == 200 and reply["channel"] == "bill:HB-12"
        status, reply = broker.api("POST", "/api/users/u1/notifications", {"text": "hi"})
        assert status == 200 and reply["channel"] == "user:u1"
        status, reply = broker.api("POST", "/api/broadcast",
                                   {"channels": ["user:u1", "user:u2"], "data": {"all": True}})
        assert status == 200
        assert [r["channel"] for r in reply["results"]] == ["user:u1", "user:u2"]
        assert [r["offset"] for r in reply["results"]] == [2, 1]
        pubs = c.pubs(3)
        assert [(p["channel"], p["data"]) for p in pubs] == [
            ("bill:HB-12", {"status": "passed"}), ("user:u1", {"text": "hi"}),
            ("user:u1", {"all": True})]


def test_broadcast_with_an_invalid_channel_publishes_nothing(broker):
    status, body = broker.api("POST", "/api/broadcast",
                              {"channels": ["user:1", "bad channel"], "data": 1})
    assert status == 400 and "bad channel" in body["error"]
    status, body = broker.api("POST", "/api/broadcast", {"channels": ["user:1", "nons:1"], "data": 1})
    assert status == 400
    assert broker.api("GET", "/api/history?channel=user:1")[1]["offset"] == 0


def test_history_since_and_limit(broker):
    for i in range(5):
        broker.publish("bill:h", {"i": i})
    status, body = broker.api("GET", "/api/history?channel=bill:h&since=2&limit=2")
    assert status == 200
    assert body["offset"] == 5 and body["channel"] == "bill:h"
    assert body["publications"] == [{"offset": 3, "data": {"i": 2}}, {"offset": 4, "data": {"i": 3}}]
    assert broker.api("GET", "/api/history")[0] == 400
    assert broker.api("GET", "/api/history?channel=bill:h&since=x")[0] == 400


@pytest.mark.parametrize("body", [b"{not json", b"", b"[1,2]", b'{"channel":"bill:1"}',
                                  b'{"channel":"bill:1","data":NaN}', b'{"channel":5,"data":1}'])
def test_bad_bodies_are_400_with_json_error(broker, body):
    status, reply = broker.api("POST", "/api/publish", body, {"Content-Type": "application/json"})
    assert status == 400 and isinstance(reply, dict) and reply["error"]


def test_body_over_limit_is_413_from_content_length(broker):
    conn = http.client.HTTPConnection("127.0.0.1", broker.port, timeout=5)
    conn.putrequest("POST", "/api/publish")
    conn.putheader("Authorization", f"apikey {broker.api_key}")
    conn.putheader("Content-Length", str(10 * 1024 * 1024))
    conn.endheaders()  # no body sent: the size alone decides
    response = conn.getresponse()
    assert response.status == 413 and "error" in json.loads(response.read())


def test_unknown_path_and_method(broker):
    assert broker.api("GET", "/api/nothing")[0] == 404
    assert broker.api("GET", "/api/publish")[0] == 405


def test_health_ready_metrics(broker):
    assert http_json("GET", broker.url + "/healthz")[0] == 200
    assert http_json("GET", broker.url + "/readyz") == (200, {"ready": True})
    broker.publish("bill:m", 1)
    status, text = http_json("GET", broker.url + "/metrics")
    assert status == 200
    assert 'broker_publications_total{shard="0"} 1.0' in text
    assert "broker_connections{" in text and "broker_rss_bytes{" in text
    # the shard's garbage collector: start-up objects frozen, every pause timed
    assert 'broker_gc_full_collections_total{shard="0"}' in text
    pauses = re.search(r'broker_gc_pause_seconds_count\{shard="0"\} (\S+)', text)
    assert pauses is not None and float(pauses.group(1)) > 0  # at least start-up's collection


def test_keep_alive_serves_many_requests_on_one_connection(broker):
    conn = http.client.HTTPConnection("127.0.0.1", broker.port, timeout=5)
    for i in range(20):
        conn.request("POST", "/api/publish", json.dumps({"channel": "bill:ka", "data": i}),
                     {"Authorization": f"apikey {broker.api_key}"})
        response = conn.getresponse()
        assert response.status == 200 and json.loads(response.read())["offset"] == i + 1


def test_publish_batch_many_channels_in_one_request(broker):
    from broker import Publisher

    with NativeClient(broker.ws_url, token=broker.token("u7")) as c:
        c.subscribe("user:u7")
        c.subscribe("bill:b1")
        with Publisher(broker.url, api_key=broker.api_key) as pub:
            reply = pub.publish_batch([("user:u7", {"n": 1}), ("bill:b1", {"n": 2}), ("user:u7", {"n": 3})])
        assert [(r["channel"], r["offset"]) for r in reply["results"]] == [
            ("user:u7", 1), ("bill:b1", 1), ("user:u7", 2)]
        assert [(p["channel"], p["data"]["n"]) for p in c.pubs(3)] == [
            ("user:u7", 1), ("bill:b1", 2), ("user:u7", 3)]


def test_publish_batch_is_refused_whole(broker):
    status, body = broker.api("POST", "/api/publish/batch", {"publications": [
        {"channel": "user:1", "data": 1}, {"channel": "nope", "data": 2}]})
    assert status == 400 and "publications" not in body and "nope" in body["error"]
    assert broker.api("GET", "/api/history?channel=user:1")[1]["offset"] == 0
    assert broker.api("POST", "/api/publish/batch", {"publications": []})[0] == 400


def test_a_large_body_sent_with_its_head_in_one_write_is_accepted(broker):
    """The head limit (431) counts the head only, not body bytes that arrive with it."""
    import socket

    body = json.dumps({"channel": "bill:big", "data": "x" * 100_000}).encode()
    head = (f"POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: apikey {broker.api_key}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", broker.port), timeout=5) as sock:
        sock.sendall(head + body)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200"), reply[:200]


def test_one_huge_header_is_431(broker):
    import socket

    with socket.create_connection(("127.0.0.1", broker.port), timeout=5) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"v" * 20000 + b"\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 431")
