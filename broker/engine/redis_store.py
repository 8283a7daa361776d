"""Redis as the sequencer and history store of every channel (many hosts).

One Lua script per publication (the model is Centrifugo's Redis engine):
the next offset from the channel's meta hash, the append to a capped history
stream (the namespace's size, and its TTL on the key), and the sharded
publish (SPUBLISH) to every host that follows the channel, all atomic, so
offsets are gapless and identical on every host. The meta hash also holds
the channel's epoch: a Redis that lost its data has no meta, and the first
script that needs it creates a new epoch, so old offsets never mean new
publications.

All keys of a channel share one hash tag (``{channel}``), so one channel
lives in one slot of a Redis Cluster, together with its pub/sub channel.

Script calls issued in the same loop turn go to Redis as one pipelined
write on a dedicated connection per node (``Pipe``): publications that
arrive together cost one round trip, not one each, and their replies are
matched as they are parsed.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import zlib
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from ..config import Config
from ..errors import EngineUnavailable
from .base import Position
from .redis_pipe import Pipe

__all__ = ["RedisStore", "Keys", "Codec", "is_cluster_url", "pack_command", "PUBLISH_LUA", "READ_LUA"]

log = logging.getLogger("broker.engine.redis")


def _pack_command(args: tuple[Any, ...]) -> bytes:
    """One command in RESP (what hiredis.pack_command does, in Python)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


# hiredis's stub types its argument as a one-item tuple; it packs any tuple.
pack_command: Callable[[tuple[Any, ...]], bytes]
try:
    from hiredis import pack_command as _hiredis_pack_command
    pack_command = _hiredis_pack_command
except ImportError:  # pragma: no cover - hiredis is the [redis] extra
    pack_command = _pack_command

# KEYS: meta hash, history stream. ARGV: pub/sub channel, payload (codec
# flag + data), history size, history TTL in ms (0: none), epoch to use if
# the channel has none, meta TTL in s (0: none).
PUBLISH_LUA = """
local epoch = redis.call('hget', KEYS[1], 'e')
if not epoch then
  epoch = ARGV[5]
  redis.call('hset', KEYS[1], 'e', epoch)
  redis.call('del', KEYS[2])
end
local offset = redis.call('hincrby', KEYS[1], 'o', 1)
if tonumber(ARGV[6]) > 0 then redis.call('expire', KEYS[1], ARGV[6]) end
local t = redis.call('time')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('xadd', KEYS[2], 'MAXLEN', ARGV[3], '0-' .. offset, 'd', ARGV[2], 't', now)
if tonumber(ARGV[4]) > 0 then redis.call('pexpire', KEYS[2], ARGV[4]) end
redis.call('spublish', ARGV[1], epoch .. ':' .. offset .. ':' .. ARGV[2])
return {offset, epoch}
"""

# KEYS: meta hash, history stream. ARGV: since, limit, epoch to use if the
# channel has none, meta TTL in s. Returns epoch, last offset, Redis time in
# ms (to judge the entries' age on one clock), and up to ``limit`` history
# entries after ``since``.
READ_LUA = """
local meta = redis.call('hmget', KEYS[1], 'e', 'o')
local epoch, offset = meta[1], tonumber(meta[2] or '0')
if not epoch then
  epoch = ARGV[3]
  offset = 0
  redis.call('hset', KEYS[1], 'e', epoch, 'o', 0)
  redis.call('del', KEYS[2])
end
if tonumber(ARGV[4]) > 0 then redis.call('expire', KEYS[1], ARGV[4]) end
local t = redis.call('time')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local entries = {}
local since = tonumber(ARGV[1])
if tonumber(ARGV[2]) > 0 and since < offset then
  entries = redis.call('xrange', KEYS[2], '(0-' .. since, '+', 'COUNT', ARGV[2])
end
return {epoch, offset, now, entries}
"""


# KEYS: presence hash. ARGV: field (one shard), value ('' = remove it), TTL
# in ms. Each field carries its own expiry (Redis time + TTL) before a ':',
# so a host that died stops counting once its entries expire, and the hash
# itself expires when nobody refreshes it.
PRESENCE_SET_LUA = """
if ARGV[2] == '' then
  redis.call('hdel', KEYS[1], ARGV[1])
  return 0
end
local t = redis.call('time')
local expires = t[1] * 1000 + math.floor(t[2] / 1000) + tonumber(ARGV[3])
redis.call('hset', KEYS[1], ARGV[1], expires .. ':' .. ARGV[2])
redis.call('pexpire', KEYS[1], ARGV[3])
return 1
"""

