"""An SSO outpost double: Authelia's forward-auth endpoint, for Caddy's `forward_auth` (gateway.forward_auth).

Authelia cannot run here (no installable binary), so this follows its documented forward-auth API
(`GET /api/authz/forward-auth`): for a request whose `authelia_session` cookie names a signed-in session,
200 with `Remote-User`, `Remote-Groups` (comma-separated), `Remote-Name` and `Remote-Email`; for any other,
401 (what Authelia answers a non-browser client; a browser would get a 302 to the portal instead).

    python -m tests.doubles.sso_outpost --port N --session TOKEN=USER:GROUP,GROUP ...
"""

from __future__ import annotations

import argparse
from http.cookies import SimpleCookie
from typing import Any

from tests.doubles.common import Handler, serve


def routes(sessions: dict[str, tuple[str, str]]) -> dict[tuple[str, str], Any]:
    def authz(h: Handler) -> None:
        cookie = SimpleCookie(h.headers.get("cookie") or "")
        morsel = cookie.get("authelia_session")
        found = sessions.get(morsel.value) if morsel is not None else None
        if found is None:
            h.send_text(401, "401 Unauthorized")
            return
        user, groups = found
        h.send_response(200)
        for name, value in (
            ("Remote-User", user),
            ("Remote-Groups", groups),
            ("Remote-Name", user.title()),
            ("Remote-Email", f"{user}@example.org"),
        ):
            h.send_header(name, value)
        h.send_header("content-length", "0")
        h.end_headers()

    def health(h: Handler) -> None:
        h.send_json(200, {"status": "OK"})

    return {
        ("GET", "/api/authz/forward-auth"): authz,
        ("HEAD", "/api/authz/forward-auth"): authz,
        ("GET", "/api/health"): health,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="sso_outpost")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--session", action="append", default=[], help="TOKEN=USER:GROUP,GROUP")
    args = parser.parse_args()
    sessions = {}
    for item in args.session:
        token, _, who = item.partition("=")
        user, _, groups = who.partition(":")
        sessions[token] = (user, groups)
    serve("127.0.0.1", args.port, routes(sessions))


if __name__ == "__main__":
    main()
