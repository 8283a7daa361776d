"""The admin API (PROTOCOL.md §5): ``POST /api/admin/deploy|rollback|reload``.

A shard answers the HTTP request by asking its supervisor, which runs the
operation (broker.operations), over the supervisor's admin socket (ZeroMQ
ROUTER; one DEALER per request here). The reply body is NDJSON: one
``{"progress": "..."}`` line per step, then the result object (``ok``,
``operation``, and the reason on failure). Status: 200 when ``ok``, else the
result's ``status`` (400 invalid config, 409 refused or busy, 502 the new
generation failed, 504 not confirmed in time).

The admin API needs the API key; with no ``api_key`` configured it answers
requests from loopback only (403 otherwise).
"""
from __future__ import annotations

import ipaddress
import json
import re
from typing import Any

import zmq
import zmq.asyncio

from .api import ApiHost, _BadRequest, route
from .httpmsg import Request, Response, error_response

__all__ = ["ask_supervisor", "ADMIN_TIMEOUT"]

ADMIN_TIMEOUT = 3600.0  # seconds; a deploy's waves may take long, the supervisor answers in the end


def _loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return False


async def ask_supervisor(endpoint: str, op: str, args: dict[str, Any],
                         timeout: float = ADMIN_TIMEOUT) -> tuple[list[str], dict[str, Any]]:
    """Run ``op`` in the supervisor; its progress lines and its result."""
    sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        await sock.send_multipart([op.encode(), json.dumps(args).encode()])
        progress: list[str] = []
        while True:
            if not await sock.poll(timeout * 1000):
                return progress, {"ok": False, "operation": op, "status": 504,
                                  "error": f"the supervisor did not answer in {timeout:.0f}s"}
            kind, payload = await sock.recv_multipart()
            if kind == b"progress":
                progress.append(payload.decode())
            else:
                return progress, json.loads(payload)
    finally:
        sock.close(0)


@route("POST", r"/api/admin/(?P<op>deploy|rollback|reload)")
async def operate(shard: ApiHost, request: Request, match: "re.Match[str]") -> Response:
    if shard.config.api_key is None and not _loopback(request.peer):
        return error_response(403, "the admin API answers loopback only when no api_key is configured")
    args: dict[str, Any] = {"config": None}
    if request.body.strip():
        try:
            body = json.loads(request.body)
        except ValueError as exc:
            raise _BadRequest(f"invalid JSON body: {exc}") from None
        if not isinstance(body, dict) or not isinstance(body.get("config"), (str, type(None))):
            raise _BadRequest('body must be {"config": "<path>" or null}')
        args["config"] = body.get("config")
    endpoint = getattr(shard, "admin_endpoint", None)
    if not endpoint:
        return error_response(501, "no supervisor: operations need `broker serve`")
    progress, result = await ask_supervisor(endpoint, match["op"], args)
    lines = [json.dumps({"progress": line}) for line in progress] + [json.dumps(result)]
    status = 200 if result.get("ok") else int(result.get("status") or 500)
    return Response(status, ("\n".join(lines) + "\n").encode(), content_type="application/x-ndjson")
