"""Coverage-guided fuzz target (atheris, libFuzzer) for the WebSocket frame
reader as the broker configures it and the native command decoder.

    python tools/fuzz_commands.py [libFuzzer flags] [CORPUS_DIR ...]
    python tools/fuzz_commands.py -max_total_time=3600 -jobs=2 fuzz-corpus/   # an hour
    python tools/fuzz_commands.py crash-<sha1>                                # replay a crash

The first input byte picks the path: the command decoder
(broker.adapters.native.protocol.parse_message on text), or the frame reader
(broker.testing.inbound_pipeline: websockets' Protocol, permessage-deflate
when asked, reassembly, UTF-8, then parse_message) on bytes split in up to
four chunks. A crash is any exception, or a close code of the server's own
that PROTOCOL.md §1 does not name (echoing a client's close is fine). libFuzzer
writes the input as crash-<sha1>; turn it into a
regression test (tests/fuzz/, tests/integration/test_hostile.py).

Known bugs still open are tolerated so the search goes on past them, each
named in KNOWN_BUGS; FUZZ_STRICT=1 makes them crashes too.
"""
from __future__ import annotations

import os
import sys
import traceback

import atheris

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

with atheris.instrument_imports(include=["broker", "websockets"]):
    from broker.errors import ProtocolViolation
    from broker.adapters.native.protocol import Command, parse_message
    from broker.testing import inbound_pipeline

CLOSE_CODES = {None, 1000, 1002, 1003, 1007, 1009}
LIMIT = 4096
STRICT = os.environ.get("FUZZ_STRICT") == "1"

#: (exception type, text in its message, function it is raised in): the
#: open bugs, reported in docs/hostile-input.md. Remove an entry with its fix.
KNOWN_BUGS: list[tuple[type[BaseException], str, str]] = []


def _known(exc: BaseException) -> bool:
    if STRICT:
        return False
    where = [frame.name for frame in traceback.extract_tb(exc.__traceback__)]
    return any(isinstance(exc, kind) and text in str(exc) and func in where for kind, text, func in KNOWN_BUGS)


def _check_commands(items: list) -> None:
    for item in items:
        if isinstance(item, ProtocolViolation):
            assert item.code in (400, 404), item.code
        else:
            assert isinstance(item, Command), item


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 2)
    try:
        if mode == 0:
            text = fdp.ConsumeUnicodeNoSurrogates(fdp.remaining_bytes())
            _check_commands(parse_message(text))
            return
        cuts = sorted(fdp.ConsumeIntInRange(0, 4096) for _ in range(fdp.ConsumeIntInRange(0, 3)))
        wire = fdp.ConsumeBytes(fdp.remaining_bytes())
        chunks = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True) if b > a] or [wire]
        result = inbound_pipeline(chunks, max_size=LIMIT, compression=mode == 2)
        # the server closes with a code of its own, or echoes the client's
        assert result.echoed or result.close_code in CLOSE_CODES, result.close_code
        _check_commands(result.commands)
    except Exception as exc:  # the fuzzer decides what a crash is
        if _known(exc):
            return
        raise


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
