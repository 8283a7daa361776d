"""The server API (PROTOCOL.md §3), Sans-I/O: a Request in, a Response out.

Routing, API-key checks, body validation and JSON errors live here; the
shard does the publishing. Every refusal is an HTTP status with a JSON body
``{"error": "..."}``; a 200 for a publication means it is in the history.
"""
from __future__ import annotations

import re
from typing import Any, Awaitable, Callable, Protocol

from .auth import check_api_key
from .channels import namespace_of, validate_channel
from .engine import Position
from .errors import EngineUnavailable, ProtocolViolation
from .handshake import upgrade_required
from .httpmsg import Request, Response, error_response, json_response
from .config import Config
from .engine import Engine
from .jsoncodec import decode_json, encode_json

__all__ = ["handle", "ApiHost", "MAX_HISTORY_LIMIT"]

MAX_HISTORY_LIMIT = 1000


class ApiHost(Protocol):
    """What the API needs from the process serving it (the shard)."""

    config: Config
    engine: Engine
    node_id: str

    async def publish(self, channel: str, data_json: bytes) -> Position:
        """Sequence, store and deliver one publication."""
        ...

    async def publish_many(self, items: list[tuple[str, bytes]]) -> list[Position]:
        """Many publications; each home shard gets its items in one message."""
        ...

    async def cluster_stats(self) -> list[dict[str, Any]]:
        """Every shard's stats."""
        ...

    def not_ready_reason(self) -> str | None:
        """Why /readyz is 503, or None."""
        ...

Handler = Callable[[ApiHost, Request, "re.Match[str]"], Awaitable[Response]]
_ROUTES: list[tuple[str, re.Pattern[str], Handler, bool]] = []  # method, path, handler, needs key
# Exact paths (no parameters) by (method, path): one dict lookup on the hot path.
_EXACT: dict[tuple[str, str], tuple[re.Pattern[str], Handler, bool]] = {}


def route(method: str, pattern: str, needs_key: bool = True):
    def register(handler: Handler) -> Handler:
        compiled = re.compile(pattern + r"\Z")
        _ROUTES.append((method, compiled, handler, needs_key))
        if "(" not in pattern:
            _EXACT[method, pattern] = (compiled, handler, needs_key)
        return handler
    return register


async def handle(shard: ApiHost, request: Request) -> Response:
    exact = _EXACT.get((request.method, request.path))
    routes = ((request.method, *exact),) if exact is not None else _ROUTES
    allowed: list[str] = []
    for method, pattern, handler, needs_key in routes:
        match = pattern.match(request.path)
        if match is None:
            continue
        if method != request.method:
            allowed.append(method)
            continue
        if needs_key and not check_api_key(request.headers.get("authorization"), shard.config):
            return error_response(401, "missing or wrong API key (Authorization: apikey <KEY>)")
        try:
            return await handler(shard, request, match)
        except _BadRequest as exc:
            return error_response(exc.status, exc.message)
        except ProtocolViolation as exc:
            return error_response(exc.code, exc.message)
        except EngineUnavailable as exc:
            return error_response(503, f"{exc.label}: {exc}", headers=(("Retry-After", "1"),))
    if allowed:
        return error_response(405, f"{request.path} takes {', '.join(allowed)}",
                              headers=(("Allow", ", ".join(allowed)),))
    return error_response(404, f"no such endpoint: {request.path}")


