"""The memory budget under a flood (PROTOCOL.md §3 "Memory budget", issue 13):
``broker serve --shards 2 --memory-limit-mb N`` flooded with connections
that subscribe and never read, while healthy clients go on receiving.

The budget is chosen from this machine's idle shard RSS (idle at 60% of
it), so the figures mean the same on any machine. The flood itself is
tools/flood.py's (the same code prints the figures for an operator);
``pytest -s -n 0`` shows its one-line summary (xdist workers keep it). Healthy clients may lag 8 MiB
behind (``outbound_buffer_bytes``): the test process that reads for them
shares two busy cores with the broker and the flood, and a reader starved
longer than its buffer allows is rightly a slow consumer.
"""
from __future__ import annotations

import pytest

from tools.flood import idle_budget_mb, run_flood

pytestmark = pytest.mark.timeout(180)

SHARDS = 2
FLOOD = 400


def test_a_flood_of_non_readers_stays_within_the_budget_and_healthy_clients_get_everything(
        broker_factory, tmp_path):
    budget = idle_budget_mb(SHARDS)
    config = tmp_path / "flood.toml"
    config.write_text("[limits]\noutbound_buffer_bytes = 8388608\n")
    broker = broker_factory("--shards", str(SHARDS), "--allow-anonymous", "--memory-limit-mb", str(budget),
                            "--config", str(config))
    figures = run_flood(broker, budget, SHARDS, flood=FLOOD, seconds=10.0, rate=100.0)
    print("\n" + figures.summary())

    # The budget holds: summed shard RSS, sampled every 20 ms from outside.
    assert figures.flood == FLOOD
    assert figures.peak_rss > figures.idle_rss
    assert figures.peak_ratio <= 1.1, figures.summary()
    # Level 2 was reached and cut the non-readers with 1013 (counted by the
    # broker: a client that does not read never reaches the close frame).
    assert figures.max_level >= 2
    assert figures.memory_cuts > 0
    assert figures.memory_cuts + figures.slow_consumers >= FLOOD
    assert "open" not in figures.close_frames, figures.close_frames  # every sampled flood socket was ended
    # Level 3 refused new upgrades (the flood coming back) with a 503 and a JSON body.
    assert figures.level3_seen and figures.level3_refusals, figures.summary()
    assert all("memory budget" in error for error in figures.level3_refusals)
    assert figures.refused_memory >= len(figures.level3_refusals)
    # The flood gone, the levels fell back to 0 and upgrades are accepted again.
    assert figures.back_to_level0_s is not None
    assert figures.reaccepted
    # Every publication answered 200 reached every healthy client, in order,
    # without a gap; none was cut.
    assert len(figures.published) > 100
    offsets = [offset for offset, _ in figures.published]
    assert offsets == list(range(offsets[0], offsets[0] + len(offsets)))
    assert figures.healthy_closed == [None] * len(figures.healthy_closed)
    assert figures.healthy_in_order, figures.summary()
