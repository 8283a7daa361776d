"""Feature flags (PROTOCOL.md §5): named switches with a rollout percentage.

A switch is on for a user when its ``[features.<name>]`` table says
``enabled = true`` and the user's bucket — a stable hash of the switch's
name and the user's ``sub`` (of the connection, for anonymous ones) — is
below ``rollout``. The same user lands in the same bucket on every shard,
every process and every generation, so raising the rollout only ever adds
users. Flags change at runtime (``broker reload``): each decision is taken
when a connection is accepted, so a change applies to new connections.

The broker consults the switches in ``SWITCHES``; a switch without a table
keeps its default behaviour.
"""
from __future__ import annotations

import zlib
from typing import Any

from .config import Config

__all__ = ["SWITCHES", "bucket", "is_on", "rollout_key", "describe"]

#: Switches the broker consults, with what they turn on (default: on).
SWITCHES: dict[str, str] = {
    "compression": "accept the client's permessage-deflate offer (with compression = true)",
    "direct_write": "the C flush writes this connection's frames straight to its socket "
                    "(off: every frame goes through the event loop's transport)",
}


def bucket(name: str, key: str) -> int:
    """0..99, stable across processes (crc32, not Python's salted hash)."""
    return zlib.crc32(f"{name}\x00{key}".encode()) % 100


def rollout_key(user: str | None, connection_key: str) -> str:
    """The hash key: the user's ``sub``, or the connection for anonymous ones."""
    return f"user:{user}" if user is not None else f"conn:{connection_key}"


def is_on(config: Config, name: str, key: str, default: bool = True) -> bool:
    """Whether switch ``name`` is on for ``key`` (see ``rollout_key``)."""
    feature = config.features.get(name)
    if feature is None:
        return default
    return feature.enabled and bucket(name, key) < feature.rollout


def describe(config: Config) -> dict[str, dict[str, Any]]:
    """``/api/stats`` ``"features"``: every configured switch and its rollout."""
    return {name: {"enabled": f.enabled, "rollout": f.rollout} for name, f in sorted(config.features.items())}
