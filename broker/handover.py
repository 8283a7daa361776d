"""State hand-over between generations (docs/operations.md "Deploy").

Every home shard journals its channels (broker.engine.journal). A new
generation's shard ``j`` of ``N`` takes over, once the old generation is
fenced (it writes nothing more), every channel whose new home is ``j``
(crc32 % N) from ALL the old journals, whatever the old shard count: the
epochs, last offsets and retained history move unchanged, so offsets go
on without a gap and clients recover exactly what they missed. The same
import continues a ``--state-dir`` left by a previous run.

Journal files are named ``journal-g<generation>-<shard>-of-<count>``.
"""
from __future__ import annotations

import glob
import logging
import os
import re

from .engine.cluster import home_of
from .engine.journal import ChannelLog, Journal, read_journal

__all__ = ["journal_path", "generation_journals", "latest_generation", "import_state", "remove_journals",
           "is_fresh"]

log = logging.getLogger("broker.handover")

_NAME = re.compile(r"journal-g(\d+)-(\d+)-of-(\d+)\Z")


def journal_path(state_dir: str, generation: int, shard: int, shards: int) -> str:
    return os.path.join(state_dir, f"journal-g{generation}-{shard}-of-{shards}")


def generation_journals(state_dir: str, generation: int) -> list[str]:
    """The journal files of one generation in ``state_dir``."""
    return sorted(path for path in glob.glob(os.path.join(state_dir, f"journal-g{generation}-*-of-*"))
                  if _NAME.match(os.path.basename(path)))


def latest_generation(state_dir: str) -> int:
    """The highest generation with a journal in ``state_dir`` (0: none)."""
    found = [int(m.group(1)) for name in os.listdir(state_dir) if (m := _NAME.match(name))] \
        if os.path.isdir(state_dir) else []
    return max(found, default=0)


def remove_journals(paths: list[str]) -> None:
    for path in paths:
        for name in (path, path + ".lock", path + ".tmp"):
            try:
                os.unlink(name)
            except FileNotFoundError:
                pass


def import_state(journal: Journal, sources: list[str], shard: int, shards: int) -> int:
    """Write into ``journal`` (a fresh one: header only) the channels homed
    on ``shard`` of ``shards`` found in the ``sources`` journals; returns
    how many. Raises OSError/JournalError when a source cannot be read."""
    mine: dict[str, ChannelLog] = {}
    for path in sources:
        for name, channel in read_journal(path).items():
            if home_of(name, shards) == shard:
                mine[name] = channel
    journal.rewrite(mine.values())
    log.info("shard %d: took over %d channel(s) from %d journal(s)", shard, len(mine), len(sources))
    return len(mine)


def is_fresh(journal: Journal) -> bool:
    """True when the journal holds nothing yet (only its file header)."""
    return journal.size <= 8
