"""Quadlet: `.container` and `.volume` units per host whose runtime is `quadlet`.

Text format, so a Jinja template (``quadlet/*.j2``) with StrictUndefined;
values are quoted the way systemd unit files expect. Secrets are the host files
deploy puts there (mode 0600), mounted read-only, as Compose mounts file secrets.
"""

from __future__ import annotations

import jinja2

from controller.plan.models import Plan
from controller.render import ASSETS, Files, renderer
from controller.render.containers import host_containers, host_files

_SAFE = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.,:/=@+%")


def systemd_quote(value: str) -> str:
    """Quote one word for a unit file: bare when safe, else double-quoted with escapes.

    systemd expands `%` specifiers and `$` variables in Exec-like keys, so
    both are escaped; a newline would end the setting and is refused earlier
    by the spec.
    """
    text = value.replace("%", "%%")
    if text and all(ch in _SAFE for ch in text):
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("$", "$$")
    return f'"{escaped}"'


def join_args(args: list[str]) -> str:
    return " ".join(systemd_quote(a) for a in args)


def bracket_ipv6(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(ASSETS / "quadlet"),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters.update(systemd_quote=systemd_quote, join_args=join_args, bracket_ipv6=bracket_ipv6)
    return env


@renderer("quadlet")
def render(plan: Plan) -> Files:
    env = _env()
    container_t = env.get_template("container.j2")
    volume_t = env.get_template("volume.j2")
    out: Files = {}
    for host in plan.fleet.hosts or []:
        if host.runtime != "quadlet":
            continue
        containers = host_containers(plan, host.name)
        for c in containers:
            out[f"{host.name}/quadlet/{c.container_name}.container"] = container_t.render(c=c)
        for name in sorted({v.source for c in containers for v in c.volumes if not v.is_bind}):
            out[f"{host.name}/quadlet/{name}.volume"] = volume_t.render(name=name, fleet=plan.fleet.name)
        out.update(host_files(plan, host.name))
    return out
