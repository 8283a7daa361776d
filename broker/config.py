"""The broker's one typed configuration model.

Layers, lowest first: defaults < TOML file < environment (BROKER_*) < flags.
Every value is validated into these dataclasses; a bad one raises
``ConfigError`` naming the dotted key (the CLI prints it and exits 2).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

__all__ = ["Config", "Limits", "Namespace", "JwtSettings", "default_namespaces"]


@dataclass
class Namespace:
    """Policy of one channel namespace (the part before the first ``:``)."""

    name: str
    history_size: int = 100          # publications kept per channel
    history_ttl: float = 300.0       # seconds a publication stays recoverable; 0 = no age limit
    subscribe: str = "public"        # "public" | "authenticated" | "owner"
    client_publish: bool = False     # may WebSocket clients publish here?


def default_namespaces() -> dict[str, Namespace]:
    return {
        "bill": Namespace("bill", subscribe="public", client_publish=False),
        "user": Namespace("user", subscribe="owner", client_publish=False),
    }


@dataclass
class Limits:
    max_message_size: int = 65536            # bytes, WebSocket message (close 1009)
    max_body_size: int = 1 << 20             # bytes, HTTP API body (413)
    outbound_buffer_bytes: int = 1 << 20     # per connection; full => close 1013
    bad_command_budget: int = 10             # bad commands allowed per window ...
    bad_command_window: float = 10.0         # ... seconds; more => close 1008
    handshake_timeout: float = 10.0          # seconds to complete the HTTP request
    max_header_count: int = 100              # more => 431
    max_header_bytes: int = 16384            # request head larger => 431
    max_connections: int = 100000            # per shard; more => 503 at upgrade


@dataclass
class JwtSettings:
    require_exp: bool = True
    algorithms: tuple[str, ...] = ("HS256",)
    public_key: str | None = None            # PEM, enables RS256 when set


@dataclass
class Config:
    host: str = "127.0.0.1"
    port: int = 8765
    shards: int = field(default_factory=lambda: os.cpu_count() or 1)
    api_key: str | None = None
    jwt_secret: str | None = None
    allow_anonymous: bool = False
    redis_url: str | None = None
    memory_limit_mb: int | None = None
    drain_timeout: float = 10.0              # seconds for a graceful stop
    flush_interval: float = 0.0              # batching window in seconds; 0 = end of loop turn
    compression: bool = True                 # accept permessage-deflate offers
    log_level: str = "info"
    limits: Limits = field(default_factory=Limits)
    jwt: JwtSettings = field(default_factory=JwtSettings)
    namespaces: dict[str, Namespace] = field(default_factory=default_namespaces)
