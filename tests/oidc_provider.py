"""A real OpenID Connect provider for the tests, on authlib's server side (Flask integration).

Authorization code flow with PKCE (required) and nonce, RS256-signed ID
tokens, JWT access tokens (RFC 9068) whose audience is configurable,
discovery, JWKS, an end-session endpoint, a token introspection endpoint
(RFC 7662) for opaque tokens, and a plain username/password login form.
Authorization codes are single-use. Users and their groups come from the
command line, so each test states who exists.

Like Keycloak, any registered client may introspect any token: the answer
says which client it was issued to (`client_id`, `aud`), and the relying
party must refuse another client's token itself.

With --allow-mint (tests only), POST /test/mint signs any JWT claims,
POST /test/opaque issues an opaque token for a user and client,
POST /test/revoke revokes one, GET /test/introspections counts the
introspection requests, and POST /test/introspection-fault makes the
endpoint fail (500, a body that is not JSON, or an answer too slow to wait for).

    python -m tests.oidc_provider --port 9000 --client-id fleet --client-secret s3cret \
        --redirect-uri https://localhost:8443/auth/callback --audience fleet \
        --user alice:pw-alice:family,admins --user bob:pw-bob:kids
"""

from __future__ import annotations

import argparse
import html
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.oauth2.rfc6749 import ClientMixin, TokenMixin, grants
from authlib.oauth2.rfc6749.models import AuthorizationCodeMixin
from authlib.oauth2.rfc7636 import CodeChallenge
from authlib.oauth2.rfc7662 import IntrospectionEndpoint
from authlib.oauth2.rfc9068 import JWTBearerTokenGenerator
from authlib.oidc.core import UserInfo
from authlib.oidc.core import grants as oidc_grants
from flask import Flask, Response, jsonify, redirect, request
from joserfc.jwk import KeySet, RSAKey


@dataclass
class User:
    id: str
    password: str
    groups: list[str]

    def get_user_id(self) -> str:
        return self.id


@dataclass
class Client(ClientMixin):  # type: ignore[misc]
    client_id: str
    client_secret: str
    redirect_uris: list[str]

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str:
        return self.redirect_uris[0]

    def get_allowed_scope(self, scope: str) -> str:
        allowed = {"openid", "profile", "email", "groups", "offline_access"}
        return " ".join(s for s in (scope or "").split() if s in allowed)

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return redirect_uri in self.redirect_uris

    def check_client_secret(self, client_secret: str) -> bool:
        return secrets.compare_digest(client_secret, self.client_secret)

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method in ("client_secret_basic", "client_secret_post")

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code"

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type == "authorization_code"


@dataclass
class Code(AuthorizationCodeMixin):  # type: ignore[misc]
    code: str
    client_id: str
    redirect_uri: str
    scope: str
    user: User
    nonce: str | None
    code_challenge: str | None
    code_challenge_method: str | None
    auth_time: int = field(default_factory=lambda: int(time.time()))

    def get_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope

    def get_nonce(self) -> str | None:
        return self.nonce

    def get_auth_time(self) -> int:
        return self.auth_time

    def get_acr(self) -> None:
        return None

    def get_amr(self) -> None:
        return None


@dataclass
class OpaqueToken(TokenMixin):  # type: ignore[misc]
    """An opaque access token: a random string that only this provider can explain."""

    user: User
    client_id: str
    audience: list[str]
    expires_at: float
    issued_at: float = field(default_factory=time.time)
    revoked: bool = False

    def check_client(self, client: Client) -> bool:
        return bool(client.get_client_id() == self.client_id)

    def get_scope(self) -> str:
        return "openid profile groups"

    def get_expires_in(self) -> int:
        return int(self.expires_at - self.issued_at)

    def is_expired(self) -> bool:
        return self.expires_at <= time.time()

    def is_revoked(self) -> bool:
        return self.revoked


# How long a "slow" introspection answer takes: longer than the gatekeeper waits.
SLOW_ANSWER_S = 4.0


