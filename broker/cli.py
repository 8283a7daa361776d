"""The ``broker`` command (PROTOCOL.md §5).

A bad flag, value or config file prints ``error: <key>: <message>`` and exits
2. Values of ``serve`` are taken as text here and validated by
``load_config``, so a flag, its BROKER_* variable and its TOML key fail with
the same message.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, NoReturn

import click
from click.core import ParameterSource

from broker._version import __version__
from broker.config import Config, load_config
from broker.errors import ConfigError, PublishError

__all__ = ["main"]

DEFAULT_URL = "http://127.0.0.1:8765"


def _fail(key: str, message: str, code: int = 2) -> NoReturn:
    click.echo(f"error: {key}: {message}", err=True)
    sys.exit(code)


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    click.echo(f"broker {__version__}")
    # No fallback for a fastpath that does not import: the package itself
    # (broker/__init__ -> server) imports it before this module can run.
    from broker._fastpath import IMPLEMENTATION

    click.echo(f"fastpath: {IMPLEMENTATION}")
    ctx.exit(0)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Print the version and the fastpath implementation, then exit.")
def main() -> None:
    """A sharded real-time message broker (WebSocket fan-out and routing)."""


# -- serve ---------------------------------------------------------------------

# Flags of `serve` that map to a top-level config key (values as text).
_SERVE_SETTINGS = ("host", "port", "shards", "api_key", "jwt_secret", "allow_anonymous", "redis_url",
                   "memory_limit_mb", "state_dir", "drain_timeout", "flush_interval", "flush_max_window",
                   "compression",
                   "log_level", "tls_cert", "tls_key")


@main.command()
@click.option("--config", "config_file", metavar="FILE", help="TOML config file.")
@click.option("--host", metavar="H", help="Address to listen on [127.0.0.1].")
@click.option("--port", metavar="P", help="Port, 0 = any free one [8765].")
@click.option("--shards", metavar="N", help="Worker processes [one per core].")
@click.option("--api-key", metavar="K", help="Key of the server API (Authorization: apikey K).")
@click.option("--jwt-secret", metavar="S", help="HS256 secret of client tokens.")
@click.option("--allow-anonymous/--no-allow-anonymous", default=None,
              help="Accept connections without a token (public channels only).")
@click.option("--redis-url", "--redis", "redis_url", metavar="URL", help="Redis engine (redis://, rediss://, unix://).")
@click.option("--memory-limit-mb", metavar="N", help="Memory budget of all shards together.")
@click.option("--state-dir", metavar="DIR",
              help="Keep channel state (epochs, offsets, history) here across restarts [none].")
@click.option("--drain-timeout", metavar="SECONDS", help="Graceful stop budget [10].")
@click.option("--flush-interval", metavar="SECONDS", help="Fixed batching window, 0 = adaptive [0].")
@click.option("--flush-max-window", metavar="SECONDS",
              help="Bound of the adaptive batching window, 0 = flush every loop turn [0.05].")
@click.option("--compression/--no-compression", default=None, help="Accept permessage-deflate [on].")
@click.option("--log-level", metavar="LEVEL", help="debug, info, warning, error, critical [info].")
@click.option("--tls-cert", metavar="FILE", help="PEM certificate chain: serve wss:// and https:// [off].")
@click.option("--tls-key", metavar="FILE", help="PEM private key of --tls-cert.")
@click.pass_context
def serve(ctx: click.Context, /, config_file: str | None, **values: Any) -> None:
    """Run the broker until SIGTERM/SIGINT (then drain and exit 0)."""
    given = {name: values[name] for name in _SERVE_SETTINGS
             if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE}
    try:
        config = load_config(config_file, os.environ, given)
    except ConfigError as exc:
        _fail(exc.key, exc.message)
    from broker.reload import ConfigSources
    from broker.server import serve as run_server  # lazy: the CLI's other commands stay light

    # Kept for reload and deploy: flags and environment still beat a new file.
    sources = ConfigSources(os.path.abspath(config_file) if config_file else None,
                            {k: v for k, v in os.environ.items() if k.startswith("BROKER_")}, given)
    try:
        code = run_server(config, sources)
    except ConfigError as exc:
        _fail(exc.key, exc.message)
    sys.exit(code or 0)


# -- token ---------------------------------------------------------------------

@main.command()
@click.option("--jwt-secret", envvar="BROKER_JWT_SECRET", required=True, metavar="S",
              help="HS256 secret (or BROKER_JWT_SECRET).")
@click.option("--sub", required=True, metavar="ID", help="User id (the 'sub' claim).")
@click.option("--ttl", type=float, default=3600.0, show_default=True, metavar="SECONDS",
              help="Lifetime; negative = already expired (for tests).")
@click.option("--channel", "channels", multiple=True, metavar="NAME",
              help="Extra channel the token may subscribe to (repeatable).")
def token(jwt_secret: str, sub: str, ttl: float, channels: tuple[str, ...]) -> None:
    """Print a signed JWT for a client."""
    from broker.auth import mint_token

    if not jwt_secret:
        _fail("jwt_secret", "must not be empty")
    click.echo(mint_token(jwt_secret, sub, ttl=ttl, channels=list(channels) or None))


# -- publish / stats -----------------------------------------------------------

def _url_option(f: Any) -> Any:
    f = click.option("--api-key", envvar="BROKER_API_KEY", metavar="K",
                     help="Server API key (or BROKER_API_KEY).")(f)
    return click.option("--url", envvar="BROKER_URL", default=DEFAULT_URL, show_default=True,
                        help="Broker HTTP URL (or BROKER_URL).")(f)


def _publisher(url: str, api_key: str | None) -> Any:
    from broker.client import Publisher

    try:
        return Publisher(url, api_key=api_key)
    except ValueError as exc:
        _fail("url", str(exc))


def _api_failure(exc: PublishError) -> NoReturn:
    if exc.status == 0:
        click.echo(f"error: {exc.body.get('error') if isinstance(exc.body, dict) else exc.body}", err=True)
    else:
        click.echo(json.dumps(exc.body), err=True)
    sys.exit(1)


@main.command()
@_url_option
@click.argument("channel")
@click.argument("data", metavar="JSON")
def publish(url: str, api_key: str | None, channel: str, data: str) -> None:
    """Publish JSON to CHANNEL through the server API; print the reply."""
    try:
        value = json.loads(data)
    except ValueError as exc:
        _fail("JSON", f"invalid JSON argument: {exc}")
    with _publisher(url, api_key) as publisher:
        try:
            reply = publisher.publish(channel, value)
        except PublishError as exc:
            _api_failure(exc)
    click.echo(json.dumps(reply))


def _stats_table(stats: dict[str, Any]) -> str:
    totals = ("connections", "subscriptions", "channels", "published", "delivered")
    lines = [f"node {stats.get('node', '?')}"
             + (f"  generation {stats['generation']} ({stats.get('phase', '?')})" if "generation" in stats else "")]
    lines.append("  ".join(f"{name} {stats.get(name, '-')}" for name in totals))
    header = ("shard", "pid", "up", "connections", "subscriptions", "delivered", "rss MB", "degradation")
    rows = [header]
    for shard in stats.get("shards") or []:
        rss = shard.get("rss_bytes")
        up = shard.get("up")
        rows.append((
            str(shard.get("id", "?")),
            str(shard.get("pid", "-")),
            "yes" if up is True else "no" if up is False else "-",
            str(shard.get("connections", "-")),
            str(shard.get("subscriptions", "-")),
            str(shard.get("delivered", "-")),
            f"{rss / (1024 * 1024):.1f}" if isinstance(rss, (int, float)) else "-",
            str(shard.get("degradation", "-")),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines.append("")
    for row in rows:
        lines.append("  ".join(cell.rjust(width) if i else cell.ljust(width)
                               for i, (cell, width) in enumerate(zip(row, widths, strict=True))).rstrip())
    return "\n".join(lines)


@main.command()
@_url_option
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON instead of a table.")
def stats(url: str, api_key: str | None, as_json: bool) -> None:
    """Print the cluster's stats: node totals, then one row per shard."""
    with _publisher(url, api_key) as publisher:
        try:
            reply = publisher.get_stats()
        except PublishError as exc:
            _api_failure(exc)
    click.echo(json.dumps(reply, indent=2) if as_json else _stats_table(reply))


