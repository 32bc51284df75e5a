"""Who may open the console, and its sessions.

Admins only: a user the spec marks `admin: true`, or a member of a group that is (`users[].admin`,
`groups[].admin`). An admin signs in with one of their API keys on `/console/login`, or arrives with a single
sign-on session (`/auth/login?next=/console`); either way the console gives the browser a session of its own
(cookie `fleet_console`, path `/console`, Secure, HttpOnly, SameSite=Strict) with a CSRF token bound to it. A
script may instead send an admin's API key as a bearer token on each call (browsers never send one by themselves,
so those calls need no CSRF token).

Every state-changing call needs the session's token in `X-CSRF-Token` and, where the browser sends one, an
`Origin` of this very host (a cross-site form cannot set the header, and SameSite=Strict keeps the cookie off
cross-site requests besides). The console sends no CORS headers: other origins cannot read its answers.
Sessions live in the gatekeeper's memory: a restart signs everyone out.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.requests import Request

from controller.spec.models import Fleet

COOKIE = "fleet_console"
SESSION_TTL_S = 12 * 3600
MAX_SESSIONS = 10_000


def is_admin(fleet: Fleet, user: str, groups: tuple[str, ...] | list[str]) -> bool:
    if any(u.name == user and u.admin for u in fleet.users):
        return True
    admin_groups = {g.name for g in fleet.groups if g.admin}
    return any(g in admin_groups for g in groups)


def not_admin_message(fleet: Fleet, user: str) -> str:
    return (
        f"user {user} is not an admin of fleet {fleet.name}: the console is for admins only; set `admin: true` on "
        "the user or on one of their groups in the spec"
    )


@dataclass(frozen=True)
class Session:
    user: str
    groups: tuple[str, ...]
    via: str  # "api key <id>" or "single sign-on": who did what, in the audit log
    csrf: str
    expires: float


class Sessions:
    def __init__(self) -> None:
        self._by_hash: dict[bytes, Session] = {}
        self._lock = threading.Lock()

    def create(self, user: str, groups: tuple[str, ...], via: str) -> tuple[str, Session]:
        token = secrets.token_urlsafe(32)
        session = Session(user, groups, via, secrets.token_urlsafe(24), time.time() + SESSION_TTL_S)
        with self._lock:
            if len(self._by_hash) >= MAX_SESSIONS:  # the oldest go first
                for old in sorted(self._by_hash, key=lambda k: self._by_hash[k].expires)[: MAX_SESSIONS // 10]:
                    del self._by_hash[old]
            self._by_hash[_hash(token)] = session
        return token, session

    def get(self, token: str | None) -> Session | None:
        if not token:
            return None
        with self._lock:
            session = self._by_hash.get(_hash(token))
            if session is not None and session.expires < time.time():
                del self._by_hash[_hash(token)]
                return None
        return session

    def end(self, token: str | None) -> None:
        if token:
            with self._lock:
                self._by_hash.pop(_hash(token), None)


def _hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def same_origin(request: Request) -> bool:
    """A state-changing call from this host's own pages: its Origin (where the browser sends one) names the host
    the request was sent to, and Sec-Fetch-Site (where sent) does not say cross-site."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    if origin is None:
        return True
    host = request.headers.get("host") or ""
    return urlsplit(origin).netloc.lower() == host.lower()


def csrf_ok(session: Session, request: Request) -> bool:
    sent = request.headers.get("x-csrf-token") or ""
    return secrets.compare_digest(sent.encode(), session.csrf.encode()) and same_origin(request)
