"""Caddy: the TLS front door, `<gateway host>/caddy/Caddyfile`.

Text format, so a Jinja template (``caddy/Caddyfile.j2``) with
StrictUndefined. TLS by ACME, Caddy's internal CA, or given files; every
client-sent identity and `x-envoy-*` header stripped; `/auth/*` (browser
login) to the gatekeeper, everything else to Envoy, which authenticates each
request itself (its Lua filter asks the gatekeeper and reuses an API key's
answer; see envoy/model_router.lua). No `forward_auth`: a sub-request per
request cost more than the rest of the chain (docs/performance.md). No
buffering or compression, so server-sent events flow as produced.
"""

from __future__ import annotations

import jinja2

from controller.plan.models import Plan
from controller.render import ASSETS, Files, renderer

# Stripped from every client request (Envoy strips X-Fleet-* and X-Envoy-* again before authenticating).
STRIP_HEADERS = (
    "X-Fleet-*",
    "X-Envoy-*",
    "Remote-User",
    "Remote-Groups",
    "Remote-Email",
    "Remote-Name",
    "X-Forwarded-User",
    "X-Forwarded-Email",
    "X-Forwarded-Groups",
    "X-Forwarded-Preferred-Username",
    "X-Auth-Request-*",
    "X-Authentik-*",
    "X-Remote-User",
)


@renderer("caddy")
def render(plan: Plan) -> Files:
    gw = plan.fleet.gateway
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(ASSETS / "caddy"),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    text = env.get_template("Caddyfile.j2").render(
        ports=gw.ports,
        tls=gw.tls,
        public_name=gw.public_name,
        bind=str(gw.bind) if gw.bind else None,
        headers_timeout_s=gw.request_headers_timeout_s,
        max_body_bytes=int(gw.max_body_mib * 1024 * 1024),
        strip_headers=STRIP_HEADERS,
    )
    return {f"{gw.host}/caddy/Caddyfile": text}
