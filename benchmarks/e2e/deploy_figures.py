"""Figures of a deploy under load (docs/operations.md "Figures").

    PYTHONPATH=$PWD python -m benchmarks.e2e.deploy_figures --clients 1000

Starts a real ``broker serve`` (2 shards), connects N Python ``Client``s
in a few processes (each subscribed to two of 10 channels), publishes steadily (retrying
503s), runs ``broker deploy`` (to 3 shards: every channel is re-homed) and
reports: deploy duration, reconnect delay percentiles (connection lost ->
open again), peak reconnects per second, and publications lost and
duplicated (by offsets, per subscriber). Bounded in time: about a minute.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import tempfile
from pathlib import Path

from broker.testing import BrokerProcess
from tests.integration.deploys import Audience, Traffic, operate, peak_per_window


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0


class _Finals:
    """What the audience waits for: each channel's last acknowledged offset."""

    def __init__(self, finals: dict[str, int]) -> None:
        self.finals = finals

    def last(self, channel: str) -> int:
        return self.finals.get(channel, 0)


def _audience_process(url: str, count: int, channels: list[str], conn) -> None:
    """One process's share of the clients (the load must not starve itself)."""
    async def run() -> None:
        audience = Audience(url, count, channels)
        await audience.connect()
        conn.send("ready")
        finals = await asyncio.get_running_loop().run_in_executor(None, conn.recv)
        await audience.caught_up(_Finals(finals), timeout=60)
        await audience.close()
        conn.send({"start": list(audience.start.items()),
                   "received": [(key, offsets) for key, offsets in audience.received.items()],
                   "reconnects": audience.reconnect_times(), "lost": audience.lost})

    asyncio.run(run())


async def _run(clients: int, rate: float, processes: int, tmp: Path) -> dict:
    config = tmp / "broker.toml"
    settings = "allow_anonymous = true\n"
    config.write_text("shards = 2\n" + settings)
    broker = BrokerProcess(args=["--config", str(config)], log_path=str(tmp / "broker.log"))
    await asyncio.to_thread(broker.start)
    channels = [f"bill:{i}" for i in range(10)]
    spawn = multiprocessing.get_context("spawn")
    pipes, procs = [], []
    try:
        for i in range(processes):
            parent, child = spawn.Pipe()
            share = clients // processes + (1 if i < clients % processes else 0)
            proc = spawn.Process(target=_audience_process, args=(broker.ws_url, share, channels, child))
            proc.start()
            pipes.append(parent)
            procs.append(proc)
        for pipe in pipes:
            assert await asyncio.to_thread(pipe.recv) == "ready"
        traffic = Traffic(broker, channels, rate=rate).start()
        await asyncio.sleep(2.0)
        config.write_text("shards = 3\n" + settings)
        code, progress, result = await asyncio.to_thread(operate, broker, "deploy")
        await asyncio.sleep(3.0)
        traffic.stop()
        finals = {channel: traffic.last(channel) for channel in channels}
        for pipe in pipes:
            pipe.send(finals)
        parts = [await asyncio.to_thread(pipe.recv) for pipe in pipes]
    finally:
        for proc in procs:
            proc.join(30)
        await asyncio.to_thread(broker.stop)
    lost = duplicated = 0
    reconnects: list[tuple[float, float]] = []
    failures = 0
    for part in parts:
        received = {tuple(key): offsets for key, offsets in part["received"]}
        for key, start in part["start"]:
            got = received.get(tuple(key), [])
            expected = set(range(start + 1, finals[key[1]] + 1))
            lost += len(expected - set(got))
            duplicated += len(got) - len(set(got))
        reconnects.extend(part["reconnects"])
        failures += len(part["lost"])
    seqs = [seq for acked in traffic.acked.values() for _, seq in acked]
    delays = [back - lost_at for lost_at, back in reconnects]
    return {
        "clients": clients, "client_processes": processes, "deploy_ok": code == 0 and result.get("ok"),
        "progress": progress, "deploy_seconds": result.get("seconds"), "fenced_ms": result.get("fenced_ms"),
        "clients_asked": result.get("clients_asked"), "reconnects": len(reconnects),
        "reconnect_delay_p50_ms": round(_percentile(delays, 0.50) * 1000, 1),
        "reconnect_delay_p99_ms": round(_percentile(delays, 0.99) * 1000, 1),
        "reconnect_delay_max_ms": round(max(delays, default=0) * 1000, 1),
        "peak_reconnects_per_second": peak_per_window([t for _, t in reconnects], 1.0),
        "reconnect_span_seconds": round(max((t for _, t in reconnects), default=0)
                                        - min((t for _, t in reconnects), default=0), 2),
        "publications_acked": len(seqs), "publish_retries_503": traffic.refused,
        "publications_lost": lost, "publications_duplicated": duplicated,
        "acked_twice": len(seqs) - len(set(seqs)), "recovery_failures": failures,
        "mean_reconnect_delay_ms": round(statistics.fmean(delays) * 1000, 1) if delays else 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=100.0, help="publications per second")
    parser.add_argument("--processes", type=int, default=4, help="client processes")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(asyncio.run(_run(args.clients, args.rate, args.processes, Path(tmp))), indent=2))


if __name__ == "__main__":
    main()
