"""Channel names and namespace permissions (PROTOCOL.md §2).

Pure functions: no I/O, no state. Who may subscribe or publish is decided
here once, for the native protocol, Socket.IO and the server API alike.
"""
from __future__ import annotations

import re
from typing import Protocol

from .config import Config, Namespace
from .errors import ProtocolViolation

__all__ = ["MAX_CHANNEL_BYTES", "validate_channel", "namespace_of", "check_subscribe",
           "check_client_publish", "IdentityLike"]

MAX_CHANNEL_BYTES = 255
_CHANNEL = re.compile(r"[A-Za-z0-9_\-.@]+:[A-Za-z0-9_\-:.@]*\Z")


class IdentityLike(Protocol):
    @property
    def user(self) -> str | None: ...
    @property
    def channels(self) -> frozenset[str]: ...
    @property
    def anonymous(self) -> bool: ...


def validate_channel(channel: object) -> str:
    """Return ``channel`` if it is a well-formed name, else raise 400."""
    if not isinstance(channel, str) or not channel:
        raise ProtocolViolation(400, "channel must be a non-empty string")
    if len(channel) > MAX_CHANNEL_BYTES:
        raise ProtocolViolation(400, f"channel longer than {MAX_CHANNEL_BYTES} bytes")
    if _CHANNEL.match(channel) is None:
        raise ProtocolViolation(
            400, "channel must be 'namespace:rest' of ASCII letters, digits and _-:.@")
    return channel


def namespace_of(config: Config, channel: str) -> Namespace:
    """The namespace policy of a valid channel name, or 404."""
    namespace = config.namespace_for(channel)
    if namespace is None:
        raise ProtocolViolation(404, f"unknown namespace {channel.partition(':')[0]!r}")
    return namespace


def check_subscribe(config: Config, identity: IdentityLike, channel: str) -> Namespace:
    """Raise 400/401/403/404 unless ``identity`` may subscribe to ``channel``."""
    validate_channel(channel)
    namespace = namespace_of(config, channel)
    if channel in identity.channels:
        return namespace
    if namespace.subscribe == "public":
        return namespace
    if identity.user is None:
        raise ProtocolViolation(401, f"channel {channel!r} needs an authenticated user")
    if namespace.subscribe == "owner" and channel.partition(":")[2] != identity.user:
        raise ProtocolViolation(403, f"channel {channel!r} belongs to another user")
    return namespace


def check_client_publish(config: Config, identity: IdentityLike, channel: str) -> Namespace:
    """Clients publish only where the namespace allows it and they may subscribe."""
    namespace = check_subscribe(config, identity, channel)
    if not namespace.client_publish:
        raise ProtocolViolation(403, f"clients may not publish to namespace {namespace.name!r}")
    return namespace
