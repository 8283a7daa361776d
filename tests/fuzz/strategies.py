"""Hypothesis strategies shared by the fuzz tests: JSON values, commands as
clients (and attackers) write them, and client WebSocket frames."""
from __future__ import annotations

import json
import os
import struct

from hypothesis import strategies as st

JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) \
    | st.text(max_size=20)
JSON = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)

CHANNELS = st.one_of(
    st.sampled_from(["bill:1", "user:u", "room:7", "nope:1", "bill:", "bill", "", ":x", "bill:a b"]),
    st.from_regex(r"\A(bill|user|room)[:][A-Za-z0-9_\-:.@]{0,20}\Z"),
    st.text(max_size=40),
    st.integers(), st.none(), st.lists(st.text(max_size=3), max_size=2),
)

# Non-string, unhashable ops (lists, objects) are left out: they hit a known
# bug (protocol.py, pinned by tests/integration/test_hostile.py and
# test_fuzz_protocol.py::test_regression_unhashable_op). Add them back with the fix.
OPS = st.one_of(st.sampled_from(["subscribe", "unsubscribe", "publish", "ping", "refresh", "pub", ""]),
                st.text(max_size=10), st.integers(), st.none(), st.booleans())

IDS = st.one_of(st.none(), st.integers(), st.floats(allow_nan=False), st.text(max_size=4), st.booleans())

RECOVER = st.one_of(st.none(), st.fixed_dictionaries({"epoch": st.text(max_size=8) | st.integers(),
                                                      "offset": st.integers() | st.text(max_size=3)}),
                    JSON)


@st.composite
def commands(draw) -> dict:
    """A command object: well formed or not, field by field."""
    obj: dict = {}
    if draw(st.booleans()):
        obj["id"] = draw(IDS)
    obj["op"] = draw(OPS)
    if draw(st.integers(0, 9)) > 0:
        obj["channel"] = draw(CHANNELS)
    if draw(st.booleans()):
        obj["data"] = draw(JSON)
    if draw(st.integers(0, 3)) == 0:
        obj["recover"] = draw(RECOVER)
    if draw(st.integers(0, 5)) == 0:
        obj[draw(st.text(max_size=5))] = draw(JSON)
    return obj


def client_frame(opcode: int, payload: bytes, fin: bool = True, rsv: int = 0, mask: bool = True) -> bytes:
    """One client frame (RFC 6455 §5.2), masked unless told otherwise."""
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    length = len(payload)
    bit = 0x80 if mask else 0
    if length < 126:
        head += bytes([bit | length])
    elif length < 65536:
        head += bytes([bit | 126]) + struct.pack("!H", length)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", length)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


@st.composite
def fragmented(draw, payload: bytes, opcode: int = 0x1) -> bytes:
    """``payload`` as one message split into 1..4 frames."""
    cuts = sorted(draw(st.lists(st.integers(0, len(payload)), max_size=3)))
    parts = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)], strict=True)]
    out = b""
    for i, part in enumerate(parts):
        out += client_frame(opcode if i == 0 else 0x0, part, fin=i == len(parts) - 1)
    return out


@st.composite
def frames(draw) -> bytes:
    """Any client frame, valid or hostile: every opcode, RSV bits, masking,
    lengths beyond the payload, control frames of any size."""
    opcode = draw(st.sampled_from([0x0, 0x1, 0x2, 0x3, 0x8, 0x9, 0xA, 0xB, 0xF]))
    payload = draw(st.binary(max_size=300))
    if draw(st.booleans()):
        payload = json.dumps(draw(commands())).encode()
    return client_frame(opcode, payload, fin=draw(st.booleans()) or opcode >= 0x8,
                        rsv=draw(st.sampled_from([0, 0, 0, 1, 2, 4])), mask=draw(st.integers(0, 9)) > 0)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` split at ``cuts`` (as TCP may deliver it)."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True) if b > a] or [data]
