"""The WebSocket upgrade decision (Sans-I/O: a Request in, an answer out)."""
from __future__ import annotations

import json
import socket

import pytest

from broker.auth import mint_token
from broker.config import Config
from broker.handshake import Accepted, negotiate
from broker.httpmsg import Request, Response
from broker.sockets import bind_shared, free_port

SECRET = "a-handshake-test-secret-long-enough-for-hs256!"
KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455's example key


def upgrade(method: str = "GET", query: str = "", **headers: str) -> Request:
    base = {"upgrade": "websocket", "connection": "keep-alive, Upgrade", "sec-websocket-version": "13",
            "sec-websocket-key": KEY}
    base.update({name.replace("_", "-"): value for name, value in headers.items()})
    return Request(method, "/ws", query, {k: v for k, v in base.items() if v is not None})


def refused(request: Request, config: Config | None = None) -> tuple[int, str, dict[str, str]]:
    answer = negotiate(request, config or Config(jwt_secret=SECRET, allow_anonymous=True))
    assert isinstance(answer, Response)
    return answer.status, json.loads(answer.body)["error"], dict(answer.headers)


def test_accepts_an_anonymous_upgrade_with_the_rfc_accept_key():
    answer = negotiate(upgrade(), Config(allow_anonymous=True))
    assert isinstance(answer, Accepted)
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in answer.response
    assert answer.deflate is None and answer.window_bits == 15
    assert answer.response.endswith(b"\r\n\r\n")


def test_a_token_from_the_query_or_the_header_names_the_user():
    token = mint_token(SECRET, "alice")
    for request in (upgrade(query=f"token={token}"), upgrade(authorization=f"Bearer {token}")):
        answer = negotiate(request, Config(jwt_secret=SECRET))
        assert isinstance(answer, Accepted) and answer.identity.user == "alice"


def test_wrong_method_missing_upgrade_bad_version_and_bad_key():
    status, message, headers = refused(upgrade(method="POST"))
    assert (status, headers) == (405, {"Allow": "GET"}) and "GET" in message
    status, _, headers = refused(upgrade(upgrade=None))
    assert status == 426 and headers["Upgrade"] == "websocket"
    status, _, headers = refused(upgrade(connection="keep-alive"))
    assert status == 426
    status, _, headers = refused(upgrade(sec_websocket_version="8"))
    assert status == 426 and headers["Sec-WebSocket-Version"] == "13"
    for key in ("not base64!", "c2hvcnQ=", ""):  # invalid, decodes to 5 bytes, missing
        assert refused(upgrade(sec_websocket_key=key))[:2] == (400, "invalid Sec-WebSocket-Key")


def test_tokens_required_unless_anonymous_and_a_bad_token_is_401():
    assert refused(upgrade(), Config(jwt_secret=SECRET))[0] == 401
    status, message, _ = refused(upgrade(authorization="Bearer garbage"))
    assert status == 401 and "malformed" in message


def test_permessage_deflate_negotiation():
    config = Config(allow_anonymous=True)
    offer = "x-unknown, permessage-deflate; client_max_window_bits; server_max_window_bits=10"
    answer = negotiate(upgrade(sec_websocket_extensions=offer), config)
    assert isinstance(answer, Accepted) and answer.deflate is not None
    assert answer.window_bits == 10
    assert b"Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover" in answer.response
    # An offer we cannot accept (a window below zlib's) is skipped: no extension, still a 101.
    answer = negotiate(upgrade(sec_websocket_extensions="permessage-deflate; server_max_window_bits=7"), config)
    assert isinstance(answer, Accepted) and answer.deflate is None
    assert b"Sec-WebSocket-Extensions" not in answer.response
    # Compression switched off: the offer is ignored.
    answer = negotiate(upgrade(sec_websocket_extensions="permessage-deflate"),
                       Config(allow_anonymous=True, compression=False))
    assert isinstance(answer, Accepted) and answer.deflate is None
    status, message, _ = refused(upgrade(sec_websocket_extensions="permessage-deflate; =bad"))
    assert status == 400 and message.startswith("invalid Sec-WebSocket-Extensions")


def test_bind_shared_lets_two_sockets_share_a_port_and_reports_a_taken_one():
    port = free_port()
    first, second = bind_shared("127.0.0.1", port), bind_shared("127.0.0.1", port)
    try:
        assert first.getsockname() == second.getsockname() == ("127.0.0.1", port)
        with socket.socket() as plain:  # no SO_REUSEPORT: the port is taken
            plain.bind(("127.0.0.1", 0))
            plain.listen()
            with pytest.raises(OSError):
                bind_shared("127.0.0.1", plain.getsockname()[1])
    finally:
        first.close()
        second.close()
