"""The compiled core, and the one place that chooses it.

Every piece here exists twice: a Cython module ``<name>`` (built by
``pip install``) and a pure-Python twin ``<name>_py`` with the same API and
the same behaviour. ``BROKER_PURE_PYTHON=1`` forces the twins (run time);
otherwise each compiled module is used when it imports, and its twin when it
does not (a machine without a compiler still runs the broker, slower).

Import fastpath names from this package only, never from the modules.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import TYPE_CHECKING

__all__ = [
    "MODULES",
    "IMPLEMENTATION",
    "PURE_PYTHON",
    "load",
    "RingBuffer",
    "OutboundTable",
    "FRAMING_NATIVE",
    "FRAMING_EIO_WS",
    "FRAMING_POLLING",
    "Deflater",
    "frame_header",
    "text_frame",
    "ndjson_batch",
    "SharedFrames",
    "SubscriptionTable",
    "HistoryWindow",
]

MODULES = ("ringbuf", "frames", "subtable", "history")

PURE_PYTHON = os.environ.get("BROKER_PURE_PYTHON", "") not in ("", "0")


def load(name: str, implementation: str) -> ModuleType:
    """Import one fastpath module: ``implementation`` is "compiled" or "pure".

    Raises ImportError when the compiled module is asked for and not built;
    tests use this to run one suite against both.
    """
    if name not in MODULES:
        raise ValueError(f"unknown fastpath module {name!r}")
    if implementation == "compiled":
        module = importlib.import_module(f"{__name__}.{name}")
        if not getattr(module, "__file__", "").endswith((".so", ".pyd")):
            raise ImportError(f"{__name__}.{name} is not compiled")
        return module
    if implementation == "pure":
        return importlib.import_module(f"{__name__}.{name}_py")
    raise ValueError(f"unknown implementation {implementation!r}")


def _choose() -> tuple[dict[str, ModuleType], str]:
    chosen: dict[str, ModuleType] = {}
    compiled = 0
    for name in MODULES:
        if not (PURE_PYTHON or TYPE_CHECKING):
            try:
                chosen[name] = load(name, "compiled")
                compiled += 1
                continue
            except ImportError:
                pass
        chosen[name] = load(name, "pure")
    if compiled == len(MODULES):
        return chosen, "compiled"
    if compiled == 0:
        return chosen, "pure-python"
    return chosen, "partial"


_modules, IMPLEMENTATION = _choose()

RingBuffer = _modules["ringbuf"].RingBuffer
OutboundTable = _modules["ringbuf"].OutboundTable
FRAMING_NATIVE: int = _modules["ringbuf"].FRAMING_NATIVE
FRAMING_EIO_WS: int = _modules["ringbuf"].FRAMING_EIO_WS
FRAMING_POLLING: int = _modules["ringbuf"].FRAMING_POLLING
Deflater = _modules["frames"].Deflater
frame_header = _modules["frames"].frame_header
text_frame = _modules["frames"].text_frame
ndjson_batch = _modules["frames"].ndjson_batch
SharedFrames = _modules["frames"].SharedFrames
SubscriptionTable = _modules["subtable"].SubscriptionTable
HistoryWindow = _modules["history"].HistoryWindow
