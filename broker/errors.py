"""One exception tree for the whole broker.

    BrokerError
    ├── ConfigError(ValueError)        a setting is wrong: names the key
    ├── AuthError(PermissionError)     a token or API key was refused
    ├── ProtocolViolation(ValueError)  a client broke PROTOCOL.md; carries code
    │     └── SocketIOError            malformed Engine.IO / Socket.IO input (400)
    ├── EngineUnavailable(ConnectionError)  the sequencer/history store is down
    │     └── Overloaded               refused to hold the memory budget (503)
    ├── PublishError                   the server API refused a publication
    │     (client side; carries the HTTP status and the JSON error body)
    └── RecoveryFailed                 a Client could not recover a channel

Builtins are mixed in so callers may catch the familiar type.
"""
from __future__ import annotations

__all__ = [
    "BrokerError",
    "ConfigError",
    "AuthError",
    "ProtocolViolation",
    "SocketIOError",
    "EngineUnavailable",
    "Overloaded",
    "PublishError",
    "RecoveryFailed",
]


class BrokerError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(BrokerError, ValueError):
    """A configuration value is invalid. ``key`` is the dotted setting name."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


class AuthError(BrokerError, PermissionError):
    """A JWT or API key was missing, invalid or expired."""


class ProtocolViolation(BrokerError, ValueError):
    """A client command broke the protocol; ``code`` is the error code to reply."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class SocketIOError(ProtocolViolation):
    """Engine.IO or Socket.IO input that breaks those protocols (or uses a
    part the broker refuses, such as binary attachments). The message names
    the problem; the code is 400, as for any bad command."""

    def __init__(self, message: str, engine_code: int = 3) -> None:
        super().__init__(400, message)
        #: the Engine.IO error code of an HTTP answer (3 "Bad request" unless
        #: the request named an unknown transport, session or version)
        self.engine_code = engine_code


class EngineUnavailable(BrokerError, ConnectionError):
    """The engine (sequencing + history) cannot be reached: answer 503."""

    label = "engine unavailable"  # how a 503 names the cause


class Overloaded(EngineUnavailable):
    """The shard refuses work to hold its memory budget (degradation level 3):
    answered 503 like an unreachable engine, and named as what it is."""

    label = "overloaded"


class PublishError(BrokerError):
    """The server API answered a publication with an error status."""

    def __init__(self, status: int, body: object) -> None:
        message = body.get("error") if isinstance(body, dict) else body
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.body = body


class RecoveryFailed(BrokerError):
    """A channel's missed publications could not be recovered (epoch changed
    or the gap fell out of the history window): refetch state."""
