"""CompressorConfig's text form (``from_strings``, what ``commit --config KEY=VALUE`` gives) and
``describe()``: each field parsed by its own annotation, whether a module wrote it as a string
(``from __future__ import annotations``, as deltastore does) or evaluated (a plugin may not)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pytest

from deltastore import InvalidInputError
from deltastore.tensor.compressors import CompressorConfig


@dataclass(frozen=True)
class Knobs(CompressorConfig):
    rate: float = 0.5
    count: int = 2
    flag: bool = False
    label: str = "x"
    limit: int | None = None
    sizes: list = field(default_factory=list, metadata={"help": "any JSON list"})


Evaluated = dataclass(frozen=True)(type("Evaluated", (CompressorConfig,), {
    "__annotations__": {"count": int, "limit": int | None}, "count": 2, "limit": None}))


@pytest.mark.parametrize("key, text, value", [
    ("rate", "0.25", 0.25), ("rate", "1e-3", 1e-3), ("count", "7", 7), ("flag", "true", True), ("flag", "No", False),
    ("label", "a=b", "a=b"), ("limit", "none", None), ("limit", "3", 3), ("sizes", "[1, 2]", [1, 2]),
])
def test_each_field_is_parsed_by_its_type(key, text, value):
    assert getattr(Knobs.from_strings({key: text}), key) == value


@pytest.mark.parametrize("key, text, message", [
    ("count", "2.5", "Knobs.count: '2.5' is not of type int; give count=VALUE"),
    ("flag", "maybe", "Knobs.flag: 'maybe' is not of type bool"),
    ("limit", "lots", "Knobs.limit: 'lots' is not of type int"),
    ("sizes", "[1,", "Knobs.sizes: '[1,' is not of type list"),
    ("speed", "3", "unknown configuration field(s) ['speed']; known fields are"),
])
def test_a_bad_text_names_the_field_and_its_type(key, text, message):
    with pytest.raises(InvalidInputError, match=re.escape(message)):
        Knobs.from_strings({key: text})


def test_evaluated_annotations_parse_and_describe_like_strings():
    assert Evaluated.from_strings({"count": "5", "limit": "none"}) == Evaluated(count=5, limit=None)
    assert [(f.name, f.type) for f in Evaluated.describe()] == [("count", "int"), ("limit", "int | None")]
    assert [(f.name, f.type, f.default, f.help) for f in Knobs.describe()][-2:] == [
        ("limit", "int | None", None, ""), ("sizes", "list", [], "any JSON list")]
