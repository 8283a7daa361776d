"""Unit tests of the load runner's pure parts (broker.bench): percentiles,
offset/gap counting, the receivers' per-frame accounting, result records,
tables, ratios, workload overrides and the CLI's surface."""
from __future__ import annotations

import io
import json
from array import array

import pytest
from click.testing import CliRunner

from broker.bench import stats
from broker.bench.cli import bench
from broker.bench.runner import WORKLOADS, workload
from broker.bench.worker import (FANOUT_CHANNEL, Receiver, SocketIOReceiver, channel_of, publication_body,
                                 publication_data)

# -- percentiles -------------------------------------------------------------------------


def test_percentiles_nearest_rank():
    values = list(range(1, 101))           # 1..100
    assert stats.percentiles(values, [50, 90, 99, 100]) == [50, 90, 99, 100]
    assert stats.percentiles(values, [0]) == [1]


def test_percentiles_small_and_unsorted():
    assert stats.percentiles([5, 1, 3], [50]) == [3]
    assert stats.percentiles([5, 1, 3], [99, 100]) == [5, 5]
    assert stats.percentiles([7], [50, 99]) == [7, 7]


def test_percentiles_empty_and_bad_q():
    assert stats.percentiles([], [50, 99]) == [None, None]
    with pytest.raises(ValueError):
        stats.percentiles([1, 2], [101])


def test_percentiles_accepts_numpy():
    import numpy as np  # a dependency: never skipped
    arr = np.arange(1000, 0, -1, dtype=np.int64)
    assert stats.percentiles(arr, [50, 99]) == [500, 990]


def test_latency_summary_in_ms():
    summary = stats.latency_summary([1_000_000, 2_000_000, 3_000_000, 10_000_000])  # ns
    assert summary == {"latency_samples": 4, "latency_p50_ms": 2.0, "latency_p90_ms": 10.0,
                       "latency_p99_ms": 10.0, "latency_max_ms": 10.0}
    assert stats.latency_summary([])["latency_p99_ms"] is None


# -- offsets -----------------------------------------------------------------------------


def test_offset_stream_counts_gaps_dups_and_expected():
    s = stats.OffsetStream(start=10)
    assert [s.feed(o) for o in (11, 12, 12, 15, 16, 14)] == ["ok", "ok", "dup", "gap", "ok", "dup"]
    assert (s.received, s.duplicates, s.gaps, s.missing, s.last) == (4, 2, 1, 2, 16)
    assert s.expected(16) == 6
    assert s.expected(5) == 0


def _pub(channel: str, offset: int, ts: int, seq: int = 0) -> bytes:
    # the broker's own line shape (broker.adapters.native.protocol.pub_line), without the trailing newline
    return b'{"op":"pub","channel":"%s","offset":%d,"data":{"ts":%d,"seq":%d,"pad":"x"}}' % (
        channel.encode(), offset, ts, seq)


def _subscribed(receiver: Receiver, offset: int) -> None:
    receiver.feed(b'{"id":1,"op":"subscribed","channel":"%s","epoch":"e","offset":%d}'
                  % (receiver.channel.encode(), offset), 0)


def test_receiver_fast_path_batch_frame():
    lat = array("q")
    r = Receiver("bill:1", lat)
    _subscribed(r, 17)
    frame = b"\n".join([_pub("bill:1", 18, 1000), _pub("bill:1", 19, 1500), _pub("bill:1", 20, 1900)])
    r.feed(frame, 2000)
    assert (r.start, r.last, r.received, r.gaps, r.duplicates) == (17, 20, 3, 0, 0)
    assert list(lat) == [1000, 500, 100]
    assert r.report(20) == {"expected": 3, "received": 3, "duplicates": 0, "gaps": 0, "missing": 0,
                            "unsubscribed": 0, "reconnects": 0, "reconnected": 0, "early": 0}


