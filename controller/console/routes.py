"""The console's HTTP routes, mounted on the gatekeeper's app (Envoy sends `/console` there, unauthenticated:
these routes decide who may see them, see controller/console/auth.py).

    GET  /console                  the page (admins; others are sent to /console/login)
    GET  /console/login            sign in with an admin's API key (or single sign-on, where configured)
    POST /console/login            form `key`: a console session for an admin's key
    POST /console/logout           ends the session
    GET  /console/static/<file>    the page's module, styles
    GET  /console/api/session      {user, via, csrf, fleet}
    GET  /console/api/snapshot     the whole picture, once (JSON; also for an admin's bearer key)
    GET  /console/events           Server-Sent Events: `snapshot` (the whole picture), then `patch` (the sections
                                   that changed), about once a second; `retry: 1000` so a browser reconnects
    GET  /console/api/keys         the key store's records (no secrets)
    POST /console/api/actions      {action, target, ...}: load, unload, restart, create_key, revoke_key
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse

from controller.console import auth
from controller.console.actions import ActionError, Actions, Audit
from controller.console.snapshot import Collector
from controller.gateway.access import Identity
from controller.gateway.keystore import KeyStore
from controller.spec.models import Fleet

STATIC = {"console.js": "text/javascript", "console.css": "text/css"}
HEARTBEAT_S = 15.0
WAKE_S = 1.0  # an open event stream wakes at least this often without a new picture (sign-out, keep-alive)
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class Pulse:
    """Wakes the open event streams when the collector has made a newer picture: each stream wakes once per
    picture. (Polling every 0.1 s cost each open console ten wake-ups a second on the gatekeeper's event loop,
    the loop that also answers Envoy's key checks on the request path.)"""

    def __init__(self, collector: Collector) -> None:
        self.collector = collector
        self.loop: asyncio.AbstractEventLoop | None = None
        self.event = asyncio.Event()
        self.subscribed = False

    def current(self) -> asyncio.Event:
        """The event the next picture sets; taken before reading the collector's version, so none is missed."""
        loop = asyncio.get_running_loop()
        if self.loop is not loop:  # the first stream (or a new loop, in tests): the events belong to it
            self.loop, self.event = loop, asyncio.Event()
        if not self.subscribed:
            self.collector.subscribe(self._from_collector)
            self.subscribed = True
        return self.event

    def _from_collector(self) -> None:
        loop = self.loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits any more
                loop.call_soon_threadsafe(self._fire)

    def _fire(self) -> None:
        event, self.event = self.event, asyncio.Event()
        event.set()

    @staticmethod
    async def wait(event: asyncio.Event, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout_s)


@dataclass
class Console:
    fleet_of: Callable[[], Fleet]
    identify_key: Callable[[str], Identity | None]  # an API key's identity, or None
    sso_identity: Callable[[Request], Identity | None]  # a single sign-on session's, or None
    sso_configured: bool
    collector: Collector
    actions: Actions
    audit: Audit
    keys: KeyStore
    sessions: auth.Sessions


def _static(name: str) -> str:
    return resources.files("controller.console").joinpath("static", name).read_text(encoding="utf-8")


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    doc = (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{html.escape(title)}</title><link rel='stylesheet' href='/console/static/console.css'></head>"
        f"<body class='narrow'>{body}</body></html>"
    )
    return HTMLResponse(doc, status_code=status, headers=SECURITY_HEADERS)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "status": status}}, status_code=status, headers=SECURITY_HEADERS)


