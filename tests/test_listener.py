"""Why every generation shares ONE listening socket (docs/operations.md):
a connection waiting in the accept queue of a closed SO_REUSEPORT listener
is reset, while closing one process's copy of a shared listening socket
leaves the queue to the others. Real kernel sockets, no broker."""
import os
import socket


from broker.sockets import bind_shared

CLIENTS = 24


def _connect_all(port: int) -> list[socket.socket]:
    clients = []
    for _ in range(CLIENTS):
        client = socket.create_connection(("127.0.0.1", port), timeout=5)
        client.sendall(b"hello")
        clients.append(client)
    return clients


def _reset(client: socket.socket) -> bool:
    client.settimeout(0.3)
    try:
        return client.recv(1) == b""  # EOF: closed without being served
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def test_closing_a_reuseport_listener_drops_its_queued_connections():
    first = bind_shared("127.0.0.1", 0)
    port = first.getsockname()[1]
    second = bind_shared("127.0.0.1", port)
    first.listen(64)
    second.listen(64)
    clients = _connect_all(port)  # queued, spread by the kernel over both
    first.close()                 # the "old generation" stops listening
    dropped = sum(_reset(client) for client in clients)
    second.close()
    for client in clients:
        client.close()
    assert dropped > 0, "every queued connection survived: the kernel spread none to the closed one"


def test_closing_one_copy_of_a_shared_listener_keeps_every_queued_connection():
    owner = bind_shared("127.0.0.1", 0)  # the supervisor's
    owner.listen(64)
    port = owner.getsockname()[1]
    old = socket.socket(fileno=os.dup(owner.fileno()))  # what a shard inherits
    new = socket.socket(fileno=os.dup(owner.fileno()))
    clients = _connect_all(port)
    old.close()                   # the old generation stops accepting
    new.settimeout(5)
    served = []
    for _ in range(CLIENTS):
        conn, _ = new.accept()
        assert conn.recv(5) == b"hello"
        conn.sendall(b"!")
        served.append(conn)
    assert all(client.recv(1) == b"!" for client in clients)
    for sock in (*served, *clients, new, owner):
        sock.close()
