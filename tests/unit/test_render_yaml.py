"""Rendered YAML written by libyaml with long strings set in by the pure-Python emitter (controller/render,
issue 17) reads exactly as the pure-Python emitter writes the whole document."""

from __future__ import annotations

import random
from typing import Any

import pytest
import yaml

from controller.plan import Plan
from controller.render import LONG, _dump, _long_values, _splice, dump_yaml, envoy


def pure(doc: Any) -> str:
    return _dump(doc, yaml.SafeDumper)


def test_envoys_files_read_as_the_pure_emitter_writes_them(example_plan: Plan) -> None:
    plan = example_plan
    docs = {"envoy.yaml": envoy.bootstrap(plan, xds_dir=envoy.XDS_DIR), **envoy.xds_files(plan, eds_dir="/e")}
    spliced = 0
    for name, doc in docs.items():
        places = _long_values(doc, LONG)
        assert places is not None, f"{name}: a long string the splice cannot place"
        if places:
            assert _splice(doc, places) == pure(doc), name
            spliced += 1
        assert dump_yaml(doc) == pure(doc), name
    assert spliced >= 1  # the listeners' Lua code: the splice, not the fallback, wrote it


def words(rng: random.Random, n: int) -> str:
    pieces = ["model", "x", "'q'", '"dq"', "a\\b", "ü", "—", "\t", "  ", "#", ": ", "- ", "\n", "{", "[x]", "%"]
    return "".join(rng.choice(pieces) + (" " if rng.random() < 0.6 else "") for _ in range(n))


@pytest.mark.parametrize("seed", range(40))
def test_long_strings_anywhere_read_alike(seed: int) -> None:
    rng = random.Random(seed)
    text = words(rng, rng.randint(150, 900))
    while len(text) <= LONG:
        text += words(rng, 50)
    doc: Any = {"top": 1, "filters": [{"name": "lua", "config": {"code": {"inline_string": text}}}]}
    for _ in range(rng.randint(0, 4)):
        doc = {"wrap": [doc, {"other": "short"}]} if rng.random() < 0.5 else {"wrap": doc, "after": [1, 2]}
    doc["second"] = {"inline": text[::-1], "n": None, "flag": True}
    places = _long_values(doc, LONG)
    assert places  # both strings are mapping values
    assert _splice(doc, places) == pure(doc)
    assert dump_yaml(doc) == pure(doc)


def test_a_long_string_in_a_list_or_as_a_key_is_written_by_the_pure_emitter() -> None:
    long = "word " * 200
    for doc in ({"items": ["short", long]}, {long: 1}, {"a": {long: {"b": 2}}}):
        assert _long_values(doc, LONG) is None
        assert dump_yaml(doc) == pure(doc)