def mount(app: FastAPI, c: Console) -> None:
    def bearer(request: Request) -> str | None:
        value = request.headers.get("authorization") or ""
        return value[7:].strip() if value.lower().startswith("bearer ") else None

    def session_of(request: Request) -> auth.Session | None:
        """The console session of the browser's cookie; else one made now for an admin's single sign-on."""
        found = c.sessions.get(request.cookies.get(auth.COOKIE))
        if found is not None:
            return found if auth.is_admin(c.fleet_of(), found.user, found.groups) else None
        return None

    def caller(request: Request) -> tuple[auth.Session | None, Response | None]:
        """The admin behind an API call: a console session, or an admin's bearer API key; else the refusal."""
        key = bearer(request)
        if key is not None:
            identity = c.identify_key(key)
            if identity is None:
                return None, _error(401, "Incorrect API key provided.")
            if not auth.is_admin(c.fleet_of(), identity.user, identity.groups):
                return None, _error(403, auth.not_admin_message(c.fleet_of(), identity.user))
            via = f"api key {identity.key_id}" if identity.key_id else "access token"
            return auth.Session(identity.user, identity.groups, via, "", time.time() + 60), None
        found = c.sessions.get(request.cookies.get(auth.COOKIE))
        if found is None:
            return None, _error(401, "sign in at /console/login first")
        if not auth.is_admin(c.fleet_of(), found.user, found.groups):
            return None, _error(403, auth.not_admin_message(c.fleet_of(), found.user))
        return found, None

    def set_cookie(response: Response, token: str) -> None:
        response.set_cookie(
            auth.COOKIE,
            token,
            max_age=auth.SESSION_TTL_S,
            path="/console",
            secure=True,
            httponly=True,
            samesite="strict",
        )

    @app.get("/console")
    @app.get("/console/")
    def page(request: Request) -> Response:
        if session_of(request) is None:
            identity = c.sso_identity(request)
            if identity is None:
                return RedirectResponse("/console/login", status_code=303, headers=SECURITY_HEADERS)
            if not auth.is_admin(c.fleet_of(), identity.user, identity.groups):
                return _page(
                    "Not an admin",
                    f"<h1>403</h1><p>{html.escape(auth.not_admin_message(c.fleet_of(), identity.user))}</p>",
                    403,
                )
            token, _ = c.sessions.create(identity.user, identity.groups, "single sign-on")
            response: Response = HTMLResponse(_static("index.html"), headers=SECURITY_HEADERS)
            set_cookie(response, token)
            return response
        return HTMLResponse(_static("index.html"), headers=SECURITY_HEADERS)

    @app.get("/console/login")
    def login_page(request: Request) -> Response:
        return login_form("")

    def login_form(message: str, status: int = 200) -> HTMLResponse:
        sso = "<p><a href='/auth/login?next=/console'>Sign in with single sign-on</a></p>" if c.sso_configured else ""
        note = f"<p class='error' role='alert'>{html.escape(message)}</p>" if message else ""
        return _page(
            f"{c.fleet_of().name}: console sign-in",
            f"<main><h1>Fleet {html.escape(c.fleet_of().name)}: operator console</h1>{note}"
            "<form method='post' action='/console/login'><label for='key'>An admin's API key</label>"
            "<input id='key' name='key' type='password' autocomplete='off' required placeholder='sk-fleet-…'>"
            f"<button type='submit'>Sign in</button></form>{sso}</main>",
            status,
        )

    @app.post("/console/login")
    async def login(request: Request) -> Response:
        if not auth.same_origin(request):
            return login_form("this sign-in did not come from this console's own page", 403)
        # One urlencoded field: read here rather than with a multipart parser the gatekeeper does not otherwise need.
        form = parse_qs((await request.body())[:8192].decode("utf-8", "replace"))
        key = (form.get("key") or [""])[0].strip()
        identity = c.identify_key(key) if key else None
        if identity is None:
            return login_form("that API key is not valid (unknown, expired or revoked)", 401)
        if not auth.is_admin(c.fleet_of(), identity.user, identity.groups):
            return login_form(auth.not_admin_message(c.fleet_of(), identity.user), 403)
        token, _ = c.sessions.create(identity.user, identity.groups, f"api key {identity.key_id}")
        response = RedirectResponse("/console", status_code=303, headers=SECURITY_HEADERS)
        set_cookie(response, token)
        return response

    @app.post("/console/logout")
    def logout(request: Request) -> Response:
        found = c.sessions.get(request.cookies.get(auth.COOKIE))
        if found is not None and not auth.csrf_ok(found, request):
            return _error(403, "missing or wrong X-CSRF-Token")
        c.sessions.end(request.cookies.get(auth.COOKIE))
        response = JSONResponse({"ok": True}, headers=SECURITY_HEADERS)
        response.delete_cookie(auth.COOKIE, path="/console")
        return response

    @app.get("/console/static/{name}")
    def static(name: str) -> Response:
        if name not in STATIC:
            return _error(404, f"no file {name!r}")
        headers = {k: v for k, v in SECURITY_HEADERS.items() if k != "Cache-Control"}
        return Response(_static(name), media_type=STATIC[name], headers={**headers, "Cache-Control": "no-cache"})

    @app.get("/console/api/session")
    def session_info(request: Request) -> Response:
        found, refused = caller(request)
        if refused is not None:
            return refused
        assert found is not None
        return JSONResponse(
            {"user": found.user, "via": found.via, "csrf": found.csrf, "fleet": c.fleet_of().name},
            headers=SECURITY_HEADERS,
        )

    @app.get("/console/api/snapshot")
    def snapshot(request: Request) -> Response:
        _, refused = caller(request)
        if refused is not None:
            return refused
        return JSONResponse(with_audit(c.collector.snapshot()), headers=SECURITY_HEADERS)

    def with_audit(doc: dict[str, Any]) -> dict[str, Any]:
        return {**doc, "audit": c.audit.last(20)}

    @app.get("/console/api/keys")
    def keys(request: Request) -> Response:
        _, refused = caller(request)
        if refused is not None:
            return refused
        return JSONResponse({"keys": [r.as_dict() for r in c.keys.list()]}, headers=SECURITY_HEADERS)

    @app.post("/console/api/actions")
    async def act(request: Request) -> Response:
        found, refused = caller(request)
        if refused is not None:
            return refused
        assert found is not None
        if bearer(request) is None and not auth.csrf_ok(found, request):
            return _error(403, "missing or wrong X-CSRF-Token, or the request came from another site")
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the body must be a JSON object: {action, target, ...}")
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object: {action, target, ...}")
        try:
            result = await asyncio.to_thread(c.actions.run, found, body)
        except ActionError as exc:
            return _error(exc.status, str(exc))
        c.collector.want()
        return JSONResponse({"ok": True, **result}, headers=SECURITY_HEADERS)

    cache: dict[str, Any] = {}
    pulse = Pulse(c.collector)

    def encoded() -> tuple[int, dict[str, Any], dict[str, str]]:
        """The latest picture and each of its sections encoded, once per picture for every open stream."""
        version = c.collector.version
        if cache.get("version") != version:
            doc = with_audit(c.collector.latest or {})
            sections = {k: json.dumps(v, separators=(",", ":"), sort_keys=True) for k, v in doc.items()}
            cache.update(version=version, doc=doc, sections=sections)
        return version, cache["doc"], cache["sections"]

    @app.get("/console/events")
    async def events(request: Request) -> Response:
        _, refused = caller(request)
        if refused is not None:
            return refused
        token = request.cookies.get(auth.COOKIE)
        c.collector.want()

        async def stream() -> AsyncIterator[str]:
            yield "retry: 1000\n\n"
            sent: dict[str, str] = {}
            version, beat = -1, time.monotonic()
            while True:
                woken_by = pulse.current()
                if await request.is_disconnected():
                    return
                if token is not None and session_of(request) is None:
                    yield 'event: end\ndata: {"reason": "signed out"}\n\n'
                    return
                c.collector.want()
                if c.collector.version != version and c.collector.latest is not None:
                    version, doc, sections = encoded()
                    if not sent:
                        yield f"event: snapshot\ndata: {json.dumps(doc, separators=(',', ':'))}\n\n"
                    else:
                        changed = {k: doc[k] for k, v in sections.items() if sent.get(k) != v and k != "time"}
                        if changed:
                            changed["time"] = doc["time"]
                            yield f"event: patch\ndata: {json.dumps(changed, separators=(',', ':'))}\n\n"
                    sent = sections
                    beat = time.monotonic()
                elif time.monotonic() - beat > HEARTBEAT_S:
                    yield ": keepalive\n\n"
                    beat = time.monotonic()
                await pulse.wait(woken_by, WAKE_S)

        headers = {**SECURITY_HEADERS, "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)
