"""Which settings may change in a running broker, and what a new file changes.

A *runtime* setting is read where it is used, so ``broker reload`` (or
SIGHUP) changes it in every shard without dropping a connection. Any other
setting shapes processes or sockets that exist already (the port, the shard
count, the engine, the journals, the listening socket, secrets every live
token was checked against) and changes only with ``broker deploy``, which
starts a new generation. ``RUNTIME`` is the one place that decides;
docs/configuration.md lists it key by key.

A reload is refused whole when the file is invalid or changes any
non-runtime key (the refusal names the first such key); the old config
stays in force.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from .config import Config, Namespace, load_config
from .errors import ConfigError

__all__ = ["ConfigSources", "Change", "ReloadRefused", "RUNTIME", "is_runtime", "flatten", "diff",
           "check_reload", "apply_runtime"]

#: Dotted keys (or prefixes ending in ".") that change at runtime. "*" stands
#: for any namespace name.
RUNTIME: tuple[str, ...] = (
    "limits.",
    "namespaces.*.history_size",
    "namespaces.*.history_ttl",
    "flush_interval",
    "flush_max_window",
    "log_level",
    "features.",
    "memory.",
    "deploy.",
)

#: Exceptions inside a runtime prefix: sized once when a shard starts.
NOT_RUNTIME: tuple[str, ...] = (
    "limits.outbound_buffer_bytes",
)

ABSENT = "(absent)"


@dataclass
class ConfigSources:
    """The layers ``broker serve`` was started with: on reload and deploy the
    flags and environment still beat the (new) file (PROTOCOL.md §5)."""

    file: str | None = None
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    flags: dict[str, object] = dataclasses.field(default_factory=dict)

    def load(self, file: str | None = None) -> Config:
        """A validated Config from ``file`` (default: the file loaded last)."""
        return load_config(file or self.file, self.env, self.flags)


class ReloadRefused(ConfigError):
    """The new file changes a setting that needs a deploy."""


@dataclass(frozen=True)
class Change:
    key: str
    old: Any
    new: Any
    runtime: bool

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "old": self.old, "new": self.new, "runtime": self.runtime}


def _matches(key: str, pattern: str) -> bool:
    if pattern.endswith("."):
        return key.startswith(pattern) or key == pattern[:-1]
    parts, wanted = key.split("."), pattern.split(".")
    return len(parts) == len(wanted) and all(w in ("*", p) for p, w in zip(parts, wanted))


def is_runtime(key: str) -> bool:
    """True when ``key`` (dotted, e.g. ``limits.max_connections``) reloads at runtime."""
    if any(_matches(key, pattern) for pattern in NOT_RUNTIME):
        return False
    return any(_matches(key, pattern) for pattern in RUNTIME)


def flatten(config: Config) -> dict[str, Any]:
    """Every setting as ``dotted.key -> value`` (sections and tables unrolled)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            if not value and prefix in ("features", "namespaces"):
                return
            for name, item in value.items():
                walk(f"{prefix}.{name}" if prefix else name, item)
        else:
            flat[prefix] = list(value) if isinstance(value, tuple) else value

    walk("", dataclasses.asdict(config))
    # A namespace's name repeats its key; its presence is what matters.
    return {key: value for key, value in flat.items()
            if not (key.startswith("namespaces.") and key.endswith(".name"))}


def diff(old: Config, new: Config) -> list[Change]:
    """What changes from ``old`` to ``new``, key by key, sorted by key."""
    a, b = flatten(old), flatten(new)
    changes = []
    for key in sorted(a.keys() | b.keys()):
        before, after = a.get(key, ABSENT), b.get(key, ABSENT)
        if before != after:
            changes.append(Change(key, before, after, is_runtime(key)))
    return changes


def check_reload(old: Config, new: Config) -> list[Change]:
    """The changes a reload would make; ReloadRefused names the first one
    that needs a deploy."""
    changes = diff(old, new)
    for change in changes:
        if not change.runtime:
            raise ReloadRefused(change.key, "cannot change at runtime (it needs `broker deploy`); "
                                            "nothing was reloaded")
    return changes


def apply_runtime(target: Config, new: Config) -> None:
    """Copy ``new``'s runtime settings into ``target`` in place: every part
    of a shard that holds ``target`` sees them from its next use on."""
    outbound = target.limits.outbound_buffer_bytes
    target.limits = dataclasses.replace(new.limits, outbound_buffer_bytes=outbound)
    for name, namespace in target.namespaces.items():
        fresh: Namespace | None = new.namespaces.get(name)
        if fresh is not None:
            namespace.history_size = fresh.history_size
            namespace.history_ttl = fresh.history_ttl
    target.flush_interval = new.flush_interval
    target.flush_max_window = new.flush_max_window
    target.log_level = new.log_level
    target.features = dict(new.features)
    target.deploy = new.deploy
    if hasattr(new, "memory"):  # [memory] thresholds, where the build has them
        target.memory = new.memory  # type: ignore[attr-defined]
    logging.getLogger().setLevel(getattr(logging, new.log_level.upper(), logging.INFO))
