"""The gatekeeper: who is this, and may they pass?

Envoy's Lua filter asks `GET /auth/check` with the request's credential
headers (Authorization, X-Api-Key, Cookie) and never the body. A 2xx answer
carries the identity headers Envoy puts on the request (user, groups,
allowed models, key id); anything else goes back to the client as is, in the
OpenAI error shape. No answer means no access: Envoy turns an unreachable or
hanging gatekeeper into a 503 (fail closed). Which model a request names is
checked by Envoy against X-Fleet-Models.

For an API key the answer may be kept by Envoy, and says how long:
`X-Fleet-Cache-Ms`, up to ANSWER_MAX_S and never past the key's expiry. A
revoked key still stops working within the spec's revocation delay: Envoy
uses a kept answer only while its last `GET /auth/sync` (which names the
keys revoked since the one before) began within that delay, so a known key
costs no round trip however many keys there are. Provider
access tokens and browser sessions are decided on every request (an opaque
token's introspection answer is kept here, at most the revocation delay; a
provider that cannot be asked is a 503).

A user's request rate is not decided here: the answer names it
(`X-Fleet-Rpm`), and Envoy holds it, one token bucket per user shared by all
its worker threads (controller/render/envoy.py, user_rate_limit), so neither
the number of keys nor of threads changes what a user may send. A decision
refuses a user whose daily token quota is used up (429 until the next UTC
day), and each request of a user with a quota books its most from a lease
(`POST /auth/reserve`), which is refused once it no longer fits, however
long Envoy keeps the user's answer. A background thread reads Envoy's usage
log into the ledger; another (with ``--tls-dir``) publishes
the certificate Envoy serves, from Caddy's storage or the spec's files
(controller/gateway/certs.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import secrets
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from controller.backends import apis
from controller.console.actions import AUDIT_FILE, Actions, Audit
from controller.console.auth import Sessions as ConsoleSessions
from controller.console.live import LiveLog
from controller.console.routes import Console
from controller.console.routes import mount as mount_console
from controller.console.snapshot import Collector
from controller.console.warnings import console_warnings
from controller.errors import ControllerError
from controller.gateway.access import Access, Identity, gatekeeper_view
from controller.gateway.certs import Publisher, Source, served_certificate
from controller.gateway.keystore import KeyStore
from controller.gateway.ledger import Ledger, utc_day
from controller.gateway.oidc import (
    LOGIN_TTL_S,
    SESSION_TTL_S,
    OidcError,
    OidcSettings,
    OidcUnavailable,
    Provider,
    Sessions,
)
from controller.gateway.rotation import Rotation, envoy_reopen
from controller.local.state import StateDir
from controller.plan.models import Plan
from controller.render.envoy import LIVE_LOG_NAME, live_log_path
from controller.spec import load_spec
from controller.spec.models import Fleet

SESSION_COOKIE = "fleet_session"
LOGIN_COOKIE = "fleet_login"

# Bound the cache so a flood of distinct keys cannot grow memory without limit.
CACHE_MAX = 100_000
INGEST_INTERVAL_S = 0.5
GIL_SWITCH_S = 0.0005  # see main()
SPEC_POLL_S = 1.0  # how often the spec file is looked at (a stat); a changed one is reloaded
# The pause between slices of usage lines, and around each commit (controller/gateway/ledger.py), so
# reading the log never holds a core for long: Envoy's worker, the backend and the clients share the cores.
INGEST_PAUSE_S = 0.002
# When a request does not fit beside the user's requests in flight (but would alone): retry after about
# as long as those take to be recorded.
RESERVE_RETRY_S = 2
# How long Envoy may admit requests on one quota lease before it asks again (and reports what it admitted):
# LEASE_S while what is left of the quota beside the lease is less than a quarter of it, so what an unspent
# lease holds back returns soon; LEASE_LONG_S while the user is far from it (each Envoy worker thread then
# asks about once per LEASE_LONG_S for a busy user, rather than once per LEASE_S).
LEASE_S = 2.0
LEASE_LONG_S = 10.0
# How long Envoy may keep an API key's answer (never past the key's expiry). A revocation reaches it sooner:
# Envoy asks /auth/sync at least once per revocation delay before it uses a kept answer, and drops the
# answers of the keys revoked since.
ANSWER_MAX_S = 900.0
# /auth/sync names the keys revoked since the asker's last sync less this much, so a revocation committed
# while the previous sync was being answered, and one this process's own lookup cache still hid (it keeps
# a key's record up to the revocation delay), is named again.
SYNC_OVERLAP_S = 10.0


def lease_report(value: str | None) -> tuple[str, int, int] | None:
    """ "ID:ADMITTED:SPENT" (Envoy's report of its previous lease) as a tuple; ValueError when malformed."""
    if value is None:
        return None
    lease_id, admitted, spent = value.split(":")
    if not lease_id.isalnum() or int(admitted) < 0 or int(spent) < 0:
        raise ValueError(value)
    return lease_id, int(admitted), int(spent)


def error(
    status: int, message: str, code: str, err_type: str = "invalid_request_error", headers: dict[str, str] | None = None
) -> JSONResponse:
    extra = dict(headers or {})
    if status == 401:
        extra["WWW-Authenticate"] = 'Bearer realm="fleet"'
    return JSONResponse(
        {"error": {"message": message, "type": err_type, "param": None, "code": code}}, status, headers=extra
    )


def anthropic_refusal(refusal: Response) -> JSONResponse:
    """A refusal made by `error` in Anthropic's error shape, with the same status and Retry-After/WWW-Authenticate."""
    try:
        message = str(json.loads(bytes(refusal.body))["error"]["message"])
    except (ValueError, KeyError, TypeError):
        message = "the gateway refused the request"
    kept = {k: v for k, v in refusal.headers.items() if k.lower() in ("retry-after", "www-authenticate")}
    return JSONResponse(apis.anthropic_error(refusal.status_code, message), refusal.status_code, headers=kept)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.decisions = Counter(
            "fleet_gatekeeper_decisions",
            "Authentication decisions by result (an API key's answer may serve many requests).",
            ["result"],
            registry=self.registry,
        )
        self.decision_seconds = Histogram(
            "fleet_gatekeeper_decision_seconds",
            "Time to decide one authentication request, inside the gatekeeper.",
            buckets=(25e-6, 50e-6, 100e-6, 150e-6, 200e-6, 300e-6, 500e-6, 1e-3, 2e-3, 5e-3, 1e-2, 0.1, 1.0),
            registry=self.registry,
        )
        self.ingested = Gauge(
            "fleet_ledger_last_ingest_timestamp_seconds", "When the usage log was last read.", registry=self.registry
        )


class UsageTotals:
    """Tokens and requests per user and model, read from the ledger's totals at each scrape.

    The totals are kept by SQLite as rows are recorded, so these counters survive a gatekeeper
    restart and never count a request twice.
    """

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def collect(self) -> Iterable[CounterMetricFamily]:
        tokens = CounterMetricFamily(
            "fleet_tokens", "Tokens used, from the backends' own usage numbers.", labels=["user", "model", "kind"]
        )
        requests = CounterMetricFamily(
            "fleet_usage_requests", "Inference requests recorded in the ledger.", labels=["user", "model"]
        )
        for total in self.ledger.totals():
            tokens.add_metric([total.user, total.model, "prompt"], total.prompt_tokens)
            tokens.add_metric([total.user, total.model, "completion"], total.completion_tokens)
            requests.add_metric([total.user, total.model], total.requests)
        yield tokens
        yield requests


class CertificateExpiry:
    """The served certificate's expiry, read from the front door itself (Caddy exports none).

    Fetched at most once a minute, with a short timeout; when the front door
    cannot be reached the series is absent rather than a made-up number.
    """

    def __init__(self, fleet: Fleet) -> None:
        self.name = fleet.gateway.public_name
        self.port = fleet.gateway.ports.https
        self.address = "127.0.0.1" if fleet.gateway.bind is None else str(fleet.gateway.bind)
        self._cached: tuple[float, float | None] = (0.0, None)

    def collect(self) -> Iterable[GaugeMetricFamily]:
        expiry = self.expiry()
        family = GaugeMetricFamily(
            "fleet_tls_cert_expiry_timestamp_seconds",
            "When the certificate the gateway serves expires (unix time).",
            labels=["domain"],
        )
        if expiry is not None:
            family.add_metric([self.name], expiry)
        yield family

    def expiry(self) -> float | None:
        """When the served certificate expires (unix time), fetched at most once a minute; None: not known."""
        checked, expiry = self._cached
        if time.monotonic() - checked > 60:
            expiry = self._fetch()
            self._cached = (time.monotonic(), expiry)
        return expiry

    def _fetch(self) -> float | None:
        cert = served_certificate(self.address, self.port, self.name)
        return None if cert is None else cert.not_valid_after_utc.timestamp()


class Gatekeeper:
    def __init__(self, access: Access, keys: KeyStore, ledger: Ledger, cache_ttl_s: float) -> None:
        self.access = access
        self.keys = keys
        self.ledger = ledger
        self.cache_ttl_s = cache_ttl_s
        self._cache: dict[bytes, tuple[float, Identity | None, float | None]] = {}
        self._spent: dict[str, tuple[float, str, int]] = {}  # user → (checked at, day, tokens)

    def reload(self, access: Access) -> None:
        """New users, groups and models: the answers kept for keys are dropped (they name models and limits)."""
        self.access = access
        self._cache = {}

    def identify(self, key: str) -> tuple[Identity | None, float]:
        """The key's identity (None: not a valid key) and how many seconds Envoy may keep this answer: up to
        ANSWER_MAX_S, never past the key's expiry (a revocation reaches Envoy through /auth/sync)."""
        token = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        now = time.monotonic()
        hit = self._cache.get(token)
        if hit is not None and hit[0] > now:
            identity, expires = hit[1], hit[2]
        else:
            record = self.keys.check(key)
            identity, expires = None, None
            if record is not None:
                identity = self.access.identity(record.user, record.models, record.id, record.app)
                expires = record.expires
            if len(self._cache) >= CACHE_MAX:
                self._cache.clear()
            self._cache[token] = (now + self.cache_ttl_s, identity, expires)
        keep = ANSWER_MAX_S if expires is None else min(ANSWER_MAX_S, expires - time.time())
        return identity, max(keep, 0.0)

    def tokens_today(self, user: str) -> int:
        """Today's tokens for ``user``; re-read from the ledger at most once a second."""
        now = time.monotonic()
        day = utc_day(time.time())
        hit = self._spent.get(user)
        if hit is not None and hit[1] == day and now - hit[0] < 1.0:
            return hit[2]
        spent = self.ledger.tokens_on(user, day)
        self._spent[user] = (now, day, spent)
        return spent


def _file_stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def public_url(fleet: Fleet) -> str:
    gw = fleet.gateway
    return f"https://{gw.public_name}" + ("" if gw.ports.https == 443 else f":{gw.ports.https}")


def oidc_settings(fleet: Fleet, spec_dir: Path) -> OidcSettings | None:
    oidc = fleet.auth.oidc
    if oidc is None:
        return None
    secret_path = spec_dir / oidc.client_secret_file
    try:
        secret = secret_path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise SystemExit(
            f"gatekeeper: cannot read auth.oidc.client_secret_file {secret_path}: {exc.strerror}"
        ) from None
    base = public_url(fleet)
    return OidcSettings(
        oidc.issuer,
        oidc.client_id,
        secret,
        f"{base}/auth/callback",
        f"{base}/",
        oidc.scopes,
        oidc.groups_claim,
        oidc.audience,
        introspection=oidc.introspection,
        introspection_endpoint=oidc.introspection_endpoint,
        cache_s=float(fleet.auth.revocation_delay_s),
    )


def safe_next(value: str | None) -> str:
    """Only a path on this site: never an open redirect to somewhere else."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    return value


def presented_key(request: Request) -> str | None:
    """The one credential in the request, or None when there is none or more than one."""
    auth = request.headers.getlist("authorization")
    api_key = request.headers.getlist("x-api-key")
    if len(auth) + len(api_key) != 1:
        return None
    if auth:
        scheme, _, value = auth[0].partition(" ")
        if scheme.lower() != "bearer":
            return None
        value = value.strip()
    else:
        value = api_key[0].strip()
    return value or None


def seconds_to_utc_midnight(now: float) -> int:
    return int(86400 - now % 86400) + 1


def cert_source(fleet: Fleet, spec_dir: Path, caddy_data: Path | None) -> Source:
    """Where the certificate Envoy serves comes from: the operator's files, or what Caddy issued."""
    tls = fleet.gateway.tls
    if tls.mode == "files" and tls.cert_file is not None and tls.key_file is not None:
        return Source(cert_file=spec_dir / tls.cert_file, key_file=spec_dir / tls.key_file)
    if caddy_data is None:
        raise SystemExit(f"gatekeeper: tls mode {tls.mode!r} needs --caddy-data (Caddy's data folder)")
    return Source(caddy_data=caddy_data, name=fleet.gateway.public_name)


def create_app(
    spec_path: Path,
    state_dir: Path,
    usage_log: Path | None = None,
    tls_dir: Path | None = None,
    caddy_data: Path | None = None,
    secrets_dir: Path | None = None,
    stack_dir: Path | None = None,
) -> FastAPI:
    """The gatekeeper; with ``tls_dir`` it also publishes the certificate Envoy serves there. It serves the operator
    console too (controller/console/): ``secrets_dir`` holds the worker secret its actions need, ``stack_dir`` is
    the `controller up` stack it runs in (its supervisor), if any."""
    fleet = load_spec(spec_path).fleet
    publisher = Publisher(cert_source(fleet, spec_path.parent, caddy_data), tls_dir) if tls_dir else None
    settings = oidc_settings(fleet, spec_path.parent)
    provider = Provider(settings) if settings else None
    sessions = Sessions(state_dir / "sessions.db") if settings else None
    keys = KeyStore(state_dir / "keys.db")
    ledger = Ledger(state_dir / "usage.db")
    gate = Gatekeeper(Access(fleet), keys, ledger, cache_ttl_s=min(float(fleet.auth.revocation_delay_s), 5.0))
    metrics = Metrics()
    certificate = CertificateExpiry(fleet)
    metrics.registry.register(certificate)
    metrics.registry.register(UsageTotals(ledger))
    stop = threading.Event()

    def ingest_loop() -> None:
        assert usage_log is not None
        # The usage log kept small without losing a line (controller/gateway/rotation.py).
        live = Path(live_log_path(str(usage_log)))
        rotation = Rotation(usage_log, live, ledger, envoy_reopen(lambda: gate.access.fleet.gateway.ports.envoy_admin))
        while not stop.is_set():
            try:
                ledger.ingest(usage_log, pause=lambda: stop.wait(INGEST_PAUSE_S))
                metrics.ingested.set(time.time())
                rotation.step()
            except Exception as exc:  # the next round retries; a bad round must not stop the loop
                print(f"usage ingest failed: {exc}", flush=True)
            stop.wait(INGEST_INTERVAL_S)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if usage_log is not None:
            threading.Thread(target=ingest_loop, name="ingest", daemon=True).start()
        threading.Thread(target=watch_spec, name="spec", daemon=True).start()
        if publisher is not None:
            publisher.start()
        console.collector.start()
        yield
        stop.set()
        console.collector.stop()
        if publisher is not None:
            publisher.stop()

    # This process and the users, groups and models it knows: Envoy drops the answers it holds when it changes.
    epoch = [secrets.token_hex(8)]

    def watch_spec() -> None:
        """Users, groups and the models' names, reloaded in place when the spec file changes (deploy replaces it by
        a rename; an editor may rewrite it): answers follow within SPEC_POLL_S, with no restart and no request
        dropped. A spec that does not load is reported and the previous one kept. The rest (gateway, auth) is read
        at start only: deploy and `controller up` restart the gatekeeper when it changes (`gatekeeper_view`)."""
        seen = _file_stamp(spec_path)
        while not stop.wait(SPEC_POLL_S):
            now = _file_stamp(spec_path)
            if now == seen:
                continue
            seen = now
            try:
                new = load_spec(spec_path).fleet
            except (ControllerError, OSError) as exc:
                print(f"spec {spec_path} changed but does not load; keeping the previous one: {exc}", flush=True)
                continue
            gate.reload(Access(new))
            epoch[0] = secrets.token_hex(8)
            pending = " (its gateway or auth changed too: those apply at the next restart)"
            print(
                f"spec reloaded: users, groups and models{pending if gatekeeper_view(new) != view else ''}", flush=True
            )

    view = gatekeeper_view(fleet)
    app = FastAPI(title="fleet gatekeeper", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.gate = gate

    @app.get("/healthz")
    def healthz() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def cookie(response: Response, name: str, value: str, max_age: int, path: str = "/") -> None:
        response.set_cookie(name, value, max_age=max_age, path=path, secure=True, httponly=True, samesite="lax")

    @app.get("/auth/login")
    def login(next: str | None = None) -> Response:
        if provider is None or sessions is None:
            return error(404, "single sign-on is not configured", "not_found")
        browser, state, nonce, verifier = sessions.begin(safe_next(next))
        try:
            target = provider.authorization_url(state, nonce, verifier)
        except OidcError as exc:
            return error(503, str(exc), "sso_unavailable", "server_error")
        response = RedirectResponse(target, status_code=302)
        cookie(response, LOGIN_COOKIE, browser, LOGIN_TTL_S, path="/auth")
        return response

    @app.get("/auth/callback")
    def callback(request: Request, code: str | None = None, state: str | None = None) -> Response:
        if provider is None or sessions is None:
            return error(404, "single sign-on is not configured", "not_found")
        if not code or not state:
            return error(401, "the sign-in was not completed", "sso_failed")
        try:
            nonce, verifier, next_path = sessions.finish(state, request.cookies.get(LOGIN_COOKIE))
            who = provider.exchange(code, verifier, nonce)
        except OidcError as exc:
            metrics.decisions.labels("sso_refused").inc()
            return error(401, str(exc), "sso_failed")
        response = RedirectResponse(next_path, status_code=302)
        cookie(response, SESSION_COOKIE, sessions.create(who), SESSION_TTL_S)
        response.delete_cookie(LOGIN_COOKIE, path="/auth")
        return response

    @app.get("/auth/logout")
    def logout(request: Request) -> Response:
        if provider is None or sessions is None:
            return error(404, "single sign-on is not configured", "not_found")
        session = request.cookies.get(SESSION_COOKIE)
        if session:
            sessions.end(session)
        try:
            target = provider.end_session_url() or "/"
        except OidcError:
            target = "/"
        response = RedirectResponse(target, status_code=302)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    def identify(request: Request) -> Identity | Response:
        """The caller, from an API key, a provider access token or a session cookie; else the refusal."""
        found, _ = identify_for_reuse(request)
        return found

    def identify_for_reuse(request: Request) -> tuple[Identity | Response, float]:
        """identify(), and for how many seconds Envoy may reuse the answer (0: decide every request)."""
        key = presented_key(request)
        if key is not None and key.startswith("sk-"):
            identity, valid_s = gate.identify(key) if fleet.auth.api_keys else (None, 0.0)
            if identity is None:
                metrics.decisions.labels("bad_key").inc()
                return error(401, "Incorrect API key provided.", "invalid_api_key"), 0.0
            # A revocation delay of 0: Envoy keeps no answer, and asks about every request.
            return identity, valid_s if fleet.auth.revocation_delay_s > 0 else 0.0
        return identify_other(request, key), 0.0

    def outpost_login(request: Request) -> Identity | None:
        """`front: caddy` with `forward_auth`: the user and groups the operator's SSO outpost named, as Caddy
        copied them from its answer (after removing any a client sent: Caddy strips every X-Fleet-* first)."""
        sso = fleet.gateway.forward_auth
        if sso is None or request.headers.get("x-fleet-front") != "caddy":
            return None
        user = (request.headers.get("x-fleet-sso-user") or "").strip()
        if not user:
            return None
        raw = request.headers.get("x-fleet-sso-groups") or ""
        groups = [g.strip() for g in raw.split(sso.groups_separator) if g.strip()]
        return gate.access.identity_for_login(user, groups)

    def identify_other(request: Request, key: str | None) -> Identity | Response:
        if key is not None and provider is not None:
            try:
                who = provider.verify_access_token(key)
            except OidcUnavailable:  # the provider could not be asked: fail closed, and not as a bad token
                metrics.decisions.labels("unavailable").inc()
                return error(503, "authentication is temporarily unavailable", "auth_unavailable", "server_error")
            except OidcError:
                metrics.decisions.labels("bad_token").inc()
                return error(401, "Invalid access token.", "invalid_token")
            return gate.access.identity_for_login(who.user, who.groups)
        if key is not None:
            metrics.decisions.labels("bad_key").inc()
            return error(401, "Incorrect API key provided.", "invalid_api_key")
        outpost = outpost_login(request)
        if outpost is not None:
            return outpost
        session = request.cookies.get(SESSION_COOKIE)
        found = sessions.get(session) if session and sessions is not None else None
        if found is None:
            metrics.decisions.labels("no_key").inc()
            return error(
                401,
                "You didn't provide an API key, or provided more than one. Send one as 'Authorization: Bearer sk-…'.",
                "missing_api_key",
            )
        return gate.access.identity_for_login(found.user, found.groups)

    @app.get("/auth/whoami")
    def whoami(request: Request) -> Response:
        try:
            found = identify(request)
        except Exception:  # the stores failing must close the door, not open it
            return error(503, "authentication is temporarily unavailable", "auth_unavailable", "server_error")
        if isinstance(found, Response):
            return found
        return JSONResponse({"user": found.user, "groups": list(found.groups), "models": sorted(found.models)})

    def sso_identity(request: Request) -> Identity | None:
        """A browser's single sign-on (an OIDC session, or Caddy's outpost), for the console; None without one."""
        outpost = outpost_login(request)
        if outpost is not None:
            return outpost
        session = request.cookies.get(SESSION_COOKIE)
        found = sessions.get(session) if session and sessions is not None else None
        return None if found is None else gate.access.identity_for_login(found.user, found.groups)

    console = build_console(
        spec_path, state_dir, usage_log, secrets_dir, stack_dir, gate, keys, ledger, certificate.expiry
    )
    console.sso_identity = sso_identity
    console.sso_configured = provider is not None
    mount_console(app, console)

    @app.api_route("/auth/check", methods=["GET", "POST", "HEAD"])
    def check(request: Request) -> Response:
        began = time.perf_counter()
        try:
            answer = decide(request)
            # Behind Caddy (front: caddy) a refusal goes to the client as given here: on Anthropic's routes (the
            # URI Caddy's forward_auth names), in Anthropic's shape. Envoy's Lua filter reshapes it itself.
            if answer.status_code >= 400 and apis.is_anthropic(request.headers.get("x-forwarded-uri", "")):
                answer = anthropic_refusal(answer)
            return answer
        finally:
            metrics.decision_seconds.observe(time.perf_counter() - began)

    def decide(request: Request) -> Response:
        try:
            found, reuse_s = identify_for_reuse(request)
            if isinstance(found, Response):
                return found
            if request.headers.get("x-fleet-front") == "caddy":
                reuse_s = 0.0  # Caddy's forward_auth asks for every request and keeps no answer
            identity = found
            spent = gate.tokens_today(identity.user) if identity.daily_tokens is not None else 0
        except Exception:  # the stores or the provider failing must close the door, not open it
            metrics.decisions.labels("unavailable").inc()
            return error(503, "authentication is temporarily unavailable", "auth_unavailable", "server_error")
        if identity.daily_tokens is not None and spent >= identity.daily_tokens:
            metrics.decisions.labels("quota").inc()
            return error(
                429,
                f"daily token quota of {identity.daily_tokens} used up; it resets at 00:00 UTC",
                "quota_exceeded",
                headers={"Retry-After": str(seconds_to_utc_midnight(time.time()))},
            )
        headers = identity.headers()
        if identity.daily_tokens is not None:  # each request then books its most (see /auth/reserve)
            headers["X-Fleet-Daily-Tokens"] = str(identity.daily_tokens)
        if reuse_s > 0:
            headers["X-Fleet-Cache-Ms"] = str(int(reuse_s * 1000))
        metrics.decisions.labels("allow").inc()
        return Response(status_code=200, headers=headers)

    @app.get("/auth/sync")
    def sync(request: Request) -> Response:
        """What Envoy needs to keep using the answers it holds: the keys revoked since it last asked.

        Asked by Envoy only (the route is closed to clients), per worker thread, at least once per revocation
        delay before it uses a kept answer. X-Fleet-Since: the X-Fleet-Since of its previous answer (absent the
        first time). The answer: X-Fleet-Revoked (key ids, comma-separated), X-Fleet-Since (to send next time)
        and X-Fleet-Epoch (this process: when it changes, the spec may have, and Envoy drops every answer).
        """
        now = time.time()
        try:
            since = float(request.headers.get("x-fleet-since") or now)
            revoked = keys.revoked_since(since - SYNC_OVERLAP_S)
        except ValueError:
            return error(400, "X-Fleet-Since must be a number", "bad_request")
        except Exception:  # the key store failing: Envoy keeps no answer it cannot vouch for
            metrics.decisions.labels("unavailable").inc()
            return error(503, "authentication is temporarily unavailable", "auth_unavailable", "server_error")
        headers = {"X-Fleet-Revoked": ",".join(revoked), "X-Fleet-Since": f"{now:.3f}", "X-Fleet-Epoch": epoch[0]}
        return Response(status_code=200, headers=headers)

    @app.post("/auth/reserve")
    def reserve(request: Request) -> Response:
        """A lease of a user's daily quota for Envoy's requests, or a refusal (429).

        Asked by Envoy only (the route is closed to clients), after it has authenticated the request:
        X-Fleet-User and X-Fleet-Daily-Tokens are the identity this process gave it, X-Fleet-Reserve the
        request's bound (body bytes + its completion cap), X-Fleet-Lease-Report "ID:ADMITTED:SPENT" the
        Envoy worker thread's previous lease of this user, closed. The answer: X-Fleet-Lease (its id),
        X-Fleet-Lease-Tokens (what it holds, at least the request's bound) and X-Fleet-Lease-Ms (how long
        Envoy may spend from it). With X-Fleet-Lease-Single: 1, a lease of the request's bound alone,
        already closed (Envoy asks so while another renewal of the same user is under way). See
        controller/gateway/ledger.py, LEASES.
        """
        try:
            user = request.headers["x-fleet-user"]
            limit = int(request.headers["x-fleet-daily-tokens"])
            tokens = int(request.headers["x-fleet-reserve"])
            report = lease_report(request.headers.get("x-fleet-lease-report"))
        except (KeyError, ValueError):
            return error(
                400,
                "a lease needs X-Fleet-User, -Daily-Tokens, -Reserve (and a well-formed -Lease-Report)",
                "bad_request",
            )
        try:
            single = request.headers.get("x-fleet-lease-single") == "1"
            granted = ledger.lease(user, tokens, limit, time.time(), report, single=single)
        except Exception:  # the ledger failing must close the door, not open it
            metrics.decisions.labels("unavailable").inc()
            return error(503, "authentication is temporarily unavailable", "auth_unavailable", "server_error")
        if isinstance(granted, tuple):
            seconds = LEASE_LONG_S if granted.left >= limit / 4 else LEASE_S
            headers = {
                "X-Fleet-Lease": granted.id,
                "X-Fleet-Lease-Tokens": str(granted.size),
                "X-Fleet-Lease-Ms": str(int(seconds * 1000)),
            }
            return Response(status_code=200, headers=headers)
        room = granted
        metrics.decisions.labels("quota").inc()
        return error(
            429,
            f"daily token quota of {limit}: this request may use up to {tokens} tokens (its body's bytes and "
            f"its max_tokens, or the model's context without one) and {room} remain with the requests in flight "
            "counted; lower max_tokens, wait for those requests, or wait for 00:00 UTC",
            "quota_exceeded",
            headers={"Retry-After": str(RESERVE_RETRY_S if room > 0 else seconds_to_utc_midnight(time.time()))},
        )

    return app


def build_console(
    spec_path: Path,
    state_dir: Path,
    usage_log: Path | None,
    secrets_dir: Path | None,
    stack_dir: Path | None,
    gate: Gatekeeper,
    keys: KeyStore,
    ledger: Ledger,
    cert_expiry: Callable[[], float | None] = lambda: None,
) -> Console:
    """The operator console's parts (controller/console/), over the gatekeeper's own key store and ledger."""
    from controller.plan import make_plan
    from controller.secrets import read_worker_key

    plans: dict[str, Any] = {}

    def plan_of() -> Plan:
        """The plan of the spec as it is now (deploy replaces it; `controller up` rewrites it)."""
        stamp = _file_stamp(spec_path)
        if plans.get("stamp") != stamp or "plan" not in plans:
            try:
                plans["plan"] = make_plan(load_spec(spec_path))
            except (ControllerError, OSError) as exc:
                if "plan" not in plans:
                    raise
                print(f"console: spec {spec_path} does not plan; showing the previous one: {exc}", flush=True)
            plans["stamp"] = stamp
        plan: Plan = plans["plan"]
        return plan

    def worker_key() -> str | None:
        if secrets_dir is None:
            return None
        try:
            return read_worker_key(secrets_dir)
        except (ControllerError, OSError):
            return None

    def worker_of(upstream: str | None) -> str | None:
        if not upstream:
            return None
        plan = plan_of()
        for w in plan.workers:
            if upstream in (f"{w.address}:{w.port}", f"[{w.address}]:{w.port}"):
                return w.name
        return "swap coordinator" if upstream.endswith(f":{plan.fleet.gateway.ports.swapper}") else upstream

    stack = StateDir(stack_dir) if stack_dir is not None else None
    live = LiveLog(Path(live_log_path(str(usage_log))) if usage_log else state_dir / LIVE_LOG_NAME, worker_of)
    ledger.ended = live.ended  # the requests that ended, from the usage lines the ledger reads anyway
    audit = Audit(state_dir / AUDIT_FILE)
    return Console(
        fleet_of=lambda: gate.access.fleet,
        identify_key=lambda key: gate.identify(key)[0] if key.startswith("sk-") else None,
        sso_identity=lambda _: None,
        sso_configured=False,
        collector=Collector(plan_of, state_dir / "usage.db", live, stack, console_warnings(cert_expiry)),
        actions=Actions(plan_of, keys, audit, worker_key, stack),
        audit=audit,
        keys=keys,
        sessions=ConsoleSessions(),
    )


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(prog="gatekeeper", description=__doc__)
    parser.add_argument("--spec", type=Path, required=True)
    parser.add_argument("--state-dir", type=Path, required=True, help="holds keys.db and usage.db")
    parser.add_argument("--usage-log", type=Path, help="Envoy's usage log to read into the ledger")
    parser.add_argument("--tls-dir", type=Path, help="publish the certificate Envoy serves here (its SDS folder)")
    parser.add_argument("--caddy-data", type=Path, help="Caddy's data folder: where it keeps what it issued")
    parser.add_argument("--secrets-dir", type=Path, help="the worker secret, for the console's load/unload/restart")
    parser.add_argument("--stack-dir", type=Path, help="the `controller up` stack this runs in (its supervisor)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    # The answers Envoy waits for (a key's first check, a quota lease) share the GIL with the background threads
    # (the usage ingest, the console's collector, which runs niced and so holds the GIL longer in wall time): a
    # waiting thread gets it after at most this long, not Python's default 5 ms.
    sys.setswitchinterval(GIL_SWITCH_S)
    app = create_app(
        args.spec, args.state_dir, args.usage_log, args.tls_dir, args.caddy_data, args.secrets_dir, args.stack_dir
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
