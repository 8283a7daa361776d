"""TLS for the listener: ``tls_cert`` / ``tls_key`` make the port serve
``wss://`` and ``https://`` (PROTOCOL.md §1).

``server_context`` builds the one ``ssl.SSLContext`` a shard hands to
``loop.create_server(ssl=...)``; the config check calls it too, so a
certificate or key that cannot be loaded stops ``broker serve`` before it
starts, with an error naming the key (exit 2).

Every byte of a TLS connection must go through the transport's SSL layer:
a direct write to the raw socket (the shard's C flush) would put plaintext
on the wire. ``is_tls`` tells the shard which transports those are.
"""
from __future__ import annotations

import asyncio
import os
import ssl
from typing import TYPE_CHECKING

from broker.errors import ConfigError

if TYPE_CHECKING:
    from broker.config import Config

__all__ = ["server_context", "load_server_context", "is_tls"]


def _readable(key: str, path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror or exc}") from None


def load_server_context(cert: str, key: str) -> ssl.SSLContext:
    """A server context for the PEM certificate chain ``cert`` and its
    private key ``key``: TLS 1.2 or newer, the ssl module's default ciphers,
    ALPN ``http/1.1`` (WebSocket upgrades ride on HTTP/1.1). Raises
    ``ConfigError`` naming ``tls_cert`` or ``tls_key``."""
    cert_pem = _readable("tls_cert", cert)
    key_pem = _readable("tls_key", key)
    if b"-----BEGIN CERTIFICATE-----" not in cert_pem:
        raise ConfigError("tls_cert", f"{cert} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    if b"PRIVATE KEY-----" not in key_pem:
        raise ConfigError("tls_key", f"{key} holds no PEM private key (-----BEGIN ... PRIVATE KEY-----)")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    # No TLS 1.3 session tickets: each shard process has its own ticket key,
    # so a ticket would resume only on the shard that issued it, and the
    # tickets sent after the handshake left about one Python client in
    # eight (websockets, ssl module) waiting forever for its upgrade
    # response on a fresh 2-shard broker (34 runs without them, none did).
    context.num_tickets = 0
    try:
        context.load_cert_chain(os.path.abspath(cert), os.path.abspath(key))
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        if "KEY_VALUES_MISMATCH" in str(reason).upper():
            raise ConfigError("tls_key", f"{key} is not the private key of the certificate in {cert}") from None
        if "PEM" in str(reason).upper() and "CERT" in str(exc).upper():
            raise ConfigError("tls_cert", f"cannot load {cert}: {reason}") from None
        raise ConfigError("tls_key", f"cannot load {key} with {cert}: {reason}") from None
    return context


def server_context(config: Config) -> ssl.SSLContext | None:
    """The listener's context, or None when TLS is not configured."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    return load_server_context(config.tls_cert, config.tls_key)


def is_tls(transport: asyncio.BaseTransport) -> bool:
    """Does this transport encrypt? Then nothing may bypass it."""
    return transport.get_extra_info("sslcontext") is not None
