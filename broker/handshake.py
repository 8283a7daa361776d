"""The WebSocket opening handshake (RFC 6455 §4.2, RFC 7692), Sans-I/O.

The connection has already parsed the request head with httptools; this
module decides: refuse (an HTTP response with a JSON body) or accept (the
101 response, the caller's identity and the negotiated compression).
websockets' helpers do the header grammar and the deflate negotiation.
"""
from __future__ import annotations

import binascii
import base64
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import parse_qs

from websockets.exceptions import InvalidHeader, NegotiationError
from websockets.extensions.permessage_deflate import PerMessageDeflate, ServerPerMessageDeflateFactory
from websockets.headers import build_extension, parse_extension
from websockets.utils import accept_key

from .auth import ANONYMOUS, verify_token
from .config import Config
from .errors import AuthError
from .features import is_on, rollout_key
from .httpmsg import Request, Response, error_response

__all__ = ["Accepted", "Authenticate", "authenticate_client", "negotiate", "upgrade_required"]


def upgrade_required() -> Response:
    """426 for a request to /ws that is not a WebSocket upgrade."""
    return error_response(426, "this endpoint speaks WebSocket: send Upgrade: websocket",
                          headers=(("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13")))

# No context takeover in either direction: the server can compress a shared
# batch once for every connection, and an idle connection holds no zlib state.
_DEFLATE = ServerPerMessageDeflateFactory(
    server_no_context_takeover=True, client_no_context_takeover=True)


@dataclass(slots=True)
class Accepted:
    response: bytes
    identity: Any
    deflate: PerMessageDeflate | None   # decodes client frames; we encode our own
    window_bits: int                    # server_max_window_bits for our Deflater
    rollout_key: str = ""               # feature flags' hash key (broker.features)


def _token_of(request: Request) -> str | None:
    authorization = request.headers.get("authorization", "")
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    values = parse_qs(request.query_string).get("token")
    return values[-1] if values else None


def _has_token(header: str, token: str) -> bool:
    return any(part.strip().lower() == token for part in header.split(","))


def _negotiate_deflate(header: str) -> tuple[str | None, PerMessageDeflate | None]:
    for name, params in parse_extension(header):
        if name != "permessage-deflate":
            continue
        try:
            response_params, extension = _DEFLATE.process_request_params(params, [])
        except NegotiationError:
            continue
        return build_extension([(name, response_params)]), extension
    return None, None


def authenticate_client(request: Request, config: Config) -> Any:
    """A client's identity from its JWT (header or ``?token=``), anonymous
    where allowed, or the 401 that refuses the upgrade."""
    token = _token_of(request)
    if token is None:
        if not config.allow_anonymous:
            return error_response(401, "a token is required (Authorization: Bearer or ?token=)")
        return ANONYMOUS
    try:
        return verify_token(token, config)
    except AuthError as exc:
        return error_response(401, str(exc))


# Who is upgrading: an identity for the session, or the Response refusing it.
Authenticate = Callable[[Request, Config], Any]


def negotiate(request: Request, config: Config,
              authenticate: Authenticate = authenticate_client) -> Accepted | Response:
    """Accept the upgrade or say exactly why not (PROTOCOL.md §1 Handshake);
    ``authenticate`` is the endpoint's rule (clients: JWT; backends: API key)."""
    headers = request.headers
    if request.method != "GET":
        return error_response(405, "the WebSocket endpoint takes GET", headers=(("Allow", "GET"),))
    if (not _has_token(headers.get("upgrade", ""), "websocket")
            or not _has_token(headers.get("connection", ""), "upgrade")):
        return upgrade_required()
    if headers.get("sec-websocket-version", "").strip() != "13":
        return error_response(426, "unsupported Sec-WebSocket-Version; this server speaks 13",
                              headers=(("Sec-WebSocket-Version", "13"),))
    key = headers.get("sec-websocket-key", "").strip()
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            raise ValueError
    except (binascii.Error, ValueError):
        return error_response(400, "invalid Sec-WebSocket-Key")

    identity = authenticate(request, config)
    if isinstance(identity, Response):
        return identity

    # Anonymous connections hash by their random Sec-WebSocket-Key.
    rollout = rollout_key(identity.user, key)
    extra = ""
    extension: PerMessageDeflate | None = None
    if (config.compression and "sec-websocket-extensions" in headers
            and is_on(config, "compression", rollout)):
        try:
            value, extension = _negotiate_deflate(headers["sec-websocket-extensions"])
        except InvalidHeader as exc:
            return error_response(400, f"invalid Sec-WebSocket-Extensions: {exc}")
        if value:
            extra = f"Sec-WebSocket-Extensions: {value}\r\n"
    response = (
        "HTTP/1.1 101 Switching Protocols\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {accept_key(key)}\r\n"
        f"{extra}\r\n"
    ).encode("latin-1")
    window_bits = (extension.local_max_window_bits or 15) if extension else 15
    return Accepted(response, identity, extension, window_bits, rollout)
