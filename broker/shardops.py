"""What a shard does for the supervisor's operations (docs/operations.md).

The supervisor drives reloads and deploys through the status it publishes
to every shard; this module turns a new status into the shard's part:

- ``config_version`` grew: re-read the node spec (``cluster.json``), apply
  its runtime settings in place (``broker.reload.apply_runtime``), resize
  the history windows, and acknowledge on the control socket.
- ``fenced``: stop writing channel state (a deploy hands it over): publishes
  answer 503 until the new generation serves.
- ``accepting`` false: stop accepting connections (the new generation owns
  the listening socket now); connections queued in the shared accept queue
  are the new generation's to take.
- ``migrate``: ask this shard's clients to reconnect in paced waves.

``view`` is what ``/api/stats`` adds: generation, phase and feature flags.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import Any
from collections.abc import Callable

from .config import Config
from .features import describe
from .feed import GenerationFeed
from .reload import apply_runtime

__all__ = ["ShardOperations", "view"]

log = logging.getLogger("broker.shardops")

HEALTH_INTERVAL = 0.2  # seconds between health reports while a deploy watches


def view(shard: Any) -> dict[str, Any]:
    """Generation, phase and features for ``/api/stats``."""
    status = getattr(shard, "cluster_status", None) or {}
    return {"generation": status.get("generation", 1), "phase": status.get("phase", "serving"),
            "features": describe(shard.config)}


class ShardOperations:
    """Follows the supervisor's status for one shard process."""

    def __init__(self, shard: Any, run_dir: str, tell: Callable[[dict[str, Any]], None],
                 config_version: int = 0) -> None:
        self.shard = shard
        self.run_dir = run_dir
        self.tell = tell
        self.config_version = config_version
        self.fenced = False
        self.on_accepting: Callable[[bool], None] = lambda accepting: None
        self.accepting: bool | None = None
        self.migration: Any = None
        self.health: Any = None
        self.feed: GenerationFeed | None = None

    def follow(self, status: dict[str, Any]) -> None:
        version = status.get("config_version", 0)
        if version > self.config_version:
            try:
                self._reload(version)
            except (OSError, ValueError, KeyError, TypeError) as exc:  # never stop following the status
                log.error("shard %d: cannot apply config version %d: %s", self.shard.id, version, exc)
                self.config_version = version  # the supervisor reports the missing confirmation
        fenced = bool(status.get("fenced", False))
        if fenced != self.fenced:
            self.fenced = fenced
            self.shard.engine.fence(fenced)
            log.info("shard %d: channel state %s", self.shard.id, "fenced" if fenced else "unfenced")
            if not fenced and self.feed is not None:  # the deploy was abandoned
                self.feed.close()
                self.feed = None
        if fenced:
            self.tell({"fenced": self.shard.id, "pid": os.getpid()})
        feed = status.get("feed")
        if fenced and feed and self.feed is None:
            self._start_feed(feed)
        accepting = status.get("accepting")
        if accepting is not None and accepting != self.accepting:
            was, self.accepting = self.accepting, accepting
            if accepting:
                self.on_accepting(True)
            elif was:  # a newer generation took the listening socket over
                self.shard.retired = True
                self.on_accepting(False)
        if status.get("report_health") and self.health is None:
            self.health = self.shard.loop.create_task(self._report_health())
        elif not status.get("report_health") and self.health is not None:
            self.health.cancel()
            self.health = None
        migrate = status.get("migrate")
        if migrate and self.migration is None:
            self.migration = self.shard.loop.create_task(self._migrate(migrate))

    def _reload(self, version: int) -> None:
        with open(os.path.join(self.run_dir, "cluster.json"), encoding="utf-8") as fh:
            spec = json.load(fh)
        if spec.get("config_version", 0) < version:
            return  # the file is older than the status: the next status retries
        apply_runtime(self.shard.config, Config.from_dict(spec["config"]))
        resized = self.shard.engine.rebound()
        self.shard.watch.reconfigure(self.shard.config)  # [memory] thresholds
        self.config_version = spec["config_version"]
        log.info("shard %d: runtime config %d applied (%d history window(s) resized)",
                 self.shard.id, self.config_version, resized)
        self.tell({"applied": self.config_version, "id": self.shard.id, "pid": os.getpid()})

    def _start_feed(self, endpoints: list[str]) -> None:
        """Follow the new generation's streams for this shard's channels
        (broker.feed), from where this shard's copy of each stands."""
        shard = self.shard
        delivered = getattr(shard.engine, "delivered", None)
        if delivered is None or shard.router is None:
            return
        self.feed = GenerationFeed(shard, endpoints, shard.router.ctx, shard.loop)
        followed = 0
        for channel in shard.subscribed_channels():
            position = delivered(channel)
            if position is not None:
                self.feed.follow(channel, position.epoch, position.offset)
                followed += 1
        log.info("shard %d: following %d channel(s) on the new generation until its clients move",
                 shard.id, followed)

    async def _report_health(self) -> None:
        """While a deploy watches this (new) generation: requests, faults and
        readiness, several times a second."""
        shard = self.shard
        while True:
            self.tell({"health": shard.id, "pid": os.getpid(), "requests": shard.http_requests,
                       "errors": shard.http_errors, "not_ready": shard.not_ready_reason()})
            await asyncio.sleep(HEALTH_INTERVAL)

    async def _migrate(self, plan: dict[str, Any]) -> None:
        moved = await self.shard.migrate(plan["wave_size"], plan["wave_interval"], plan["max_after_ms"])
        self.tell({"migrated": self.shard.id, "pid": os.getpid(), "clients": moved})
