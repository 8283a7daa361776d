"""JWT minting/verification and API-key checks (PROTOCOL.md §1, §3)."""
import base64
import dataclasses
import hashlib
import hmac
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from broker.auth import ANONYMOUS, Identity, check_api_key, mint_token, verify_token
from broker.config import Config, JwtSettings
from broker.errors import AuthError

SECRET = "a-test-secret-that-is-long-enough-for-hs256-and-for-hs512-too-0123456789"


def config(**kwargs) -> Config:
    return Config(jwt_secret=SECRET, **kwargs)


def refused(token, cfg=None) -> str:
    with pytest.raises(AuthError) as info:
        verify_token(token, cfg or config())
    return str(info.value)


def test_mint_and_verify():
    token = mint_token(SECRET, "42", channels=["user:7", "bill:1"])
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert claims["sub"] == "42" and claims["exp"] > time.time() + 3500
    assert verify_token(token, config()) == Identity("42", frozenset({"user:7", "bill:1"}), False,
                                                     expires=float(claims["exp"]))


def test_identity_is_frozen():
    identity = verify_token(mint_token(SECRET, "1"), config())
    assert identity.channels == frozenset() and identity.anonymous is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        identity.user = "2"  # type: ignore[misc]
    assert ANONYMOUS.anonymous and ANONYMOUS.user is None


def test_negative_ttl_is_expired():
    token = mint_token(SECRET, "1", ttl=-1)
    assert jwt.decode(token, SECRET, algorithms=["HS256"], options={"verify_exp": False})["exp"] < time.time()
    assert "expired" in refused(token)


def test_leeway_accepts_recently_expired():
    token = mint_token(SECRET, "1", ttl=-2)
    assert verify_token(token, config(jwt=JwtSettings(leeway=30))).user == "1"


def test_missing_and_garbage_tokens():
    assert "missing" in refused(None)
    assert "missing" in refused("")
    assert "malformed" in refused("not-a-jwt")
    assert "malformed" in refused("a.b.c")


def test_wrong_signature():
    assert "signature" in refused(mint_token("another-secret-of-enough-length-0123456789", "1"))


def test_exp_required_unless_configured():
    token = mint_token(SECRET, "1", ttl=None)
    assert "'exp'" in refused(token)
    relaxed = config(jwt=JwtSettings(require_exp=False))
    assert verify_token(token, relaxed).user == "1"


def test_sub_required_and_string():
    no_sub = jwt.encode({"exp": int(time.time()) + 60}, SECRET, algorithm="HS256")
    assert "'sub'" in refused(no_sub)
    numeric = jwt.encode({"sub": 5, "exp": int(time.time()) + 60}, SECRET, algorithm="HS256")
    refused(numeric)


def test_channels_claim_must_be_list_of_strings():
    bad = jwt.encode({"sub": "1", "exp": int(time.time()) + 60, "channels": "user:2"}, SECRET, algorithm="HS256")
    assert "channels" in refused(bad)


def test_unsigned_and_disallowed_algorithms():
    unsigned = jwt.encode({"sub": "1", "exp": int(time.time()) + 60}, None, algorithm="none")
    refused(unsigned)
    hs512 = jwt.encode({"sub": "1", "exp": int(time.time()) + 60}, SECRET, algorithm="HS512")
    assert "HS512" in refused(hs512)
    assert verify_token(hs512, config(jwt=JwtSettings(algorithms=("HS256", "HS512")))).user == "1"


def test_no_secret_configured():
    assert "not configured" in refused(mint_token(SECRET, "1"), Config())


def test_not_yet_valid():
    token = jwt.encode({"sub": "1", "exp": int(time.time()) + 600, "nbf": int(time.time()) + 300},
                       SECRET, algorithm="HS256")
    assert "not yet valid" in refused(token)


def test_rs256_with_public_key():
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()).decode()
    public_pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    cfg = config(jwt=JwtSettings(public_key=public_pem))
    token = mint_token(private_pem, "rs-user", algorithm="RS256")
    assert verify_token(token, cfg).user == "rs-user"
    # HS256 with the secret still works beside it.
    assert verify_token(mint_token(SECRET, "hs-user"), cfg).user == "hs-user"
    # Without the public key, RS256 is refused.
    assert "RS256" in refused(token)
    # Algorithm confusion: an HS256 token whose HMAC key is the public key
    # text must not verify (the HMAC key is only ever the secret).
    assert "signature" in refused(hs256_signed_with(public_pem, {"sub": "evil", "exp": 9999999999}), cfg)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other_pem = other.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()).decode()
    assert "signature" in refused(mint_token(other_pem, "evil", algorithm="RS256"), cfg)


def hs256_signed_with(key: str, claims: dict) -> str:
    def b64(raw: bytes) -> bytes:
        return base64.urlsafe_b64encode(raw).rstrip(b"=")
    signing_input = b64(b'{"alg":"HS256","typ":"JWT"}') + b"." + b64(json.dumps(claims).encode())
    signature = hmac.new(key.encode(), signing_input, hashlib.sha256).digest()
    return (signing_input + b"." + b64(signature)).decode()


def test_check_api_key():
    cfg = Config(api_key="k3y")
    assert check_api_key("apikey k3y", cfg)
    assert check_api_key("ApiKey   k3y ", cfg)
    assert not check_api_key("apikey wrong", cfg)
    assert not check_api_key("Bearer k3y", cfg)
    assert not check_api_key("k3y", cfg)
    assert not check_api_key("", cfg)
    assert not check_api_key(None, cfg)


def test_open_api_without_key():
    cfg = Config(api_key=None)
    assert check_api_key(None, cfg) and check_api_key("apikey anything", cfg)


def test_rs256_allowed_but_no_public_key_is_not_configured():
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()).decode()
    token = mint_token(private_pem, "rs-user", algorithm="RS256")
    assert "no JWT public key" in refused(token, config(jwt=JwtSettings(algorithms=("HS256", "RS256"))))


def test_a_signed_payload_that_is_not_json_is_malformed():
    token = jwt.api_jws.encode(b"not json", SECRET, algorithm="HS256")  # a good signature over garbage
    assert refused(token) == "malformed token"


def test_an_empty_sub_is_refused():
    token = jwt.encode({"sub": "", "exp": int(time.time()) + 60}, SECRET, algorithm="HS256")
    assert "non-empty string" in refused(token)
