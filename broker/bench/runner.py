"""Orchestration of one bench invocation: targets x workloads, each run in
fresh worker processes, results as records of ``stats.RESULT_FIELDS``.

Phases of one run (target, workload):
  1. start receiver workers and the publisher (spawn: no loop exists yet);
  2. connect (server CPU and RSS sampled before/after: connect rate, RSS per
     connection); W3 stops here;
  3. publish at the schedule for ``duration`` seconds, then give the
     receivers the channels' final offsets and let them drain (bounded);
  4. collect counts and latencies, close everything, stop the workers.
Everything is bounded: every wait has a timeout and every worker an alarm.
"""
from __future__ import annotations

import math
import multiprocessing as mp
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any, TextIO

import psutil

from . import stats
from .targets import Target, process_cpu_seconds
from .worker import (SLOT_CONNECTED, SLOT_DISCONNECTS, SLOT_FAILED, SLOT_PUBLISHED, SLOT_RECEIVED, SLOTS,
                     publisher_main, raise_nofile_limit, receiver_main)

#: targets that are the broker through its native endpoint (they have the backend stream)
BROKER_NATIVE = ("broker", "broker-redis")

__all__ = ["Workload", "WORKLOADS", "workload", "RunOptions", "run_workload", "report_document"]


@dataclass(frozen=True)
class Workload:
    name: str
    fanout_connections: int = 0     # subscribed to bill:1 (anonymous)
    user_connections: int = 0       # each on user:<i> (a JWT each)
    idle_connections: int = 0       # connect only (W3)
    fanout_rate: float = 0.0        # publications/s to bill:1
    user_rate: float = 0.0          # publications/s to random user:<i>
    duration: float = 15.0
    flood: bool = False             # publish as fast as the server answers (no schedule) for ``duration``

    @property
    def connections(self) -> int:
        return self.fanout_connections + self.user_connections + self.idle_connections

    @property
    def publications(self) -> int:
        if self.flood:
            return 0  # as many as the server takes
        return _count(self.fanout_rate, self.duration) + _count(self.user_rate, self.duration)


def _count(rate: float, duration: float) -> int:
    return int(round(rate * duration)) if rate > 0 else 0


WORKLOADS: dict[str, Workload] = {
    "w1-1k": Workload("w1-1k", fanout_connections=1000, fanout_rate=50, duration=15),
    "w1-5k": Workload("w1-5k", fanout_connections=5000, fanout_rate=50, duration=15),
    "w2": Workload("w2", user_connections=5000, user_rate=2000, duration=15),
    "w3": Workload("w3", idle_connections=5000, duration=0),
    # Publications per second a host takes: 64 backend connections, each
    # publication sent as soon as the previous one on its connection was
    # answered, to bill:1, followed by 10 subscribers.
    "flood": Workload("flood", fanout_connections=10, fanout_rate=1.0, duration=10, flood=True),
    "mixed": Workload("mixed", fanout_connections=1000, user_connections=1000, fanout_rate=50,
                      user_rate=500, duration=15),
}


def workload(name: str, connections: int | None = None, rate: float | None = None,
             duration: float | None = None) -> Workload:
    """A named workload with optional overrides. ``mixed`` splits connections
    half/half and a total rate 1:10 between the fan-out and the users."""
    base = WORKLOADS[name]
    changes: dict[str, Any] = {}
    if duration is not None:
        changes["duration"] = duration
    if name.startswith("w1") or name == "flood":
        if connections is not None:
            changes["fanout_connections"] = connections
        if rate is not None:
            changes["fanout_rate"] = rate
    elif name == "w2":
        if connections is not None:
            changes["user_connections"] = connections
        if rate is not None:
            changes["user_rate"] = rate
    elif name == "w3":
        if connections is not None:
            changes["idle_connections"] = connections
    elif name == "mixed":
        if connections is not None:
            changes["fanout_connections"] = connections // 2
            changes["user_connections"] = connections - connections // 2
        if rate is not None:
            changes["fanout_rate"] = rate / 11
            changes["user_rate"] = rate * 10 / 11
    return replace(base, **changes)


@dataclass
class RunOptions:
    workers: int = 2
    api_key: str | None = None
    jwt_secret: str | None = None
    concurrency: int = 100            # connects in flight, all workers together
    http_conns: int | None = None      # publisher connections per stream (None: by rate)
    drain_timeout: float = 10.0
    progress: TextIO | None = sys.stderr
    deflate: bool = False              # receivers offer permessage-deflate, as browsers do
    publish_over: str = "http"         # "stream": the broker's backend stream (GET /api/stream)


