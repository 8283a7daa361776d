"""Fixtures for the Socket.IO adapter's tests: real Node peers.

``node_client(url, **options)`` starts ``node/client.js`` (socket.io-client;
options as in its header: channels, token, transports, count, timeout,
recover, reconnection) and returns a ``NodeClient``; every client started is
closed at teardown. ``socketio_baseline`` is the Node socket.io server
baseline, running. Both install their npm packages once, on first use.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from .nodeclient import NodeBaseline, NodeClient


@pytest.fixture
def node_client(tmp_path) -> Iterator[Callable[..., NodeClient]]:
    started: list[NodeClient] = []

    def start(url: str, **options: Any) -> NodeClient:
        client = NodeClient(url, options, log_path=str(tmp_path / f"node-client-{len(started)}.log"))
        started.append(client)
        return client

    yield start
    for client in started:
        client.close()


@pytest.fixture
def socketio_baseline(tmp_path) -> Iterator[NodeBaseline]:
    baseline = NodeBaseline(log_path=str(tmp_path / "socketio-baseline.log"))
    yield baseline
    baseline.stop()


@pytest.fixture
def pyclient() -> Iterator[Callable[[], Any]]:
    """python-socketio clients (test_broker.PySocketIO), closed at teardown."""
    from .test_broker import PySocketIO

    made: list[PySocketIO] = []

    def make() -> PySocketIO:
        made.append(PySocketIO())
        return made[-1]

    yield make
    for client in made:
        client.close()
