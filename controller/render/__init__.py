"""Renderers: pure functions from a plan to files.

Each target is one module that registers itself with ``@renderer("name")``
and returns ``{relative path: text}``. ``render_all`` runs every registered
renderer in name order and refuses two renderers claiming one path. Adding a
target (WireGuard, Prometheus, an Ansible inventory) is one new module added
to ``TARGETS``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

import jinja2

from controller.errors import RenderError
from controller.gcpause import collector_paused
from controller.plan.models import Plan
from controller.render.yamltext import dump_yaml

__all__ = ["ASSETS", "Files", "asset", "dump_yaml", "render_all", "renderer", "text_template"]

Files = dict[str, str]
Renderer = Callable[[Plan], Files]

# Modules that define renderers; imported on first use so each registers itself.
TARGETS = ("compose", "quadlet", "envoy", "caddy", "prometheus", "alertmanager", "grafana")

_REGISTRY: dict[str, Renderer] = {}

# Folders at the repository root that hold the targets' templates and static fragments.
ASSETS = Path(__file__).resolve().parents[2]


def renderer(name: str) -> Callable[[Renderer], Renderer]:
    def register(fn: Renderer) -> Renderer:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise RuntimeError(f"renderer {name!r} registered twice")
        _REGISTRY[name] = fn
        return fn

    return register


def registry() -> dict[str, Renderer]:
    for target in TARGETS:
        importlib.import_module(f"controller.render.{target}")
    return dict(sorted(_REGISTRY.items()))


@collector_paused()
def render_all(plan: Plan, only: list[str] | None = None) -> Files:
    """Every file of the fleet, keyed by path relative to the output folder."""
    renderers = registry()
    unknown = sorted(set(only or []) - set(renderers))
    if unknown:
        raise RenderError(f"unknown render target(s) {', '.join(unknown)}; known: {', '.join(renderers)}")
    out: Files = {}
    owner: dict[str, str] = {}
    for name, fn in renderers.items():
        if only and name not in only:
            continue
        for path, text in fn(plan).items():
            if path in out:
                raise RenderError(f"renderers {owner[path]} and {name} both write {path}")
            out[path] = text
            owner[path] = name
    return dict(sorted(out.items()))


def asset(*parts: str) -> Path:
    path = ASSETS.joinpath(*parts)
    if not path.is_file():
        raise RenderError(f"missing template {path}; is the package installed from its source tree?")
    return path


def text_template(folder: str, name: str) -> jinja2.Template:
    """A Jinja template of a text format (Caddyfile), strict: an undefined name fails the render."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(ASSETS / folder),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    return env.get_template(name)
