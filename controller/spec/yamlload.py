"""YAML loading that remembers where every value came from.

PyYAML's safe loader builds plain data but forgets positions and silently
keeps the last of two duplicate keys. Spec errors must name a line, and a
duplicated key is almost always a mistake, so this loader composes the node
tree once, constructs the data with duplicate detection, and records the line
of every mapping key and sequence item by its path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from controller.errors import Problem, SpecError

# A fleet file is a few hundred lines; refuse anything absurd before parsing
# so a wrong path (a model file, a log) fails fast instead of eating memory.
MAX_SPEC_BYTES = 4 * 1024 * 1024

PathKey = tuple[str | int, ...]


class _DuplicateKey(Exception):
    def __init__(self, key: object, first: int, again: int) -> None:
        super().__init__(key)
        self.key, self.first, self.again = key, first, again


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[object, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise _DuplicateKey(key, seen[key], line)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_spec_text(path: Path) -> str:
    """Read a spec file with the size bound and a clear error for each failure."""
    name = str(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise SpecError(f"{name}: no such file; check the path") from None
    except OSError as exc:
        raise SpecError(f"{name}: cannot read: {exc.strerror}") from None
    if not path.is_file():
        raise SpecError(f"{name}: not a regular file")
    if size > MAX_SPEC_BYTES:
        raise SpecError(f"{name}: {size} bytes is larger than the {MAX_SPEC_BYTES}-byte limit for a spec file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{name}: not UTF-8 text (byte {exc.start}); save the file as UTF-8") from None
    except OSError as exc:
        raise SpecError(f"{name}: cannot read: {exc.strerror}") from None


def load_yaml(text: str, filename: str) -> tuple[Any, dict[PathKey, int]]:
    """Parse YAML text; return the data and a map from value path to line number."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}
        data = loader.construct_document(node)
    except _DuplicateKey as exc:
        raise SpecError(
            "duplicate key",
            [
                Problem(
                    filename, exc.again, "", f"duplicate key {exc.key!r} (first defined on line {exc.first}); keep one"
                )
            ],
        ) from None
    except yaml.MarkedYAMLError as exc:
        raise SpecError("malformed YAML", [_yaml_problem(exc, filename, text)]) from None
    except yaml.YAMLError as exc:
        raise SpecError("malformed YAML", [Problem(filename, None, "", f"malformed YAML: {exc}")]) from None
    finally:
        loader.dispose()
    lines: dict[PathKey, int] = {}
    _record_lines(node, (), lines)
    return data, lines


def _yaml_problem(exc: yaml.MarkedYAMLError, filename: str, text: str) -> Problem:
    mark = exc.problem_mark or exc.context_mark
    line = mark.line + 1 if mark is not None else None
    column = mark.column + 1 if mark is not None else None
    problem = exc.problem or "malformed YAML"
    if "\t" in problem or "'\\t'" in problem or (mark is not None and _char_at(text, mark.line, mark.column) == "\t"):
        return Problem(filename, line, "", f"tab character at column {column}; YAML indentation must use spaces")
    context = f" ({exc.context})" if exc.context else ""
    return Problem(filename, line, "", f"malformed YAML at column {column}: {problem}{context}")


def _char_at(text: str, line: int, column: int) -> str:
    rows = text.splitlines()
    if line < len(rows) and column < len(rows[line]):
        return rows[line][column]
    return ""


def _record_lines(node: yaml.Node, path: PathKey, lines: dict[PathKey, int]) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            key_path = (*path, str(key_node.value))
            lines.setdefault(key_path, key_node.start_mark.line + 1)
            _record_lines(value_node, key_path, lines)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _record_lines(item, (*path, index), lines)


def line_for(lines: dict[PathKey, int], path: PathKey) -> int | None:
    """The line of the deepest recorded ancestor of ``path``."""
    for end in range(len(path), -1, -1):
        found = lines.get(tuple(path[:end]))
        if found is not None:
            return found
    return None


def dotted(path: PathKey) -> str:
    """Render a path the way users read it: ``hosts[1].gpus[0].uuid``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out
