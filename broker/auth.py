"""Who is connecting: JWTs for WebSocket clients, API keys for backends.

Pure functions over a ``Config``; no I/O. PROTOCOL.md §1 (JWT claims: ``sub``,
``exp``, optional ``channels``) and §3 (``Authorization: apikey <KEY>``).
"""
from __future__ import annotations

import hmac
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import jwt

from broker.config import Config
from broker.errors import AuthError

__all__ = [
    "Identity",
    "ANONYMOUS",
    "mint_token",
    "verify_token",
    "check_api_key",
]

_HMAC = ("HS256", "HS384", "HS512")

# PyJWT warns on every encode/decode with an HMAC secret under 32 bytes; the
# secret is the operator's choice (docs/configuration.md recommends >= 32
# bytes), and a warning per connection would flood the log.
warnings.filterwarnings("ignore", category=jwt.InsecureKeyLengthWarning)


@dataclass(frozen=True)
class Identity:
    """A connection's identity: a user (token ``sub``) or anonymous."""

    user: str | None
    channels: frozenset[str] = frozenset()   # extra channels the token grants
    anonymous: bool = False
    expires: float | None = None             # the token's exp (unix seconds); None: never


ANONYMOUS = Identity(user=None, channels=frozenset(), anonymous=True)


def mint_token(secret: str, sub: str, ttl: float | None = 3600,
               channels: Iterable[str] | None = None, algorithm: str = "HS256") -> str:
    """A signed JWT for user ``sub`` valid for ``ttl`` seconds.

    A negative ``ttl`` gives an already-expired token (for tests); ``None``
    gives a token without ``exp``. For RS*/ES* algorithms ``secret`` is the
    PEM private key.
    """
    now = int(time.time())
    payload: dict[str, object] = {"sub": str(sub), "iat": now}
    if ttl is not None:
        payload["exp"] = int(now + ttl) if ttl >= 0 else min(int(now + ttl), now - 1)
    if channels is not None:
        payload["channels"] = list(channels)
    return jwt.encode(payload, secret, algorithm=algorithm)


def _key_for(algorithm: str, config: Config) -> tuple[str, list[str]]:
    allowed = set(config.jwt.algorithms)
    if config.jwt.public_key is not None:
        allowed.add("RS256")
    if algorithm not in allowed:
        raise AuthError(f"token algorithm {algorithm} is not accepted")
    if algorithm in _HMAC:
        if not config.jwt_secret:
            raise AuthError("token authentication is not configured (no JWT secret)")
        return config.jwt_secret, [algorithm]
    if not config.jwt.public_key:
        raise AuthError("token authentication is not configured (no JWT public key)")
    return config.jwt.public_key, [algorithm]


def verify_token(token: str | None, config: Config) -> Identity:
    """The identity a token proves, or AuthError with a human message."""
    if not token:
        raise AuthError("missing token")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.InvalidTokenError:
        raise AuthError("malformed token") from None
    algorithm = header.get("alg")
    if not isinstance(algorithm, str) or algorithm.lower() == "none":
        raise AuthError("unsigned tokens are not accepted")
    key, algorithms = _key_for(algorithm, config)
    required = ["sub", "exp"] if config.jwt.require_exp else ["sub"]
    try:
        claims = jwt.decode(token, key, algorithms=algorithms, leeway=config.jwt.leeway,
                            options={"require": required, "verify_aud": False})
    except jwt.ExpiredSignatureError:
        raise AuthError("token expired") from None
    except jwt.ImmatureSignatureError:
        raise AuthError("token not yet valid") from None
    except jwt.InvalidSignatureError:
        raise AuthError("token signature is invalid") from None
    except jwt.MissingRequiredClaimError as exc:
        raise AuthError(f"token has no {exc.claim!r} claim") from None
    except jwt.DecodeError:
        raise AuthError("malformed token") from None
    except jwt.InvalidTokenError as exc:
        raise AuthError(f"invalid token: {exc}") from None
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise AuthError("token 'sub' claim must be a non-empty string")
    channels = claims.get("channels", [])
    if not isinstance(channels, list) or not all(isinstance(c, str) for c in channels):
        raise AuthError("token 'channels' claim must be a list of channel names")
    exp = claims.get("exp")
    expires = float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool) else None
    return Identity(user=sub, channels=frozenset(channels), anonymous=False, expires=expires)


def check_api_key(header_value: str | None, config: Config) -> bool:
    """Does ``Authorization: apikey <KEY>`` carry the configured key?

    No configured key means the server API is open (docs/configuration.md);
    the server logs a warning at startup in that case. Constant-time compare.
    """
    if config.api_key is None:
        return True
    if not header_value:
        return False
    scheme, _, key = header_value.strip().partition(" ")
    if scheme.lower() != "apikey":
        return False
    return hmac.compare_digest(key.strip().encode(), config.api_key.encode())
