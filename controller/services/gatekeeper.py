"""The gatekeeper: Caddy's forward_auth target. Who is this, and may they pass?

It sees headers only, never a body: Caddy asks `GET /auth/check` with the
client's headers; a 2xx answer lets the request through with the identity
headers Caddy copies (user, groups, allowed models, key id); anything else
is returned to the client as is, in the OpenAI error shape. No answer means
no access: Caddy turns an unreachable gatekeeper into a 503 (fail closed).

Decisions for a known key are cached for at most the spec's revocation
delay, so a revoked key stops working within that bound.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from controller.services.access import Access, Identity
from controller.services.keystore import KeyStore
from controller.spec import load_spec

# Bound the cache so a flood of distinct keys cannot grow memory without limit.
CACHE_MAX = 100_000


def error(status: int, message: str, code: str, err_type: str = "invalid_request_error") -> JSONResponse:
    headers = {"WWW-Authenticate": 'Bearer realm="fleet"'} if status == 401 else None
    return JSONResponse(
        {"error": {"message": message, "type": err_type, "param": None, "code": code}}, status, headers=headers
    )


class Gatekeeper:
    def __init__(self, access: Access, keys: KeyStore, cache_ttl_s: float) -> None:
        self.access = access
        self.keys = keys
        self.cache_ttl_s = cache_ttl_s
        self._cache: dict[bytes, tuple[float, Identity | None]] = {}

    def decide(self, key: str) -> Identity | None:
        token = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        now = time.monotonic()
        hit = self._cache.get(token)
        if hit is not None and hit[0] > now:
            return hit[1]
        record = self.keys.check(key)
        identity = None
        if record is not None:
            identity = self.access.identity(record.user, record.models, record.id)
        if len(self._cache) >= CACHE_MAX:
            self._cache.clear()
        self._cache[token] = (now + self.cache_ttl_s, identity)
        return identity


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


def create_app(spec_path: Path, state_dir: Path) -> FastAPI:
    fleet = load_spec(spec_path).fleet
    keys = KeyStore(state_dir / "keys.db")
    gate = Gatekeeper(Access(fleet), keys, cache_ttl_s=min(float(fleet.auth.revocation_delay_s), 5.0))
    app = FastAPI(title="fleet gatekeeper", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gate = gate

    @app.get("/healthz")
    def healthz() -> dict[str, bool]:
        return {"ok": True}

    @app.api_route("/auth/check", methods=["GET", "POST", "HEAD"])
    def check(request: Request) -> Response:
        key = presented_key(request)
        if key is None:
            return error(
                401,
                "You didn't provide an API key, or provided more than one. Send one as 'Authorization: Bearer sk-…'.",
                "missing_api_key",
            )
        try:
            identity = gate.decide(key) if fleet.auth.api_keys else None
        except Exception:  # the store failing must close the door, not open it
            return error(503, "authentication is temporarily unavailable", "auth_unavailable", "server_error")
        if identity is None:
            return error(401, "Incorrect API key provided.", "invalid_api_key")
        return Response(status_code=200, headers=identity.headers())

    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(prog="gatekeeper", description=__doc__)
    parser.add_argument("--spec", type=Path, required=True)
    parser.add_argument("--state-dir", type=Path, required=True, help="holds keys.db")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    app = create_app(args.spec, args.state_dir)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
