"""Google ID tokens between the functions and the Serve ingress.

In the cloud the functions call Serve with an ID token for the audience
``TRIGGERFISH_SERVE_AUDIENCE``; the ingress verifies it (Google's signature,
audience, expiry). The internal request form, which carries object generations
and request ids, is trusted only from the service accounts listed in
``TRIGGERFISH_ALLOWED_INVOKERS``; every other route but health also needs a token,
from an invoker or from an account in ``TRIGGERFISH_ALLOWED_CALLERS``.

``TRIGGERFISH_AUTH`` (Serve's environment) is ``required`` by default: an ingress
without an audience then refuses to start. Only ``off``, an explicit switch that
the local stack sets for its own Serve process, turns verification off. The
functions mint tokens whenever an audience is set.

A failure of the verification's own infrastructure (Google's certificate endpoint
down, or answering something other than the certificates) is
:class:`AuthUnavailable` (HTTP 503, retryable), never a refusal of the caller.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

AUDIENCE_ENV = "TRIGGERFISH_SERVE_AUDIENCE"
INVOKERS_ENV = "TRIGGERFISH_ALLOWED_INVOKERS"
CALLERS_ENV = "TRIGGERFISH_ALLOWED_CALLERS"
AUTH_ENV = "TRIGGERFISH_AUTH"
AUTH_REQUIRED = "required"
AUTH_OFF = "off"
_CERTS_URL = "https://www.googleapis.com/oauth2/v1/certs"
_REFRESH_MARGIN_S = 300
_CERTS_TTL_S = 3600
# A token naming a key id the cached certificates lack fetches them again (Google
# rotates keys), at most this often, so forged key ids cannot hammer the endpoint.
_UNKNOWN_KID_REFETCH_S = 60
# Without any certificates every call fails; fetch again at most this often meanwhile.
_NO_CERTS_RETRY_S = 1.0


class AuthError(Exception):
    """The caller's token is missing, invalid, or names no allowed invoker."""


class AuthUnavailable(Exception):
    """Tokens cannot be verified right now (the certificate endpoint failed): retry later."""


