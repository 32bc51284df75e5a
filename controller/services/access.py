"""Who may use which model: users, groups and keys from the spec, resolved once."""

from __future__ import annotations

from dataclasses import dataclass

from controller.spec.models import Fleet

ALL = "*"


@dataclass(frozen=True)
class Identity:
    user: str
    groups: tuple[str, ...]
    models: frozenset[str]  # served names (aliases included), or {"*"}
    key_id: str | None = None
    rpm: int | None = None  # requests per minute; None: unlimited
    daily_tokens: int | None = None  # prompt + completion tokens per UTC day; None: unlimited

    def may_use(self, model: str) -> bool:
        return ALL in self.models or model in self.models

    def headers(self) -> dict[str, str]:
        """What Caddy copies to the upstream request (see caddy.IDENTITY_HEADERS)."""
        out = {
            "X-Fleet-User": self.user,
            "X-Fleet-Groups": ",".join(self.groups),
            "X-Fleet-Models": ALL if ALL in self.models else ",".join(sorted(self.models)),
        }
        if self.key_id:
            out["X-Fleet-Key-Id"] = self.key_id
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

    def identity(self, user: str, key_models: list[str] | None = None, key_id: str | None = None) -> Identity | None:
        spec_user = self._users.get(user)
        if spec_user is None:
            return None  # a key of a user removed from the spec grants nothing
        refs = list(spec_user.models)
        for group in spec_user.groups:
            refs += self._groups[group].models
        allowed = self._expand(refs)
        if key_models is not None:
            allowed = self._intersect(allowed, self._expand(key_models))
        groups = [self._groups[g] for g in spec_user.groups]
        rpm = spec_user.rpm if spec_user.rpm is not None else _most_generous([g.rpm for g in groups])
        daily = (
            spec_user.daily_tokens
            if spec_user.daily_tokens is not None
            else _most_generous([g.daily_tokens for g in groups])
        )
        return Identity(spec_user.name, tuple(spec_user.groups), frozenset(allowed), key_id, rpm, daily)

    def identity_for_login(self, user: str, claimed_groups: list[str]) -> Identity:
        """An SSO user: the spec's user of that name if any, plus the spec groups the provider says they are in."""
        spec_user = self._users.get(user)
        groups = [g for g in claimed_groups if g in self._groups]
        refs: list[str] = []
        rpm_limits: list[int | None] = []
        daily_limits: list[int | None] = []
        if spec_user is not None:
            groups = sorted(set(groups) | set(spec_user.groups))
            refs += spec_user.models
        for name in groups:
            refs += self._groups[name].models
            rpm_limits.append(self._groups[name].rpm)
            daily_limits.append(self._groups[name].daily_tokens)
        rpm = spec_user.rpm if spec_user is not None and spec_user.rpm is not None else _most_generous(rpm_limits)
        daily = (
            spec_user.daily_tokens
            if spec_user is not None and spec_user.daily_tokens is not None
            else _most_generous(daily_limits)
        )
        return Identity(user, tuple(sorted(groups)), frozenset(self._expand(refs)), None, rpm, daily)

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