class _Progress:
    """Simple stderr progress lines: rewritten in place on a TTY, one line
    every few seconds otherwise."""

    def __init__(self, stream: TextIO | None, label: str) -> None:
        self.stream = stream
        self.label = label
        self.tty = bool(stream is not None and getattr(stream, "isatty", lambda: False)())
        self._last = 0.0

    def bar(self, done: float, total: float, width: int = 24) -> str:
        frac = 0.0 if total <= 0 else min(1.0, done / total)
        filled = int(frac * width)
        return "[" + "#" * filled + "." * (width - filled) + f"] {frac * 100:5.1f}%"

    def update(self, text: str, force: bool = False) -> None:
        if self.stream is None:
            return
        now = time.monotonic()
        if self.tty:
            if force or now - self._last >= 0.2:
                self.stream.write(f"\r\x1b[K{self.label} {text}")
                self.stream.flush()
                self._last = now
        elif force or now - self._last >= 3.0:
            self.stream.write(f"{self.label} {text}\n")
            self.stream.flush()
            self._last = now

    def done(self, text: str) -> None:
        if self.stream is None:
            return
        if self.tty:
            self.stream.write(f"\r\x1b[K{self.label} {text}\n")
        else:
            self.stream.write(f"{self.label} {text}\n")
        self.stream.flush()


class _Workers:
    """The run's worker processes and their pipes."""

    def __init__(self, ctx: Any, n_receivers: int) -> None:
        self.ctx = ctx
        self.progress = ctx.Array("q", SLOTS * (n_receivers + 1), lock=False)
        self.receivers: list[tuple[Any, Any]] = []   # (process, parent end)
        self.publisher: tuple[Any, Any] | None = None
        self.pids: list[int] = []

    def start(self, target: Callable[..., None], params: dict[str, Any], slot: int) -> tuple[Any, Any]:
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=target, args=(child, self.progress, slot * SLOTS, params), daemon=True,
                                name=f"bench-{target.__name__}-{slot}")
        proc.start()
        child.close()
        return proc, parent

    def sum(self, slot_index: int) -> int:
        """A progress slot summed over the receivers."""
        n = len(self.receivers)
        return sum(self.progress[i * SLOTS + slot_index] for i in range(n))

    def published(self) -> int:
        return int(self.progress[len(self.receivers) * SLOTS + SLOT_PUBLISHED])

    @property
    def all(self) -> list[tuple[Any, Any]]:
        return self.receivers + ([self.publisher] if self.publisher else [])

    def cpu_seconds(self) -> float:
        total = 0.0
        for proc, _ in self.all:
            try:
                total += process_cpu_seconds(psutil.Process(proc.pid))
            except psutil.Error:
                pass
        return total

    def stop(self) -> None:
        """Close every worker; end the ones that do not by their pid."""
        for _proc, pipe in self.all:
            try:
                pipe.send(("exit",))
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + 5
        for proc, pipe in self.all:
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.terminate()
                proc.join(2)
            if proc.is_alive():
                proc.kill()
                proc.join(1)
            try:
                pipe.close()
            except OSError:
                pass


def _expect(pipe: Any, kind: str, timeout: float) -> Any:
    if not pipe.poll(timeout):
        raise TimeoutError(f"worker did not answer {kind!r} within {timeout:.0f}s")
    msg = pipe.recv()
    if msg[0] != kind:
        raise RuntimeError(f"worker answered {msg[0]!r}, expected {kind!r}")
    return msg[1]


def _http_parts(http_url: str) -> tuple[str, int]:
    from urllib.parse import urlsplit
    parts = urlsplit(http_url)
    return parts.hostname or "127.0.0.1", parts.port or 80


def _streams(w: Workload, opts: RunOptions) -> list[dict[str, Any]]:
    streams: list[dict[str, Any]] = []
    for name, rate, channels in (("fanout", w.fanout_rate, 0), ("users", w.user_rate, w.user_connections)):
        total = _count(rate, w.duration)
        if total <= 0:
            continue
        conns = opts.http_conns or max(2, min(32, math.ceil(rate / 100)))
        if w.flood:   # no schedule: a cap no run reaches, and the clock ends it
            total, conns = 10**9, opts.http_conns or 64
        streams.append({"name": name, "rate": 0.0 if w.flood else rate, "total": total, "channels": channels,
                        "http_conns": min(conns, total), "seed": len(streams) + 1,
                        "seconds": w.duration if w.flood else None})
    return streams


STREAM_BASELINES = ("picows", "websockets")  # take ``publish`` commands on their WebSocket


