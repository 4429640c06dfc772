"""Google ID tokens between the functions and the Serve ingress.

In the cloud the functions call Serve with an ID token for the audience
``TRIGGERFISH_SERVE_AUDIENCE``; the ingress verifies it (Google's signature,
audience, expiry) and trusts the internal request form, which carries object
generations and request ids, only from the service accounts listed in
``TRIGGERFISH_ALLOWED_INVOKERS``. Without an audience (the local stack) nothing
is minted or verified.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

AUDIENCE_ENV = "TRIGGERFISH_SERVE_AUDIENCE"
INVOKERS_ENV = "TRIGGERFISH_ALLOWED_INVOKERS"
_CERTS_URL = "https://www.googleapis.com/oauth2/v1/certs"
_REFRESH_MARGIN_S = 300
_CERTS_TTL_S = 3600


class AuthError(Exception):
    """The caller's token is missing, invalid, or names no allowed invoker."""


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """Whether and how callers are authenticated."""

    audience: str = ""
    invokers: frozenset[str] = frozenset()

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> AuthConfig:
        invokers = frozenset(e.strip() for e in env.get(INVOKERS_ENV, "").split(",") if e.strip())
        return cls(env.get(AUDIENCE_ENV, "").strip(), invokers)

    @property
    def enabled(self) -> bool:
        return bool(self.audience)


class TokenSource:
    """ID tokens for ``audience`` from the metadata server (or ADC), reused until near expiry."""

    def __init__(self, audience: str, fetch: Callable[[str], str] | None = None) -> None:
        self._audience = audience
        self._fetch = fetch or _fetch_id_token
        self._lock = threading.Lock()
        self._token = ""
        self._expires_at = 0.0

    def header(self) -> dict[str, str]:
        with self._lock:
            if time.time() > self._expires_at - _REFRESH_MARGIN_S:
                self._token = self._fetch(self._audience)
                self._expires_at = _expiry(self._token)
            return {"authorization": f"Bearer {self._token}"}


def _fetch_id_token(audience: str) -> str:
    import google.auth.transport.requests
    import google.oauth2.id_token

    return google.oauth2.id_token.fetch_id_token(google.auth.transport.requests.Request(), audience)


def _expiry(token: str) -> float:
    from google.auth import jwt

    claims = jwt.decode(token, verify=False)
    return float(claims.get("exp", time.time() + 600))


class TokenVerifier:
    """Verifies bearer tokens against Google's certificates (fetched hourly, not per call).

    Verified tokens are remembered until they expire, so a function instance
    that reuses its token costs one signature check, not one per request.
    """

    def __init__(self, config: AuthConfig, fetch_certs: Callable[[], Mapping[str, str]] | None = None) -> None:
        self._config = config
        self._fetch_certs = fetch_certs or _fetch_certs
        self._certs: Mapping[str, str] = {}
        self._certs_at = 0.0
        self._verified: dict[str, tuple[float, str]] = {}
        self._lock = threading.Lock()

    def caller(self, authorization: str | None) -> str:
        """The verified caller's email.

        Raises:
            AuthError: with the reason, for any token that is not acceptable.
        """
        if not authorization or not authorization.lower().startswith("bearer "):
            raise AuthError("no bearer token")
        token = authorization[len("bearer ") :].strip()
        now = time.time()
        cached = self._verified.get(token)
        if cached and cached[0] > now:
            return cached[1]
        claims = self._verify(token)
        email = str(claims.get("email") or "")
        if not claims.get("email_verified", False) or email not in self._config.invokers:
            raise AuthError(f"caller {email or claims.get('sub')!r} is not an allowed invoker")
        if len(self._verified) > 1024:
            self._verified.clear()
        self._verified[token] = (float(claims["exp"]), email)
        return email

    def _verify(self, token: str) -> Mapping[str, Any]:
        from google.auth import exceptions, jwt

        with self._lock:
            if time.time() - self._certs_at > _CERTS_TTL_S:
                self._certs = self._fetch_certs()
                self._certs_at = time.time()
            certs = self._certs
        try:
            claims = jwt.decode(token, certs=certs, audience=self._config.audience)
        except (ValueError, exceptions.GoogleAuthError) as err:
            raise AuthError(f"invalid token: {err}") from err
        if claims.get("iss") not in ("accounts.google.com", "https://accounts.google.com"):
            raise AuthError(f"token issuer {claims.get('iss')!r} is not Google")
        return claims


def _fetch_certs() -> Mapping[str, str]:
    import google.auth.transport.requests

    response = google.auth.transport.requests.Request()(_CERTS_URL, method="GET")
    if response.status != 200:
        raise AuthError(f"could not fetch Google's certificates: HTTP {response.status}")
    import json

    return json.loads(response.data)