def create_app(args: argparse.Namespace) -> Flask:
    issuer = args.issuer or f"http://127.0.0.1:{args.port}"
    key = RSAKey.generate_key(2048, parameters={"kid": "test-key-1", "use": "sig", "alg": "RS256"})
    private = key.as_dict(private=True)
    public = KeySet([key]).as_dict(private=False)
    users: dict[str, User] = {}
    for spec in args.user:
        name, password, groups = [*spec.split(":"), ""][:3]
        users[name] = User(name, password, [g for g in groups.split(",") if g])
    client = Client(args.client_id, args.client_secret, args.redirect_uri)
    codes: dict[str, Code] = {}
    nonces: set[str] = set()
    opaque: dict[str, OpaqueToken] = {}
    introspect_state: dict[str, Any] = {"fault": "none", "requests": 0}

    class AuthorizationCodeGrant(grants.AuthorizationCodeGrant):  # type: ignore[misc]
        TOKEN_ENDPOINT_AUTH_METHODS: ClassVar[list[str]] = ["client_secret_basic", "client_secret_post"]

        def save_authorization_code(self, code: str, req: Any) -> None:
            nonce = req.payload.data.get("nonce")
            if nonce:
                nonces.add(nonce)
            codes[code] = Code(
                code,
                req.client.get_client_id(),
                req.payload.redirect_uri,
                req.payload.scope,
                req.user,
                nonce,
                req.payload.data.get("code_challenge"),
                req.payload.data.get("code_challenge_method"),
            )

        def query_authorization_code(self, code: str, client: Client) -> Code | None:
            found = codes.get(code)
            return found if found is not None and found.client_id == client.get_client_id() else None

        def delete_authorization_code(self, authorization_code: Code) -> None:
            codes.pop(authorization_code.code, None)  # single use: a replayed code finds nothing

        def authenticate_user(self, authorization_code: Code) -> User:
            return authorization_code.user

    class OpenIDCode(oidc_grants.OpenIDCode):  # type: ignore[misc]
        def exists_nonce(self, nonce: str, req: Any) -> bool:
            return False  # nonces are fresh per login here; the relying party checks its own

        def resolve_client_private_key(self, client: Client) -> dict[str, Any]:
            return private

        def get_client_algorithm(self, client: Client) -> str:
            return "RS256"

        def get_encode_header(self, client: Client) -> dict[str, str]:
            return {"alg": "RS256", "kid": "test-key-1"}

        def get_client_claims(self, client: Client) -> dict[str, Any]:
            return {"iss": issuer, "aud": [client.get_client_id()], "exp": int(time.time()) + 300}

        def generate_user_info(self, user: User, scope: str) -> UserInfo:
            return UserInfo(
                sub=user.id, preferred_username=user.id, email=f"{user.id}@example.test", groups=user.groups
            )

    class AccessTokens(JWTBearerTokenGenerator):  # type: ignore[misc]
        def get_jwks(self) -> dict[str, Any]:
            return {"keys": [private]}

        def get_extra_claims(self, client: Client, grant_type: str, user: User, scope: str) -> dict[str, Any]:
            return {"preferred_username": user.id, "groups": user.groups}

        def get_audiences(self, client: Client, user: User, scope: str) -> str:
            return str(args.audience or client.get_client_id())

    class Introspection(IntrospectionEndpoint):  # type: ignore[misc]
        def query_token(self, token_string: str, token_type_hint: str | None) -> OpaqueToken | None:
            return opaque.get(token_string)

        def check_permission(self, token: OpaqueToken, client: Client, request: Any) -> bool:
            return True  # any client may ask (as in Keycloak); the answer says whose token it is

        def introspect_token(self, token: OpaqueToken) -> dict[str, Any]:
            return {
                "active": True,
                "client_id": token.client_id,
                "token_type": "Bearer",
                "username": token.user.id,
                "sub": f"uid-{token.user.id}",  # not the name: the gateway must read `username`
                "aud": token.audience,
                "iss": issuer,
                "scope": token.get_scope(),
                "exp": token.expires_at,
                "iat": token.issued_at,
                "groups": token.user.groups,
            }

    app = Flask(__name__)
    server = AuthorizationServer(
        app, query_client=lambda cid: client if cid == client.client_id else None, save_token=lambda token, req: None
    )
    server.register_grant(AuthorizationCodeGrant, [OpenIDCode(require_nonce=True), CodeChallenge(required=True)])
    server.register_token_generator("default", AccessTokens(issuer=issuer))
    server.register_endpoint(Introspection)

    @app.get("/.well-known/openid-configuration")
    def discovery() -> Response:
        return jsonify(
            {
                "issuer": issuer,
                "authorization_endpoint": f"{issuer}/authorize",
                "token_endpoint": f"{issuer}/token",
                "jwks_uri": f"{issuer}/jwks",
                "introspection_endpoint": f"{issuer}/introspect",
                "introspection_endpoint_auth_methods_supported": ["client_secret_basic"],
                "end_session_endpoint": f"{issuer}/logout",
                "response_types_supported": ["code"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "code_challenge_methods_supported": ["S256"],
                "scopes_supported": ["openid", "profile", "email", "groups"],
                "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            }
        )

    @app.get("/jwks")
    def jwks() -> Response:
        return jsonify(public)

    @app.route("/authorize", methods=["GET", "POST"])
    def authorize() -> Any:
        if request.method == "GET":
            fields = "".join(
                f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">'
                for k, v in request.args.items()
            )
            return (
                f'<form method="post">{fields}<input name="username"><input name="password" type="password">'
                "<button>Sign in</button></form>"
            )
        user = users.get(request.form.get("username", ""))
        if user is None or not secrets.compare_digest(request.form.get("password", ""), user.password):
            return Response("wrong username or password", 401)
        return server.create_authorization_response(grant_user=user)

    @app.post("/token")
    def token() -> Any:
        return server.create_token_response()

    @app.post("/introspect")
    def introspect() -> Any:
        introspect_state["requests"] = int(introspect_state["requests"]) + 1
        fault = introspect_state["fault"]
        if fault == "500":
            return Response("internal error", 500)
        if fault == "garbage":
            return Response("<html>not json", 200, content_type="application/json")
        if fault == "slow":
            time.sleep(SLOW_ANSWER_S)
        return server.create_endpoint_response("introspection")

    @app.get("/logout")
    def logout() -> Any:
        target = request.args.get("post_logout_redirect_uri")
        return redirect(target) if target else Response("signed out")

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify({"ok": True})

    if args.allow_mint:
        # Tests only: sign arbitrary claims with the provider's key, to prove the relying party
        # checks issuer, audience and expiry and not just the signature.
        @app.post("/test/mint")
        def mint() -> Response:
            from joserfc import jwt

            claims = request.get_json(force=True)
            return jsonify({"token": jwt.encode({"alg": "RS256", "kid": "test-key-1"}, claims, key)})

        @app.post("/test/opaque")
        def issue_opaque() -> Any:
            """An opaque token for {"user", "client_id"?, "aud"?, "expires_in"? (seconds, may be negative)}."""
            want = request.get_json(force=True)
            user = users.get(want.get("user", ""))
            if user is None:
                return Response("no such user", 400)
            found = OpaqueToken(
                user,
                want.get("client_id", client.client_id),
                [aud] if isinstance(aud := want.get("aud", []), str) else list(aud),
                time.time() + float(want.get("expires_in", 300)),
            )
            token = secrets.token_urlsafe(32)
            opaque[token] = found
            return jsonify({"token": token, "exp": found.expires_at})

        @app.post("/test/revoke")
        def revoke_opaque() -> Any:
            found = opaque.get(request.get_json(force=True).get("token", ""))
            if found is None:
                return Response("no such token", 404)
            found.revoked = True
            return jsonify({"revoked": True})

        @app.get("/test/introspections")
        def introspections() -> Response:
            return jsonify({"requests": introspect_state["requests"]})

        @app.post("/test/introspection-fault")
        def introspection_fault() -> Any:
            fault = request.get_json(force=True).get("fault")
            if fault not in ("none", "500", "garbage", "slow"):
                return Response("fault: none, 500, garbage or slow", 400)
            introspect_state["fault"] = fault
            return jsonify({"fault": fault})

    return app


def main() -> None:
    parser = argparse.ArgumentParser(prog="oidc-provider")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--issuer")
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--client-secret", required=True)
    parser.add_argument("--redirect-uri", action="append", required=True)
    parser.add_argument("--audience")
    parser.add_argument("--user", action="append", default=[], help="name:password:group1,group2")
    parser.add_argument("--allow-mint", action="store_true", help="tests only: the /test/ endpoints")
    args = parser.parse_args()
    create_app(args).run(host="127.0.0.1", port=args.port, threaded=True)


if __name__ == "__main__":
    main()