def _publish_over(target: Target, opts: RunOptions) -> str:
    """NATS takes PUBs on its client port; with ``stream``, the broker
    publishes over its backend stream and the picows and websockets
    baselines over a WebSocket of their own (the same pipelined client);
    Socket.IO on Node keeps HTTP."""
    if target.protocol == "nats":
        return "nats"
    if target.name in BROKER_NATIVE or target.name in STREAM_BASELINES:
        return opts.publish_over
    return "http"


def _stream_url(target: Target) -> str:
    """Where the stream publisher connects: the broker's ``/api/stream``, a baseline's ``/ws``."""
    if target.name in BROKER_NATIVE:
        host, port = _http_parts(target.http_url)
        return f"ws://{host}:{port}/api/stream"
    return target.ws_url


def run_workload(target: Target, w: Workload, opts: RunOptions) -> dict[str, Any]:
    """Run workload ``w`` against ``target``; returns one result record."""
    from .targets import RssSampler

    result = stats.empty_result(target.name, w.name)
    result["connections_requested"] = w.connections
    result["publications_requested"] = w.publications
    progress = _Progress(opts.progress, f"[{target.name} {w.name}]")
    started = time.monotonic()
    raise_nofile_limit()
    if w.user_connections and not opts.jwt_secret:
        raise ValueError(f"{w.name} needs --jwt-secret (or --spawn) to mint user tokens")

    n_workers = max(1, min(opts.workers, w.connections or 1))
    ctx = mp.get_context("spawn")
    workers = _Workers(ctx, n_workers)
    budget = 120 + w.duration * 2 + w.connections / 50 + opts.drain_timeout
    spec = {"fanout_connections": w.fanout_connections, "user_connections": w.user_connections,
            "idle_connections": w.idle_connections}
    concurrency = max(1, opts.concurrency // n_workers)
    sampler = RssSampler(target.tree)
    sampler.reset()
    sampler.start()
    try:
        for i in range(n_workers):
            params = {"spec": spec, "indices": list(range(i, w.connections, n_workers)), "ws_url": target.ws_url,
                      "jwt_secret": opts.jwt_secret, "concurrency": concurrency, "budget": budget,
                      "deflate": opts.deflate, "protocol": target.protocol}
            workers.receivers.append(workers.start(receiver_main, params, i))
        streams = _streams(w, opts)
        if streams:
            host, port = _http_parts(target.http_url)
            workers.publisher = workers.start(
                publisher_main, {"http_host": host, "http_port": port, "api_key": opts.api_key,
                                 "streams": streams, "budget": budget,
                                 "publish_over": _publish_over(target, opts),
                                 "stream_url": _stream_url(target)},
                n_workers)
        for _, pipe in workers.all:
            workers.pids.append(_expect(pipe, "ready", 60))

        # -- connect ---------------------------------------------------------------
        time.sleep(0.2)
        result["server_processes"] = target.tree.count()
        cpu0 = target.tree.cpu_seconds()
        result["rss_before_bytes"] = target.tree.rss_bytes()
        sampler.reset()
        gen0 = workers.cpu_seconds()
        for _, pipe in workers.receivers:
            pipe.send(("connect",))
        replies: list[dict[str, Any]] = []
        connect_deadline = time.monotonic() + 60 + w.connections / 100
        pending = list(workers.receivers)
        while pending:
            if time.monotonic() > connect_deadline:
                raise TimeoutError("connect phase did not finish in time")
            for item in list(pending):
                if item[1].poll(0):
                    replies.append(_expect(item[1], "connected", 1))
                    pending.remove(item)
            ok, failed = workers.sum(SLOT_CONNECTED), workers.sum(SLOT_FAILED)
            progress.update(f"connect {progress.bar(ok + failed, w.connections)} {ok}/{w.connections}"
                            + (f" ({failed} failed)" if failed else ""))
            time.sleep(0.05)
        result["server_cpu_seconds_connect"] = round(target.tree.cpu_seconds() - cpu0, 3)
        result["connections"] = sum(r["connected"] for r in replies)
        result["connect_failed"] = sum(r["failed"] for r in replies)
        result["connect_seconds"] = round(max(r["end"] for r in replies) - min(r["start"] for r in replies), 3)
        for r in replies:
            result["errors"].extend(f"connect: {k} x{v}" for k, v in r["errors"].items())
        progress.done(f"connected {result['connections']}/{w.connections} in {result['connect_seconds']:.2f}s"
                      + (f", {result['connect_failed']} failed" if result["connect_failed"] else ""))
        time.sleep(1.0 if not streams else 0.3)   # let the server settle before the RSS sample
        result["rss_connected_bytes"] = target.tree.rss_bytes()

        # -- publish ---------------------------------------------------------------
        if streams and workers.publisher is not None:
            cpu1 = target.tree.cpu_seconds()
            redis_cpu1 = target.redis.tree.cpu_seconds() if target.redis is not None else None
            gen0 = workers.cpu_seconds()
            pub_pipe = workers.publisher[1]
            pub_budget = w.duration + 30
            pub_pipe.send(("publish", pub_budget))
            deadline = time.monotonic() + pub_budget + 15
            planned = 0 if w.flood else sum(s["total"] for s in streams)
            while not pub_pipe.poll(0.1):
                if time.monotonic() > deadline:
                    raise TimeoutError("publisher did not finish in time")
                if not target.alive():
                    raise RuntimeError(f"{target.name} died during the run")
                published = workers.published()
                progress.update(f"publish {progress.bar(published, planned)} {published}/{planned}"
                                f"  received {workers.sum(SLOT_RECEIVED):,}"
                                f"  disconnects {workers.sum(SLOT_DISCONNECTS)}")
            pub = _expect(pub_pipe, "published", 1)
            result["publications"] = pub["ok"]
            result["publications_failed"] = pub["failed"]
            result["publish_seconds"] = round(pub["end"] - pub["start"], 3)
            result["errors"].extend(f"publish: {k} x{v}" for k, v in pub["statuses"].items())
            progress.done(f"published {pub['ok']}/{planned} in {result['publish_seconds']:.2f}s"
                          + (f", {pub['failed']} failed" if pub["failed"] else ""))

            # -- drain and collect -----------------------------------------------------
            for _, pipe in workers.receivers:
                pipe.send(("drain", pub["finals"], opts.drain_timeout))
            reports = []
            for _, pipe in workers.receivers:
                reports.append(_expect(pipe, "report", opts.drain_timeout + 30))
            result["server_cpu_seconds"] = round(target.tree.cpu_seconds() - cpu1, 3)
            if target.redis is not None and redis_cpu1 is not None:
                result["redis_cpu_seconds"] = round(target.redis.tree.cpu_seconds() - redis_cpu1, 3)
            counts = stats.merge_counts(r["counts"] for r in reports)
            result["deliveries_expected"] = counts.get("expected", 0)
            result["deliveries_received"] = counts.get("received", 0)
            result["duplicates"] = counts.get("duplicates", 0)
            result["offset_gaps"] = counts.get("gaps", 0)
            result["offsets_missing"] = counts.get("missing", 0)
            codes = stats.merge_counts(r["close_codes"] for r in reports)
            result["disconnects"] = sum(codes.values())
            if codes:
                result["errors"].append("closed by server: " + ", ".join(f"{k} x{v}" for k, v in sorted(codes.items())))
            for r in reports:
                result["errors"].extend(f"receiver: {k} x{v}" for k, v in r["errors"].items())
            import numpy as np
            lat = np.concatenate([np.frombuffer(r["latencies"], dtype=np.int64) for r in reports]) \
                if reports else np.zeros(0, dtype=np.int64)
            result.update(stats.latency_summary(lat))
            progress.done(f"received {result['deliveries_received']:,}/{result['deliveries_expected']:,}"
                          f", gaps {result['offset_gaps']}, p99 {result['latency_p99_ms']} ms")
        result["loadgen_cpu_seconds"] = round(workers.cpu_seconds() - gen0, 2)
        result["peak_rss_bytes"] = max(sampler.peak, result["rss_connected_bytes"] or 0)
        for _, pipe in workers.all:
            pipe.send(("close",))
        for _, pipe in workers.all:
            try:
                _expect(pipe, "closed", 10)
            except (TimeoutError, RuntimeError, EOFError, OSError):
                pass
    except Exception as exc:  # the record says what went wrong; the caller goes on
        result["errors"].append(f"run failed: {type(exc).__name__}: {exc}")
        progress.done(f"FAILED: {type(exc).__name__}: {exc}")
    finally:
        sampler.stop()
        workers.stop()
    result["elapsed_seconds"] = round(time.monotonic() - started, 2)
    # dedupe errors, keep them short
    seen: dict[str, None] = {}
    for e in result["errors"]:
        seen.setdefault(e[:200], None)
    result["errors"] = list(seen)[:20]
    return stats.finish_result(result)


def report_document(results: list[dict[str, Any]], params: dict[str, Any]) -> dict[str, Any]:
    """The JSON written by ``--json``."""
    return {
        "version": 1,
        "command": " ".join(sys.argv),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"platform": platform.platform(), "python": platform.python_version(),
                 "cpus": os.cpu_count(), "load_average": list(os.getloadavg())},
        "params": params,
        "fields": list(stats.RESULT_FIELDS),
        "results": results,
        "ratios": stats.ratios(results),
    }


def workload_dict(w: Workload) -> dict[str, Any]:
    return {**asdict(w), "connections": w.connections, "publications": w.publications}
