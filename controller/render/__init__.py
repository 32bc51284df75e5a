"""Renderers: pure functions from a plan to files.

Each target is one module that registers itself with ``@renderer("name")``
and returns ``{relative path: text}``. ``render_all`` runs every registered
renderer in name order and refuses two renderers claiming one path. Adding a
target (WireGuard, Prometheus, an Ansible inventory) is one new module added
to ``TARGETS``.
"""

from __future__ import annotations

import importlib
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jinja2
import yaml

from controller.errors import RenderError
from controller.plan.models import Plan

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


# libyaml's emitter where PyYAML has it (its wheels do) writes these documents about ten times faster than the
# pure-Python one, which was most of a large fleet's render (issue 17). The two write the same text except for a
# string longer than the line width (the pure one folds it at a space, libyaml never does). Such strings (Envoy's
# Lua code, a few per fleet) are written by the pure-Python emitter alone and set into libyaml's text of the rest
# (`_splice`), so every rendered file reads as before (the golden files and tests/unit/test_render_yaml.py say so).
_FAST_DUMPER = getattr(yaml, "CSafeDumper", None)
LINE_WIDTH = 1000
LONG = LINE_WIDTH // 2


def _long_values(doc: Any, limit: int) -> list[tuple[dict[Any, Any], str]] | None:
    """Where ``doc`` holds a string longer than ``limit``: (mapping, key) for each; None where one is not a mapping's
    value under a short string key (a list item, a key), which `_splice` does not place."""
    found: list[tuple[dict[Any, Any], str]] = []
    stack = [doc]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if len(str(key)) > limit:
                    return None
                if isinstance(value, str) and len(value) > limit:
                    if not isinstance(key, str):
                        return None
                    found.append((item, key))
                elif isinstance(value, dict | list | tuple):
                    stack.append(value)
        elif isinstance(item, list | tuple):
            for value in item:
                if isinstance(value, str) and len(value) > limit:
                    return None
                if isinstance(value, dict | list | tuple):
                    stack.append(value)
    return found


def _dump(doc: Any, dumper: Any) -> str:
    return yaml.dump(
        doc, Dumper=dumper, sort_keys=False, default_flow_style=False, width=LINE_WIDTH, allow_unicode=True
    )


def _splice(doc: Any, places: list[tuple[dict[Any, Any], str]]) -> str | None:
    """``doc`` written by libyaml with each long string in ``places`` as a placeholder, then each placeholder's line
    rewritten with the pure-Python emitter's text for that string. A block scalar's text depends only on the
    column its key starts at (which also sets the indentation of its folded lines), so the string is written as
    the one value of a document of nested mappings putting its key at that column. None where a placeholder is not
    found once, alone at the end of its line."""
    token = f"fleet-long-{uuid.uuid4().hex}-"
    kept = [(mapping, key, mapping[key]) for mapping, key in places]
    try:
        for n, (mapping, key, _) in enumerate(kept):
            mapping[key] = f"{token}{n}"
        text = _dump(doc, _FAST_DUMPER)
    finally:
        for mapping, key, value in kept:
            mapping[key] = value
    lines = text.split("\n")
    at = {line.rpartition(" ")[2]: i for i, line in enumerate(lines) if token in line}
    if len(at) != len(kept):
        return None
    for n, (_, key, value) in enumerate(kept):
        i = at.get(f"{token}{n}", -1)
        if i < 0 or not lines[i].endswith(f": {token}{n}"):
            return None
        prefix = lines[i][: -len(f"{token}{n}")]  # the indent, any "- ", the key and ": "
        column = len(prefix) - len(prefix.lstrip(" "))
        while prefix.startswith("- ", column):
            column += 2
        if column % 2:
            return None
        alone: Any = {key: value}
        for _ in range(column // 2):
            alone = {"k": alone}
        written = _dump(alone, yaml.SafeDumper).rstrip("\n").split("\n")
        first = written[column // 2]
        if first[column : len(prefix)] != prefix[column:]:  # the key written alike by both
            return None
        lines[i] = "\n".join([prefix + first[len(prefix) :], *written[column // 2 + 1 :]])
    return "\n".join(lines)


def dump_yaml(doc: Any) -> str:
    """A rendered YAML file's text: keys in the order built, block style, long lines kept whole, UTF-8 as is."""
    if _FAST_DUMPER is None:
        return _dump(doc, yaml.SafeDumper)
    places = _long_values(doc, LONG)
    if places == []:
        return _dump(doc, _FAST_DUMPER)
    spliced = None if places is None else _splice(doc, places)
    return spliced if spliced is not None else _dump(doc, yaml.SafeDumper)


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
