"""The three layers stay visible in the tree (STYLE.md): pure tensor math imports no storage,
zarr and obstore are imported only by the storage layer, click only by the CLI."""

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


def test_only_storage_imports_zarr_or_obstore_and_only_cli_imports_click():
    for path in _files("deltastore") + _files("cli"):
        rel = path.relative_to(ROOT).as_posix()
        top = {n.split(".")[0] for n in _imports(path)}
        if "zarr" in top:
            assert rel.startswith("deltastore/storage/"), f"{rel} imports zarr"
        if "obstore" in top:
            assert rel.startswith("deltastore/storage/"), f"{rel} imports obstore"
        if "click" in top:
            assert rel.startswith("cli/"), f"{rel} imports click"


def test_the_checks_see_real_imports():
    """Guard against a vacuous pass: the walker finds the imports we know are there."""
    assert "zarr" in {n.split(".")[0] for n in _imports(ROOT / "deltastore/storage/backend.py")}
    assert "obstore" in {n.split(".")[0] for n in _imports(ROOT / "deltastore/storage/objectstore.py")}
    assert "click" in _imports(ROOT / "cli/deltastore_cli/main.py")
    assert "deltastore.tensor.bitpack" in _imports(ROOT / "deltastore/tensor/compressors/bitdelta/__init__.py")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(path: Path, modules: set[str]) -> set[str]:
    """The package modules a file imports when it runs (at the top or inside functions), not
    counting ``if TYPE_CHECKING:`` blocks; ``from pkg import mod`` counts ``pkg.mod``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    name = _module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
               for child in node.body for n in ast.walk(child)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def test_no_import_cycles():
    """No two modules of the package need each other, even through a function-level import:
    the layers (tensor -> storage -> engine -> registry -> CLI) form a directed graph."""
    files = _files("deltastore") + _files("cli")
    modules = {_module_name(p) for p in files}
    graph = {_module_name(p): _runtime_imports(p, modules) for p in files}
    assert graph["deltastore.registry"], "the walker sees no imports: the check would pass vacuously"
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(trail[trail.index(nxt):] + [node, nxt]) if nxt in trail else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
