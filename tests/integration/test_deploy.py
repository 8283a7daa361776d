"""Deploys, rollbacks and reloads through real processes (PROTOCOL.md §5,
docs/operations.md): nothing acknowledged is lost or duplicated."""
from __future__ import annotations

import asyncio
import math
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from broker.testing import BrokerProcess

from .deploys import ROOT, Audience, Prober, Traffic, operate, peak_per_window
from .wsclient import NativeClient

pytestmark = pytest.mark.timeout(240)


def stats(broker: BrokerProcess) -> dict:
    status, body = broker.api("GET", "/api/stats")
    assert status == 200, body
    return body  # type: ignore[return-value]


def test_deploy_under_steady_traffic_loses_and_duplicates_nothing(broker_factory, tmp_path):
    config = tmp_path / "broker.toml"
    settings = "allow_anonymous = true\n[deploy]\nwave_size = 40\nwave_interval = 0.5\nmax_after_ms = 400\n"
    config.write_text("shards = 2\n" + settings)
    broker = broker_factory("--config", str(config))
    channels = [f"bill:{i}" for i in range(6)]
    audience = Audience(broker.ws_url, 240, channels)

    async def scenario() -> tuple[int, list[str], dict]:
        await audience.connect()
        traffic = Traffic(broker, channels, rate=80).start()
        prober = Prober(broker.url).start()
        try:
            await asyncio.sleep(1.0)
            config.write_text("shards = 3\n" + settings)  # the new generation re-homes every channel
            outcome = await asyncio.to_thread(operate, broker, "deploy")
            await asyncio.sleep(2.0)
        finally:
            traffic.stop()
            prober.stop()
        # New connections all along the take-over: none refused or reset.
        assert prober.ok > 50 and not prober.failures, prober.failures[:3]
        await audience.caught_up(traffic)
        await audience.close()
        audience.check_exactly_once(traffic)
        return outcome + (traffic,)  # type: ignore[return-value]

    code, progress, result, traffic = asyncio.run(scenario())
    assert code == 0 and result["ok"], (progress, result)
    assert result["generation"] == 2 and result["previous"] == 1
    assert any("fencing generation 1" in line for line in progress)
    view = stats(broker)
    assert view["generation"] == 2 and view["phase"] == "serving" and len(view["shards"]) == 3
    # Every client moved once, in waves: never a thundering herd.
    reconnects = audience.reconnect_times()
    assert all(client.reconnects >= 1 for client in audience.clients)
    assert len(reconnects) >= audience.count
    # Waves start every 0.5 s; a wave's reconnects spread over after_ms (<= 0.4 s)
    # plus the client's jitter, so any second sees at most 4 waves' worth.
    assert peak_per_window([t for _, t in reconnects], 1.0) <= 4 * 40
    waves = math.ceil(audience.count / 40)
    span = max(t for _, t in reconnects) - min(t for _, t in reconnects)
    assert span >= (waves / 2 - 1) * 0.5, span  # spread over the waves, not at once
    assert traffic.seq > 200


def _broker_from_a_copy(tmp_path: Path, *args: str) -> tuple[BrokerProcess, Path]:
    """A broker whose code lives in a copy we can break, as code on disk is."""
    code = tmp_path / "code"
    shutil.copytree(ROOT / "broker", code / "broker", ignore=shutil.ignore_patterns("__pycache__"))
    # PYTHONSAFEPATH: the working directory (the checkout) must not shadow the copy.
    broker = BrokerProcess(args=list(args), env={"PYTHONPATH": str(code), "PYTHONSAFEPATH": "1"},
                           log_path=str(tmp_path / "broker.log")).start()
    return broker, code / "broker" / "worker.py"


def test_a_broken_new_generation_is_torn_down_and_the_old_one_serves_on(tmp_path):
    config = tmp_path / "broker.toml"
    config.write_text("allow_anonymous = true\nshards = 2\n")
    broker, worker = _broker_from_a_copy(tmp_path, "--config", str(config))
    good = worker.read_text()
    channels = ["bill:1", "bill:2", "bill:3"]
    audience = Audience(broker.ws_url, 30, channels)
    outcomes = []

    async def scenario() -> Traffic:
        await audience.connect()
        traffic = Traffic(broker, channels, rate=50).start()
        try:
            # 1. The new code crashes at start.
            worker.write_text(good.replace("\ndef main(", "\nraise SystemExit(5)\n\n\ndef main(", 1))
            outcomes.append(await asyncio.to_thread(operate, broker, "deploy"))
            # 2. The new code never becomes ready (ready_timeout, a runtime setting, now 4 s).
            config.write_text("allow_anonymous = true\nshards = 2\n[deploy]\nready_timeout = 4\n")
            outcomes.append(await asyncio.to_thread(operate, broker, "reload"))
            worker.write_text(good.replace("\ndef main(", "\nimport time\ntime.sleep(600)\n\n\ndef main(", 1))
            outcomes.append(await asyncio.to_thread(operate, broker, "deploy"))
            await asyncio.sleep(0.5)
        finally:
            traffic.stop()
            worker.write_text(good)
        await audience.caught_up(traffic)
        await audience.close()
        return traffic

    try:
        traffic = asyncio.run(scenario())
        (code1, progress1, crashed), reloaded, (code2, _, stuck) = outcomes
        assert reloaded[0] == 0, reloaded
        assert code1 == 1 and not crashed["ok"] and "exited with code 5" in crashed["error"], crashed
        assert any("tearing generation 2 down" in line for line in progress1)
        assert code2 == 1 and not stuck["ok"] and "timed out" in stuck["error"], stuck
        assert "error:" in crashed["stderr"]
        view = stats(broker)
        assert view["generation"] == 1 and view["phase"] == "serving"
        assert all(s["up"] for s in view["shards"])
        audience.check_exactly_once(traffic)
        assert all(client.reconnects == 0 for client in audience.clients)  # nobody was moved
        assert broker.publish("bill:1", "after")["offset"] == traffic.last("bill:1") + 1
    finally:
        assert broker.stop() == 0


