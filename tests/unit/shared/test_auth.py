"""ID-token verification: the auth switch, invokers versus callers, key rotation, and
failures of the certificate endpoint as 503s (AuthUnavailable), never as refusals."""

from __future__ import annotations

import time
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from google.auth import crypt, jwt

from shared import auth
from shared.auth import AuthConfig, AuthError, AuthUnavailable, TokenVerifier

AUDIENCE = "https://serve.internal"
FUNCTIONS = "functions@p.iam.gserviceaccount.com"
USER = "analyst@example.com"


def _key_and_cert() -> tuple[bytes, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test")])
    now = time.time()
    import datetime as dt

    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(dt.datetime.fromtimestamp(now - 60, dt.UTC))
        .not_valid_after(dt.datetime.fromtimestamp(now + 3600, dt.UTC))
        .sign(key, hashes.SHA256())
    )
    pem_key = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return pem_key, cert.public_bytes(serialization.Encoding.PEM).decode()


KEY_A, CERT_A = _key_and_cert()
KEY_B, CERT_B = _key_and_cert()


def _token(key: bytes, kid: str, email: str = FUNCTIONS) -> str:
    signer = crypt.RSASigner.from_string(key, key_id=kid)
    now = int(time.time())
    claims = {
        "iss": "https://accounts.google.com", "aud": AUDIENCE, "iat": now, "exp": now + 600,
        "email": email, "email_verified": True, "sub": "1",
    }  # fmt: skip
    return "Bearer " + jwt.encode(signer, claims).decode()


class _Certs:
    """A certificate endpoint that answers what it is told, counting fetches."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.fetches = 0

    def __call__(self) -> Any:
        self.fetches += 1
        answer = self.answers[min(self.fetches, len(self.answers)) - 1]
        if isinstance(answer, Exception):
            raise answer
        return answer


CONFIG = AuthConfig(AUDIENCE, frozenset({FUNCTIONS}), frozenset({USER}))


def test_auth_is_required_unless_switched_off_explicitly() -> None:
    assert AuthConfig.from_env({}).required
    assert AuthConfig.from_env({"TRIGGERFISH_AUTH": "required"}).required
    assert not AuthConfig.from_env({"TRIGGERFISH_AUTH": "off"}).required
    with pytest.raises(ValueError, match="TRIGGERFISH_AUTH must be 'required' or 'off', got 'no'"):
        AuthConfig.from_env({"TRIGGERFISH_AUTH": "no"})
    config = AuthConfig.from_env(
        {"TRIGGERFISH_SERVE_AUDIENCE": AUDIENCE, "TRIGGERFISH_ALLOWED_INVOKERS": f" {FUNCTIONS} ,",
         "TRIGGERFISH_ALLOWED_CALLERS": USER}
    )  # fmt: skip
    assert (config.audience, config.invokers, config.callers) == (AUDIENCE, {FUNCTIONS}, {USER})


def test_invokers_may_use_every_route_and_callers_only_the_public_ones() -> None:
    verifier = TokenVerifier(CONFIG, _Certs({"a": CERT_A}))

    assert verifier.caller(_token(KEY_A, "a")) == FUNCTIONS
    assert verifier.public_caller(_token(KEY_A, "a")) == FUNCTIONS
    assert verifier.public_caller(_token(KEY_A, "a", USER)) == USER
    with pytest.raises(AuthError, match="not allowed"):
        verifier.caller(_token(KEY_A, "a", USER))
    with pytest.raises(AuthError, match="not allowed"):
        verifier.public_caller(_token(KEY_A, "a", "stranger@example.com"))
    with pytest.raises(AuthError, match="no bearer token"):
        verifier.public_caller(None)
    with pytest.raises(AuthError, match="invalid token"):
        verifier.public_caller("Bearer not.a.jwt")


def test_an_unknown_key_id_fetches_the_certificates_again_at_most_once_a_minute() -> None:
    now = [1000.0]
    certs = _Certs({"a": CERT_A}, {"a": CERT_A, "b": CERT_B})
    verifier = TokenVerifier(CONFIG, certs, clock=lambda: now[0])

    assert verifier.caller(_token(KEY_A, "a")) == FUNCTIONS
    assert verifier.caller(_token(KEY_B, "b")) == FUNCTIONS  # Google rotated its keys
    assert certs.fetches == 2
    for _ in range(5):  # forged key ids do not make every call fetch
        with pytest.raises(AuthError):
            verifier.caller(_token(KEY_B, "forged"))
    assert certs.fetches == 2
    now[0] += 61
    with pytest.raises(AuthError):
        verifier.caller(_token(KEY_B, "forged"))
    assert certs.fetches == 3


@pytest.mark.parametrize(
    "failure",
    [AuthUnavailable("Google's certificate endpoint answered non-JSON: Expecting value"), OSError("connection refused"), {}],
    ids=["non-json", "down", "empty"],
)
def test_without_certificates_every_call_is_unavailable_not_refused(failure: Any) -> None:
    verifier = TokenVerifier(CONFIG, _Certs(failure))

    with pytest.raises(AuthUnavailable, match="cannot fetch Google's certificates"):
        verifier.caller(_token(KEY_A, "a"))


def test_a_failed_refresh_keeps_the_certificates_at_hand() -> None:
    now = [1000.0]
    certs = _Certs({"a": CERT_A}, OSError("connection refused"))
    verifier = TokenVerifier(CONFIG, certs, clock=lambda: now[0])
    assert verifier.caller(_token(KEY_A, "a")) == FUNCTIONS

    now[0] += auth._CERTS_TTL_S + 1

    assert verifier.public_caller(_token(KEY_A, "a", USER)) == USER  # a token not verified before
    assert certs.fetches == 2


class _Response:
    def __init__(self, status: int, data: bytes) -> None:
        self.status, self.data = status, data


@pytest.mark.parametrize(
    ("response", "words"),
    [
        (_Response(200, b"<html>captive portal</html>"), "non-JSON"),
        (_Response(200, b"[1, 2]"), "not a key-id map"),
        (_Response(503, b""), "HTTP 503"),
    ],
)
def test_the_certificate_endpoint_failing_is_auth_unavailable(
    monkeypatch: pytest.MonkeyPatch, response: _Response, words: str
) -> None:
    import google.auth.transport.requests as transport

    monkeypatch.setattr(transport, "Request", lambda: lambda url, method: response)

    with pytest.raises(AuthUnavailable, match=words):
        auth._fetch_certs()