def _emails(env: Mapping[str, str], name: str) -> frozenset[str]:
    return frozenset(e.strip() for e in env.get(name, "").split(",") if e.strip())


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """Whether and how callers are authenticated.

    Attributes:
        audience: The ID tokens' audience; the functions mint tokens when it is set.
        invokers: Accounts that may send the internal form (the functions).
        callers: Further accounts that may use the public routes.
        required: Serve verifies tokens (``TRIGGERFISH_AUTH=required``, the default).
    """

    audience: str = ""
    invokers: frozenset[str] = frozenset()
    callers: frozenset[str] = frozenset()
    required: bool = True

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> AuthConfig:
        """Read the settings; a ``TRIGGERFISH_AUTH`` other than ``required``/``off`` raises ``ValueError``."""
        mode = env.get(AUTH_ENV, "").strip().lower() or AUTH_REQUIRED
        if mode not in (AUTH_REQUIRED, AUTH_OFF):
            raise ValueError(f"{AUTH_ENV} must be {AUTH_REQUIRED!r} or {AUTH_OFF!r}, got {env.get(AUTH_ENV)!r}")
        return cls(
            env.get(AUDIENCE_ENV, "").strip(),
            _emails(env, INVOKERS_ENV),
            _emails(env, CALLERS_ENV),
            mode == AUTH_REQUIRED,
        )

    @property
    def enabled(self) -> bool:
        """Tokens are minted (functions side): an audience is set."""
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

    def __init__(
        self,
        config: AuthConfig,
        fetch_certs: Callable[[], Mapping[str, str]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._fetch_certs = fetch_certs or _fetch_certs
        self._clock = clock
        self._certs: Mapping[str, str] = {}
        self._certs_at = 0.0
        self._fetch_tried_at = float("-inf")
        self._fetch_error = ""
        self._kid_fetched_at = float("-inf")
        self._verified: dict[str, tuple[float, str]] = {}
        self._lock = threading.Lock()

    def public_caller(self, authorization: str | None) -> str:
        """The verified caller's email, for the public routes (invokers and allowed callers).

        Raises:
            AuthError: the token is not acceptable.
            AuthUnavailable: the certificates cannot be fetched.
        """
        return self._caller(authorization, self._config.invokers | self._config.callers)

    def caller(self, authorization: str | None) -> str:
        """The verified invoker's email, for the internal form.

        Raises:
            AuthError: with the reason, for any token that is not acceptable.
            AuthUnavailable: the certificates cannot be fetched.
        """
        return self._caller(authorization, self._config.invokers)

    def _caller(self, authorization: str | None, allowed: frozenset[str]) -> str:
        if not authorization or not authorization.lower().startswith("bearer "):
            raise AuthError("no bearer token")
        token = authorization[len("bearer ") :].strip()
        now = self._clock()
        cached = self._verified.get(token)
        if cached and cached[0] > now:
            if cached[1] not in allowed:
                raise AuthError(f"caller {cached[1]!r} is not allowed here")
            return cached[1]
        claims = self._verify(token)
        email = str(claims.get("email") or "")
        if not claims.get("email_verified", False) or email not in allowed:
            raise AuthError(f"caller {email or claims.get('sub')!r} is not allowed here")
        if len(self._verified) > 1024:
            self._verified.clear()
        self._verified[token] = (float(claims["exp"]), email)
        return email

    def _certificates(self, kid: str | None) -> Mapping[str, str]:
        """Google's certificates: refreshed hourly, and at once (rate-limited) for an unknown key id."""
        with self._lock:
            now = self._clock()
            since_try = now - self._fetch_tried_at
            if not self._certs:
                due = since_try >= _NO_CERTS_RETRY_S
            elif now - self._certs_at > _CERTS_TTL_S:
                due = since_try >= _UNKNOWN_KID_REFETCH_S  # a failed hourly refresh: retry each minute
            elif kid is not None and kid not in self._certs:
                due = now - self._kid_fetched_at >= _UNKNOWN_KID_REFETCH_S
                if due:
                    self._kid_fetched_at = now
            else:
                due = False
            if due:
                self._fetch_tried_at = now
                try:
                    certs = self._fetch_certs()
                    if not isinstance(certs, Mapping) or not certs:
                        raise AuthUnavailable("Google's certificate endpoint answered no certificates")
                    self._certs, self._certs_at, self._fetch_error = certs, now, ""
                except Exception as err:  # noqa: BLE001 - any failure to fetch is the infrastructure's
                    self._fetch_error = str(err)[:300] if isinstance(err, AuthUnavailable) else repr(err)[:300]
                    logger.warning("fetching Google's certificates failed: %s", self._fetch_error)
            if not self._certs:
                # Nothing to verify with: the caller is not at fault, so retry later.
                raise AuthUnavailable(f"cannot fetch Google's certificates: {self._fetch_error}")
            return self._certs

    def _verify(self, token: str) -> Mapping[str, Any]:
        from google.auth import exceptions, jwt

        try:
            header = jwt.decode_header(token)
        except Exception as err:  # noqa: BLE001 - whatever a malformed token makes the decoder raise
            raise AuthError(f"invalid token: {err!r}"[:300]) from err
        kid = header.get("kid") if isinstance(header, dict) else None
        certs = self._certificates(kid if isinstance(kid, str) else None)
        try:
            claims = jwt.decode(token, certs=certs, audience=self._config.audience)
        except (ValueError, exceptions.GoogleAuthError) as err:
            raise AuthError(f"invalid token: {err}") from err
        if claims.get("iss") not in ("accounts.google.com", "https://accounts.google.com"):
            raise AuthError(f"token issuer {claims.get('iss')!r} is not Google")
        return claims


def _fetch_certs() -> Mapping[str, str]:
    import json

    import google.auth.transport.requests

    try:
        response = google.auth.transport.requests.Request()(_CERTS_URL, method="GET")
    except Exception as err:  # noqa: BLE001 - transport errors of any kind
        raise AuthUnavailable(f"could not reach Google's certificates at {_CERTS_URL}: {err!r}"[:300]) from err
    if response.status != 200:
        raise AuthUnavailable(f"could not fetch Google's certificates: HTTP {response.status}")
    try:
        certs = json.loads(response.data)
    except ValueError as err:
        raise AuthUnavailable(f"Google's certificate endpoint answered non-JSON: {err}") from err
    if not isinstance(certs, dict) or not all(isinstance(v, str) for v in certs.values()):
        raise AuthUnavailable("Google's certificate endpoint answered JSON that is not a key-id map")
    return certs
