"""TLS (issue 13): `broker serve --tls-cert/--tls-key` serves wss:// and
https://, every byte through TLS, with a certificate the test makes."""
from __future__ import annotations

import socket

import pytest

from broker.testing import BrokerProcess, self_signed_cert

from .wsclient import NativeClient

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def tls_broker(tmp_path):
    cert, key = self_signed_cert(str(tmp_path))
    proc = BrokerProcess(args=["--shards", "2", "--allow-anonymous", "--tls-cert", cert, "--tls-key", key],
                         log_path=str(tmp_path / "broker.log"), tls_ca=cert)
    proc.start()
    yield proc
    proc.stop()


@pytest.mark.parametrize("compression", [None, "deflate"])
def test_wss_fan_out_and_https_api(tls_broker, compression):
    broker = tls_broker
    clients = [NativeClient(broker.ws_url, compression=compression, ssl=broker.ssl_context)
               for _ in range(6)]  # on both shards
    try:
        for client in clients:
            client.subscribe("bill:tls")
        for n in range(20):
            assert broker.publish("bill:tls", {"n": n, "pad": "x" * 300})["offset"] == n + 1
        for client in clients:
            assert [p["data"]["n"] for p in client.pubs(20)] == list(range(20))
        status, stats = broker.api("GET", "/api/stats")
        assert status == 200 and stats["connections"] == 6
    finally:
        for client in clients:
            client.close()


def test_plain_bytes_on_the_tls_port_get_no_plaintext(tls_broker):
    with socket.create_connection(("127.0.0.1", tls_broker.port), timeout=5) as raw:
        raw.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            answer = raw.recv(4096)
        except ConnectionResetError:
            answer = b""
    assert b"HTTP/1.1 200" not in answer  # nothing is served in the clear
