"""Runtime config, feature flags, check-config --diff and the journal
hand-over, driven directly (the processes are in integration/test_deploy.py)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from broker.config import Config, Feature, load_config
from broker.engine.cluster import home_of
from broker.engine.journal import ChannelLog, Journal, read_journal
from broker.engine.memory import MemoryEngine
from broker.errors import ConfigError, EngineUnavailable
from broker.features import bucket, is_on, rollout_key
from broker.handover import generation_journals, import_state, is_fresh, journal_path, latest_generation
from broker.reload import ReloadRefused, apply_runtime, check_reload, diff, is_runtime

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("key", ["limits.max_connections", "limits.commands_per_second",
                                 "namespaces.bill.history_size", "namespaces.bill.history_ttl",
                                 "flush_interval", "log_level", "features.x.rollout", "features.x.enabled",
                                 "memory.high", "deploy.wave_size"])
def test_runtime_keys(key):
    assert is_runtime(key)


@pytest.mark.parametrize("key", ["host", "port", "shards", "redis_url", "state_dir", "api_key",
                                 "jwt_secret", "namespaces.bill.subscribe", "namespaces.new",
                                 "limits.outbound_buffer_bytes", "cluster.transport", "tls_cert"])
def test_deploy_only_keys(key):
    assert not is_runtime(key)


def test_diff_names_each_changed_key_and_whether_it_is_runtime(tmp_path):
    old = load_config(write(tmp_path / "a.toml", "[limits]\nmax_connections = 10\n"))
    new = load_config(write(tmp_path / "b.toml", "shards = 7\n[limits]\nmax_connections = 20\n"
                                                 "[features.compression]\nrollout = 25\n"))
    changes = {c.key: (c.old, c.new, c.runtime) for c in diff(old, new)}
    assert changes.pop("shards")[1:] == (7, False)
    assert changes == {"limits.max_connections": (10, 20, True),
                       "features.compression.enabled": ("(absent)", True, True),
                       "features.compression.rollout": ("(absent)", 25, True)}


def test_a_reload_is_refused_whole_when_one_key_needs_a_deploy():
    old, new = Config(shards=2), Config(shards=3)
    new.limits.max_connections = 5
    with pytest.raises(ReloadRefused) as refused:
        check_reload(old, new)
    assert refused.value.key == "shards" and isinstance(refused.value, ConfigError)
    assert old.limits.max_connections == 100000


def test_apply_runtime_changes_the_live_config_in_place():
    live = Config(shards=1)
    namespace = live.namespaces["bill"]
    new = Config(shards=1, flush_interval=0.01, log_level="debug")
    new.limits.max_connections = 3
    new.limits.outbound_buffer_bytes = 1  # sized at start: not taken
    new.namespaces["bill"].history_size = 7
    new.features["compression"] = Feature(True, 10)
    apply_runtime(live, new)
    assert live.limits.max_connections == 3 and live.limits.outbound_buffer_bytes == 1 << 20
    assert live.namespaces["bill"] is namespace and namespace.history_size == 7
    assert live.flush_interval == 0.01 and live.features["compression"].rollout == 10
    apply_runtime(live, Config(shards=1))  # back to info, for the other tests


def test_feature_buckets_are_stable_and_rollout_is_a_share():
    config = Config(shards=1, features={"compression": Feature(True, 25), "off": Feature(False, 100)})
    keys = [rollout_key(f"u{i}", "") for i in range(4000)]
    on = [key for key in keys if is_on(config, "compression", key)]
    assert 0.20 < len(on) / len(keys) < 0.30
    assert bucket("compression", "user:u1") == bucket("compression", "user:u1")
    config.features["compression"] = Feature(True, 50)  # raising the rollout only adds users
    assert set(on) <= {key for key in keys if is_on(config, "compression", key)}
    assert not any(is_on(config, "off", key) for key in keys)
    assert is_on(config, "unconfigured", "user:x") and not is_on(config, "unconfigured", "user:x", False)
    assert rollout_key(None, "abc") == "conn:abc"


def test_features_table_is_validated(tmp_path):
    with pytest.raises(ConfigError) as bad:
        load_config(write(tmp_path / "f.toml", "[features.compression]\nrollout = 101\n"))
    assert bad.value.key == "features.compression.rollout"
    with pytest.raises(ConfigError) as bad:
        load_config(write(tmp_path / "f.toml", "[features.compression]\nenable = true\n"))
    assert bad.value.key == "features.compression.enable"
    with pytest.raises(ConfigError) as bad:
        load_config(write(tmp_path / "f.toml", "[deploy]\nmax_after_ms = 40000\n"))
    assert bad.value.key == "deploy.max_after_ms"


def test_check_config_diff_cli(tmp_path):
    old = write(tmp_path / "old.toml", "[namespaces.bill]\nhistory_size = 10\n")
    runtime = write(tmp_path / "runtime.toml", "[namespaces.bill]\nhistory_size = 20\n")
    deploy = write(tmp_path / "deploy.toml", "shards = 5\n[namespaces.bill]\nhistory_size = 20\n")
    bad = write(tmp_path / "bad.toml", "[limits]\nmax_connections = -1\n")

    def run(*args):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        return subprocess.run([sys.executable, "-m", "broker", "check-config", *args], env=env,
                              capture_output=True, text=True, timeout=30)

    result = run("--diff", old, runtime)
    assert result.returncode == 0
    assert "namespaces.bill.history_size: 10 -> 20  [runtime]" in result.stdout
    assert "a reload applies it" in result.stdout
    result = run("--diff", old, deploy)
    assert "shards: " in result.stdout and "needs a deploy (`broker deploy`): shards" in result.stdout
    assert run("--diff", old, old).stdout.strip() == "no change"
    result = run("--diff", old, bad)
    assert result.returncode == 2 and "limits.max_connections" in result.stderr


def test_rebound_applies_new_history_bounds_to_existing_channels():
    config = Config(shards=1)
    engine = MemoryEngine(config)
    for i in range(10):
        engine.publish_now("bill:1", b"%d" % i)
    config.namespaces["bill"].history_size = 4
    assert engine.rebound() == 1
    position, kept = engine.history_now("bill:1", 0, 100)
    assert position.offset == 10 and [o for o, _ in kept] == [7, 8, 9, 10]
    config.namespaces["bill"].history_ttl = 0.0
    assert engine.rebound() == 1
    assert [o for o, _ in engine.history_now("bill:1", 0, 100)[1]] == [7, 8, 9, 10]
    assert engine.publish_now("bill:1", b"x").offset == 11


def test_memory_pressure_keeps_a_fraction_of_each_history_then_all_again():
    engine = MemoryEngine(Config(shards=1))  # bill: history_size 100
    for i in range(40):
        engine.publish_now("bill:1", b"%d" % i)
    assert engine.scale_history(0.25) == 1
    assert engine.scale_history(0.25) == 0  # already there
    assert [o for o, _ in engine.history_now("bill:1", 0, 100)[1]] == list(range(16, 41))
    epoch = engine.position_now("bill:1").epoch
    assert engine.recover_now("bill:1", epoch, 10).recovered is False
    assert engine.recover_now("bill:1", epoch, 15).recovered is True
    assert engine.scale_history(1.0) == 1
    for _ in range(60):
        engine.publish_now("bill:1", b"x")
    assert [o for o, _ in engine.history_now("bill:1", 0, 200)[1]] == list(range(16, 101))


def test_a_fenced_engine_acknowledges_nothing():
    engine = MemoryEngine(Config(shards=1))
    engine.publish_now("bill:1", b"1")
    engine.fence()
    with pytest.raises(EngineUnavailable):
        engine.publish_now("bill:1", b"2")
    with pytest.raises(EngineUnavailable):
        engine.position_now("bill:new")  # creating a channel writes too
    assert engine.position_now("bill:1").offset == 1
    engine.fence(False)
    assert engine.publish_now("bill:1", b"2").offset == 2


@pytest.mark.parametrize("old_count,new_count", [(2, 3), (3, 1), (4, 4)])
def test_import_rehomes_every_channel_whatever_the_shard_counts(tmp_path, old_count, new_count):
    channels = {f"bill:{i}": ChannelLog(f"bill:{i}", f"e{i}", 5 + i,
                                        [(4 + i, b"a", 1.0), (5 + i, b"b", 2.0)]) for i in range(30)}
    for shard in range(old_count):
        with Journal(journal_path(str(tmp_path), 1, shard, old_count)) as journal:
            journal.rewrite(c for name, c in channels.items() if home_of(name, old_count) == shard)
    assert latest_generation(str(tmp_path)) == 1
    sources = generation_journals(str(tmp_path), 1)
    assert len(sources) == old_count  # no lock files
    seen = {}
    for shard in range(new_count):
        with Journal(journal_path(str(tmp_path), 2, shard, new_count)) as journal:
            assert is_fresh(journal)
            import_state(journal, sources, shard, new_count)
            assert not is_fresh(journal) or not any(home_of(n, new_count) == shard for n in channels)
        for name, log in read_journal(journal_path(str(tmp_path), 2, shard, new_count)).items():
            assert home_of(name, new_count) == shard
            seen[name] = log
    assert seen == channels
    assert latest_generation(str(tmp_path)) == 2


def test_a_reload_reaches_the_memory_thresholds_a_shard_holds(tmp_path):
    import asyncio
    import json as jsonlib

    from broker.shard import Shard
    from broker.shardops import ShardOperations

    loop = asyncio.new_event_loop()
    try:
        config = Config(shards=1, memory_limit_mb=100)
        shard = Shard(config, loop=loop)
        new = Config(shards=1, memory_limit_mb=100)
        new.memory.level1 = 0.5
        new.limits.max_connections = 9
        (tmp_path / "cluster.json").write_text(jsonlib.dumps({"config": new.to_dict(), "config_version": 2}))
        told = []
        ShardOperations(shard, str(tmp_path), told.append, 1).follow({"config_version": 2})
        assert shard.config.limits.max_connections == 9
        assert shard.watch.degradation.thresholds.level1 == 0.5
        assert told == [{"applied": 2, "id": 0, "pid": os.getpid()}]
        shard.close()
    finally:
        loop.close()
