"""Rendered YAML made by libyaml (controller/render/yamltext.py, issue 17) reads exactly as PyYAML's pure-Python
SafeDumper writes the whole document: every file of every example, and random documents with every kind of value,
shared parts (anchors) and long strings."""

from __future__ import annotations

import random
from typing import Any

import pytest
import yaml

from controller.plan import Plan
from controller.render import envoy, render_all
from controller.render.yamltext import LONG, by_libyaml, dump_yaml, pure


def test_every_rendered_file_reads_as_the_pure_emitter_writes_it(example_plan: Plan) -> None:
    """Each example's YAML documents (Envoy's built here, the rest read back from their rendered text) made by
    libyaml, not left to the pure emitter, and alike."""
    plan = example_plan
    docs = {"envoy.yaml": envoy.bootstrap(plan, xds_dir=envoy.XDS_DIR), **envoy.xds_files(plan, eds_dir="/e")}
    for path, text in render_all(plan).items():
        if path.endswith((".yaml", ".yml")) and "/envoy/" not in path:
            docs[path] = yaml.safe_load(text)
    for name, doc in docs.items():
        assert by_libyaml(doc) == pure(doc), name
    lua = docs["listeners.yaml"]["resources"][0]["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
    assert any(len(str(f)) > LONG for f in lua)  # the Lua code is long: the splice wrote it


SCALARS: list[Any] = [
    *["", " ", "yes", "No", "on", "null", "~", "1", "0x1f", "1e3", "1_000", "3.5", ".inf", "-.nan", "2026-12-03"],
    *["a: b", "- x", "# c", "'q'", '"dq"', "x\ny", "trailing ", " leading", "ü—", "\t", "%x", "@x", "`x", "{x}"],
    *[0, -7, 2**40, 1.5, -0.0, 1e20, 1e-7, float("inf"), float("-inf"), True, False, None],
]


def value(rng: random.Random, depth: int, shared: list[Any]) -> Any:
    roll = rng.random()
    if depth > 3 or roll < 0.45:
        return rng.choice(SCALARS)
    if roll < 0.55 and shared:
        return rng.choice(shared)  # the same object again: an anchor and an alias
    if roll < 0.8:
        keys = [str(k) for k in SCALARS if k != ""]  # an empty key: the pure emitter's (the last test)
        made: Any = {rng.choice(keys): value(rng, depth + 1, shared) for _ in range(rng.randint(0, 4))}
    else:
        made = [value(rng, depth + 1, shared) for _ in range(rng.randint(0, 4))]
    if rng.random() < 0.2:
        shared.append(made)
    return made


def words(rng: random.Random) -> str:
    pieces = ["model", "x", "'q'", '"dq"', "a\\b", "ü", "—", "\t", "  ", "#", ": ", "- ", "\n", "{", "[x]", "%"]
    text = ""
    while len(text) <= LONG:
        text += rng.choice(pieces) + (" " if rng.random() < 0.6 else "")
    return text


@pytest.mark.parametrize("seed", range(60))
def test_random_documents_read_alike(seed: int) -> None:
    rng = random.Random(seed)
    shared: list[Any] = []
    doc: dict[str, Any] = {"top": value(rng, 0, shared), "more": [value(rng, 1, shared) for _ in range(3)]}
    if seed % 2:
        long = words(rng)
        doc["filters"] = [{"name": "lua", "config": {"code": {"inline_string": long}}}]
        for _ in range(rng.randint(0, 4)):
            doc = {"wrap": [doc, {"other": "short"}]} if rng.random() < 0.5 else {"wrap": doc, "after": [1, 2]}
        doc["second"] = {"inline": long[::-1], "n": None}
    assert by_libyaml(doc) == pure(doc)


def test_a_long_string_in_a_list_or_as_a_key_and_an_empty_key_are_written_by_the_pure_emitter() -> None:
    long = "word " * 200
    for doc in ({"items": ["short", long]}, {long: 1}, {"a": {long: {"b": 2}}}, {"a": {"": 1}}, {"t": (1, 2)}):
        assert by_libyaml(doc) is None
        assert dump_yaml(doc) == pure(doc)
