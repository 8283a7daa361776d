"""A sharded real-time message broker: WebSocket fan-out and routing.

The one public import::

    from broker import Broker, Publisher, AsyncPublisher, Client, Config

``Broker`` embeds a broker in this process; ``Publisher`` and
``AsyncPublisher`` talk to the server API; ``Client`` subscribes over the
native WebSocket protocol and recovers what it missed after a reconnect.
"""
from ._version import __version__
from .client import AsyncPublisher, Client, Publication, Publisher
from .config import Config, load_config
from .errors import (AuthError, BrokerError, ConfigError, EngineUnavailable, ProtocolViolation,
                     PublishError, RecoveryFailed)
from .server import Broker

__all__ = [
    "__version__",
    "Broker",
    "Publisher",
    "AsyncPublisher",
    "Client",
    "Publication",
    "Config",
    "load_config",
    "BrokerError",
    "ConfigError",
    "AuthError",
    "ProtocolViolation",
    "EngineUnavailable",
    "PublishError",
    "RecoveryFailed",
]
