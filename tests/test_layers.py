"""The three layers stay visible in the tree (STYLE.md): pure tensor math imports no storage,
zarr is imported only by the storage layer, click only by the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    """Top-level module names a file imports, relative imports resolved against its package."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = path.relative_to(ROOT).with_suffix("").parts[:-1]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                names.add(".".join(base + ((node.module,) if node.module else ())))
            else:
                names.add(node.module or "")
    return names


def _files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def test_tensor_math_imports_no_storage():
    for path in _files("deltastore/tensor"):
        bad = {n for n in _imports(path) if n.split(".")[0] in ("zarr", "numcodecs", "click")
               or n.startswith(("deltastore.storage", "deltastore.registry"))}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_only_storage_imports_zarr_and_only_cli_imports_click():
    for path in _files("deltastore") + _files("cli"):
        rel = path.relative_to(ROOT).as_posix()
        top = {n.split(".")[0] for n in _imports(path)}
        if "zarr" in top:
            assert rel.startswith("deltastore/storage/"), f"{rel} imports zarr"
        if "click" in top:
            assert rel.startswith("cli/"), f"{rel} imports click"


def test_the_checks_see_real_imports():
    """Guard against a vacuous pass: the walker finds the imports we know are there."""
    assert "zarr" in {n.split(".")[0] for n in _imports(ROOT / "deltastore/storage/backend.py")}
    assert "click" in _imports(ROOT / "cli/deltastore_cli/main.py")
    assert "deltastore.tensor.bitpack" in _imports(ROOT / "deltastore/tensor/compressors/bitdelta.py")
