import signal
import subprocess

import pytest

from broker.testing import BrokerProcess


@pytest.fixture
def broker_factory(tmp_path):
    """Start real ``broker serve`` processes; all are stopped at teardown."""
    started: list[BrokerProcess] = []

    def start(*args: str, env: dict[str, str] | None = None, **kwargs) -> BrokerProcess:
        proc = BrokerProcess(args=list(args), env=env or {},
                             log_path=str(tmp_path / f"broker-{len(started)}.log"), **kwargs)
        started.append(proc)
        return proc.start()

    yield start
    # SIGTERM first: a supervisor that exits normally saves its coverage data
    # (a killed one records nothing); a broker still draining after a few
    # seconds is killed, so teardown stays short.
    running = [p.process for p in started if p.process is not None and p.process.poll() is None]
    for process in running:
        process.send_signal(signal.SIGTERM)
    for process in running:
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def broker(broker_factory) -> BrokerProcess:
    """One running broker (one shard) with an API key, a JWT secret and anonymous access."""
    return broker_factory("--shards", "1", "--allow-anonymous")
