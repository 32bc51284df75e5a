"""Who may use which model: users, groups and keys from the spec, resolved once."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace

from controller.spec.models import Fleet, User

ALL = "*"


def gatekeeper_view(fleet: Fleet) -> str:
    """A digest of the part of the spec the gatekeeper reads at start only: the fleet's name, the gateway and auth.
    Users, groups and the models' served names it reloads in place when its spec file changes
    (controller/gateway/gatekeeper.py), so a change to them needs no restart and drops no request."""
    view = {
        "name": fleet.name,
        "gateway": fleet.gateway.model_dump(mode="json"),
        "auth": fleet.auth.model_dump(mode="json"),
    }
    return hashlib.sha256(json.dumps(view, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Identity:
    user: str
    groups: tuple[str, ...]
    models: frozenset[str]  # served names (aliases included), or {"*"}
    key_id: str | None = None
    rpm: int | None = None  # requests per minute; None: unlimited
    daily_tokens: int | None = None  # prompt + completion tokens per UTC day; None: unlimited
    app: str | None = None  # the app the key names (controller keys create --app), written with its usage

    def may_use(self, model: str) -> bool:
        return ALL in self.models or model in self.models

    def headers(self) -> dict[str, str]:
        """What Envoy's Lua filter puts on the request (see envoy/model_router.lua)."""
        out = {
            "X-Fleet-User": self.user,
            "X-Fleet-Groups": ",".join(self.groups),
            "X-Fleet-Models": ALL if ALL in self.models else ",".join(sorted(self.models)),
        }
        if self.key_id:
            out["X-Fleet-Key-Id"] = self.key_id
        if self.app:
            out["X-Fleet-App"] = self.app
        if self.rpm is not None:  # Envoy holds the rate: a token bucket per user (controller/render/envoy.py)
            out["X-Fleet-Rpm"] = str(self.rpm)
        return out


class Access:
    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self._served = {m.name: tuple(m.served_names) for m in fleet.models}
        self._by_served = {n: m.name for m in fleet.models for n in m.served_names}
        self._groups = {g.name: g for g in fleet.groups}
        self._users = {u.name: u for u in fleet.users}

    def user_exists(self, user: str) -> bool:
        return user in self._users

    def identity(
        self, user: str, key_models: list[str] | None = None, key_id: str | None = None, app: str | None = None
    ) -> Identity | None:
        spec_user = self._users.get(user)
        if spec_user is None:
            return None  # a key of a user removed from the spec grants nothing
        identity = replace(self._build(user, spec_user, list(spec_user.groups), key_id), app=app)
        if key_models is None:
            return identity
        allowed = self._intersect(set(identity.models), self._expand(key_models))
        return replace(identity, models=frozenset(allowed))

    def identity_for_login(self, user: str, claimed_groups: list[str]) -> Identity:
        """An SSO user: the spec's user of that name if any, plus the spec groups the provider says they are in."""
        spec_user = self._users.get(user)
        groups = {g for g in claimed_groups if g in self._groups}
        if spec_user is not None:
            groups |= set(spec_user.groups)
        return self._build(user, spec_user, sorted(groups), None)

    def _build(self, user: str, spec_user: User | None, groups: list[str], key_id: str | None) -> Identity:
        """Models are the user's plus their groups'; a limit set on the user wins over the groups' most generous."""
        refs = list(spec_user.models) if spec_user is not None else []
        for name in groups:
            refs += self._groups[name].models
        specs = [self._groups[name] for name in groups]
        rpm = spec_user.rpm if spec_user is not None and spec_user.rpm is not None else None
        daily = spec_user.daily_tokens if spec_user is not None and spec_user.daily_tokens is not None else None
        if rpm is None:
            rpm = _most_generous([g.rpm for g in specs])
        if daily is None:
            daily = _most_generous([g.daily_tokens for g in specs])
        return Identity(user, tuple(groups), frozenset(self._expand(refs)), key_id, rpm, daily)

    def _expand(self, refs: list[str]) -> set[str]:
        if ALL in refs:
            return {ALL}
        out: set[str] = set()
        for ref in refs:
            model = self._by_served.get(ref)
            if model is not None:
                out.update(self._served[model])
        return out

    def _intersect(self, allowed: set[str], wanted: set[str]) -> set[str]:
        if ALL in allowed:
            return wanted
        if ALL in wanted:
            return allowed
        return allowed & wanted


def _most_generous(limits: list[int | None]) -> int | None:
    """A user in several groups gets the most generous limit; a group without one sets none."""
    if not limits or any(limit is None for limit in limits):
        return None
    return max(limit for limit in limits if limit is not None)
