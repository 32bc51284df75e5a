"""The text of a rendered YAML file, as PyYAML's pure-Python SafeDumper writes it, made mostly by libyaml.

The pure-Python emitter was most of a large fleet's render (issue 17): for every document PyYAML's representer
builds a node per value in Python and its serializer asks the resolver twice per scalar. Here the events are made
straight from the document (`_events`: the same tags, implicit flags, anchors and aliases the representer and
serializer make, each scalar's implicit flags cached) and libyaml's emitter writes them, which gives the same text
for every document these renderers build, except for an empty key (left to the pure emitter) and a string longer
than the line width: the pure emitter folds it at a space, libyaml never does. Such strings (Envoy's Lua code, a few per fleet) are written by the pure emitter
alone, at their key's column, and set into libyaml's text (`_splice`); one it cannot place (in a list, as a key)
sends the whole document to the pure emitter. tests/unit/test_render_yaml.py compares the texts.
"""

from __future__ import annotations

import functools
import itertools
import uuid
from typing import Any

import yaml
from yaml.events import (
    AliasEvent,
    DocumentEndEvent,
    DocumentStartEvent,
    Event,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
    StreamEndEvent,
    StreamStartEvent,
)
from yaml.nodes import ScalarNode

LINE_WIDTH = 1000
LONG = LINE_WIDTH // 2  # a string longer than this may be folded by the pure emitter
_C_DUMPER = getattr(yaml, "CSafeDumper", None)  # libyaml's, where PyYAML's wheel has it
_RESOLVER = yaml.resolver.Resolver()
_TAG = "tag:yaml.org,2002:"
STR = _TAG + "str"
_NO_KEY = object()  # a list item's "key" in `_walk`'s one loop over mapping pairs and list items


def pure(doc: Any) -> str:
    """``doc`` as the pure-Python SafeDumper writes it: keys in the order built, block style, UTF-8 as is."""
    return yaml.dump(
        doc, Dumper=yaml.SafeDumper, sort_keys=False, default_flow_style=False, width=LINE_WIDTH, allow_unicode=True
    )


def dump_yaml(doc: Any) -> str:
    """A rendered YAML file's text: what `pure` writes, made by libyaml where PyYAML has it."""
    text = by_libyaml(doc)
    return pure(doc) if text is None else text


def by_libyaml(doc: Any) -> str | None:
    """`pure`'s text for ``doc``, made by libyaml; None where this document is the pure emitter's to write."""
    if _C_DUMPER is None:
        return None
    token = f"fleet-long-{uuid.uuid4().hex}-"
    longs: list[tuple[str, str]] = []
    try:
        events = _events(doc, token, longs)
    except _PureOnly:
        return None
    text: str = yaml.emit(events, Dumper=_C_DUMPER, width=LINE_WIDTH, allow_unicode=True)
    return _splice(text, token, longs) if longs else text


class _PureOnly(Exception):
    """A document `_events` leaves to the pure emitter."""


@functools.lru_cache(maxsize=65536)
def _implicit(tag: str, value: str) -> tuple[bool, bool]:
    """The serializer's implicit flags for a scalar: whether it reads back as ``tag`` unquoted, and quoted."""
    resolve = _RESOLVER.resolve  # untyped in types-PyYAML
    return (
        resolve(ScalarNode, value, (True, False)) == tag,  # type: ignore[no-untyped-call]
        resolve(ScalarNode, value, (False, True)) == tag,  # type: ignore[no-untyped-call]
    )


def _float(data: float) -> str:
    """SafeRepresenter.represent_float's text."""
    if data != data:
        return ".nan"
    if data in (float("inf"), float("-inf")):
        return ".inf" if data > 0 else "-.inf"
    value = repr(data).lower()
    return value.replace("e", ".0e", 1) if "." not in value and "e" in value else value


def _anchors(doc: Any) -> dict[int, str]:
    """The anchors the serializer gives a mapping or list that appears more than once (the same object: the
    representer makes one node of it), numbered in the order it meets each a second time."""
    seen: dict[int, str | None] = {}
    anchors: dict[int, str] = {}
    stack = [doc]
    while stack:
        item = stack.pop()
        if not isinstance(item, dict | list):
            continue
        key = id(item)
        if key in seen:
            if seen[key] is None:
                seen[key] = anchors[key] = f"id{len(anchors) + 1:03d}"
            continue
        seen[key] = None
        children = [x for pair in item.items() for x in pair] if isinstance(item, dict) else item
        stack.extend(reversed(children))  # depth first, in order
    return anchors


class _Shared(Exception):
    """A mapping or list met twice: the document needs anchors (`_anchors`)."""


