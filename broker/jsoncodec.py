"""The one JSON codec of client and backend data: strict in, compact out.

Every adapter and the server API decode with ``decode_json`` (NaN, Infinity
and absurd nesting refused, so every stored payload is valid JSON) and encode
with ``encode_json`` (compact, no newlines: a publication's bytes are made
once and shared by every subscriber and every protocol).
"""
from __future__ import annotations

import json
from typing import Any

__all__ = ["decode_json", "encode_json"]

_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_decoder = json.JSONDecoder(parse_constant=_reject_constant)


def decode_json(text: str | bytes) -> Any:
    """Strict JSON decoding; raises ValueError (also for absurd nesting)."""
    try:
        return _decoder.decode(text if isinstance(text, str) else text.decode())
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def encode_json(value: Any) -> bytes:
    """Compact JSON as UTF-8 bytes: the one serialization of client data."""
    return _encoder.encode(value).encode()
