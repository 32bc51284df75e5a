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

Tokens that are not JWTs (opaque tokens, such as Authentik's API tokens) are
asked about at the provider's introspection endpoint (RFC 7662) as this
client (`client_secret_basic`); see `Provider._accept` for what is
accepted. Each answer, yes or no, is kept by the token's hash for at most
the revocation delay and never past the token's expiry. A provider that
cannot be asked raises OidcUnavailable: the gatekeeper answers 503 (fail
closed), not 401, so a client does not take it for a bad token.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard
from urllib.parse import urlencode

import httpx
from authlib.oauth2.auth import ClientAuth
from authlib.oauth2.rfc7009 import prepare_revoke_token_request
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

# Asymmetric signatures only.
ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"]
JWKS_REFRESH_MIN_S = 5.0
LEEWAY_S = 30
LOGIN_TTL_S = 600
SESSION_TTL_S = 12 * 3600
# Under Envoy's wait for the gatekeeper (2 s), so a slow provider gets our own 503.
INTROSPECTION_TIMEOUT_S = 1.5
INTROSPECTION_CACHE_MAX = 10_000
# Longer opaque tokens are refused without asking the provider.
OPAQUE_TOKEN_MAX = 4096
# `token_type` (RFC 7662) and Keycloak's `typ`, when present, must name an access token.
ACCESS_TOKEN_TYPES = {"bearer", "access_token"}


class OidcError(Exception):
    """A login or token that must not be accepted; the message is safe to show."""


class OidcUnavailable(OidcError):
    """The provider could not be asked, or gave no usable answer: fail closed, and not as a bad token."""


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
    introspection: bool = True
    introspection_endpoint: str | None = None  # None: the discovery document's
    cache_s: float = 5.0  # auth.revocation_delay_s: the longest an introspection answer is kept


@dataclass(frozen=True)
class Login:
    user: str
    groups: list[str]


class AnswerCache:
    """Introspection answers by the token's hash, each until its deadline (time.monotonic()).

    A refusal is kept as its message. Cleared when full, like the gatekeeper's
    cache of keys, so a flood of distinct tokens cannot grow memory without limit.
    """

    def __init__(self, max_entries: int = INTROSPECTION_CACHE_MAX) -> None:
        self.max_entries = max_entries
        self._answers: dict[bytes, tuple[float, Login | str]] = {}

    def __len__(self) -> int:
        return len(self._answers)

    def get(self, token: str, now: float) -> Login | str | None:
        hit = self._answers.get(_hash(token))
        return hit[1] if hit is not None and hit[0] > now else None

    def put(self, token: str, answer: Login | str, until: float) -> None:
        if len(self._answers) >= self.max_entries:
            self._answers.clear()
        self._answers[_hash(token)] = (until, answer)


class Provider:
    def __init__(self, settings: OidcSettings, http: httpx.Client | None = None) -> None:
        self.settings = settings
        self.http = http or httpx.Client(timeout=10)
        self._discovery: dict[str, Any] | None = None
        self._keys: KeySet | None = None
        self._keys_at = 0.0
        self._lock = threading.Lock()
        self.answers = AnswerCache()

    # -- discovery and keys ----------------------------------------------------------

    def discovery(self) -> dict[str, Any]:
        if self._discovery is None:
            url = self.settings.issuer.rstrip("/") + "/.well-known/openid-configuration"
            try:
                data = self.http.get(url).raise_for_status().json()
            except (httpx.HTTPError, ValueError) as exc:
                raise OidcUnavailable(f"cannot read the provider's discovery document: {exc}") from None
            if not isinstance(data, dict) or data.get("issuer") != self.settings.issuer:
                raise OidcUnavailable("the provider's discovery document names another issuer")
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
                    raise OidcUnavailable(f"cannot read the provider's keys: {exc}") from None
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
        if self.settings.introspection and not _is_jwt(token):
            return self.introspect(token)
        if self.settings.audience is None:
            raise OidcError("provider access tokens are not accepted: auth.oidc.audience is not set")
        return self.login(self.verify(token, audience=self.settings.audience))

    def introspect(self, token: str) -> Login:
        """An opaque token, as the provider's introspection endpoint describes it; answers are cached."""
        if len(token) > OPAQUE_TOKEN_MAX:
            raise OidcError("token too long")
        now = time.monotonic()
        answer = self.answers.get(token, now)
        if answer is None:
            claims = self._introspection(token)
            answer = self._judge(claims)
            keep_s = self._keep_s(claims)
            if keep_s > 0:
                self.answers.put(token, answer, now + keep_s)
        if isinstance(answer, str):
            raise OidcError(answer)
        return answer

    def _introspection(self, token: str) -> dict[str, Any]:
        """The provider's RFC 7662 answer, asked as this client; OidcUnavailable when there is none."""
        url = self._introspection_url()
        # The same form as a revocation request (token, token_type_hint), as authlib's own client sends it.
        body, headers = prepare_revoke_token_request(token, "access_token")
        client = ClientAuth(self.settings.client_id, self.settings.client_secret, "client_secret_basic")
        _, headers, body = client.prepare("POST", url, headers, body)
        try:
            response = self.http.post(url, content=body, headers=headers, timeout=INTROSPECTION_TIMEOUT_S)
            data = response.raise_for_status().json()
        except (httpx.HTTPError, ValueError) as exc:
            raise OidcUnavailable(f"the provider's introspection endpoint failed: {type(exc).__name__}") from None
        if not isinstance(data, dict) or not isinstance(data.get("active"), bool):
            raise OidcUnavailable("the provider's introspection answer is not RFC 7662")
        return data

    def _introspection_url(self) -> str:
        url = self.settings.introspection_endpoint or self.discovery().get("introspection_endpoint")
        if not isinstance(url, str) or not url:
            raise OidcError("opaque tokens are not accepted: the provider names no introspection endpoint")
        return url

    def _judge(self, claims: dict[str, Any]) -> Login | str:
        """The login for an introspection answer, or why it is refused."""
        try:
            return self._accept(claims)
        except OidcError as exc:
            return str(exc)

    def _accept(self, claims: dict[str, Any]) -> Login:
        """Active, not expired, an access token of our issuer, for this gateway (`_for_us`)."""
        if claims.get("active") is not True:
            raise OidcError("the provider says this token is not active")
        exp = claims.get("exp")
        if exp is not None and (not _is_number(exp) or exp <= time.time()):
            raise OidcError("the token has expired")
        for field in ("token_type", "typ"):
            kind = claims.get(field)
            if kind is not None and str(kind).lower() not in ACCESS_TOKEN_TYPES:
                raise OidcError("not an access token")
        if claims.get("iss", self.settings.issuer) != self.settings.issuer:
            raise OidcError("the token names another issuer")
        if not self._for_us(claims):
            raise OidcError("the token was issued to another client")
        return self.login({**claims, "preferred_username": claims.get("preferred_username") or claims.get("username")})

    def _for_us(self, claims: dict[str, Any]) -> bool:
        """The token's `aud` or `client_id` names auth.oidc.audience or auth.oidc.client_id."""
        aud = claims.get("aud")
        named = {a for a in (aud if isinstance(aud, list) else [aud]) if isinstance(a, str)}
        if isinstance(claims.get("client_id"), str):
            named.add(claims["client_id"])
        allowed = {self.settings.client_id} | ({self.settings.audience} if self.settings.audience else set())
        return bool(named & allowed)

    def _keep_s(self, claims: dict[str, Any]) -> float:
        """How long an answer may be kept: the revocation delay, and never past the token's expiry."""
        exp = claims.get("exp")
        if _is_number(exp):
            return min(self.settings.cache_s, float(exp) - time.time())
        return self.settings.cache_s

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


def _is_jwt(token: str) -> bool:
    """Three dot-separated segments, the first a JOSE header: a JWS. Anything else is an opaque token."""
    if token.count(".") != 2:
        return False
    try:
        return "alg" in _header(token)
    except OidcError:
        return False


def _is_number(value: Any) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


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
