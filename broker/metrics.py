"""Prometheus exposition of shard stats, through prometheus_client.

The hot path keeps plain integer counters on the shard; this collector reads
them only when /metrics is scraped, so counting costs nothing per message.
"""
from __future__ import annotations

from typing import Any, Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["render"]

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
    ("up", "broker_shard_up", "gauge", "1 when the shard is serving."),
)


class _ShardCollector:
    def __init__(self, shards: list[dict[str, Any]]) -> None:
        self._shards = shards

    def collect(self) -> Iterable[Metric]:
        for key, name, kind, help_text in _SERIES:
            family_type = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            family = family_type(name, help_text, labels=["shard"])
            for shard in self._shards:
                if key in shard:
                    family.add_metric([str(shard["id"])], float(shard[key]))
            yield family


def render(shards: list[dict[str, Any]]) -> tuple[bytes, str]:
    """The text exposition of every shard's stats, labelled by shard id."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_ShardCollector(shards))  # type: ignore[arg-type]
    return generate_latest(registry), CONTENT_TYPE_LATEST
