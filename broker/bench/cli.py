"""``broker bench``: the end-to-end load runner (issue 4).

Kept light at import time (only click): ``broker.cli`` imports this module to
register the command; the runner and its workers load when the command runs.
"""
from __future__ import annotations

import sys

import click

__all__ = ["bench"]

WORKLOAD_NAMES = ("w1-1k", "w1-5k", "w2", "w3", "mixed", "flood")
TARGET_NAMES = ("broker", "picows", "websockets", "nats", "broker-socketio", "socketio-node", "broker-redis")
COMPARE_NAMES = ("broker", "picows", "websockets", "nats")   # --compare without --targets (nats if installed)


def _split_targets(value: str | None, compare: bool, redis: bool = False) -> list[str]:
    from broker.bench.nats import nats_server_path

    if value is None:
        names = ([n for n in COMPARE_NAMES if n != "nats" or nats_server_path() is not None]
                 if compare else ["broker"])
        return [*names, "broker-redis"] if redis else names
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in TARGET_NAMES]
    if bad or not names:
        raise click.BadParameter(
            f"unknown target(s) {', '.join(bad) or '(none)'}; choose from {', '.join(TARGET_NAMES)}",
            param_hint="--targets")
    if "nats" in names and nats_server_path() is None:
        raise click.BadParameter("target nats needs nats-server (install it, put it on PATH, or set NATS_SERVER)",
                                 param_hint="--targets")
    return names


@click.command("bench")
@click.option("--workload", "workloads", multiple=True, default=("w1-1k",), show_default=True,
              type=click.Choice([*WORKLOAD_NAMES, "all"]),
              help="Workload(s) to run (repeatable; 'all' = every one).")
@click.option("--connections", type=click.IntRange(min=1), help="Override the workload's connection count.")
@click.option("--rate", type=click.FloatRange(min=0.1), help="Override the publication rate (per second).")
@click.option("--duration", type=click.FloatRange(min=0.1), help="Override the publishing time (seconds).")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="Receiver processes (plus one publisher process).")
@click.option("--concurrency", type=click.IntRange(min=1), default=100, show_default=True,
              help="Connects in flight, all workers together.")
@click.option("--http-conns", type=click.IntRange(min=1), help="Publisher keep-alive connections per stream [by rate].")
@click.option("--url", envvar="BROKER_URL", help="Broker to load (http://HOST:PORT) [http://127.0.0.1:8765].")
@click.option("--http-url", help="Server API URL when it differs from --url.")
@click.option("--pid", type=int, help="Broker's root pid for CPU/RSS (default: found from --url's port).")
@click.option("--api-key", envvar="BROKER_API_KEY", help="Server API key (or BROKER_API_KEY).")
@click.option("--jwt-secret", envvar="BROKER_JWT_SECRET", help="HS256 secret to mint user tokens (W2, mixed).")
@click.option("--spawn", is_flag=True, help="Start the broker (on a free port) per workload and stop it after.")
@click.option("--shards", type=click.IntRange(min=1), default=1, show_default=True, help="Shards of a spawned broker.")
@click.option("--compare", is_flag=True,
              help="Also run the baselines (picows, websockets, and nats when nats-server is installed) "
                   "under the same load; print ratios.")
@click.option("--targets", "targets_opt", metavar="LIST",
              help="Comma-separated targets to run: broker,picows,websockets,nats (a nats-server of the run's "
                   "own: receivers over its WebSocket, PUBs over TCP),broker-socketio (the broker through "
                   "its Socket.IO endpoint),socketio-node (the Node socket.io server; needs node),"
                   "broker-redis (the broker on the Redis engine; see --redis) "
                   "[broker; the first four with --compare; plus broker-redis with --redis].")
@click.option("--drain-timeout", type=click.FloatRange(min=0.5), default=10.0, show_default=True,
              help="Max wait for in-flight deliveries after the last publication.")
@click.option("--log-dir", type=click.Path(file_okay=False), help="Write spawned servers' logs here.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the results as JSON to this file.")
@click.option("--quiet", is_flag=True, help="No progress lines.")
@click.option("--deflate", is_flag=True,
              help="Receivers offer permessage-deflate (client_max_window_bits), as browsers do.")
@click.option("--publish-over", type=click.Choice(["http", "stream"]), default="http", show_default=True,
              help="How publications are sent: one POST per publication (keep-alive connections, one "
                   "in flight each), or over ONE pipelined WebSocket: the broker's backend stream, the "
                   "picows and websockets baselines' own /ws (Node Socket.IO keeps HTTP).")
@click.option("--redis", "redis_opt", is_flag=False, flag_value="spawn", metavar="[URL]",
              help="Also run the broker on the Redis engine (target broker-redis; needs --spawn): on a "
                   "redis-server the run starts on a free port, or on the Redis at URL; prints the "
                   "broker-redis / broker ratios.")
@click.option("--serve-arg", "serve_args", multiple=True, metavar="ARG",
              help="Extra flag for a spawned broker (repeatable), e.g. --serve-arg=--flush-max-window=0.")
def bench(workloads: tuple[str, ...], connections: int | None, rate: float | None, duration: float | None,
          workers: int, concurrency: int, http_conns: int | None, url: str | None, http_url: str | None,
          pid: int | None, api_key: str | None, jwt_secret: str | None, spawn: bool, shards: int, compare: bool,
          targets_opt: str | None, drain_timeout: float, log_dir: str | None, json_path: str | None,
          quiet: bool, deflate: bool, serve_args: tuple[str, ...], publish_over: str,
          redis_opt: str | None) -> None:
    """Load a broker (and, with --compare, the baselines) with thousands of
    WebSocket connections; print a table and the broker/baseline ratios.

    \b
    Workloads:
      w1-1k / w1-5k  1,000 / 5,000 connections on bill:1, 50 pub/s for 15 s
      w2             5,000 connections each on user:<i>, 2,000 pub/s to random users
      w3             5,000 connects as fast as possible; RSS per connection
      mixed          1,000 on bill:1 + 1,000 users, 50 + 500 pub/s at once
      flood          10 on bill:1; publications as fast as 64 publisher
                     connections get answers, for 10 s (pub/s a host takes)
    """
    from broker.bench.report import run_bench  # lazy: heavy imports only when benching

    names = list(WORKLOAD_NAMES) if "all" in workloads else list(dict.fromkeys(workloads))
    targets = _split_targets(targets_opt, compare, redis_opt is not None)
    if "broker-redis" in targets and not spawn:
        raise click.UsageError("broker-redis (--redis) needs --spawn: the run starts the broker on Redis")
    if "broker" in targets and not spawn and url is None:
        url = "http://127.0.0.1:8765"
    if not spawn and "broker" in targets and not jwt_secret and any(n in ("w2", "mixed") for n in names):
        raise click.UsageError("w2 and mixed need --jwt-secret (the broker's) or --spawn")
    code = run_bench(
        workloads=names, targets=targets, connections=connections, rate=rate, duration=duration,
        workers=workers, concurrency=concurrency, http_conns=http_conns, url=url, http_url=http_url, pid=pid,
        api_key=api_key, jwt_secret=jwt_secret, spawn=spawn, shards=shards, drain_timeout=drain_timeout,
        log_dir=log_dir, json_path=json_path, progress=None if quiet else sys.stderr,
        deflate=deflate, serve_args=list(serve_args), publish_over=publish_over,
        redis_url=None if redis_opt in (None, "spawn") else redis_opt,
    )
    sys.exit(code)