def test_rollback_after_a_good_deploy_returns_to_the_previous_config(broker_factory, tmp_path):
    config = tmp_path / "broker.toml"
    config.write_text("allow_anonymous = true\nshards = 1\n")
    broker = broker_factory("--config", str(config))
    channels = ["bill:1", "user:1"]
    audience = Audience(broker.ws_url, 20, ["bill:1", "bill:2"])

    async def scenario() -> tuple:
        await audience.connect()
        traffic = Traffic(broker, ["bill:1", "bill:2", *channels[1:]], rate=50).start()
        try:
            config.write_text("allow_anonymous = true\nshards = 2\n[features.compression]\nrollout = 30\n")
            deployed = await asyncio.to_thread(operate, broker, "deploy")
            mid = stats(broker)
            rolled = await asyncio.to_thread(operate, broker, "rollback")
            await asyncio.sleep(0.5)
        finally:
            traffic.stop()
        await audience.caught_up(traffic)
        await audience.close()
        audience.check_exactly_once(traffic)
        return deployed, mid, rolled

    deployed, mid, rolled = asyncio.run(scenario())
    assert deployed[0] == 0 and deployed[2]["generation"] == 2
    assert mid["features"] == {"compression": {"enabled": True, "rollout": 30}} and len(mid["shards"]) == 2
    code, progress, result = rolled
    assert code == 0 and result["ok"] and result["generation"] == 3, result
    assert mid["phase"] == "serving" and mid["generation"] == 2
    assert any("rolling back" in line for line in progress)
    view = stats(broker)
    assert view["generation"] == 3 and view["features"] == {} and len(view["shards"]) == 1


def test_rollback_without_a_previous_generation_is_refused(broker):
    code, _, result = operate(broker, "rollback")
    assert code == 1 and not result["ok"] and "no previous generation" in result["error"]


def test_reload_valid_invalid_non_runtime_and_sighup(broker_factory, tmp_path):
    config = tmp_path / "broker.toml"
    base = "allow_anonymous = true\nshards = 2\n"
    config.write_text(base + "[namespaces.bill]\nhistory_size = 100\n")
    broker = broker_factory("--config", str(config))
    client = NativeClient(broker.ws_url)
    assert client.subscribe("bill:1")["op"] == "subscribed"
    for i in range(10):
        broker.publish("bill:1", i)
    assert len(client.pubs(10)) == 10

    # A valid runtime change: history size and a feature flag, no connection dropped.
    config.write_text(base + "[namespaces.bill]\nhistory_size = 3\n[features.compression]\nrollout = 0\n")
    code, progress, result = operate(broker, "reload")
    assert code == 0 and result["ok"], result
    assert {c["key"] for c in result["changes"]} == {"namespaces.bill.history_size",
                                                    "features.compression.enabled",
                                                    "features.compression.rollout"}
    assert any("every shard applied" in line for line in progress)
    status, history = broker.api("GET", "/api/history?channel=bill:1")
    assert [p["offset"] for p in history["publications"]] == [8, 9, 10]
    assert stats(broker)["features"] == {"compression": {"enabled": True, "rollout": 0}}
    fresh = NativeClient(broker.ws_url, compression="deflate")  # offered, switched off for everyone
    assert "sec-websocket-extensions" not in {k.lower() for k in fresh.ws.response.headers.keys()}
    broker.publish("bill:1", "still here")
    assert client.pubs(1)[0]["data"] == "still here"  # the old connection never dropped

    # An invalid file: refused whole, exit 2 naming the key, the old config stays.
    config.write_text(base + "[namespaces.bill]\nhistory_size = 50\n[limits]\nmax_connections = \"many\"\n")
    code, _, result = operate(broker, "reload")
    assert code == 2 and not result["ok"] and result["key"] == "limits.max_connections"
    assert "error: limits.max_connections" in result["stderr"]

    # A setting that cannot change at runtime: named in the refusal.
    config.write_text(base.replace("shards = 2", "shards = 3") + "[features.compression]\nrollout = 100\n")
    code, _, result = operate(broker, "reload")
    assert code == 2 and result["key"] == "shards" and "deploy" in result["error"]
    assert stats(broker)["features"]["compression"]["rollout"] == 0

    # SIGHUP reloads the file loaded last.
    config.write_text(base + "[namespaces.bill]\nhistory_size = 3\n[features.compression]\nrollout = 100\n")
    broker.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while stats(broker)["features"]["compression"]["rollout"] != 100:
        assert time.monotonic() < deadline, "SIGHUP did not reload"
        time.sleep(0.1)
    client.ping() if hasattr(client, "ping") else client.request("ping")
    assert len(stats(broker)["shards"]) == 2