# -- check-config --------------------------------------------------------------

def _summary(config: Config) -> str:
    lines = [
        f"listen {config.host}:{config.port}, {config.shards} shard(s)",
        f"engine {'redis ' + config.redis_url if config.redis_url else 'memory (one host)'}",
        f"tls {'on (' + config.tls_cert + ')' if config.tls_cert else 'off'}",
        f"server API {'protected by an API key' if config.api_key else 'OPEN (no api_key)'}",
        f"tokens {'HS256 secret' if config.jwt_secret else 'no secret'}"
        f"{', RS256 public key' if config.jwt.public_key else ''}; "
        f"anonymous {'allowed' if config.allow_anonymous else 'refused'}",
    ]
    for ns in config.namespaces.values():
        lines.append(f"namespace {ns.name}: history {ns.history_size} for {ns.history_ttl:g}s, "
                     f"subscribe {ns.subscribe}, client publish {'yes' if ns.client_publish else 'no'}")
    return "\n".join(lines)


@main.command("check-config")
@click.argument("file", metavar="FILE", required=False)
@click.option("--diff", "files", nargs=2, metavar="OLD NEW",
              help="Show what changes from OLD to NEW, key by key, and whether a reload "
                   "applies it or it needs a deploy.")
def check_config(file: str | None, files: tuple[str, str] | None) -> None:
    """Validate a TOML config file (exit 2 naming the bad key), or --diff two."""
    if files:
        _diff(*files)
        return
    if file is None:
        _fail("FILE", "give a config file to check (or --diff OLD NEW)")
    try:
        config = load_config(file)
    except ConfigError as exc:
        _fail(exc.key, exc.message)
    click.echo("ok")
    click.echo(_summary(config))


