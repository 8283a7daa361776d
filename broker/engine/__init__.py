"""Engines sequence channels: epoch, next offset, history, and hand each
accepted publication to the shard for delivery.

The shard talks only to the ``Engine`` interface, so the in-process memory
engine (one host) and a Redis engine (many hosts) are interchangeable.
"""
from .base import Engine, Position, Recovery
from .memory import MemoryEngine

__all__ = ["Engine", "Position", "Recovery", "MemoryEngine"]
