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
    for proc in started:
        if proc.process is not None and proc.process.poll() is None:
            proc.process.kill()
            proc.process.wait()


@pytest.fixture
def broker(broker_factory) -> BrokerProcess:
    """One running broker (one shard) with an API key, a JWT secret and anonymous access."""
    return broker_factory("--shards", "1", "--allow-anonymous")
