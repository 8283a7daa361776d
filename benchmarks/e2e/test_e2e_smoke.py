"""End-to-end smoke of ``broker bench`` (runs in CI, well under 20 s).

A tiny W1 (50 connections on bill:1, 20 publications) against a spawned
broker and both baselines, through the same code path as
``broker bench --compare --spawn --json``: zero losses, zero gaps, every
field in the JSON, ratios present. The full-size workloads are run by hand
(see benchmarks/README.md).
"""
from __future__ import annotations

import io
import json

import pytest

from broker.bench.report import run_bench
from broker.bench.stats import RATIO_METRICS, RESULT_FIELDS

pytestmark = pytest.mark.timeout(60)

CONNECTIONS = 50
PUBLICATIONS = 20


def test_tiny_w1_compare(tmp_path):
    out = io.StringIO()
    path = tmp_path / "bench.json"
    code = run_bench(workloads=["w1-1k"], targets=["broker", "picows", "websockets"],
                     connections=CONNECTIONS, rate=20, duration=PUBLICATIONS / 20, workers=1,
                     spawn=True, json_path=str(path), drain_timeout=5, progress=None,
                     log_dir=str(tmp_path / "logs"), out=out)
    doc = json.loads(path.read_text())
    assert code == 0, out.getvalue()
    assert doc["fields"] == list(RESULT_FIELDS)
    assert [r["target"] for r in doc["results"]] == ["broker", "picows", "websockets"]
    for r in doc["results"]:
        assert set(r) == set(RESULT_FIELDS), r["target"]
        assert r["errors"] == [], (r["target"], r["errors"])
        assert r["connections"] == CONNECTIONS
        assert r["publications"] == PUBLICATIONS
        assert r["deliveries_expected"] == CONNECTIONS * PUBLICATIONS
        assert r["deliveries_received"] == CONNECTIONS * PUBLICATIONS
        assert r["deliveries_lost"] == 0
        assert r["offset_gaps"] == 0 and r["offsets_missing"] == 0 and r["duplicates"] == 0
        assert r["disconnects"] == 0
        assert r["latency_samples"] == CONNECTIONS * PUBLICATIONS
        assert 0 < r["latency_p50_ms"] <= r["latency_p90_ms"] <= r["latency_p99_ms"] <= r["latency_max_ms"]
        assert r["server_cpu_seconds"] > 0 and r["deliveries_per_cpu_second"] > 0
        assert r["peak_rss_bytes"] > 0 and r["rss_per_connection_bytes"] is not None
        assert r["connect_rate"] > 0
    assert {row["baseline"] for row in doc["ratios"]} == {"picows", "websockets"}
    for row in doc["ratios"]:
        assert set(RATIO_METRICS) <= set(row)
        assert row["deliveries_per_cpu_second"] > 0
    text = out.getvalue()
    assert "deliv/cpu-s" in text and "ratios broker / baseline" in text
