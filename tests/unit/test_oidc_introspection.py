"""Opaque provider tokens through RFC 7662 introspection: what is accepted, and how long answers are kept.

The provider is an httpx MockTransport here, and the module's clock a fake one, so the cache's
bounds are checked to the second; tests/e2e/test_oidc.py runs the same against a real provider.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest

from controller.gateway import oidc
from controller.gateway.oidc import AnswerCache, Login, OidcError, OidcSettings, OidcUnavailable, Provider

ISSUER = "https://id.example.test"
INTROSPECT = f"{ISSUER}/introspect"
TOKEN = "opaque-token-1"


class Clock:
    """Stands in for the `time` module inside controller.gateway.oidc."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now


@dataclass
class FakeProvider:
    """Discovery plus an introspection endpoint whose answer each test sets."""

    answer: Callable[[], httpx.Response]
    discovery: dict[str, Any] = field(
        default_factory=lambda: {"issuer": ISSUER, "jwks_uri": f"{ISSUER}/jwks", "introspection_endpoint": INTROSPECT}
    )
    asked: list[httpx.Request] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/.well-known/openid-configuration":
            return httpx.Response(200, json=self.discovery)
        self.asked.append(request)
        return self.answer()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(oidc, "time", fake)
    return fake


def settings(**changes: Any) -> OidcSettings:
    base: dict[str, Any] = {
        "issuer": ISSUER,
        "client_id": "fleet-gateway",
        "client_secret": "s3cret",
        "redirect_uri": "https://gw.example.test/auth/callback",
        "post_logout_uri": "https://gw.example.test/",
        "scopes": ["openid"],
        "groups_claim": "groups",
        "audience": "fleet-api",
        "cache_s": 2.0,
    }
    return OidcSettings(**{**base, **changes})


def active(clock: Clock, **claims: Any) -> dict[str, Any]:
    return {
        "active": True,
        "client_id": "fleet-gateway",
        "token_type": "Bearer",
        "username": "alice",
        "sub": "uid-alice",
        "iss": ISSUER,
        "exp": clock.now + 300,
        "groups": ["family"],
        **claims,
    }


def provider_answering(
    answer: dict[str, Any] | Callable[[], httpx.Response], **changes: Any
) -> tuple[Provider, FakeProvider]:
    respond = answer if callable(answer) else (lambda: httpx.Response(200, json=answer))
    fake = FakeProvider(respond)
    return Provider(settings(**changes), httpx.Client(transport=httpx.MockTransport(fake))), fake


def test_an_active_token_is_the_user_and_groups_as_from_sso(clock: Clock) -> None:
    provider, fake = provider_answering(active(clock))
    assert provider.verify_access_token(TOKEN) == Login("alice", ["family"])  # `username`, not the opaque `sub`
    (request,) = fake.asked
    assert request.method == "POST" and str(request.url) == INTROSPECT
    assert request.headers["authorization"] == "Basic " + base64.b64encode(b"fleet-gateway:s3cret").decode()
    assert parse_qs(request.content.decode()) == {"token": [TOKEN], "token_type_hint": ["access_token"]}


def test_preferred_username_wins_over_username_as_in_the_jwt_path(clock: Clock) -> None:
    provider, _ = provider_answering(active(clock, preferred_username="Alice A."))
    assert provider.verify_access_token(TOKEN).user == "Alice A."


@pytest.mark.parametrize(
    "change",
    [
        {"active": False},
        {"exp": 1_000_000_000},  # active, says the provider, yet past its expiry
        {"exp": "tomorrow"},
        {"token_type": "refresh_token"},
        {"typ": "Refresh"},  # Keycloak's claim for a refresh token
        {"iss": "https://other.example.test"},
        {"client_id": "other-app"},
        {"client_id": "other-app", "aud": ["other-api", "more"]},
        {"client_id": None, "aud": None},
        {"username": None, "sub": None},
    ],
    ids=[
        "inactive",
        "expired",
        "exp-not-a-number",
        "refresh-token",
        "keycloak-typ",
        "other-issuer",
        "other-client",
        "other-client-and-audience",
        "no-client",
        "no-user",
    ],
)
def test_refused_answers(clock: Clock, change: dict[str, Any]) -> None:
    provider, _ = provider_answering(active(clock, **change))
    with pytest.raises(OidcError) as refused:
        provider.verify_access_token(TOKEN)
    assert not isinstance(refused.value, OidcUnavailable)  # a bad token: 401, not a provider outage


@pytest.mark.parametrize(
    "change",
    [{"client_id": "other-app", "aud": ["fleet-api"]}, {"client_id": "other-app", "aud": "fleet-gateway"}, {}],
    ids=["aud-names-the-audience", "aud-names-the-client", "own-client"],
)
def test_a_token_for_this_gateway_passes_whoever_asked_for_it(clock: Clock, change: dict[str, Any]) -> None:
    provider, _ = provider_answering(active(clock, **change))
    assert provider.verify_access_token(TOKEN).user == "alice"


@pytest.mark.parametrize(
    "answer",
    [
        lambda: httpx.Response(500, text="boom"),
        lambda: httpx.Response(401, json={"error": "invalid_client"}),
        lambda: httpx.Response(200, text="<html>"),
        lambda: httpx.Response(200, json=[True]),
        lambda: httpx.Response(200, json={"active": "true"}),
        lambda: httpx.Response(302, headers={"location": "https://elsewhere.example.test/"}),
    ],
    ids=["500", "client-refused", "not-json", "not-an-object", "active-not-a-boolean", "redirect"],
)
def test_a_failing_endpoint_is_unavailable_and_not_cached(clock: Clock, answer: Callable[[], httpx.Response]) -> None:
    good = active(clock)
    answers: list[Callable[[], httpx.Response]] = [answer, lambda: httpx.Response(200, json=good)]
    provider, fake = provider_answering(lambda: answers.pop(0)())
    with pytest.raises(OidcUnavailable):
        provider.verify_access_token(TOKEN)
    assert provider.verify_access_token(TOKEN).user == "alice"  # asked again at once: the failure was not kept
    assert len(fake.asked) == 2


