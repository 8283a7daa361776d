"""The Prometheus exposition of shard stats, parsed back with prometheus_client."""
from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from broker.metrics import PowerHistogram, render


def _families(text: bytes) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    return {family.name: [(s.name, s.labels, s.value) for s in family.samples]
            for family in text_string_to_metric_families(text.decode())}


def test_power_histogram_buckets_by_bit_length():
    histogram = PowerHistogram(size=5, unit=1.0)
    for value in (0, 1, 2, 3, 4, 7, 100):
        histogram.observe(value)
    # bit_length: 0 -> 0, 1 -> 1, 2 and 3 -> 2, 4 and 7 -> 3, 100 -> 7 (past the end: the last bucket)
    assert histogram.counts == [1, 1, 2, 2, 1]
    assert histogram.total == 117
    snapshot = histogram.snapshot()
    # Cumulative, upper bound 2**i - 1 units; the last bucket is only in the count (+Inf).
    assert snapshot == {"buckets": [[0.0, 1], [1.0, 2], [3.0, 4], [7.0, 6]], "count": 7, "sum": 117}


def test_power_histogram_unit_scales_bounds():
    histogram = PowerHistogram(size=3, unit=1e-3)
    histogram.observe(0.0025)  # 2 units of 1 ms -> bucket 2
    assert histogram.counts == [0, 0, 1]
    assert PowerHistogram.from_counts([1, 2, 3], 4.5, unit=0.5) == {
        "buckets": [[0.0, 1], [0.5, 3]], "count": 6, "sum": 4.5}


def test_render_labels_every_shard_and_skips_what_a_shard_lacks():
    shards = [
        {"id": 0, "up": 1, "connections": 3, "published": 7, "engine": {"repairs": 2},
         "batch_lines": {"buckets": [[0.0, 0], [1.0, 4], [3.0, 5]], "count": 6, "sum": 9.0}},
        {"id": 1, "up": 0},  # a shard that is down reports nothing else
    ]
    body, content_type = render(shards)
    assert content_type.startswith("text/plain")
    families = _families(body)
    assert families["broker_shard_up"] == [("broker_shard_up", {"shard": "0"}, 1.0),
                                           ("broker_shard_up", {"shard": "1"}, 0.0)]
    assert families["broker_connections"] == [("broker_connections", {"shard": "0"}, 3.0)]
    assert ("broker_publications_total", {"shard": "0"}, 7.0) in families["broker_publications"]
    assert ("broker_stream_repairs_total", {"shard": "0"}, 2.0) in families["broker_stream_repairs"]
    assert families["broker_zmq_hwm_drops"] == []  # nobody reported it: declared, no sample
    histogram = {(name, labels.get("le")): value for name, labels, value in families["broker_batch_lines"]}
    assert histogram[("broker_batch_lines_bucket", "1.0")] == 4
    assert histogram[("broker_batch_lines_bucket", "3.0")] == 5
    assert histogram[("broker_batch_lines_bucket", "+Inf")] == 6
    assert histogram[("broker_batch_lines_count", None)] == 6 and histogram[("broker_batch_lines_sum", None)] == 9
