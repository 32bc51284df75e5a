"""Caddy: the certificate's keeper, `<gateway host>/caddy/Caddyfile`.

Text format, so a Jinja template (``caddy/Caddyfile.j2``) with
StrictUndefined. Caddy obtains and renews the certificate for the public
name (ACME with the HTTP challenge, or its internal CA) on a loopback-only
site, and serves the public HTTP port: ACME challenges and a redirect to
HTTPS. Envoy terminates TLS on the public HTTPS port with that certificate
(published to it by the gatekeeper, see controller/services/certs.py), so
no API request passes through Caddy: in the request path Caddy cost more
CPU than everything else together (docs/performance.md). In `files` mode
there is nothing to obtain, and Caddy only redirects.
"""

from __future__ import annotations

import jinja2

from controller.plan.models import Plan
from controller.render import ASSETS, Files, renderer


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
    )
    return {f"{gw.host}/caddy/Caddyfile": text}
