"""Socket.IO v4 clients (Engine.IO protocol 4, Socket.IO protocol 5), PROTOCOL.md §4.

``packets``: encoding and decoding of both protocols' packets (Sans-I/O).
``engine``: one Engine.IO session's state machine over polling and WebSocket
(Sans-I/O: requests and messages in, effects out; it holds no socket).
"""