def test_receiver_follows_a_reconnect_op_and_recovers_without_a_gap():
    lat = array("q")
    r = Receiver("bill:1", lat)
    reopened = []
    r.reopen = lambda receiver, after_ms: reopened.append(after_ms)
    _subscribed(r, 10)
    r.feed(_pub("bill:1", 11, 0) + b'\n{"op":"reconnect","reason":"deploy","after_ms":250}', 5)
    r.disconnected(1_000)                 # the 1012 close that follows
    assert reopened == [250] and r.reconnects == 1
    assert json.loads(r.recover_command()) == {"id": 2, "op": "subscribe", "channel": "bill:1",
                                               "recover": {"epoch": "e", "offset": 11}}
    r.recovering = True                   # what on_ws_connected does on the new connection
    r.feed(b'{"id":2,"op":"subscribed","channel":"bill:1","epoch":"e","offset":13,"recovered":true}\n'
           + _pub("bill:1", 12, 0) + b"\n" + _pub("bill:1", 13, 0), 301_000)
    assert (r.start, r.last, r.received, r.gaps, r.duplicates) == (10, 13, 3, 0, 0)
    assert r.reconnect_delays == [300_000] and not r.errors
    r.disconnected(400_000)               # a close without a reconnect op: not followed
    assert reopened == [250]


def test_receiver_counts_gaps_duplicates_and_losses():
    lat = array("q")
    r = Receiver("user:3", lat)
    _subscribed(r, 0)
    for off in (1, 2, 2, 5, 6, 3):
        r.feed(_pub("user:3", off, 10), 20)
    assert (r.received, r.duplicates, r.gaps, r.missing) == (4, 2, 1, 2)
    report = r.report(8)             # publisher saw offsets up to 8: 8 expected, 4 received
    assert report["expected"] == 8 and report["received"] == 4
    assert len(lat) == 4             # duplicates are not latency samples


def test_receiver_slow_path_other_key_order_and_control_messages():
    lat = array("q")
    r = Receiver("bill:9", lat)
    _subscribed(r, 4)
    other_order = json.dumps({"channel": "bill:9", "offset": 5, "op": "pub", "data": {"ts": 100}},
                             separators=(",", ":")).encode()
    r.feed(other_order + b'\n{"op":"unsubscribed","channel":"bill:9","reason":"x"}\n{"op":"pong"}', 150)
    assert (r.last, r.received) == (5, 1)
    assert list(lat) == [50]
    assert r.unsubscribed == 1 and any("unsubscribed" in e for e in r.errors)


def test_receiver_rejects_other_channels_and_bad_json():
    r = Receiver("bill:1", array("q"))
    _subscribed(r, 0)
    r.feed(_pub("bill:2", 1, 0), 1)   # does not match the prefix: slow path, wrong channel
    r.feed(b"{not json", 1)
    assert r.received == 0 and len(r.errors) == 2


def test_receiver_pub_before_subscribed_is_not_counted():
    r = Receiver("bill:1", array("q"))
    r.feed(_pub("bill:1", 1, 0), 1)
    assert r.received == 0 and r.early == 1


