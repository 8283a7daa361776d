"""The broker's one typed configuration model.

Layers, lowest first: defaults < TOML file < environment (BROKER_*) < flags.
Every value is validated into these dataclasses; a bad one raises
``ConfigError`` naming the dotted key (the CLI prints it and exits 2).
``load_config`` builds a ``Config`` from those layers; docs/configuration.md
lists every key.
"""
from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any
from urllib.parse import urlsplit

from broker.errors import ConfigError

__all__ = [
    "Config",
    "Limits",
    "Namespace",
    "JwtSettings",
    "Cluster",
    "RedisSettings",
    "Feature",
    "Deploy",
    "Memory",
    "default_namespaces",
    "load_config",
    "ENV_VARS",
    "SUBSCRIBE_POLICIES",
    "LOG_LEVELS",
]

SUBSCRIBE_POLICIES = ("public", "authenticated", "owner")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
JWT_ALGORITHMS = ("HS256", "HS384", "HS512", "RS256", "RS384", "RS512",
                  "ES256", "ES384", "ES512", "PS256", "PS384", "PS512")
REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster")
_NAMESPACE_NAME = re.compile(r"[A-Za-z0-9_-]+\Z")


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
    ping_interval: float = 25.0              # seconds of client silence before a server Ping
    ping_timeout: float = 20.0               # seconds after the Ping before the connection is dropped
    subscriptions_per_connection: int = 1000 # the subscribe beyond it => error 429
    commands_per_second: int = 100          # per connection, burst of the same size; beyond => 429
    connections_per_ip: int = 1000           # across the host's shards; beyond => HTTP 429 at upgrade
    channels_per_shard: int = 100000         # channel states a shard keeps; a new one beyond => 503
    inbound_pending_commands: int = 1024     # unprocessed commands per connection before reading pauses


@dataclass
class Memory:
    """Degradation thresholds: fractions of each shard's share of
    ``memory_limit_mb`` where levels 1, 2 and 3 begin, and the gap RSS must
    fall below a threshold before its level is left (PROTOCOL.md §3)."""

    level1: float = 0.75                     # shrink caches, history windows, idle buffers
    level2: float = 0.85                     # cut the connections with the most pending bytes (1013)
    level3: float = 0.95                     # refuse upgrades and publishes (503), /readyz 503
    hysteresis: float = 0.05                 # fraction of the budget
    check_interval: float = 1.0              # seconds between RSS measurements


@dataclass
class JwtSettings:
    require_exp: bool = True
    algorithms: tuple[str, ...] = ("HS256",)
    public_key: str | None = None            # PEM, enables RS256 when set
    leeway: float = 0.0                      # seconds of clock skew tolerated on exp/nbf


@dataclass
class Cluster:
    """How the shards of one host talk to each other (ZeroMQ)."""

    transport: str = "ipc"                   # "ipc" (unix sockets) or "tcp" (127.0.0.1 ports)
    request_timeout: float = 3.0             # seconds a shard waits for another's answer
    high_water_mark: int = 100000            # ZeroMQ messages queued per peer before dropping
    restart_backoff_max: float = 30.0        # seconds between restarts of a shard that keeps dying
    sweep_interval: float = 30.0             # seconds between sweeps of idle channel state


@dataclass
class RedisSettings:
    """The Redis engine (used when ``redis_url`` is set; docs/operations-redis.md)."""

    timeout: float = 2.0                     # seconds a Redis call may take before it is a 503
    prefix: str = "broker"                   # key and pub/sub channel prefix (several brokers, one Redis)
    meta_ttl: float = 2592000.0              # seconds a channel's epoch/offset outlive its last use; 0 = forever
    compress_threshold: int = 4096           # payloads this large go through Redis zlib-compressed; 0 = never
    health_interval: float = 0.5             # seconds between PINGs that decide readiness
    reconnect_backoff_max: float = 2.0       # longest wait between reconnect attempts (jittered)
    presence_ttl: float = 60.0               # seconds a host's presence entries live unless refreshed


@dataclass
class Feature:
    """A named switch (PROTOCOL.md §5): on for ``rollout`` percent of users,
    chosen by a stable hash (broker.features)."""

    enabled: bool = True
    rollout: int = 100                       # 0..100: share of users (or anonymous connections)