# KEYS: presence hash. Returns Redis time in ms and the hash's fields/values;
# expired fields are removed on the way.
PRESENCE_READ_LUA = """
local t = redis.call('time')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local all = redis.call('hgetall', KEYS[1])
local live = {}
for i = 1, #all, 2 do
  local expires = tonumber(string.match(all[i + 1], '^(%d+):'))
  if expires and expires > now then
    live[#live + 1] = all[i]
    live[#live + 1] = all[i + 1]
  else
    redis.call('hdel', KEYS[1], all[i])
  end
end
return live
"""


def is_cluster_url(url: str) -> bool:
    return urlsplit(url).scheme.endswith("+cluster")


def plain_url(url: str) -> str:
    """``redis+cluster://h:p`` → ``redis://h:p`` (what redis-py reads)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(scheme=parts.scheme.replace("+cluster", "")))


class Keys:
    """Names in Redis. The ``{channel}`` hash tag keeps a channel's keys and
    its pub/sub channel in one cluster slot."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._head = len(prefix) + 2  # "<prefix>:{"

    def meta(self, channel: str) -> str:
        return f"{self.prefix}:{{{channel}}}:m"

    def history(self, channel: str) -> str:
        return f"{self.prefix}:{{{channel}}}:h"

    def presence(self, channel: str) -> str:
        return f"{self.prefix}:{{{channel}}}:p"

    def topic(self, channel: str) -> bytes:
        return f"{self.prefix}:{{{channel}}}".encode()

    def channel_of(self, topic: bytes) -> str:
        return topic[self._head:-1].decode()


class Codec:
    """How a payload travels through Redis: a flag byte, then the JSON as
    is (``j``) or zlib-compressed (``z``) when it is at least ``threshold``
    bytes and compression makes it smaller. Clients never see the difference."""

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self.compressed = 0

    def encode(self, data: bytes) -> bytes:
        if self.threshold and len(data) >= self.threshold:
            packed = zlib.compress(data, 1)
            if len(packed) < len(data):
                self.compressed += 1
                return b"z" + packed
        return b"j" + data

    @staticmethod
    def decode(payload: bytes) -> bytes:
        if payload[:1] == b"z":
            return zlib.decompress(payload[1:])
        return payload[1:]


@dataclass(frozen=True, slots=True)
class _Script:
    text: str
    sha: str
    keys: int  # how many of its arguments are keys (the first one routes it in a cluster)


def _script(text: str, keys: int) -> _Script:
    import hashlib

    return _Script(text, hashlib.sha1(text.encode()).hexdigest(), keys)


#: one queued script call: the script, its arguments (keys first), its caller's future
_Call = tuple[_Script, list[Any], "asyncio.Future[Any]"]

_PUBLISH = _script(PUBLISH_LUA, 2)
_READ = _script(READ_LUA, 2)
_PRESENCE_SET = _script(PRESENCE_SET_LUA, 1)
_PRESENCE_READ = _script(PRESENCE_READ_LUA, 1)
_SCRIPTS = (_PUBLISH, _READ, _PRESENCE_SET, _PRESENCE_READ)


def connect(url: str, timeout: float) -> Redis | RedisCluster:
    """A command client with no retries of its own: a publication that
    failed is a 503 to its publisher, never sent twice behind its back."""
    if is_cluster_url(url):
        return RedisCluster.from_url(plain_url(url), **_options(timeout))
    return Redis.from_url(url, **_options(timeout))


def _options(timeout: float) -> dict[str, Any]:
    # RESP2: pub/sub messages are plain replies on the link's own connection
    # (RESP3 would make them push messages, handled behind our back).
    return dict(socket_timeout=timeout, socket_connect_timeout=timeout,
                retry=Retry(NoBackoff(), 0), protocol=2)


def node_url(url: str, host: str, port: int) -> str:
    """The seed URL (credentials, TLS) pointed at another node of its cluster."""
    parts = urlsplit(plain_url(url))
    credentials = parts.netloc.rpartition("@")[0]
    netloc = f"{credentials}@{host}:{port}" if credentials else f"{host}:{port}"
    return urlunsplit(parts._replace(netloc=netloc, path=""))


class RedisStore:
    """Script calls (batched per loop turn) and the health of the connection."""

    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop,
                 client: Redis | RedisCluster | None = None) -> None:
        assert config.redis_url is not None
        self.config = config
        self.settings = config.redis
        self.loop = loop
        self.client = client or connect(config.redis_url, self.settings.timeout)
        self.cluster = isinstance(self.client, RedisCluster)
        self.keys = Keys(self.settings.prefix)
        self.codec = Codec(self.settings.compress_threshold)
        self.healthy = False
        self.on_recovered: Callable[[], None] = lambda: None
        self._queue: list[_Call] = []
        self._pipes: dict[str, Pipe] = {}  # pipelined script calls, per node ("": the single Redis)
        self._flush_scheduled = False
        # Epoch candidates: random per process, then a counter per batch (unique
        # without a random draw per loop turn).
        self._epoch_base = secrets.token_hex(6)
        self._epoch_serial = 0
        self._epoch = self._epoch_base + "0"  # epoch candidate of the batch being gathered
        self._tasks: set[asyncio.Task[Any]] = set()
        self._watcher: asyncio.Task[None] | None = None
        self._nodes: dict[str, Redis] = {}  # cluster: a plain client per primary, for pipelines
        self._refresh_slots = False         # cluster: a MOVED/ASK reply was seen
        # counters since start
        self.calls = 0
        self.batches = 0
        self.errors = 0
        self.outages = 0

    # ------------------------------------------------------------ scripts
    async def publish(self, channel: str, data: bytes) -> Position:
        """Sequence, store and publish one publication: its position once stored."""
        ns = self.config.namespace_for(channel)
        size, ttl = (ns.history_size, ns.history_ttl) if ns else (1, 0.0)
        offset, epoch = await self._call(_PUBLISH, [
            self.keys.meta(channel), self.keys.history(channel), self.keys.topic(channel),
            self.codec.encode(data), size, int(ttl * 1000), self._epoch,
            int(self.settings.meta_ttl)])
        return Position(epoch.decode(), int(offset))

    async def read(self, channel: str, since: int, limit: int) -> tuple[Position, list[tuple[int, bytes]]]:
        """The channel's position and its retained publications after ``since``."""
        epoch, offset, now, entries = await self._call(
            _READ, [self.keys.meta(channel), self.keys.history(channel), max(0, since),
                    max(0, limit), self._epoch, int(self.settings.meta_ttl)])
        position = Position(epoch.decode(), int(offset))
        if not entries:
            return position, []
        ns = self.config.namespace_for(channel)
        oldest = int(now) - int(ns.history_ttl * 1000) if ns and ns.history_ttl > 0 else None
        decode = self.codec.decode
        publications = []
        for entry_id, fields in entries:
            record = dict(zip(fields[::2], fields[1::2], strict=True))
            if oldest is not None and int(record[b"t"]) < oldest:
                continue  # aged out (the key's TTL only ends a whole idle history)
            publications.append((int(entry_id[2:]), decode(record[b"d"])))
        return position, publications

    def presence_set(self, channel: str, field: str, value: bytes, ttl: float) -> asyncio.Future[Any]:
        """Store (or with an empty ``value``, remove) one shard's presence entry."""
        return self._call(_PRESENCE_SET, [self.keys.presence(channel), field, value, int(ttl * 1000)])

    async def presence_read(self, channel: str) -> dict[bytes, bytes]:
        """Every live presence entry of the channel: field → value (expiry stripped)."""
        flat = await self._call(_PRESENCE_READ, [self.keys.presence(channel)])
        return {flat[i]: flat[i + 1].partition(b":")[2] for i in range(0, len(flat), 2)}

    def _call(self, script: _Script, args: list[Any]) -> asyncio.Future[Any]:
        """Queue one script call for this loop turn's pipeline."""
        future: asyncio.Future[Any] = self.loop.create_future()
        if not self.healthy:
            future.set_exception(EngineUnavailable("Redis is unreachable"))
            return future
        self._queue.append((script, args, future))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._flush_scheduled = False
        # A fresh epoch candidate per batch: used only by channels the batch
        # creates, so no channel ever gets an epoch it had before.
        self._epoch_serial += 1
        self._epoch = f"{self._epoch_base}{self._epoch_serial:x}"
        batch, self._queue = self._queue, []
        if batch:
            self._send(batch)

    def _send(self, batch: list[_Call], reloaded: bool = False) -> None:
        """Write the batch now, one packed write per node; each call's
        future is answered from the reply parser (``_answer``)."""
        self.batches += 1
        self.calls += len(batch)
        try:
            groups = self._route(batch)
        except Exception as exc:  # cluster slots unknown: every caller gets its answer
            self._fail(batch, exc)
            return
        for name, calls in groups.items():
            payload = b"".join([pack_command(("EVALSHA", script.sha, script.keys, *args))
                                for script, args, _ in calls])
            done = self._pipe(name).request(payload, len(calls))
            done.add_done_callback(functools.partial(self._answer, calls, reloaded=reloaded))

    def _route(self, batch: list[_Call]) -> dict[str, list[_Call]]:
        if not self.cluster:
            return {"": batch}
        # Redis Cluster: one pipeline per primary, for the calls whose channel
        # lives there (each call's first key routes it).
        cluster: Any = self.client
        groups: dict[str, list[_Call]] = {}
        for call in batch:
            groups.setdefault(cluster.get_node_from_key(call[1][0]).name, []).append(call)
        return groups

    def _pipe(self, name: str) -> Pipe:
        """The open pipeline connection to a node (``""``: the single Redis), or a new one."""
        pipe = self._pipes.get(name)
        if pipe is None or pipe.closed:
            client: Any = self._node(name) if name else self.client
            pool = client.connection_pool
            kwargs = pool.connection_kwargs
            pipe = self._pipes[name] = Pipe(self.loop, lambda: pool.connection_class(**kwargs),
                                            self.settings.timeout, name or "redis")
        return pipe

    def _answer(self, calls: list[_Call], done: asyncio.Future[list[Any]], *, reloaded: bool) -> None:
        exc = done.exception()
        if exc is not None:
            self._fail(calls, exc)
            return
        again = []
        for (script, args, future), reply in zip(calls, done.result(), strict=True):
            if future.done():
                continue
            if isinstance(reply, ResponseError):
                message = str(reply)
                if message.startswith("NOSCRIPT") and not reloaded:
                    again.append((script, args, future))  # not run: safe to send again
                    continue
                if message.startswith(("MOVED", "ASK")):
                    self._refresh_slots = True  # resharding: learn the new owners
                self.errors += 1
                future.set_exception(EngineUnavailable(f"Redis: {message}"))
            else:
                future.set_result(reply)
        if again:
            self._spawn(self._reload_and_send(again))

    def _fail(self, calls: list[_Call], exc: BaseException) -> None:
        reason = str(exc) or type(exc).__name__
        self.errors += 1
        self._down(f"a call failed: {reason}")
        for _, _, future in calls:
            if not future.done():
                future.set_exception(EngineUnavailable(f"Redis: {reason}"))

    async def _reload_and_send(self, calls: list[_Call]) -> None:
        """Redis lost its scripts (a restart): load them, then send the calls again, once."""
        try:
            await asyncio.wait_for(self._load_scripts(), self.settings.timeout)
        except Exception as exc:
            for _, _, future in calls:
                if not future.done():
                    future.set_exception(EngineUnavailable(f"Redis: cannot load scripts: {exc}"))
            return
        self._send(calls, reloaded=True)

    def _spawn(self, coroutine: Any) -> None:
        task = self.loop.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _node(self, name: str) -> Redis:
        client = self._nodes.get(name)
        if client is None:
            host, _, port = name.rpartition(":")
            assert self.config.redis_url is not None
            client = self._nodes[name] = Redis.from_url(
                node_url(self.config.redis_url, host, int(port)), **_options(self.settings.timeout))
        return client

    # ------------------------------------------------------------- health
    def start(self) -> None:
        self._watcher = self.loop.create_task(self._watch())

    async def _watch(self) -> None:
        """PING every ``health_interval``: readiness, and the moment Redis
        comes back (then the engine resyncs its streams)."""
        while True:
            try:
                await asyncio.wait_for(self._check(), self.settings.timeout)
            except Exception as exc:  # any failure means: not ready
                self._down(f"health check failed: {exc or type(exc).__name__}")
            else:
                if not self.healthy:
                    self.healthy = True
                    log.info("Redis reachable at %s", self.config.redis_url)
                    self.on_recovered()
            await asyncio.sleep(self.settings.health_interval)

    async def _check(self) -> None:
        client: Any = self.client
        if self.cluster:
            if self._refresh_slots:
                self._refresh_slots = False
                await client.nodes_manager.initialize()
            await client.initialize()  # learns the slots; again after a failure
            await client.ping(target_nodes=RedisCluster.PRIMARIES)
        else:
            await client.ping()
        if not self.healthy:
            await self._load_scripts()

    async def _load_scripts(self) -> None:
        """Scripts live in Redis's memory only: load them after every outage
        (a restarted Redis answers NOSCRIPT until then; on a cluster, every primary)."""
        clients: list[Any] = [self.client]
        if self.cluster:
            cluster: Any = self.client
            clients = [self._node(node.name) for node in cluster.get_primaries()]
        for client in clients:
            for script in _SCRIPTS:
                await client.script_load(script.text)

    def _down(self, reason: str) -> None:
        if self.healthy:
            self.healthy = False
            self.outages += 1
            log.warning("Redis unreachable (%s): publishing and subscribing answer 503", reason)

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        for task in list(self._tasks):
            task.cancel()
        for pipe in self._pipes.values():
            pipe.close()
        for client in [self.client, *self._nodes.values()]:
            try:
                await client.aclose()
            except (RedisError, OSError):
                pass

    def stats(self) -> dict[str, int]:
        return {"redis_calls": self.calls, "redis_batches": self.batches,
                "redis_errors": self.errors, "redis_outages": self.outages,
                "redis_compressed": self.codec.compressed, "redis_up": int(self.healthy)}
