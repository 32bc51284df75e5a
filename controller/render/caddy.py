"""Caddy: the certificate's keeper, `<gateway host>/caddy/Caddyfile`.

Text format, so a Jinja template (``caddy/Caddyfile.j2``) with
StrictUndefined. Caddy obtains and renews the certificate for the public
name (ACME with the HTTP challenge, or its internal CA) on a loopback-only
site, and serves the public HTTP port: ACME challenges and a redirect to
HTTPS. Envoy terminates TLS on the public HTTPS port with that certificate
(published to it by the gatekeeper, see controller/gateway/certs.py), so
no API request passes through Caddy: in the request path Caddy cost more
CPU than everything else together (docs/performance.md). In `files` mode
there is nothing to obtain, and Caddy only redirects.

With ``gateway.front: caddy`` Caddy is the front door instead: it serves the
HTTPS port, asks the gatekeeper about every request (``forward_auth``) and
hands what it allows to Envoy over a private Unix socket (see the template).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from controller.plan.models import Plan
from controller.render import Files, renderer, text_template
from controller.render.envoy import AUTH_TIMEOUT_MS, FRONT_SOCKET, MIB
from controller.spec.models import ForwardAuth

# What the gatekeeper's answer says about the caller, copied onto the request in `front: caddy`.
IDENTITY_HEADERS = [
    "X-Fleet-User",
    "X-Fleet-Groups",
    "X-Fleet-Models",
    "X-Fleet-Key-Id",
    "X-Fleet-App",
    "X-Fleet-Rpm",
    "X-Fleet-Daily-Tokens",
]
# Identity headers of other proxies and SSO outposts: a client's never reach anything behind the gateway.
FOREIGN_IDENTITY_HEADERS = [
    "Remote-User",
    "Remote-Groups",
    "Remote-Email",
    "Remote-Name",
    "X-Forwarded-User",
    "X-Authentik-*",
]


@renderer("caddy")
def render(plan: Plan) -> Files:
    gw = plan.fleet.gateway
    return {f"{gw.host}/caddy/Caddyfile": caddyfile(plan)}


def caddyfile(plan: Plan, front_socket: str = FRONT_SOCKET) -> str:
    gw = plan.fleet.gateway
    return text_template("caddy", "Caddyfile.j2").render(
        front=gw.front,
        ports=gw.ports,
        tls=gw.tls,
        public_name=gw.public_name,
        bind=str(gw.bind) if gw.bind else None,
        headers_timeout_s=gw.request_headers_timeout_s,
        max_body_bytes=int(gw.max_body_mib * MIB),
        front_socket=front_socket,
        auth_timeout_s=AUTH_TIMEOUT_MS / 1000,
        outpost=_outpost(gw.forward_auth),
        identity=IDENTITY_HEADERS,
        foreign_identity=FOREIGN_IDENTITY_HEADERS,
    )


def _outpost(auth: ForwardAuth | None) -> dict[str, str] | None:
    """The outpost as `forward_auth` takes it: the upstream (scheme, host, port) and the URI asked there."""
    if auth is None:
        return None
    url = urlsplit(auth.url)
    upstream = f"{url.scheme}://{url.netloc}" if url.scheme == "https" else url.netloc
    uri = url.path or "/"
    if url.query:
        uri += f"?{url.query}"
    return {"upstream": upstream, "uri": uri, "user_header": auth.user_header, "groups_header": auth.groups_header}