@dataclass
class Deploy:
    """How ``broker deploy`` moves clients to a new generation (docs/operations.md)."""

    ready_timeout: float = 60.0              # seconds for every new shard to be ready
    wave_size: int = 200                     # clients asked to reconnect per wave, whole node
    wave_interval: float = 0.5               # seconds between waves
    max_after_ms: int = 1000                 # reconnect ops carry after_ms in 0..this (<= 30000)
    max_error_rate: float = 0.05             # share of failed requests in the first wave => rollback
    first_wave_watch: float = 2.0            # seconds the new generation is watched after the first wave


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
    tls_cert: str | None = None              # PEM certificate chain: serve wss:// and https://
    tls_key: str | None = None               # PEM private key of tls_cert
    state_dir: str | None = None             # where shards journal channel state; None = the run dir (gone at exit)
    drain_timeout: float = 10.0              # seconds for a graceful stop
    flush_interval: float = 0.0              # fixed batching window in seconds; 0 = adaptive
    flush_max_window: float = 0.05           # adaptive window's bound in seconds; 0 = end of each loop turn
    compression: bool = True                 # accept permessage-deflate offers
    log_level: str = "info"
    limits: Limits = field(default_factory=Limits)
    jwt: JwtSettings = field(default_factory=JwtSettings)
    namespaces: dict[str, Namespace] = field(default_factory=default_namespaces)
    cluster: Cluster = field(default_factory=Cluster)
    redis: RedisSettings = field(default_factory=RedisSettings)
    memory: Memory = field(default_factory=Memory)
    features: dict[str, Feature] = field(default_factory=dict)
    deploy: Deploy = field(default_factory=Deploy)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-safe) for handing the config to a shard process."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Config:
        """The inverse of ``to_dict`` (no validation: the data came from a Config)."""
        top = {k: v for k, v in data.items()
               if k not in ("limits", "jwt", "namespaces", "cluster", "memory", "redis", "features",
                            "deploy")}
        jwt = dict(data["jwt"])
        jwt["algorithms"] = tuple(jwt["algorithms"])
        return cls(**top, limits=Limits(**data["limits"]), jwt=JwtSettings(**jwt),
                   cluster=Cluster(**data["cluster"]), memory=Memory(**data.get("memory", {})),
                   redis=RedisSettings(**data.get("redis", {})),
                   namespaces={k: Namespace(**v) for k, v in data["namespaces"].items()},
                   features={k: Feature(**v) for k, v in data.get("features", {}).items()},
                   deploy=Deploy(**data.get("deploy", {})))

    def namespace_for(self, channel: str) -> Namespace | None:
        """The namespace of ``channel`` (the part before its first ``:``), or
        None when the channel has no ``:`` or its namespace is not configured."""
        name, sep, _ = channel.partition(":")
        if not sep:
            return None
        return self.namespaces.get(name)


# --------------------------------------------------------------------------
# Value parsers. Each takes (key, value, text) where ``text`` is True when the
# value came from the environment or a flag (a string to be parsed) and False
# when it came from TOML (already typed: no "8765" for an integer there).

def _describe(value: object) -> str:
    return f"{value!r} ({type(value).__name__})"