class _Sent:
    """A picows transport stand-in that records what a receiver sends."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, _msg_type: object, data: bytes) -> None:
        self.sent.append(data)


def test_socketio_receiver_connects_subscribes_pongs_and_counts_pub_packets():
    lat = array("q")
    r = SocketIOReceiver("bill:1", lat, token="jwt")
    r.transport = transport = _Sent()
    r.feed(b'0{"sid":"0.aaaaaaaaaaaaaaaaaaaa","upgrades":[],"pingInterval":25000,"pingTimeout":20000}', 0)
    r.feed(b'40{"sid":"x"}', 0)
    r.feed(b'42["pub",{"channel":"bill:1","offset":3,"data":{"ts":0}}]', 0)   # before the ack: early
    r.feed(b'430[{"ok":true,"epoch":"e","offset":3}]', 0)
    r.feed(b"2", 0)
    r.feed(b'42["pub",{"channel":"bill:1","offset":4,"data":{"ts":1000,"x":1}}]', 1500)
    r.feed(b'42["pub",{"channel":"bill:1","offset":6,"data":{"ts":1000,"x":1}}]', 1600)
    assert transport.sent == [b'40{"token": "jwt"}', b'420["subscribe",{"channel":"bill:1"}]', b"3"]
    assert (r.start, r.last, r.received, r.gaps, r.missing, r.early) == (3, 6, 2, 1, 1, 1)
    assert list(lat) == [500, 600]


def test_socketio_receiver_refused_ack_fails_ready():
    import asyncio

    loop = asyncio.new_event_loop()
    try:
        ready = loop.create_future()
        r = SocketIOReceiver("user:1", array("q"), ready)
        r.transport = _Sent()
        r.feed(b'430[{"ok":false,"code":403,"message":"not yours"}]', 0)
        assert ready.done() and "403" in str(ready.exception())
    finally:
        loop.close()


def test_receiver_error_reply_fails_ready():
    import asyncio

    loop = asyncio.new_event_loop()
    try:
        ready = loop.create_future()
        r = Receiver("user:1", array("q"), ready)
        r.feed(b'{"id":1,"op":"error","code":403,"message":"not yours"}', 0)
        assert ready.done() and isinstance(ready.exception(), RuntimeError)
    finally:
        loop.close()


def _msg(subject: bytes, seq: int, ts: int) -> bytes:
    data = publication_data(seq, ts)
    return b"MSG %s 1 %d\r\n%s\r\n" % (subject, len(data), data)


def test_nats_receiver_connects_subscribes_and_counts_seq_across_frames():
    from broker.bench.natsclient import CONNECT, NatsReceiver

    lat = array("q")
    r = NatsReceiver("bill:1", lat)
    r.transport = transport = _Sent()
    r.feed(b'INFO {"server_id":"x","max_payload":1048576}\r\n', 0)
    assert transport.sent == [CONNECT + b"SUB bill:1 1\r\nPING\r\n"]
    r.feed(_msg(b"bill:1", 1, 0), 5)            # before the PONG: early, not counted
    r.feed(b"PONG\r\n", 0)
    assert (r.start, r.last, r.early) == (0, 0, 1)
    one, two, four = _msg(b"bill:1", 1, 1000), _msg(b"bill:1", 2, 1000), _msg(b"bill:1", 4, 1000)
    stream = one + b"PING\r\n" + two + four + two     # 3 missing, 2 again
    r.feed(stream[:7], 1100)                    # a frame boundary inside the MSG line
    r.feed(stream[7:60], 1200)                  # ... and inside the payload
    r.feed(stream[60:len(one) + 3], 1250)       # the first MSG ends here, "PI" of the PING too
    r.feed(stream[len(one) + 3:], 1300)
    assert transport.sent[1:] == [b"PONG\r\n"]
    assert (r.received, r.last, r.gaps, r.missing, r.duplicates) == (3, 4, 1, 1, 1)
    assert list(lat) == [250, 300, 300] and r.report(4)["expected"] == 4 and r.errors == []


def test_nats_receiver_error_fails_ready_and_idle_connections_resolve_on_pong():
    import asyncio

    from broker.bench.natsclient import CONNECT, NatsReceiver

    loop = asyncio.new_event_loop()
    try:
        idle = NatsReceiver(None, array("q"), loop.create_future())
        idle.transport = transport = _Sent()
        idle.feed(b"INFO {}\r\nPONG\r\n", 0)
        assert transport.sent == [CONNECT + b"PING\r\n"] and idle.ready is not None and idle.ready.done()
        assert idle.start is None    # W3: nothing to count
        refused = NatsReceiver("user:1", array("q"), loop.create_future())
        refused.feed(b"-ERR 'Authorization Violation'\r\n", 0)
        assert refused.ready is not None and "Authorization Violation" in str(refused.ready.exception())
    finally:
        loop.close()


def test_publication_data_is_the_body_data():
    body = publication_body("user:3", 7, 123)
    assert body == b'{"channel":"user:3","data":%s}' % publication_data(7, 123)
    assert publication_data(7, 123).startswith(b'{"ts":123,"seq":7,')


def test_publication_body_is_about_200_bytes_with_ts_first():
    body = publication_body("bill:1", 12345, 1_700_000_000_000_000_000)
    msg = json.loads(body)
    data = json.dumps(msg["data"], separators=(",", ":"))
    assert 180 <= len(data) <= 230
    assert data.startswith('{"ts":1700000000000000000,')
    assert msg["channel"] == "bill:1"


# -- workloads -----------------------------------------------------------------------------


def test_workload_defaults_match_the_issue():
    assert WORKLOADS["w1-1k"].fanout_connections == 1000 and WORKLOADS["w1-5k"].fanout_connections == 5000
    assert WORKLOADS["w1-5k"].fanout_rate == 50 and WORKLOADS["w1-5k"].duration == 15
    assert WORKLOADS["w2"].user_connections == 5000 and WORKLOADS["w2"].user_rate == 2000
    assert WORKLOADS["w3"].idle_connections == 5000 and WORKLOADS["w3"].publications == 0


def test_workload_overrides():
    w = workload("w1-5k", connections=50, rate=20, duration=1)
    assert (w.fanout_connections, w.fanout_rate, w.duration, w.publications) == (50, 20, 1, 20)
    m = workload("mixed", connections=101, rate=110)
    assert (m.fanout_connections, m.user_connections) == (50, 51)
    assert (m.fanout_rate, m.user_rate) == (10, 100)


def test_channel_of_splits_fanout_users_idle():
    spec = {"fanout_connections": 2, "user_connections": 2, "idle_connections": 1}
    assert [channel_of(spec, i) for i in range(5)] == [FANOUT_CHANNEL, FANOUT_CHANNEL, "user:0", "user:1", None]


# -- records, tables, ratios -----------------------------------------------------------------


def _record(target: str, **values):
    r = stats.empty_result(target, "w1-5k")
    r.update(connections=100, connect_seconds=0.5, publications=10, publish_seconds=1.0,
             deliveries_expected=1000, deliveries_received=990, server_cpu_seconds=0.01,
             server_cpu_seconds_connect=0.1, rss_before_bytes=1_000_000, rss_connected_bytes=2_024_000,
             latency_p99_ms=2.0)
    r.update(values)
    return stats.finish_result(r)


def test_finish_result_derives_fields_and_keeps_the_shape():
    r = _record("broker")
    assert list(r) == list(stats.RESULT_FIELDS)
    assert r["connect_rate"] == 200.0
    assert r["deliveries_lost"] == 10
    assert r["deliveries_per_cpu_second"] == 99000
    assert r["rss_per_connection_bytes"] == 10240
    assert r["connections_per_cpu_second"] == 1000
    assert json.loads(json.dumps(r, allow_nan=False)) == r  # the record goes into --json files as it is


def test_finish_result_w3_has_no_delivery_rate():
    r = stats.empty_result("broker", "w3")
    r.update(connections=10, connect_seconds=1.0)
    stats.finish_result(r)
    assert r["deliveries_per_cpu_second"] is None and r["deliveries_lost"] is None
    assert r["connect_rate"] == 10.0


def test_ratios_subject_over_baseline():
    rows = stats.ratios([_record("broker"), _record("picows", server_cpu_seconds=0.02, latency_p99_ms=4.0),
                         _record("websockets", connect_seconds=1.0)])
    assert [row["baseline"] for row in rows] == ["picows", "websockets"]
    assert rows[0]["deliveries_per_cpu_second"] == 2.0
    assert rows[0]["latency_p99_ms"] == 0.5
    assert rows[1]["connect_rate"] == 2.0
    assert set(rows[0]) == {"workload", "baseline", *stats.RATIO_METRICS}


def test_ratios_missing_values_are_none():
    a = _record("broker")
    b = stats.finish_result({**stats.empty_result("picows", "w1-5k")})
    assert stats.ratios([a, b])[0]["deliveries_per_cpu_second"] is None


def test_format_table_and_ratios_text():
    results = [_record("broker"), _record("picows", server_cpu_seconds=0.02)]
    table = stats.format_table(results)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["workload", "target", "conns"]
    assert set(lines[1]) <= {"-", " "}
    assert len(lines) == 4 and "99,000" in lines[2] and "49,500" in lines[3]
    text = stats.format_ratios(stats.ratios(results))
    assert "2.00" in text and "picows" in text


def test_merge_counts():
    assert stats.merge_counts([{"a": 1, "b": 2}, {"a": 3}]) == {"a": 4, "b": 2}


# -- CLI surface -------------------------------------------------------------------------------


def test_cli_help_lists_the_options():
    result = CliRunner().invoke(bench, ["--help"])
    assert result.exit_code == 0
    for option in ("--workload", "--connections", "--rate", "--duration", "--workers", "--url", "--api-key",
                   "--jwt-secret", "--spawn", "--shards", "--compare", "--json"):
        assert option in result.output


def test_cli_rejects_unknown_workload_and_target():
    assert CliRunner().invoke(bench, ["--workload", "w9"]).exit_code == 2
    assert CliRunner().invoke(bench, ["--targets", "nginx", "--spawn"]).exit_code == 2


def test_cli_nats_without_nats_server_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(bench, ["--targets", "broker,nats", "--spawn"],
                                env={"NATS_SERVER": str(tmp_path / "no-such-nats-server")})
    assert result.exit_code == 2 and "target nats needs nats-server" in result.output


def test_compare_includes_nats_only_where_nats_server_is(tmp_path):
    from broker.bench.cli import _split_targets

    fake = tmp_path / "nats-server"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NATS_SERVER", str(fake))
        assert _split_targets(None, True) == ["broker", "picows", "websockets", "nats"]
        mp.setenv("NATS_SERVER", str(tmp_path / "missing"))
        assert _split_targets(None, True) == ["broker", "picows", "websockets"]
        assert _split_targets(None, False) == ["broker"]


def test_cli_w2_against_url_needs_a_secret():
    result = CliRunner().invoke(bench, ["--workload", "w2", "--url", "http://127.0.0.1:1"],
                                env={"BROKER_JWT_SECRET": ""})
    assert result.exit_code == 2 and "jwt-secret" in result.output


def test_deflate_receivers_inflate_what_the_broker_compresses():
    from broker._fastpath import Deflater
    from broker.bench.worker import DEFLATE_OFFER, _inflate

    line = b'{"op":"pub","channel":"bill:1","offset":7,"data":{"seq":1,"ts":5}}'
    assert _inflate(Deflater(6, 15).compress(line)) == line
    assert DEFLATE_OFFER["Sec-WebSocket-Extensions"].startswith("permessage-deflate")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_rewrites_one_line_on_a_terminal_and_writes_lines_elsewhere():
    from broker.bench.runner import _Progress

    tty = _Terminal()
    progress = _Progress(tty, "[broker w1]")
    progress.update("connecting 1/2", force=True)
    progress.update("connecting 2/2")  # within 0.2 s of the last: not redrawn
    progress.done("ok")
    assert tty.getvalue() == "\r\x1b[K[broker w1] connecting 1/2\r\x1b[K[broker w1] ok\n"
    plain = io.StringIO()
    progress = _Progress(plain, "[broker w1]")
    progress.update("connecting 1/2", force=True)
    progress.update("connecting 2/2")  # within 3 s: not repeated
    progress.done("ok")
    assert plain.getvalue() == "[broker w1] connecting 1/2\n[broker w1] ok\n"
    assert progress.bar(1, 4, width=8) == "[##......]  25.0%" and progress.bar(1, 0, width=2) == "[..]   0.0%"