@pytest.mark.parametrize("error", [httpx.ConnectError, httpx.ReadTimeout])
def test_an_unreachable_endpoint_is_unavailable(clock: Clock, error: type[httpx.TransportError]) -> None:
    def fail() -> httpx.Response:
        raise error("provider down")

    provider, _ = provider_answering(fail)
    with pytest.raises(OidcUnavailable):
        provider.verify_access_token(TOKEN)


def test_an_unreadable_discovery_document_is_unavailable(clock: Clock) -> None:
    provider, fake = provider_answering(active(clock))
    fake.discovery = {"issuer": "https://someone-else.example.test"}
    with pytest.raises(OidcUnavailable):
        provider.verify_access_token(TOKEN)


def test_answers_are_kept_at_most_the_revocation_delay(clock: Clock) -> None:
    provider, fake = provider_answering(active(clock), cache_s=2.0)
    provider.verify_access_token(TOKEN)
    clock.now += 1.9
    provider.verify_access_token(TOKEN)
    assert len(fake.asked) == 1  # kept
    clock.now += 0.2
    provider.verify_access_token(TOKEN)
    assert len(fake.asked) == 2  # 2.1 s after it was asked: asked again


def test_answers_are_never_kept_past_the_tokens_expiry(clock: Clock) -> None:
    answers = [active(clock, exp=clock.now + 0.5), {"active": False}]
    provider, fake = provider_answering(lambda: httpx.Response(200, json=answers.pop(0)), cache_s=5.0)
    assert provider.verify_access_token(TOKEN).user == "alice"
    clock.now += 0.6
    with pytest.raises(OidcError):
        provider.verify_access_token(TOKEN)
    assert len(fake.asked) == 2


def test_refusals_are_kept_too_and_for_no_longer(clock: Clock) -> None:
    answers = [{"active": False}, active(clock)]
    provider, fake = provider_answering(lambda: httpx.Response(200, json=answers.pop(0)), cache_s=2.0)
    for _ in range(3):
        with pytest.raises(OidcError):
            provider.verify_access_token(TOKEN)
    assert len(fake.asked) == 1
    clock.now += 2.1
    assert provider.verify_access_token(TOKEN).user == "alice"


def test_no_revocation_delay_means_every_request_is_asked(clock: Clock) -> None:
    provider, fake = provider_answering(active(clock), cache_s=0.0)
    for _ in range(3):
        provider.verify_access_token(TOKEN)
    assert len(fake.asked) == 3


def test_the_cache_is_keyed_by_the_token_and_holds_no_token(clock: Clock) -> None:
    provider, fake = provider_answering(active(clock))
    provider.verify_access_token(TOKEN)
    provider.verify_access_token(TOKEN + "x")
    assert len(fake.asked) == 2
    assert TOKEN.encode() not in repr(provider.answers._answers).encode()


def test_the_cache_is_bounded() -> None:
    cache = AnswerCache(max_entries=3)
    now = time.monotonic()
    for i in range(3):
        cache.put(f"t{i}", Login(f"u{i}", []), now + 60)
    assert len(cache) == 3 and cache.get("t0", now) == Login("u0", [])
    cache.put("t3", "not active", now + 60)
    assert len(cache) == 1 and cache.get("t0", now) is None and cache.get("t3", now) == "not active"
    assert cache.get("t3", now + 61) is None


def test_a_jwt_is_never_introspected(clock: Clock) -> None:
    provider, fake = provider_answering(active(clock))
    head = base64.urlsafe_b64encode(json.dumps({"alg": "RS256", "kid": "k"}).encode()).rstrip(b"=").decode()
    with pytest.raises(OidcError):
        provider.verify_access_token(f"{head}.e30.c2ln")  # checked against the JWKS (which this fake lacks)
    assert [r.url.path for r in fake.asked] == ["/jwks"]


def test_three_segments_without_a_jose_header_are_opaque(clock: Clock) -> None:
    provider, fake = provider_answering({"active": False})
    with pytest.raises(OidcError):
        provider.verify_access_token("a.b.c")
    assert [r.url.path for r in fake.asked] == ["/introspect"]


def test_introspection_off_refuses_opaque_tokens_without_asking(clock: Clock) -> None:
    provider, fake = provider_answering(active(clock), introspection=False)
    with pytest.raises(OidcError):
        provider.verify_access_token(TOKEN)
    assert fake.asked == []


def test_the_spec_may_name_the_endpoint(clock: Clock) -> None:
    provider, fake = provider_answering(active(clock), introspection_endpoint=f"{ISSUER}/other/introspect")
    fake.discovery.pop("introspection_endpoint")
    provider.verify_access_token(TOKEN)
    assert [str(r.url) for r in fake.asked] == [f"{ISSUER}/other/introspect"]


def test_a_provider_without_an_endpoint_refuses_opaque_tokens(clock: Clock) -> None:
    provider, fake = provider_answering(active(clock))
    fake.discovery.pop("introspection_endpoint")
    with pytest.raises(OidcError) as refused:
        provider.verify_access_token(TOKEN)
    assert not isinstance(refused.value, OidcUnavailable) and fake.asked == []


def test_an_overlong_token_is_refused_without_asking(clock: Clock) -> None:
    provider, fake = provider_answering(active(clock))
    with pytest.raises(OidcError):
        provider.verify_access_token("x" * (oidc.OPAQUE_TOKEN_MAX + 1))
    assert fake.asked == []
