"""The broker runs the fastpath the test command built, never a quiet mix.

``broker._fastpath`` falls back module by module, so a build that compiled
only some modules still runs, as "partial". The test command builds every
module (``pip install -e .``), so anything but "compiled" here is a broken
build, and it fails the suite (under CI=true and everywhere else), like a
compiled module that does not import fails the fastpath suites.
"""
from __future__ import annotations

import os
import subprocess
import sys

import broker._fastpath as fastpath


def _implementation(code: str = "", **env: str) -> str:
    """IMPLEMENTATION as a fresh interpreter sees it, after running ``code``."""
    clean = {k: v for k, v in os.environ.items() if k != "BROKER_PURE_PYTHON"}
    result = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport broker._fastpath as f\nprint(f.IMPLEMENTATION)"],
        env={**clean, **env}, capture_output=True, text=True, timeout=60, check=True)
    return result.stdout.strip()


def test_the_fastpath_in_use_is_the_one_asked_for() -> None:
    expected = "pure-python" if fastpath.PURE_PYTHON else "compiled"
    assert fastpath.IMPLEMENTATION == expected, "a partial or missing build: run `pip install -e .`"
    for name in fastpath.MODULES:
        module = sys.modules[f"broker._fastpath.{name}" + ("_py" if fastpath.PURE_PYTHON else "")]
        assert module.__file__ is not None
        assert module.__file__.endswith(".py" if fastpath.PURE_PYTHON else ".so")


def test_a_partial_build_is_reported_as_partial() -> None:
    """What the check above catches: one module that fails to import."""
    assert _implementation() == "compiled"
    assert _implementation("import sys; sys.modules['broker._fastpath.frames'] = None") == "partial"
    assert _implementation(BROKER_PURE_PYTHON="1") == "pure-python"