def _int(minimum: int | None = None, maximum: int | None = None) -> Callable[[str, Any, bool], int]:
    def parse(key: str, value: Any, text: bool) -> int:
        if text and isinstance(value, str):
            try:
                value = int(value.strip(), 10)
            except ValueError:
                raise ConfigError(key, f"must be an integer, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"must be an integer, got {_describe(value)}")
        if minimum is not None and value < minimum or maximum is not None and value > maximum:
            if maximum is None:
                raise ConfigError(key, f"must be >= {minimum}, got {value}")
            raise ConfigError(key, f"must be in {minimum}..{maximum}, got {value}")
        return value
    return parse


def _float(minimum: float = 0.0, strict: bool = False) -> Callable[[str, Any, bool], float]:
    """A number of seconds; ``strict`` means it must be > minimum."""
    def parse(key: str, value: Any, text: bool) -> float:
        if text and isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise ConfigError(key, f"must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"must be a number, got {_describe(value)}")
        number = float(value)
        if number != number or number in (float("inf"), float("-inf")):
            raise ConfigError(key, f"must be a finite number, got {number}")
        if number < minimum or strict and number == minimum:
            raise ConfigError(key, f"must be {'>' if strict else '>='} {minimum:g}, got {number:g}")
        return number
    return parse


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _bool(key: str, value: Any, text: bool) -> bool:
    if text and isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        raise ConfigError(key, f"must be a boolean (1/0/true/false/yes/no), got {value!r}")
    if not isinstance(value, bool):
        raise ConfigError(key, f"must be a boolean, got {_describe(value)}")
    return value


def _str(key: str, value: Any, text: bool) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, f"must be a string, got {_describe(value)}")
    if not value.strip():
        raise ConfigError(key, "must not be empty")
    return value


def _host(key: str, value: Any, text: bool) -> str:
    checked = _str(key, value, text).strip()
    if any(ch.isspace() for ch in checked) or "/" in checked:
        raise ConfigError(key, f"is not a host name or address: {checked!r}")
    return checked


def _redis_url(key: str, value: Any, text: bool) -> str:
    checked = _str(key, value, text).strip()
    parts = urlsplit(checked)
    if parts.scheme not in REDIS_SCHEMES or not (parts.netloc or parts.path):
        raise ConfigError(key, "must be a redis://, rediss://, unix:// or redis+cluster:// URL, "
                               f"got {checked!r}")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(key, f"has an invalid port: {checked!r}") from None
    if parts.scheme.endswith("+cluster"):
        if not parts.hostname or port is None:
            raise ConfigError(key, f"a cluster URL names one seed node as HOST:PORT, got {checked!r}")
    elif parts.scheme != "unix" and not parts.hostname:
        raise ConfigError(key, f"names no host: {checked!r}")
    db = parts.path.strip("/")
    if parts.scheme != "unix" and db and not db.isdigit():
        raise ConfigError(key, f"the database after the host must be a number, got {db!r}")
    return checked


def _log_level(key: str, value: Any, text: bool) -> str:
    checked = _str(key, value, text).strip().lower()
    if checked not in LOG_LEVELS:
        raise ConfigError(key, f"must be one of {', '.join(LOG_LEVELS)}, got {checked!r}")
    return checked


def _subscribe_policy(key: str, value: Any, text: bool) -> str:
    checked = _str(key, value, text)
    if checked not in SUBSCRIBE_POLICIES:
        raise ConfigError(key, f"must be one of {', '.join(SUBSCRIBE_POLICIES)}, got {checked!r}")
    return checked


def _algorithms(key: str, value: Any, text: bool) -> tuple[str, ...]:
    if text and isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(key, f"must be a non-empty list of algorithm names, got {_describe(value)}")
    for name in value:
        if name not in JWT_ALGORITHMS:
            raise ConfigError(key, f"unsupported algorithm {name!r} (known: {', '.join(JWT_ALGORITHMS)})")
    return tuple(value)


def _pem(key: str, value: Any, text: bool) -> str:
    checked = _str(key, value, text)
    if "-----BEGIN" not in checked:
        raise ConfigError(key, "must be a PEM public key (-----BEGIN PUBLIC KEY----- ...)")
    return checked


TOP_LEVEL: dict[str, Callable[[str, Any, bool], Any]] = {
    "host": _host,
    "port": _int(0, 65535),
    "shards": _int(1),
    "api_key": _str,
    "jwt_secret": _str,
    "allow_anonymous": _bool,
    "redis_url": _redis_url,
    "memory_limit_mb": _int(1),
    "tls_cert": _str,
    "tls_key": _str,
    "state_dir": _str,
    "drain_timeout": _float(0.0),
    "flush_interval": _float(0.0),
    "flush_max_window": _float(0.0),
    "compression": _bool,
    "log_level": _log_level,
}

LIMITS: dict[str, Callable[[str, Any, bool], Any]] = {
    f.name: (_int(1) if f.type in ("int", int) else _float(0.0, strict=True)) for f in fields(Limits)
}

JWT: dict[str, Callable[[str, Any, bool], Any]] = {
    "require_exp": _bool,
    "algorithms": _algorithms,
    "public_key": _pem,
    "leeway": _float(0.0),
}

def _transport(key: str, value: Any, text: bool) -> str:
    checked = _str(key, value, text)
    if checked not in ("ipc", "tcp"):
        raise ConfigError(key, f"must be 'ipc' or 'tcp', got {checked!r}")
    return checked


CLUSTER: dict[str, Callable[[str, Any, bool], Any]] = {
    "transport": _transport,
    "request_timeout": _float(0.0, strict=True),
    "high_water_mark": _int(1),
    "restart_backoff_max": _float(0.0, strict=True),
    "sweep_interval": _float(0.0, strict=True),
}

def _redis_prefix(key: str, value: Any, text: bool) -> str:
    checked = _str(key, value, text)
    if any(ch in checked for ch in "{} \t\r\n"):
        raise ConfigError(key, f"must not contain braces or whitespace (it precedes a hash tag), got {checked!r}")
    return checked


REDIS: dict[str, Callable[[str, Any, bool], Any]] = {
    "timeout": _float(0.0, strict=True),
    "prefix": _redis_prefix,
    "meta_ttl": _float(0.0),
    "compress_threshold": _int(0),
    "health_interval": _float(0.0, strict=True),
    "reconnect_backoff_max": _float(0.0, strict=True),
    "presence_ttl": _float(0.0, strict=True),
}


def _fraction(strict: bool) -> Callable[[str, Any, bool], float]:
    """A share of the memory budget: (0, 1], or [0, 1] when not ``strict``."""
    number = _float(0.0, strict=strict)

    def parse(key: str, value: Any, text: bool) -> float:
        fraction = number(key, value, text)
        if fraction > 1.0:
            raise ConfigError(key, f"must be a fraction of the budget, at most 1, got {fraction:g}")
        return fraction
    return parse


MEMORY: dict[str, Callable[[str, Any, bool], Any]] = {
    "level1": _fraction(strict=True),
    "level2": _fraction(strict=True),
    "level3": _fraction(strict=True),
    "hysteresis": _fraction(strict=False),
    "check_interval": _float(0.0, strict=True),
}

FEATURE: dict[str, Callable[[str, Any, bool], Any]] = {
    "enabled": _bool,
    "rollout": _int(0, 100),
}

DEPLOY: dict[str, Callable[[str, Any, bool], Any]] = {
    "ready_timeout": _float(0.0, strict=True),
    "wave_size": _int(1),
    "wave_interval": _float(0.0),
    "max_after_ms": _int(0, 30000),
    "max_error_rate": _float(0.0),
    "first_wave_watch": _float(0.0),
}

NAMESPACE: dict[str, Callable[[str, Any, bool], Any]] = {
    "history_size": _int(1),
    "history_ttl": _float(0.0),
    "subscribe": _subscribe_policy,
    "client_publish": _bool,
}

#: Every top-level key can come from the environment as BROKER_<KEY>.
ENV_VARS: dict[str, str] = {f"BROKER_{key.upper()}": key for key in TOP_LEVEL}

#: Flag spellings that mean another key (``--redis`` is ``--redis-url``).
FLAG_ALIASES = {"redis": "redis_url"}


# --------------------------------------------------------------------------

def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"invalid TOML in {path}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError("config", f"invalid TOML in {path}: not UTF-8 ({exc.reason})") from None


def _table(key: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(key, f"must be a table ([{key}]), got {_describe(value)}")
    return value


def _apply_section(target: Any, section: str, table: dict[str, Any],
                   parsers: Mapping[str, Callable[[str, Any, bool], Any]]) -> Any:
    changes = {}
    for name, value in table.items():
        key = f"{section}.{name}"
        if name not in parsers:
            raise ConfigError(key, f"unknown key (known: {', '.join(parsers)})")
        changes[name] = parsers[name](key, value, False)
    return replace(target, **changes)


def _apply_file(config: Config, data: dict[str, Any]) -> None:
    for name, value in data.items():
        if name in TOP_LEVEL:
            setattr(config, name, TOP_LEVEL[name](name, value, False))
        elif name == "limits":
            config.limits = _apply_section(config.limits, "limits", _table("limits", value), LIMITS)
        elif name == "jwt":
            table = dict(_table("jwt", value))
            if "public_key_file" in table:
                # Convenience: the PEM may live in its own file.
                path = _str("jwt.public_key_file", table.pop("public_key_file"), False)
                try:
                    with open(path, encoding="ascii") as fh:
                        table.setdefault("public_key", fh.read())
                except (OSError, UnicodeDecodeError) as exc:
                    raise ConfigError("jwt.public_key_file", f"cannot read {path}: {exc}") from None
            config.jwt = _apply_section(config.jwt, "jwt", table, JWT)
        elif name == "cluster":
            config.cluster = _apply_section(config.cluster, "cluster", _table("cluster", value), CLUSTER)
        elif name == "redis":
            config.redis = _apply_section(config.redis, "redis", _table("redis", value), REDIS)
        elif name == "memory":
            config.memory = _apply_section(config.memory, "memory", _table("memory", value), MEMORY)
        elif name == "namespaces":
            for ns_name, ns_table in _table("namespaces", value).items():
                key = f"namespaces.{ns_name}"
                if not _NAMESPACE_NAME.match(ns_name):
                    raise ConfigError(key, "namespace names use only letters, digits, '_' and '-'")
                base = config.namespaces.get(ns_name) or Namespace(ns_name)
                config.namespaces[ns_name] = _apply_section(base, key, _table(key, ns_table), NAMESPACE)
        elif name == "features":
            for feature, table in _table("features", value).items():
                key = f"features.{feature}"
                if not _NAMESPACE_NAME.match(feature):
                    raise ConfigError(key, "feature names use only letters, digits, '_' and '-'")
                config.features[feature] = _apply_section(Feature(), key, _table(key, table), FEATURE)
        elif name == "deploy":
            config.deploy = _apply_section(config.deploy, "deploy", _table("deploy", value), DEPLOY)
        else:
            known = [*TOP_LEVEL, "limits", "jwt", "cluster", "memory", "redis", "namespaces", "features",
                     "deploy"]
            raise ConfigError(name, f"unknown key (known: {', '.join(known)})")


def _check(config: Config) -> None:
    """Rules that involve more than one key."""
    if config.jwt.public_key is None and not any(a.startswith("HS") for a in config.jwt.algorithms):
        raise ConfigError("jwt.algorithms", "only asymmetric algorithms listed but jwt.public_key is not set")
    memory = config.memory
    if not memory.level1 < memory.level2 < memory.level3:
        raise ConfigError("memory.level2" if memory.level2 <= memory.level1 else "memory.level3",
                          f"levels must rise: level1 < level2 < level3, got "
                          f"{memory.level1:g}, {memory.level2:g}, {memory.level3:g}")
    if memory.hysteresis >= memory.level1:
        raise ConfigError("memory.hysteresis", f"must be below memory.level1 ({memory.level1:g}), "
                          f"got {memory.hysteresis:g}")
    if (config.tls_cert is None) != (config.tls_key is None):
        missing = "tls_key" if config.tls_key is None else "tls_cert"
        raise ConfigError(missing, "tls_cert and tls_key go together: set both or neither")
    if config.tls_cert is not None:
        from broker.tls import server_context  # lazy: plain configs never touch ssl

        server_context(config)  # raises ConfigError naming the file's key


def load_config(file: str | None = None, env: Mapping[str, str] | None = None,
                flags: Mapping[str, object] | None = None) -> Config:
    """Build a validated ``Config``: defaults < TOML ``file`` < ``env`` < ``flags``.

    ``env`` is a mapping such as ``os.environ`` (None: no environment layer);
    only the BROKER_* names in ``ENV_VARS`` are read and an empty value counts
    as unset. ``flags`` maps top-level keys (``port``, ``redis_url`` or its
    alias ``redis``, ...) to values the user actually gave, typed or as text;
    None values are skipped. Raises ``ConfigError(key, message)``.
    """
    config = Config()
    if file is not None:
        _apply_file(config, _read_toml(file))
    for var, key in ENV_VARS.items():
        value = (env or {}).get(var)
        if value is None or value.strip() == "":
            continue
        try:
            setattr(config, key, TOP_LEVEL[key](key, value, True))
        except ConfigError as exc:
            raise ConfigError(key, f"{exc.message} (from {var})") from None
    for name, given in (flags or {}).items():
        if given is None:
            continue
        key = FLAG_ALIASES.get(name, name)
        if key not in TOP_LEVEL:
            raise ConfigError(key, "unknown setting")
        try:
            setattr(config, key, TOP_LEVEL[key](key, given, True))
        except ConfigError as exc:
            raise ConfigError(key, f"{exc.message} (from --{name.replace('_', '-')})") from None
    _check(config)
    return config
