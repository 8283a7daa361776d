"""One ``broker bench`` invocation: every workload against every target, one
after the other (a spawned server is fresh for each workload), then the table,
the ratios and the JSON file."""
from __future__ import annotations

import json
import os
import secrets
import sys
import time
from typing import Any, TextIO

from . import stats
from .nats import spawn_nats
from .runner import RunOptions, report_document, run_workload, workload, workload_dict
from .targets import Target, attach, socketio_url, spawn_baseline, spawn_broker, spawn_redis

SOCKETIO_TARGETS = ("broker-socketio", "socketio-node")

__all__ = ["run_bench"]


def _log_path(log_dir: str | None, name: str, workload_name: str) -> str | None:
    if not log_dir:
        return None
    os.makedirs(log_dir, exist_ok=True)
    return os.path.join(log_dir, f"{name}-{workload_name}.log")


def _start(name: str, workload_name: str, *, spawn: bool, url: str | None, http_url: str | None, pid: int | None,
           api_key: str | None, jwt_secret: str | None, shards: int, log_dir: str | None,
           serve_args: list[str] | None = None, redis_url: str | None = None) -> Target:
    log = _log_path(log_dir, name, workload_name)
    if name == "broker-redis":   # the broker on the Redis engine: its own redis-server, or the one given
        if not spawn:
            raise ValueError("broker-redis needs --spawn (the run starts the broker on Redis)")
        assert api_key is not None and jwt_secret is not None
        redis = None if redis_url else spawn_redis(_log_path(log_dir, "redis", workload_name))
        try:
            target = spawn_broker(shards=shards, api_key=api_key, jwt_secret=jwt_secret, log_path=log,
                                  extra=serve_args, redis_url=redis_url or (redis.url if redis else None))
        except BaseException:
            if redis is not None:
                redis.stop()
            raise
        target.name, target.redis = name, redis
        return target
    if name in ("broker", "broker-socketio"):
        if spawn:
            assert api_key is not None and jwt_secret is not None, "run_bench makes them up when it spawns"
            target = spawn_broker(shards=shards, api_key=api_key, jwt_secret=jwt_secret, log_path=log,
                                  extra=serve_args)
        else:
            assert url is not None
            target = attach(url, http_url, pid)
        if name == "broker-socketio":   # the same broker, loaded through its Socket.IO endpoint
            target.name = name
            target.ws_url = socketio_url(target.http_url)
        return target
    if name == "nats":   # always a nats-server of this run's own, on free ports
        return spawn_nats(log_path=log)
    return spawn_baseline(name, log_path=log)


def run_bench(*, workloads: list[str], targets: list[str], connections: int | None = None, rate: float | None = None,
              duration: float | None = None, workers: int = 2, concurrency: int = 100, http_conns: int | None = None,
              url: str | None = None, http_url: str | None = None, pid: int | None = None,
              api_key: str | None = None, jwt_secret: str | None = None, spawn: bool = False, shards: int = 1,
              drain_timeout: float = 10.0, log_dir: str | None = None, json_path: str | None = None,
              progress: TextIO | None = sys.stderr, out: TextIO | None = None, deflate: bool = False,
              serve_args: list[str] | None = None, publish_over: str = "http", redis_url: str | None = None) -> int:
    """Run, print, write; returns the exit code (1 when a run failed outright).

    With ``spawn``, a missing API key or JWT secret is generated for the run."""
    out = out or sys.stdout
    if spawn:
        api_key = api_key or secrets.token_hex(8)
        jwt_secret = jwt_secret or secrets.token_hex(16)
    jwt_secret = jwt_secret or secrets.token_hex(16)   # the baselines accept any token
    opts = RunOptions(workers=workers, api_key=api_key, jwt_secret=jwt_secret, concurrency=concurrency,
                      http_conns=http_conns, drain_timeout=drain_timeout, progress=progress, deflate=deflate,
                      publish_over=publish_over)
    results: list[dict[str, Any]] = []
    plan = [workload(name, connections, rate, duration) for name in workloads]
    failed = False
    for w in plan:
        for name in targets:
            try:
                target = _start(name, w.name, spawn=spawn, url=url, http_url=http_url, pid=pid, api_key=api_key,
                                jwt_secret=jwt_secret, shards=shards, log_dir=log_dir, serve_args=serve_args,
                                redis_url=redis_url)
            except Exception as exc:
                record = stats.finish_result({**stats.empty_result(name, w.name),
                                              "errors": [f"start failed: {type(exc).__name__}: {exc}"]})
                results.append(record)
                failed = True
                if progress is not None:
                    progress.write(f"[{name} {w.name}] could not start: {exc}\n")
                continue
            try:
                record = run_workload(target, w, opts)
            finally:
                code = target.stop()
            if code not in (None, 0):
                record["errors"].append(f"server exit code {code}")
            if any(e.startswith("run failed") for e in record["errors"]) or (
                    record["publications_requested"] and not record["publications"]):
                failed = True
            results.append(record)
            time.sleep(0.5)   # let sockets in TIME_WAIT and the CPU settle between runs
    out.write("\n" + stats.format_table(results) + "\n")
    rows = [r for r in stats.ratios(results) if r["baseline"] not in (*SOCKETIO_TARGETS, "broker-redis")]
    if rows:
        out.write("\nratios broker / baseline (same load, same run):\n" + stats.format_ratios(rows) + "\n")
    # Socket.IO: the broker's endpoint against its native one and the Node server.
    rows = [r for r in stats.ratios(results, "broker-socketio") if r["baseline"] in ("broker", "socketio-node")]
    if rows:
        out.write("\nratios broker-socketio / baseline (same load, same run):\n"
                  + stats.format_ratios(rows, "broker-socketio") + "\n")
    # The Redis engine against the embedded one (Redis's own CPU is in the JSON, redis_cpu_seconds).
    rows = [r for r in stats.ratios(results, "broker-redis") if r["baseline"] == "broker"]
    if rows:
        out.write("\nratios broker-redis / broker (Redis engine / embedded engine, same load, same run):\n"
                  + stats.format_ratios(rows, "broker-redis") + "\n")
    notes = [f"  {r['target']} {r['workload']}: {e}" for r in results for e in r["errors"]]
    if notes:
        out.write("\nnotes:\n" + "\n".join(notes) + "\n")
    out.flush()
    if json_path:
        params = {"workloads": [workload_dict(w) for w in plan], "targets": targets, "workers": workers,
                  "concurrency": concurrency, "spawn": spawn, "shards": shards, "url": url,
                  "redis_url": redis_url}
        with open(json_path, "w") as fh:
            json.dump(report_document(results, params), fh, indent=2)
            fh.write("\n")
    return 1 if failed else 0
