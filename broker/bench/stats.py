"""Pure parts of the load runner: percentiles, offset tracking, the result
record, the table and the ratios. No I/O, no event loop; unit-tested in
tests/test_bench.py.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "RESULT_FIELDS",
    "RATIO_METRICS",
    "OffsetStream",
    "percentiles",
    "latency_summary",
    "empty_result",
    "finish_result",
    "ratios",
    "format_table",
    "format_ratios",
    "merge_counts",
]

# Every run record (one target x one workload) has exactly these keys, so the
# JSON's shape does not depend on the workload (a value that does not apply,
# e.g. latency in W3, is null).
RESULT_FIELDS: tuple[str, ...] = (
    "target",                      # "broker", "picows", "websockets"
    "workload",                    # "w1-1k", "w1-5k", "w2", "w3", "mixed"
    "connections_requested",
    "connections",                 # established (handshake done, subscribed when asked)
    "connect_failed",
    "connect_seconds",
    "connect_rate",                # connections / connect_seconds
    "publications_requested",
    "publications",                # acknowledged with 200
    "publications_failed",
    "publish_seconds",
    "publish_rate",                # achieved publications / s
    "deliveries_expected",
    "deliveries_received",
    "deliveries_lost",             # expected - received (never negative)
    "duplicates",
    "offset_gaps",                 # number of jumps in a channel's offsets
    "offsets_missing",             # offsets skipped by those jumps
    "disconnects",                 # connections closed by the server during the run
    "latency_samples",
    "latency_p50_ms",
    "latency_p90_ms",
    "latency_p99_ms",
    "latency_max_ms",
    "server_processes",
    "server_cpu_seconds",          # publish phase (+ drain), user+system over the process tree
    "server_cpu_seconds_connect",  # connect phase
    "redis_cpu_seconds",           # publish phase, the redis-server a broker-redis run started (else null)
    "rss_before_bytes",
    "rss_connected_bytes",
    "peak_rss_bytes",
    "rss_per_connection_bytes",
    "deliveries_per_cpu_second",
    "publications_per_cpu_second",  # publications / server_cpu_seconds (what a host takes per core)
    "connections_per_cpu_second",
    "loadgen_cpu_seconds",         # the runner's own workers (is the generator the bottleneck?)
    "elapsed_seconds",
    "errors",                      # list of strings
)

# metric -> True when higher is better (for the ratio's reading)
RATIO_METRICS: dict[str, bool] = {
    "deliveries_per_cpu_second": True,
    "publications_per_cpu_second": True,
    "connect_rate": True,
    "rss_per_connection_bytes": False,
    "latency_p99_ms": False,
}


class OffsetStream:
    """One channel as one connection sees it: offsets must go +1 each time.

    ``start`` is the offset of the ``subscribed`` reply; ``feed(offset)``
    classifies the next publication. The receivers inline the same rules on
    their hot path (``broker.bench.worker.Receiver``); this class is their
    reference and what the drain phase uses to count what is still missing.
    """

    __slots__ = ("start", "last", "received", "duplicates", "gaps", "missing")

    def __init__(self, start: int) -> None:
        self.start = start
        self.last = start
        self.received = 0
        self.duplicates = 0
        self.gaps = 0
        self.missing = 0

    def feed(self, offset: int) -> str:
        """'ok', 'dup' (offset <= last seen) or 'gap' (skipped some)."""
        last = self.last
        if offset == last + 1:
            self.last = offset
            self.received += 1
            return "ok"
        if offset <= last:
            self.duplicates += 1
            return "dup"
        self.gaps += 1
        self.missing += offset - last - 1
        self.last = offset
        self.received += 1
        return "gap"

    def expected(self, final: int) -> int:
        """Publications this connection should have got, given the channel's
        final offset as the publisher saw it."""
        return max(0, final - self.start)


def percentiles(values: Sequence[float] | Any, qs: Iterable[float]) -> list[float | None]:
    """Nearest-rank percentiles (q in 0..100) of ``values``; None when empty.

    Nearest rank (the smallest value with at least q% of samples <= it) is
    what latency reports usually mean by p99; it never interpolates between
    two samples. Accepts a list or a numpy array.
    """
    import numpy as np  # imported on first use: `broker --help` should not pay for it
    n = len(values)
    qs = list(qs)
    if n == 0:
        return [None for _ in qs]
    for q in qs:
        if not 0 <= q <= 100:
            raise ValueError(f"percentile {q} outside 0..100")
    ranks = [max(1, math.ceil(q / 100.0 * n)) for q in qs]
    part = np.partition(np.asarray(values), sorted({r - 1 for r in ranks}))
    return [float(part[r - 1]) for r in ranks]


def latency_summary(latencies_ns: Sequence[int] | Any) -> dict[str, float | int | None]:
    """p50/p90/p99/max in milliseconds of latencies given in nanoseconds."""
    p50, p90, p99, pmax = percentiles(latencies_ns, (50, 90, 99, 100))
    scale = 1e-6

    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * scale, 3)

    return {"latency_samples": len(latencies_ns), "latency_p50_ms": ms(p50),
            "latency_p90_ms": ms(p90), "latency_p99_ms": ms(p99), "latency_max_ms": ms(pmax)}


def merge_counts(parts: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """Sum dicts of counters (the workers' reports)."""
    total: dict[str, int] = {}
    for part in parts:
        for key, value in part.items():
            total[key] = total.get(key, 0) + value
    return total


def empty_result(target: str, workload: str) -> dict[str, Any]:
    result: dict[str, Any] = {name: None for name in RESULT_FIELDS}
    result.update(target=target, workload=workload, errors=[])
    return result


def _div(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return a / b


def finish_result(result: dict[str, Any]) -> dict[str, Any]:
    """Fill the derived fields from the measured ones (in place, returned)."""
    r = result
    r["connect_rate"] = _round(_div(r["connections"], r["connect_seconds"]), 1)
    r["publish_rate"] = _round(_div(r["publications"], r["publish_seconds"]), 1)
    if r["deliveries_expected"] is not None and r["deliveries_received"] is not None:
        r["deliveries_lost"] = max(0, r["deliveries_expected"] - r["deliveries_received"])
    if r["deliveries_received"]:
        r["deliveries_per_cpu_second"] = _round(_div(r["deliveries_received"], r["server_cpu_seconds"]), 0)
    if r["publications"]:
        r["publications_per_cpu_second"] = _round(_div(r["publications"], r["server_cpu_seconds"]), 0)
    if r["connections"]:
        r["connections_per_cpu_second"] = _round(_div(r["connections"], r["server_cpu_seconds_connect"]), 0)
        if r["rss_connected_bytes"] is not None and r["rss_before_bytes"] is not None:
            r["rss_per_connection_bytes"] = _round(
                (r["rss_connected_bytes"] - r["rss_before_bytes"]) / r["connections"], 0)
    missing = [name for name in RESULT_FIELDS if name not in r]
    if missing:
        raise KeyError(f"result lacks {missing}")
    return r


def _round(value: float | None, digits: int) -> float | None:
    if value is None:
        return None
    return round(value, digits) if digits else float(round(value))


def ratios(results: Sequence[Mapping[str, Any]], subject: str = "broker") -> list[dict[str, Any]]:
    """subject / baseline for every baseline and workload present.

    One row per (workload, baseline) with each metric of RATIO_METRICS
    (None when either side lacks it). > 1 is better for the first two,
    < 1 for RSS per connection and p99 latency.
    """
    by_key = {(r["workload"], r["target"]): r for r in results}
    rows = []
    for r in results:
        if r["target"] == subject:
            continue
        mine = by_key.get((r["workload"], subject))
        if mine is None:
            continue
        row: dict[str, Any] = {"workload": r["workload"], "baseline": r["target"]}
        for metric in RATIO_METRICS:
            ratio = _div(mine.get(metric), r.get(metric))
            row[metric] = None if ratio is None else round(ratio, 2)
        rows.append(row)
    return rows


# -- text output ---------------------------------------------------------------------

@dataclass(frozen=True)
class _Col:
    title: str
    key: str
    fmt: str = "{:,.0f}"


_TABLE = (
    _Col("workload", "workload", "{}"),
    _Col("target", "target", "{}"),
    _Col("conns", "connections"),
    _Col("conn/s", "connect_rate"),
    _Col("pubs", "publications"),
    _Col("pub/s", "publish_rate"),
    _Col("expected", "deliveries_expected"),
    _Col("received", "deliveries_received"),
    _Col("lost", "deliveries_lost"),
    _Col("gaps", "offset_gaps"),
    _Col("dups", "duplicates"),
    _Col("p50 ms", "latency_p50_ms", "{:.2f}"),
    _Col("p90 ms", "latency_p90_ms", "{:.2f}"),
    _Col("p99 ms", "latency_p99_ms", "{:.2f}"),
    _Col("max ms", "latency_max_ms", "{:.1f}"),
    _Col("cpu s", "server_cpu_seconds", "{:.2f}"),
    _Col("deliv/cpu-s", "deliveries_per_cpu_second"),
    _Col("peak MB", "peak_rss_bytes", "mb"),
    _Col("KB/conn", "rss_per_connection_bytes", "kb"),
    _Col("gen cpu s", "loadgen_cpu_seconds", "{:.1f}"),
)


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    if fmt == "mb":
        return f"{value / 1048576:.1f}"
    if fmt == "kb":
        return f"{value / 1024:.1f}"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def _render(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
    lines = []
    for n, row in enumerate((header, *rows)):
        cells = [str(c).ljust(w) if i < 2 else str(c).rjust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_table(results: Sequence[Mapping[str, Any]]) -> str:
    """One row per run, the columns a reader compares first."""
    header = [c.title for c in _TABLE]
    rows = [[_cell(r.get(c.key), c.fmt) for c in _TABLE] for r in results]
    return _render(header, rows)


def format_ratios(rows: Sequence[Mapping[str, Any]], subject: str = "broker") -> str:
    """The ratio table (subject / baseline)."""
    titles = {"deliveries_per_cpu_second": "deliv/cpu-s (>1 better)",
              "publications_per_cpu_second": "pubs/cpu-s (>1 better)",
              "connect_rate": "connect rate (>1 better)",
              "rss_per_connection_bytes": "RSS/conn (<1 better)",
              "latency_p99_ms": "p99 latency (<1 better)"}
    header = ["workload", f"{subject} / baseline", *(titles[m] for m in RATIO_METRICS)]
    body = [[r["workload"], r["baseline"], *(_cell(r.get(m), "{:.2f}") for m in RATIO_METRICS)] for r in rows]
    return _render(header, body)
