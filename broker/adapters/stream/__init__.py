"""The backend stream (PROTOCOL.md §3, ``GET /api/stream``): a persistent,
pipelined, API-key-authenticated WebSocket for backends that publish a lot."""
