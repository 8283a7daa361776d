"""Pytest helpers that run one suite against both fastpath implementations.

A compiled module that does not import is a FAILURE, not a skip: the test
command builds the extension, so its absence means the build is broken.
"""
from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest

from . import load

IMPLEMENTATIONS = ("compiled", "pure")


def fastpath_fixture(name: str) -> Any:  # pytest's fixture type is private
    """A fixture giving the module ``name`` once per implementation."""

    @pytest.fixture(params=IMPLEMENTATIONS, ids=lambda impl: f"{name}-{impl}")
    def fixture(request: pytest.FixtureRequest) -> ModuleType:
        try:
            return load(name, request.param)
        except ImportError as exc:  # pragma: no cover - a broken build
            pytest.fail(f"compiled fastpath module {name!r} did not import: {exc}")

    return fixture
