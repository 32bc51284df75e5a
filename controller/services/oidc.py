"""OpenID Connect for the gatekeeper: browser login and provider-issued access tokens.

Any OpenID Connect provider (Authentik, Keycloak, …) through its discovery
document. Browser login is the authorization code flow with PKCE (S256),
`state` bound to the browser by a short-lived cookie and used once, and a
`nonce` checked in the ID token. ID tokens and access tokens are verified
against the provider's JWKS (fetched again when a token names an unknown
`kid`, at most every few seconds) with asymmetric algorithms only — never
`none`, never HMAC (a token "signed" with the provider's public key as an
HMAC secret is refused) — and the key comes only from our JWKS, never from
a token's own `jwk`/`jku` header. Issuer, audience and expiry are checked.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

# Asymmetric signatures only.
ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"]
JWKS_REFRESH_MIN_S = 5.0
LEEWAY_S = 30
LOGIN_TTL_S = 600
SESSION_TTL_S = 12 * 3600


class OidcError(Exception):
    """A login or token that must not be accepted; the message is safe to show."""


@dataclass(frozen=True)
class OidcSettings:
    issuer: str
    client_id: str
    client_secret: str
    redirect_uri: str
    post_logout_uri: str
    scopes: list[str]
    groups_claim: str
    audience: str | None


@dataclass(frozen=True)
class Login:
    user: str
    groups: list[str]


class Provider:
    def __init__(self, settings: OidcSettings, http: httpx.Client | None = None) -> None:
        self.settings = settings
        self.http = http or httpx.Client(timeout=10)
        self._discovery: dict[str, Any] | None = None
        self._keys: KeySet | None = None
        self._keys_at = 0.0
        self._lock = threading.Lock()

    # -- discovery and keys ----------------------------------------------------------

    def discovery(self) -> dict[str, Any]:
        if self._discovery is None:
            url = self.settings.issuer.rstrip("/") + "/.well-known/openid-configuration"
            try:
                data = self.http.get(url).raise_for_status().json()
            except (httpx.HTTPError, ValueError) as exc:
                raise OidcError(f"cannot read the provider's discovery document: {exc}") from None
            if data.get("issuer") != self.settings.issuer:
                raise OidcError("the provider's discovery document names another issuer")
            self._discovery = data
        return self._discovery

    def keys(self, refresh: bool = False) -> KeySet:
        with self._lock:
            stale = refresh and time.monotonic() - self._keys_at > JWKS_REFRESH_MIN_S
            if self._keys is None or stale:
                try:
                    data = self.http.get(self.discovery()["jwks_uri"]).raise_for_status().json()
                    self._keys = KeySet.import_key_set(data)
                except (httpx.HTTPError, ValueError, KeyError, JoseError) as exc:
                    raise OidcError(f"cannot read the provider's keys: {exc}") from None
                self._keys_at = time.monotonic()
            return self._keys

    # -- the browser flow ------------------------------------------------------------

    def authorization_url(self, state: str, nonce: str, verifier: str) -> str:
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        query = {
            "response_type": "code",
            "client_id": self.settings.client_id,
            "redirect_uri": self.settings.redirect_uri,
            "scope": " ".join(self.settings.scopes),
            "state": state,
            "nonce": nonce,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }
        return f"{self.discovery()['authorization_endpoint']}?{urlencode(query)}"

    def exchange(self, code: str, verifier: str, nonce: str) -> Login:
        try:
            response = self.http.post(
                self.discovery()["token_endpoint"],
                data={
                    "grant_type": "authorization_code",
                    "code": code,
                    "redirect_uri": self.settings.redirect_uri,
                    "code_verifier": verifier,
                },
                auth=(self.settings.client_id, self.settings.client_secret),
            )
        except httpx.HTTPError as exc:
            raise OidcError(f"the provider's token endpoint failed: {exc}") from None
        if response.status_code != 200:
            raise OidcError("the provider refused the authorization code (expired or already used)")
        id_token = response.json().get("id_token")
        if not isinstance(id_token, str):
            raise OidcError("the provider returned no ID token")
        claims = self.verify(id_token, audience=self.settings.client_id)
        if not nonce or claims.get("nonce") != nonce:
            raise OidcError("the ID token's nonce does not match this login")
        return self.login(claims)

    def end_session_url(self) -> str | None:
        endpoint = self.discovery().get("end_session_endpoint")
        if not endpoint:
            return None
        query = urlencode(
            {"client_id": self.settings.client_id, "post_logout_redirect_uri": self.settings.post_logout_uri}
        )
        return f"{endpoint}?{query}"

    # -- tokens ------------------------------------------------------------------------

    def verify_access_token(self, token: str) -> Login:
        if self.settings.audience is None:
            raise OidcError("provider access tokens are not accepted: auth.oidc.audience is not set")
        return self.login(self.verify(token, audience=self.settings.audience))

    def verify(self, token: str, audience: str) -> dict[str, Any]:
        header = _header(token)
        if header.get("alg") not in ALGORITHMS:
            raise OidcError("token algorithm not allowed")
        kid = header.get("kid")
        keys = self.keys()
        if kid is not None and not _has_kid(keys, kid):
            keys = self.keys(refresh=True)  # the provider may have rotated its keys
        try:
            decoded = jwt.decode(token, keys, algorithms=ALGORITHMS)
        except (JoseError, ValueError) as exc:
            raise OidcError(f"token signature not valid: {type(exc).__name__}") from None
        registry = jwt.JWTClaimsRegistry(
            leeway=LEEWAY_S,
            iss={"essential": True, "value": self.settings.issuer},
            aud={"essential": True, "value": audience},
            exp={"essential": True},
        )
        try:
            registry.validate(decoded.claims)
        except JoseError as exc:
            raise OidcError(f"token claims not valid: {type(exc).__name__}") from None
        return dict(decoded.claims)

    def login(self, claims: dict[str, Any]) -> Login:
        user = claims.get("preferred_username") or claims.get("email") or claims.get("sub")
        if not isinstance(user, str) or not user:
            raise OidcError("the token names no user")
        groups = claims.get(self.settings.groups_claim) or []
        if not isinstance(groups, list):
            groups = []
        return Login(user, [str(g) for g in groups])


def _header(token: str) -> dict[str, Any]:
    try:
        head = token.split(".")[0]
        data = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    except (ValueError, IndexError) as exc:
        raise OidcError("not a JWT") from exc
    if not isinstance(data, dict):
        raise OidcError("not a JWT")
    return data


def _has_kid(keys: KeySet, kid: str) -> bool:
    return any(k.kid == kid for k in keys.keys)


class Sessions:
    """Pending logins (state → browser, nonce, PKCE verifier) and sessions, in SQLite.

    Session ids are stored hashed, like API keys; a stolen database yields no
    live session cookie.
    """

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(
            "CREATE TABLE IF NOT EXISTS pending (state TEXT PRIMARY KEY, browser TEXT, nonce TEXT, verifier TEXT,"
            " next TEXT, created REAL);"
            "CREATE TABLE IF NOT EXISTS sessions (id BLOB PRIMARY KEY, user TEXT, groups TEXT, expires REAL);"
        )
        self._lock = threading.Lock()

    def begin(self, next_path: str) -> tuple[str, str, str, str]:
        """A new login: (browser cookie, state, nonce, verifier)."""
        browser, state, nonce = (secrets.token_urlsafe(32) for _ in range(3))
        verifier = secrets.token_urlsafe(64)
        now = time.time()
        with self._lock:
            self._db.execute("DELETE FROM pending WHERE created < ?", (now - LOGIN_TTL_S,))
            self._db.execute(
                "INSERT INTO pending VALUES (?,?,?,?,?,?)", (state, browser, nonce, verifier, next_path, now)
            )
        return browser, state, nonce, verifier

    def finish(self, state: str, browser: str | None) -> tuple[str, str, str]:
        """The pending login for ``state`` if this browser started it: (nonce, verifier, next). Used once."""
        with self._lock:
            row = self._db.execute(
                "SELECT browser, nonce, verifier, next, created FROM pending WHERE state = ?", (state,)
            ).fetchone()
            self._db.execute("DELETE FROM pending WHERE state = ?", (state,))
        if row is None or time.time() - row[4] > LOGIN_TTL_S:
            raise OidcError("unknown or expired login; start again")
        if browser is None or not secrets.compare_digest(str(row[0]), browser):
            raise OidcError("this login was started in another browser")
        return str(row[1]), str(row[2]), str(row[3])

    def create(self, login: Login) -> str:
        session = secrets.token_urlsafe(32)
        with self._lock:
            self._db.execute(
                "INSERT INTO sessions VALUES (?,?,?,?)",
                (_hash(session), login.user, json.dumps(login.groups), time.time() + SESSION_TTL_S),
            )
        return session

    def get(self, session: str) -> Login | None:
        with self._lock:
            row = self._db.execute(
                "SELECT user, groups, expires FROM sessions WHERE id = ?", (_hash(session),)
            ).fetchone()
        if row is None or row[2] < time.time():
            return None
        return Login(str(row[0]), list(json.loads(row[1])))

    def end(self, session: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM sessions WHERE id = ?", (_hash(session),))


def _hash(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()
