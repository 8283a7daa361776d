"""Prometheus exposition of shard stats, through prometheus_client.

The hot path keeps plain integer counters on the shard; this collector reads
them only when /metrics is scraped, so counting costs nothing per message.
"""
from __future__ import annotations

from typing import Any
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
                                    Metric)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["render", "PowerHistogram"]


class PowerHistogram:
    """A histogram with power-of-two buckets, cheap enough for the hot path:
    ``observe`` is one ``bit_length`` and one list add. Bucket ``i`` holds
    values ``v`` (in ``unit``s, rounded down) with ``v.bit_length() == i``,
    so its upper bound is ``2**i - 1`` units."""

    __slots__ = ("counts", "total", "unit")

    def __init__(self, size: int = 21, unit: float = 1.0) -> None:
        self.counts = [0] * size
        self.total = 0.0
        self.unit = unit

    def observe(self, value: float) -> None:
        self.total += value
        index = int(value / self.unit).bit_length()
        counts = self.counts
        counts[index if index < len(counts) else -1] += 1

    @classmethod
    def from_counts(cls, counts: list[int], total: float, unit: float = 1.0) -> dict[str, Any]:
        """The snapshot of bucket counts kept elsewhere (the outbound table's)."""
        histogram = cls(len(counts), unit)
        histogram.counts = list(counts)
        histogram.total = total
        return histogram.snapshot()

    def snapshot(self) -> dict[str, Any]:
        """Cumulative buckets as Prometheus wants them: [(upper bound, count), ...]."""
        cumulative, buckets = 0, []
        for index, count in enumerate(self.counts[:-1]):
            cumulative += count
            buckets.append([((1 << index) - 1) * self.unit if index else 0.0, cumulative])
        return {"buckets": buckets, "count": cumulative + self.counts[-1], "sum": self.total}

# (stats key, metric name, kind, help)
_SERIES = (
    ("connections", "broker_connections", "gauge", "Open WebSocket connections."),
    ("subscriptions", "broker_subscriptions", "gauge", "Channel subscriptions held."),
    ("channels", "broker_channels", "gauge", "Channels with at least one local subscriber."),
    ("published", "broker_publications", "counter", "Publications accepted."),
    ("delivered", "broker_deliveries", "counter", "Publications queued to subscribers."),
    ("bytes_out", "broker_bytes_out", "counter", "WebSocket bytes written."),
    ("frames_out", "broker_frames_out", "counter", "WebSocket data frames written."),
    ("slow_consumers", "broker_slow_consumer_drops", "counter",
     "Connections closed with 1013 because their buffer was full."),
    ("bad_commands", "broker_bad_commands", "counter", "Client commands refused with 400."),
    ("rss_bytes", "broker_rss_bytes", "gauge", "Resident memory of the shard process."),
    ("degradation", "broker_degradation_level", "gauge", "Memory degradation level (0 = normal)."),
    ("memory_cuts", "broker_memory_cuts", "counter",
     "Connections closed with 1013 at degradation level 2 (most pending bytes first)."),
    ("upgrades_refused_memory", "broker_upgrades_refused_memory", "counter",
     "WebSocket upgrades answered 503 at degradation level 3."),
    ("upgrades_refused_per_ip", "broker_upgrades_refused_per_ip", "counter",
     "WebSocket upgrades answered 429 over limits.connections_per_ip."),
    ("upgrades_refused_fds", "broker_upgrades_refused_fds", "counter",
     "WebSocket upgrades answered 503 to keep file descriptors for HTTP (EMFILE avoided)."),
    ("up", "broker_shard_up", "gauge", "1 when the shard is serving."),
    ("engine.history_bytes", "broker_history_bytes", "gauge", "Bytes of retained history homed here."),
    ("engine.zmq_hwm_drops", "broker_zmq_hwm_drops", "counter",
     "ZeroMQ messages dropped at a high-water mark (receivers repair from history)."),
    ("engine.repairs", "broker_stream_repairs", "counter",
     "Gaps in a channel's stream filled from the home shard's history."),
    ("engine.lost_streams", "broker_lost_streams", "counter",
     "Channel streams that could not continue (subscribers told to recover)."),
    ("engine.redis_up", "broker_redis_up", "gauge", "1 when Redis answers (Redis engine)."),
    ("engine.redis_outages", "broker_redis_outages", "counter", "Times Redis stopped answering."),
    ("engine.redis_reconnects", "broker_redis_pubsub_reconnects", "counter",
     "Reconnects of the shard's Redis pub/sub connections."),
    ("engine.redis_errors", "broker_redis_errors", "counter", "Redis calls that failed (each a 503)."),
    ("engine.redis_calls", "broker_redis_calls", "counter", "Script calls sent to Redis."),
    ("engine.redis_batches", "broker_redis_batches", "counter",
     "Pipelined round trips to Redis (calls / batches = the batching factor)."),
    ("engine.redis_compressed", "broker_redis_compressed", "counter",
     "Payloads sent through Redis compressed."),
    ("gc_full_collections", "broker_gc_full_collections", "counter",
     "Full (generation 2) garbage collections of the shard process."),
)

_HISTOGRAMS = (
    ("batch_lines", "broker_batch_lines", "Lines (messages) per WebSocket frame written."),
    ("flush_latency", "broker_publish_to_flush_seconds",
     "Age of the oldest queued publication at each flush pass."),
    ("gc_pauses", "broker_gc_pause_seconds",
     "Pause of each garbage collection of the shard process (start-up objects are frozen)."),
)


def _lookup(stats: dict[str, Any], path: str) -> Any:
    value: Any = stats
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


class _ShardCollector:
    def __init__(self, shards: list[dict[str, Any]]) -> None:
        self._shards = shards

    def collect(self) -> Iterable[Metric]:
        for key, name, kind, help_text in _SERIES:
            family_type = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            family = family_type(name, help_text, labels=["shard"])
            for shard in self._shards:
                value = _lookup(shard, key)
                if value is not None:
                    family.add_metric([str(shard["id"])], float(value))
            yield family
        for key, name, help_text in _HISTOGRAMS:
            histogram = HistogramMetricFamily(name, help_text, labels=["shard"])
            for shard in self._shards:
                snapshot = shard.get(key)
                if snapshot:
                    buckets = [(repr(float(le)), count) for le, count in snapshot["buckets"]]
                    buckets.append(("+Inf", snapshot["count"]))
                    histogram.add_metric([str(shard["id"])], buckets, snapshot["sum"])
            yield histogram


def render(shards: list[dict[str, Any]]) -> tuple[bytes, str]:
    """The text exposition of every shard's stats, labelled by shard id."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_ShardCollector(shards))
    return generate_latest(registry), CONTENT_TYPE_LATEST