def _events(doc: Any, token: str, longs: list[tuple[str, str]]) -> list[Event]:
    """The events PyYAML's SafeDumper emits for ``doc``; a string longer than `LONG` that is a mapping's value
    becomes the placeholder ``token`` + its number in ``longs``, which keeps (key, string). Most documents share
    no part, so they are walked once without anchors; one that does is walked again with them."""
    try:
        return _walk(doc, token, longs, None)
    except _Shared:
        longs.clear()
        return _walk(doc, token, longs, _anchors(doc))


def _walk(doc: Any, token: str, longs: list[tuple[str, str]], anchors: dict[int, str] | None) -> list[Event]:
    done: set[int] = set()
    out: list[Event] = [StreamStartEvent(), DocumentStartEvent(explicit=False)]
    emit = out.append
    implicit = _implicit

    def scalar(data: Any, key: Any, is_key: bool) -> ScalarEvent:
        """A scalar's event; the strings and keys `container` does not make itself."""
        kind = type(data)
        if kind is str:
            if is_key and not data:
                raise _PureOnly  # the pure emitter writes an empty key as `? ''`, libyaml as `''`
            if len(data) > LONG:
                if is_key or not isinstance(key, str):
                    raise _PureOnly
                longs.append((key, data))
                data = f"{token}{len(longs) - 1}"
            tag = STR
        elif kind is bool:
            tag, data = _TAG + "bool", "true" if data else "false"
        elif kind is int:
            tag, data = _TAG + "int", str(data)
        elif kind is float:
            tag, data = _TAG + "float", _float(data)
        elif data is None:
            tag, data = _TAG + "null", "null"
        else:
            raise _PureOnly  # anything else (a subclass, a tuple): the representer says what it makes of it
        return ScalarEvent(None, tag, implicit(tag, data), data)

    def container(data: Any) -> None:
        at = id(data)
        anchor = None
        if at in done:
            if anchors is None:
                raise _Shared
            emit(AliasEvent(anchors[at]))
            return
        done.add(at)
        if anchors is not None:
            anchor = anchors.get(at)
        mapping = type(data) is dict
        if mapping:
            emit(MappingStartEvent(anchor, _TAG + "map", True, flow_style=False))
        else:
            emit(SequenceStartEvent(anchor, _TAG + "seq", True, flow_style=False))
        # The common cases (a short string key, a short string or a container value) without a call each.
        for k, v in data.items() if mapping else zip(itertools.repeat(_NO_KEY), data):
            if k is not _NO_KEY:
                if type(k) is str and 0 < len(k) <= LONG:
                    emit(ScalarEvent(None, STR, implicit(STR, k), k))
                else:
                    emit(scalar(k, None, True))
            kind = type(v)
            if kind is str and len(v) <= LONG:
                emit(ScalarEvent(None, STR, implicit(STR, v), v))
            elif kind is dict or kind is list:
                container(v)
            else:
                emit(scalar(v, k, False))  # a long list item (its key _NO_KEY): the pure emitter's
        emit(MappingEndEvent() if mapping else SequenceEndEvent())

    if type(doc) is dict or type(doc) is list:
        container(doc)
    else:
        emit(scalar(doc, None, False))
    out += [DocumentEndEvent(explicit=False), StreamEndEvent()]
    return out


def _splice(text: str, token: str, longs: list[tuple[str, str]]) -> str | None:
    """``text`` with each placeholder's line rewritten with the pure emitter's text for its string. A block
    scalar's text depends only on the column its key starts at (which also sets the indentation of its folded
    lines), so the string is written as the one value of a document of nested mappings putting its key at that
    column. None where a placeholder is not found once, alone at the end of its line."""
    lines = text.split("\n")
    at = {line.rpartition(" ")[2]: i for i, line in enumerate(lines) if token in line}
    if len(at) != len(longs):
        return None
    for n, (key, value) in enumerate(longs):
        placeholder = f"{token}{n}"
        i = at.get(placeholder, -1)
        if i < 0 or not lines[i].endswith(f": {placeholder}"):
            return None
        prefix = lines[i][: -len(placeholder)]  # the indent, any "- ", the key and ": "
        column = len(prefix) - len(prefix.lstrip(" "))
        while prefix.startswith("- ", column):
            column += 2
        if column % 2:
            return None
        alone: Any = {key: value}
        for _ in range(column // 2):
            alone = {"k": alone}
        written = pure(alone).rstrip("\n").split("\n")
        first = written[column // 2]
        if first[column : len(prefix)] != prefix[column:]:  # the key written alike by both
            return None
        lines[i] = "\n".join([prefix + first[len(prefix) :], *written[column // 2 + 1 :]])
    return "\n".join(lines)