class _BadRequest(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        self.status = status
        self.message = message


def _json_body(request: Request) -> Any:
    if not request.body:
        raise _BadRequest("empty body: send a JSON document")
    try:
        return decode_json(request.body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _BadRequest(f"invalid JSON body: {exc}") from None


def _publishable(shard: ApiHost, channel: object) -> str:
    """A valid channel in a configured namespace; 400 otherwise."""
    try:
        name = validate_channel(channel)
        namespace_of(shard.config, name)
    except ProtocolViolation as exc:
        raise _BadRequest(f"invalid channel {channel!r}: {exc.message}") from None
    return name


def _encode_data(value: Any) -> bytes:
    try:
        return encode_json(value)
    except ValueError as exc:
        raise _BadRequest(f"data is not valid JSON: {exc}") from None


def _position_json(channel: str, position: Position) -> bytes:
    """``{"channel","epoch","offset"}``: the answer to every publication and
    the head of a history reply. Channel names and epochs need no JSON
    escaping (validated ASCII / hex), so no encoder runs per publication."""
    return b'{"channel":"%s","epoch":"%s","offset":%d}' % (
        channel.encode(), position.epoch.encode(), position.offset)


async def _publish_all(shard: ApiHost, items: list[tuple[str, bytes]]) -> Response:
    """Publish validated (channel, data) pairs in order: ``{"results": [...]}``."""
    positions = await shard.publish_many(items)
    results = [_position_json(channel, position) for (channel, _), position in zip(items, positions, strict=True)]
    return Response(200, b'{"results":[' + b",".join(results) + b"]}")


async def _publish(shard: ApiHost, channel: str, data: Any) -> Response:
    position = await shard.publish(channel, _encode_data(data))
    return Response(200, _position_json(channel, position))


@route("POST", "/api/publish")
async def publish(shard: ApiHost, request: Request, match: re.Match[str]) -> Response:
    body = _json_body(request)
    if not isinstance(body, dict) or "channel" not in body or "data" not in body:
        raise _BadRequest('body must be {"channel": "...", "data": ...}')
    return await _publish(shard, _publishable(shard, body["channel"]), body["data"])


@route("POST", "/api/broadcast")
async def broadcast(shard: ApiHost, request: Request, match: re.Match[str]) -> Response:
    body = _json_body(request)
    if not isinstance(body, dict) or not isinstance(body.get("channels"), list) or "data" not in body:
        raise _BadRequest('body must be {"channels": ["..."], "data": ...}')
    if not body["channels"]:
        raise _BadRequest("channels must not be empty")
    # Refused whole when any channel is invalid: validate all before publishing one.
    channels = [_publishable(shard, channel) for channel in body["channels"]]
    data_json = _encode_data(body["data"])
    return await _publish_all(shard, [(channel, data_json) for channel in channels])


MAX_BATCH = 10000


@route("POST", "/api/publish/batch")
async def publish_batch(shard: ApiHost, request: Request, match: re.Match[str]) -> Response:
    """Many publications (each its own channel and data) in one request: one
    HTTP round trip instead of N. Validated whole first: one bad item, and
    nothing is published."""
    body = _json_body(request)
    items = body.get("publications") if isinstance(body, dict) else None
    if not isinstance(items, list) or not items:
        raise _BadRequest('body must be {"publications": [{"channel": "...", "data": ...}, ...]}')
    if len(items) > MAX_BATCH:
        raise _BadRequest(f"at most {MAX_BATCH} publications per batch", status=413)
    prepared = []
    for index, item in enumerate(items):
        if not isinstance(item, dict) or "channel" not in item or "data" not in item:
            raise _BadRequest(f"publications[{index}] must be {{\"channel\": ..., \"data\": ...}}")
        prepared.append((_publishable(shard, item["channel"]), _encode_data(item["data"])))
    return await _publish_all(shard, prepared)


@route("POST", r"/api/bills/(?P<id>[^/]+)/updates")
async def bill_update(shard: ApiHost, request: Request, match: re.Match[str]) -> Response:
    return await _publish(shard, _publishable(shard, f"bill:{match['id']}"), _json_body(request))


@route("POST", r"/api/users/(?P<id>[^/]+)/notifications")
async def user_notification(shard: ApiHost, request: Request, match: re.Match[str]) -> Response:
    return await _publish(shard, _publishable(shard, f"user:{match['id']}"), _json_body(request))


def _int_param(query: dict[str, str], name: str, default: int, low: int, high: int | None = None) -> int:
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _BadRequest(f"{name} must be an integer") from None
    if value < low or (high is not None and value > high):
        raise _BadRequest(f"{name} must be between {low} and {high}" if high is not None
                          else f"{name} must be >= {low}")
    return value


@route("GET", "/api/history")
async def history(shard: ApiHost, request: Request, match: re.Match[str]) -> Response:
    query = request.query()
    if "channel" not in query:
        raise _BadRequest("channel is required")
    channel = _publishable(shard, query["channel"])
    since = _int_param(query, "since", 0, 0)
    limit = _int_param(query, "limit", MAX_HISTORY_LIMIT, 1, MAX_HISTORY_LIMIT)
    position, publications = await shard.engine.history(channel, since, limit)
    # The stored data is already compact JSON: splice it in, never re-encode.
    items = b",".join(b'{"offset":%d,"data":%s}' % (offset, data) for offset, data in publications)
    return Response(200, _position_json(channel, position)[:-1] + b',"publications":[' + items + b"]}")


@route("GET", "/api/presence")
async def presence(shard: "Shard", request: Request, match: re.Match[str]) -> Response:
    """Subscribers of a channel and their user ids, across every host (the
    Redis engine keeps each shard's share there; entries are up to about a
    second old)."""
    query = request.query()
    if "channel" not in query:
        raise _BadRequest("channel is required")
    channel = _publishable(shard, query["channel"])
    answer = await shard.engine.presence(channel)
    if answer is None:
        raise _BadRequest("presence needs the Redis engine (--redis)", status=501)
    return json_response(200, answer)


@route("GET", "/api/stats")
async def stats(shard: ApiHost, request: Request, match: re.Match[str]) -> Response:
    from .shardops import view

    return json_response(200, {**node_stats(shard.node_id, await shard.cluster_stats(),
                                            (shard.config.memory_limit_mb or 0) * 2**20), **view(shard)})


def node_stats(node: str, shards: list[dict[str, Any]], memory_limit_bytes: int = 0) -> dict[str, Any]:
    """The cluster view of PROTOCOL.md §3: node totals, then each shard."""
    totals = {key: sum(s[key] for s in shards)
              for key in ("connections", "subscriptions", "channels", "published", "delivered")}
    return {"node": node, **totals, "memory_limit_bytes": memory_limit_bytes, "shards": shards}


@route("GET", "/healthz", needs_key=False)
async def healthz(shard: ApiHost, request: Request, match: re.Match[str]) -> Response:
    return json_response(200, {"status": "ok"})


@route("GET", "/readyz", needs_key=False)
async def readyz(shard: ApiHost, request: Request, match: re.Match[str]) -> Response:
    reason = shard.not_ready_reason()
    if reason is not None:
        return json_response(503, {"ready": False, "reason": reason})
    return json_response(200, {"ready": True})


@route("GET", "/metrics", needs_key=False)
async def metrics(shard: ApiHost, request: Request, match: re.Match[str]) -> Response:
    from .metrics import render

    body, content_type = render(await shard.cluster_stats())
    return Response(200, body, content_type=content_type)


@route("GET", "/api/stream", needs_key=False)
@route("GET", "/ws", needs_key=False)
async def websocket_without_upgrade(shard: ApiHost, request: Request, match: re.Match[str]) -> Response:
    """A plain GET of the WebSocket endpoint: say how to talk to it."""
    return upgrade_required()


from . import admin  # noqa: E402,F401  (registers /api/admin/*)