def test_admin_api_needs_the_api_key(broker):
    status, body = broker.api("POST", "/api/admin/reload", {"config": None},
                              headers={"Authorization": "apikey wrong"})
    assert status == 401
    status, body = broker.api("POST", "/api/admin/reload", {"config": 5})
    assert status == 400


@pytest.mark.parametrize("fault", ["publish fails", "crash"])
def test_a_new_generation_failing_its_first_wave_is_rolled_back(tmp_path, fault):
    config = tmp_path / "broker.toml"
    config.write_text("allow_anonymous = true\nshards = 2\n"
                      "[deploy]\nwave_size = 10\nwave_interval = 0.3\nfirst_wave_watch = 3\n")
    broker, worker = _broker_from_a_copy(tmp_path, "--config", str(config))
    if fault == "crash":  # the new code dies a second after it became ready
        good = worker.read_text()
        marker = 'router.tell_supervisor({"ready": shard_id_int, "pid": os.getpid()})'
        assert marker in good
        worker.write_text(good.replace(marker, marker + "\n            loop.call_later(1.0, os._exit, 7)"))
    else:  # the new code answers every publication 500
        api = worker.parent / "api.py"
        good = api.read_text()
        marker = "async def _publish(shard: ApiHost, channel: str, data: Any) -> Response:\n"
        assert marker in good
        api.write_text(good.replace(marker, marker + '    raise RuntimeError("broken build")\n'))
    channels = ["bill:1", "bill:2", "bill:3"]
    audience = Audience(broker.ws_url, 40, channels)

    async def scenario() -> tuple:
        await audience.connect()
        traffic = Traffic(broker, channels, rate=60, retry=(0, 500, 503)).start()
        try:
            await asyncio.sleep(0.5)
            outcome = await asyncio.to_thread(operate, broker, "deploy")
            await asyncio.sleep(1.0)
        finally:
            traffic.stop()
        await audience.caught_up(traffic)
        await audience.close()
        return outcome, traffic

    try:
        (code, progress, result), traffic = asyncio.run(scenario())
        assert code == 1 and not result["ok"] and "first wave" in result["error"], result
        assert ("error rate" if fault == "publish fails" else "exited with code 7") in result["error"]
        assert "rolled back to generation 3" in result["error"]
        assert any("rolling back" in line for line in progress)
        view = stats(broker)
        assert view["generation"] == 3 and view["phase"] == "serving" and all(s["up"] for s in view["shards"])
        audience.check_exactly_once(traffic, crashed=fault == "crash")
        offset = broker.publish("bill:1", "after")["offset"]  # the state moved on twice, no gap
        assert offset == traffic.last("bill:1") + 1 if fault != "crash" else offset > traffic.last("bill:1")
    finally:
        assert broker.stop() == 0


def test_clients_waiting_for_their_wave_stay_live(broker_factory, tmp_path):
    config = tmp_path / "broker.toml"
    config.write_text("allow_anonymous = true\nshards = 1\n"
                      "[deploy]\nwave_size = 4\nwave_interval = 1.5\nmax_after_ms = 0\n")
    broker = broker_factory("--config", str(config))
    clients = [NativeClient(broker.ws_url) for _ in range(12)]
    for client in clients:
        assert client.subscribe("bill:7")["offset"] == 0
    broker.publish("bill:7", "before")
    for client in clients:
        assert client.pubs(1)[0]["data"] == "before"
    deploy = ThreadPoolExecutor(1).submit(operate, broker, "deploy")
    deadline = time.monotonic() + 60
    while stats(broker)["generation"] != 2:  # new connections reach the new generation only
        assert time.monotonic() < deadline and not deploy.done(), "no take-over"
        time.sleep(0.05)
    assert broker.publish("bill:7", "after the take-over")["offset"] == 2
    live = 0
    for client in clients:
        first = client.recv(timeout=15)
        if first["op"] == "pub":  # fed by the new generation's stream while it waits for its wave
            assert (first["offset"], first["data"]) == (2, "after the take-over")
            live += 1
            first = client.recv(timeout=15)
        assert first["op"] == "reconnect" and first["after_ms"] == 0
    assert live >= 4, live  # at least the last wave's clients (waves 1.5 s apart)
    code, _, result = deploy.result(60)
    assert code == 0 and result["ok"], result
