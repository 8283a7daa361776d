"""Helpers for tests and tools that drive a real ``broker serve`` process.

Nothing here is used by the broker itself; it lives in the package so the
test suite, the benchmarks and tools/ share one way to start a broker.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import ssl

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from .sockets import free_port
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = ["free_port", "BrokerProcess", "http_json", "self_signed_cert", "InboundResult",
           "inbound_pipeline"]


@dataclass
class InboundResult:
    """What a server connection made of a client's bytes."""

    commands: list[Any] = field(default_factory=list)  # Command | ProtocolViolation, in order
    close_code: int | None = None                  # the server's close code, if it closes
    echoed: bool = False                           # ... echoing the client's close frame


def inbound_pipeline(chunks: Iterable[bytes], max_size: int = 65536,
                     compression: bool = False) -> InboundResult:
    """The client-to-server path of a WebSocket connection as the broker
    configures it (broker.connection: websockets' Sans-I/O Protocol in state
    OPEN, permessage-deflate without context takeover, text reassembly,
    binary 1003, UTF-8 1007, then broker.adapters.native.protocol.parse_message), without
    sockets, for fuzzing. Feeds ``chunks`` in order, as TCP might split them."""
    from websockets.frames import Frame, Opcode
    from websockets.protocol import OPEN, Protocol, Side

    from .handshake import _negotiate_deflate
    from .adapters.native.protocol import parse_message

    ws = Protocol(Side.SERVER, state=OPEN, max_size=max_size)
    if compression:
        extension = _negotiate_deflate("permessage-deflate")[1]
        assert extension is not None  # the plain offer is always accepted
        ws.extensions = [extension]
    result = InboundResult()
    fragments: list[bytes] | None = None
    for chunk in chunks:
        ws.receive_data(chunk)
        for frame in ws.events_received():
            assert isinstance(frame, Frame)  # a server-side Protocol in state OPEN yields frames only
            payload: bytes | None = None
            if frame.opcode is Opcode.BINARY:
                result.close_code = 1003
                return result
            if frame.opcode is Opcode.TEXT:
                if frame.fin:
                    payload = bytes(frame.data)
                else:
                    fragments = [bytes(frame.data)]
            elif frame.opcode is Opcode.CONT and fragments is not None:
                fragments.append(bytes(frame.data))
                if frame.fin:
                    payload, fragments = b"".join(fragments), None
            if payload is not None:
                try:
                    text = payload.decode("utf-8")
                except UnicodeDecodeError:
                    result.close_code = 1007
                    return result
                result.commands.extend(parse_message(text))
        ws.data_to_send()
        if ws.close_sent is not None:
            result.close_code = ws.close_sent.code
            result.echoed = ws.close_rcvd is not None and ws.close_rcvd.code == ws.close_sent.code
            return result
    return result


def self_signed_cert(directory: str, host: str = "127.0.0.1") -> tuple[str, str]:
    """Write a fresh self-signed certificate for ``host`` (an IP address or a
    name) and its key as PEM files in ``directory``; returns (cert, key).
    For tests: a client trusts it by loading the certificate as its CA."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    try:
        alt: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        alt = x509.DNSName(host)
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([alt]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path = os.path.join(directory, "cert.pem")
    key_path = os.path.join(directory, "key.pem")
    with open(cert_path, "wb") as fh:
        fh.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    return cert_path, key_path


def http_json(method: str, url: str, body: object | bytes | None = None,
              headers: dict[str, str] | None = None, timeout: float = 10.0,
              context: ssl.SSLContext | None = None) -> tuple[int, object]:
    """One HTTP request; returns (status, parsed JSON body or raw text)."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode("utf-8", "replace")


@dataclass
class BrokerProcess:
    """A ``broker serve`` subprocess on a free port; stop() sends SIGTERM."""

    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    api_key: str = "test-api-key"
    jwt_secret: str = "test-jwt-secret-long-enough-for-hs256!"
    port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"
    process: subprocess.Popen[bytes] | None = None
    log_path: str | None = None
    tls_ca: str | None = None   # the broker serves TLS; clients trust this certificate
    nofile: int | None = None   # RLIMIT_NOFILE (soft and hard) of the broker's processes

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        if self.tls_ca is None:
            return None
        import ssl

        return ssl.create_default_context(cafile=self.tls_ca)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls_ca else 'http'}://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"{'wss' if self.tls_ca else 'ws'}://{self.host}:{self.port}/ws"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "broker", "serve", "--host", self.host,
                "--port", str(self.port), "--api-key", self.api_key,
                "--jwt-secret", self.jwt_secret, *self.args]

    def start(self, timeout: float = 60.0) -> BrokerProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(self.command(), env=env, stdout=log, stderr=subprocess.STDOUT,
                                        preexec_fn=self._limits if self.nofile else None)
        self.wait_ready(timeout)
        return self

    def _limits(self) -> None:
        import resource

        assert self.nofile is not None
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"broker exited early with {self.process.returncode}")
            try:
                status, _ = http_json("GET", self.url + "/readyz", timeout=1.0, context=self.ssl_context)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"broker on port {self.port} not ready after {timeout}s")

    def api(self, method: str, path: str, body: object | bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, object]:
        return http_json(method, self.url + path, body,
                         {"Authorization": f"apikey {self.api_key}", **(headers or {})},
                         context=self.ssl_context)

    def publish(self, channel: str, data: object) -> dict[str, Any]:
        status, reply = self.api("POST", "/api/publish", {"channel": channel, "data": data})
        if status != 200:
            raise AssertionError(f"publish failed: {status} {reply}")
        return reply  # type: ignore[return-value]

    def token(self, sub: str, ttl: float = 3600, **claims: object) -> str:
        import jwt

        payload = {"sub": sub, "exp": int(time.time() + ttl), **claims}
        return jwt.encode(payload, self.jwt_secret, algorithm="HS256")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Signal the broker and wait; returns its exit code."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise
        return self.process.returncode

    def __enter__(self) -> BrokerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
