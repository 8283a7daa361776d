"""Process set-up shared by the supervisor, the shards and the embedded broker."""
from __future__ import annotations

import asyncio
import logging
import sys

__all__ = ["new_loop", "configure_logging"]


def new_loop() -> asyncio.AbstractEventLoop:
    """uvloop where installed (a dependency on POSIX), else asyncio's own loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def configure_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
