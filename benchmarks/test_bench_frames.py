"""Frames and permessage-deflate, compiled vs pure (same session).

Compare the ``frames-compiled`` and ``frames-pure`` rows of each test:
    python -m pytest benchmarks/test_bench_frames.py --benchmark-enable -q -p no:cacheprovider
"""
from __future__ import annotations

import json
import zlib

LINES = [json.dumps({"op": "pub", "ch": "prices.eu", "o": 1000 + i,
                     "data": {"sym": f"S{i:03d}", "px": 100.25 + i, "q": i * 7}},
                    separators=(",", ":")).encode() + b"\n" for i in range(40)]
BATCH = b"".join(LINES)
while len(BATCH) < 2048:
    BATCH += BATCH
BATCH = BATCH[:2047].rsplit(b"\n", 1)[0] + b"\n"  # ~2 KB of whole lines
LOOKUPS = 5_000


def test_batch_frame_2k(benchmark, frames):
    frame = benchmark(frames.batch_frame, BATCH)
    assert frame[2 + 2:] == BATCH[:-1]


def test_deflater_compress_2k(benchmark, frames):
    deflater = frames.Deflater()
    out = benchmark(deflater.compress, BATCH[:-1])
    assert 0 < len(out) < len(BATCH)


def test_shared_frames_5000_lookups(benchmark, frames):
    """A flush where 5,000 connections hold the same batch (equal bytes,
    distinct objects as take() returns them): one compression, 5,000 hits."""
    pendings = [bytes(bytearray(BATCH)) for _ in range(LOOKUPS)]
    shared = frames.SharedFrames(frames.Deflater())
    flushes = 0

    def flush():
        nonlocal flushes
        flushes += 1
        shared.clear()
        batch_frame = shared.batch_frame
        for pending in pendings:
            frame = batch_frame(pending, True)
        return frame

    before = shared.compressions
    frame = benchmark(flush)
    assert shared.compressions - before == flushes, "one compression per flush, not one per connection"
    # A final, compressed (RSV1) text frame whose payload inflates back to the batch.
    assert frame[0] == 0x80 | 0x40 | frames.OP_TEXT and frame[1] == 126
    payload = frame[4:]
    assert len(payload) == int.from_bytes(frame[2:4], "big")
    assert zlib.decompressobj(-15).decompress(payload + b"\x00\x00\xff\xff") == BATCH[:-1]
