"""The shape of the package: layer folders, small modules, no import cycles (imports
inside functions count), no private names imported across modules."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "ckptstore"
LAYERS = ("api", "plan", "staging", "pipeline", "commit", "storage", "manifest", "verify",
          "read", "runs", "distributed", "interop", "integrations", "cli", "peer")
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every ckptstore module ``name`` imports, at any depth of its code."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                base = ".".join(parent + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                       for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in known and t != name)
    return out


def graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {name: _imports(name, path, known) for name, path in mods.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``g`` as a list of modules, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_the_package():
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_every_layer_is_a_folder():
    for layer in LAYERS:
        assert (PKG / layer / "__init__.py").is_file(), layer
    flat = sorted(p.name for p in PKG.glob("*.py"))
    assert flat == ["__init__.py", "__main__.py", "errors.py", "version.py"], flat


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: str(p.relative_to(PKG)))
def test_modules_stay_small(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES


def test_no_private_names_imported_across_modules():
    bad = []
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ckptstore"):
                bad += [f"{path.relative_to(PKG)}: {a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    assert not bad, bad


BARE = {"tuple", "list", "dict", "set", "frozenset", "Tuple", "List", "Dict"}


def _bare_fields(tree: ast.AST) -> list[str]:
    out = []
    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
        decorators = [ast.unparse(d) for d in cls.decorator_list]
        if not any(d.startswith(("dataclass", "dataclasses.dataclass")) for d in decorators):
            continue
        for stmt in cls.body:
            if isinstance(stmt, ast.AnnAssign):
                text = ast.unparse(stmt.annotation).strip("'\"")
                parts = {p.strip() for p in text.split("|")}
                if parts & BARE:
                    out.append(f"{cls.name}.{ast.unparse(stmt.target)}: {text}")
    return out


def test_bare_container_finder_flags_untyped_fields():
    code = "@dataclass(frozen=True)\nclass A:\n    x: tuple\n    y: tuple[int, ...]\n    z: dict | None\n"
    assert _bare_fields(ast.parse(code)) == ["A.x: tuple", "A.z: dict | None"]


def test_dataclass_fields_between_layers_are_typed():
    bad = []
    for path in PKG.rglob("*.py"):
        bad += [f"{path.relative_to(PKG)}: {f}" for f in _bare_fields(ast.parse(path.read_text()))]
    assert not bad, "\n".join(bad)
