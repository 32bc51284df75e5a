"""Load a fleet file in named phases: parse → validate → defaults → references.

Every problem found is reported with its file, line and dotted path, sorted,
all at once, as one ``SpecError``. Capacity (does it fit?) is the planner's
phase, not this one.
"""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from controller.errors import Problem, SpecError
from controller.gcpause import collector_paused
from controller.spec import arch as arch_mod
from controller.spec import refs
from controller.spec.models import Fleet
from controller.spec.yamlload import PathKey, dotted, line_for, load_yaml, read_spec_text


@dataclass
class Locations:
    """Where each value of the merged document came from (file and line)."""

    main_file: str
    lines: dict[PathKey, int] = field(default_factory=dict)
    # Paths under a prefix that came from another file (hosts_file).
    included: dict[PathKey, tuple[str, dict[PathKey, int]]] = field(default_factory=dict)

    def problem(self, path: PathKey, message: str) -> Problem:
        for prefix, (file, lines) in self.included.items():
            if path[: len(prefix)] == prefix:
                return Problem(file, line_for(lines, path[len(prefix) :]), dotted(path), message)
        return Problem(self.main_file, line_for(self.lines, path), dotted(path), message)


@dataclass(frozen=True)
class LoadedSpec:
    fleet: Fleet
    path: Path
    locations: Locations

    @property
    def base_dir(self) -> Path:
        return self.path.parent


@collector_paused()
def load_spec(path: str | Path) -> LoadedSpec:
    """Read, validate and cross-check a fleet file; raise ``SpecError`` listing every problem."""
    spec_path = Path(path)
    text = read_spec_text(spec_path)
    data, lines = load_yaml(text, str(spec_path))
    loc = Locations(str(spec_path), lines)
    if not isinstance(data, dict):
        kind = "empty" if data is None else type(data).__name__
        raise SpecError(
            "not a mapping", [Problem(str(spec_path), 1, "", f"the spec must be a mapping of keys, got {kind}")]
        )
    data = _merge_hosts_file(data, spec_path, loc)
    fleet = _validate(data, loc)
    fleet, problems = arch_mod.resolve_arch(fleet, spec_path.parent, loc.problem)
    problems += refs.check(fleet, loc.problem)
    if problems:
        raise SpecError(f"{spec_path}: {len(problems)} problem(s)", problems)
    return LoadedSpec(fleet, spec_path, loc)


def _merge_hosts_file(data: dict[str, Any], spec_path: Path, loc: Locations) -> dict[str, Any]:
    hosts_file = data.get("hosts_file")
    if hosts_file is None:
        return data
    if "hosts" in data:
        raise SpecError("hosts twice", [loc.problem(("hosts_file",), "give `hosts` or `hosts_file`, not both")])
    if not isinstance(hosts_file, str):
        raise SpecError("bad hosts_file", [loc.problem(("hosts_file",), "must be a path (string)")])
    target = spec_path.parent / hosts_file
    inc_data, inc_lines = load_yaml(read_spec_text(target), str(target))
    if not isinstance(inc_data, dict) or set(inc_data) != {"hosts"}:
        raise SpecError(
            "bad hosts file", [Problem(str(target), 1, "", "a hosts file must be a mapping with one key, `hosts`")]
        )
    loc.included[("hosts",)] = (str(target), {k[1:]: v for k, v in inc_lines.items() if k[:1] == ("hosts",)})
    return {**data, "hosts": inc_data["hosts"]}


def _validate(data: dict[str, Any], loc: Locations) -> Fleet:
    try:
        return Fleet.model_validate(data)
    except ValidationError as exc:
        problems = [_pydantic_problem(err, loc) for err in exc.errors(include_url=False)]
        raise SpecError(f"{loc.main_file}: {len(problems)} problem(s)", problems) from None


def _pydantic_problem(err: ErrorDetails, loc: Locations) -> Problem:
    path: PathKey = tuple(p for p in err["loc"] if isinstance(p, (str, int)))
    kind = err["type"]
    if kind == "extra_forbidden" and path and isinstance(path[-1], str):
        key = path[-1]
        known = sorted(_fields_at(Fleet, path[:-1]))
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hint = f"did you mean `{close[0]}`?" if close else f"valid keys: {', '.join(known)}"
        return loc.problem(path, f"unknown key {key!r}; {hint}")
    message = err["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if kind == "missing":
        return loc.problem(path, "required; add it")
    if kind == "string_pattern_mismatch":
        about = _description_at(Fleet, path) or f"must match {err.get('ctx', {}).get('pattern')}"
        return loc.problem(path, f"{err['input']!r} is not valid: {about}")
    if kind not in ("value_error", "assertion_error") and "input" in err and _is_scalar(err["input"]):
        message = f"{message} (got {err['input']!r})"
    return loc.problem(path, message)


def _is_scalar(value: object) -> bool:
    return isinstance(value, (str, int, float, bool)) or value is None


def _description_at(model: type[BaseModel], path: PathKey) -> str | None:
    """The description of the field at ``path`` (from ``Field(description=…)``)."""
    if not path or not isinstance(path[-1], str):
        parent_path, name = path[:-1], None
    else:
        parent_path, name = path[:-1], path[-1]
    parent = _unwrap(_annotation_at(model, parent_path))
    if name is None or not (isinstance(parent, type) and issubclass(parent, BaseModel)):
        return None
    info = parent.model_fields.get(name)
    if info is None:
        return None
    if info.description:
        return info.description
    for meta in typing.get_args(info.annotation) if typing.get_origin(info.annotation) is typing.Annotated else []:
        if getattr(meta, "description", None):
            return str(meta.description)
    return None


def _fields_at(model: type[BaseModel], path: PathKey) -> set[str]:
    """Field names of the model found by following ``path`` from ``model``."""
    current = _unwrap(_annotation_at(model, path))
    if isinstance(current, type) and issubclass(current, BaseModel):
        return set(current.model_fields)
    return set()


def _annotation_at(model: type[BaseModel], path: PathKey) -> Any:
    current: Any = model
    for part in path:
        current = _unwrap(current)
        if isinstance(part, int):
            args = typing.get_args(current)
            current = args[0] if args else None
        elif isinstance(current, type) and issubclass(current, BaseModel):
            info = current.model_fields.get(part)
            current = info.annotation if info else None
        elif typing.get_origin(current) is dict:
            current = typing.get_args(current)[1]
        else:
            return None
    return current


def _unwrap(annotation: Any) -> Any:
    """Strip Optional/Union-with-None and Annotated to reach the container or model."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            rest = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(rest) != 1:
                return annotation
            annotation = rest[0]
        else:
            return annotation
