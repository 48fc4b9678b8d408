"""No compressor name outside its own module and the registration (issue 12): the engine, the
registry and the CLI reach a compressor through the registry of compressors and the constants
the compressors package owns (``DEFAULT_COMPRESSOR``, ``WHOLE_TENSORS``, ``dbms.BASE_COMPRESSOR``),
so adding one touches its own module, its spec page and one registration."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from deltastore.tensor.compressors import available

ROOT = Path(__file__).resolve().parents[1]
# Users of compressors, not the engine: the demo's example settings name the ones it shows
# (as do the docs, README, tests and benchmarks, which are outside the scanned folders).
USERS = {Path("deltastore/demo.py")}
OWNERS = Path("deltastore/tensor/compressors")


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings: prose may name a compressor."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def _literals_naming(path: Path, names: re.Pattern) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _docstrings(tree)
    return [f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}" for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip
            and names.search(node.value)]


def test_no_compressor_name_in_engine_registry_or_cli():
    builtin = {"bitdelta", "dare", "deltadq", "lossless"}
    assert builtin <= set(available())
    names = re.compile(r"\b(" + "|".join(sorted(available())) + r")\b")
    files = [p for folder in ("deltastore", "cli") for p in sorted((ROOT / folder).rglob("*.py"))
             if not p.relative_to(ROOT).is_relative_to(OWNERS) and p.relative_to(ROOT) not in USERS]
    assert len(files) > 10
    found = [hit for path in files for hit in _literals_naming(path, names)]
    assert not found, "compressor names outside their modules:\n" + "\n".join(found)


def test_the_roles_the_engine_names_through_constants(example, registry_copy):
    """The default compressor and the whole-tensor one are the compressors package's constants;
    a commit with the whole-tensor compressor is refused with the ones that store deltas."""
    import inspect

    import pytest

    from deltastore import InvalidInputError, Registry
    from deltastore.tensor import dbms
    from deltastore.tensor.compressors import DEFAULT_COMPRESSOR, WHOLE_TENSORS, delta_compressors

    assert inspect.signature(Registry.commit).parameters["method"].default == DEFAULT_COMPRESSOR
    assert WHOLE_TENSORS not in delta_compressors() and DEFAULT_COMPRESSOR in delta_compressors()
    with pytest.raises(InvalidInputError, match=f"compressor '{WHOLE_TENSORS}' stores whole tensors, not deltas; "
                                                f"pick one of {', '.join(delta_compressors())}"):
        registry_copy.commit("t", example.finetunes["has_top"], method=WHOLE_TENSORS, progress=False)
    assert registry_copy.tasks() == []
    _, base = registry_copy.base("all")
    assert {e.codec for e in base.tensors.values()} == {dbms.BASE_COMPRESSOR}
