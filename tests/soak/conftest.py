"""Soak runs: long, left out of the default run (`-m "not soak"` in pytest's
addopts). Run them with `python -m pytest -m soak`; BROKER_SOAK_SECONDS
bounds each one (CI runs a short slice, a developer a long one)."""
from __future__ import annotations

import os

import pytest


@pytest.fixture
def soak_seconds() -> float:
    """How long one soak test keeps its load going (default: 120 s)."""
    return float(os.environ.get("BROKER_SOAK_SECONDS", "120"))
