"""The native WebSocket protocol (PROTOCOL.md §1): NDJSON commands at ``/ws``."""