def _diff(old_file: str, new_file: str) -> None:
    from broker.reload import diff

    configs = []
    for path in (old_file, new_file):
        try:
            configs.append(load_config(path))
        except ConfigError as exc:
            _fail(exc.key, f"{exc.message} (in {path})")
    changes = diff(*configs)
    if not changes:
        click.echo("no change")
        return
    for change in changes:
        click.echo(f"{change.key}: {change.old!r} -> {change.new!r}  "
                   f"[{'runtime' if change.runtime else 'deploy'}]")
    needs_deploy = [c.key for c in changes if not c.runtime]
    if needs_deploy:
        click.echo(f"needs a deploy (`broker deploy`): {', '.join(needs_deploy)}")
    else:
        click.echo("a reload applies it (`broker reload` or SIGHUP), no connection dropped")


# -- deploy / rollback / reload ---------------------------------------------------

def _operate(url: str, api_key: str | None, op: str, config_file: str | None) -> NoReturn:
    """POST /api/admin/<op>: print the progress lines, then the result as one
    JSON line; exit 0 on success, 2 when a config key is refused, else 1."""
    import urllib.error
    import urllib.request

    body = json.dumps({"config": os.path.abspath(config_file) if config_file else None}).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"apikey {api_key}"
    request = urllib.request.Request(url.rstrip("/") + f"/api/admin/{op}", data=body,
                                     method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=3600) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:
        raw = exc.read()
    except (OSError, ValueError) as exc:
        unreachable = {"ok": False, "operation": op, "error": f"cannot reach the broker at {url}: {exc}"}
        click.echo(json.dumps(unreachable))
        sys.exit(1)
    result: dict[str, Any] = {"ok": False, "operation": op, "error": "empty reply"}
    for line in raw.decode("utf-8", "replace").splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if isinstance(item, dict) and set(item) == {"progress"}:
            click.echo(item["progress"])
        elif isinstance(item, dict) and "ok" in item:
            result = item
        elif isinstance(item, dict) and "error" in item:  # a refusal before the operation (401, 403)
            result = {"ok": False, "operation": op, "error": item["error"]}
    click.echo(json.dumps(result))
    if result.get("ok"):
        sys.exit(0)
    if result.get("key"):
        click.echo(f"error: {result['key']}: {result.get('error')}", err=True)
        sys.exit(2)
    click.echo(f"error: {result.get('error')}", err=True)
    sys.exit(1)


@main.command()
@_url_option
@click.option("--config", "config_file", metavar="FILE",
              help="Config of the new generation [the file the broker loaded last].")
def deploy(url: str, api_key: str | None, config_file: str | None) -> None:
    """Blue-green deploy: a new generation from the code and config on disk."""
    _operate(url, api_key, "deploy", config_file)


@main.command()
@_url_option
def rollback(url: str, api_key: str | None) -> None:
    """Back to the previous generation's code and config."""
    _operate(url, api_key, "rollback", None)


@main.command()
@_url_option
@click.option("--config", "config_file", metavar="FILE",
              help="File to reload [the file the broker loaded last].")
def reload(url: str, api_key: str | None, config_file: str | None) -> None:
    """Apply changed runtime settings without dropping a connection."""
    _operate(url, api_key, "reload", config_file)



from broker.bench.cli import bench  # noqa: E402  (click only; the runner loads when it runs)
main.add_command(bench)
