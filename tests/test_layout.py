"""The package layout: no import cycles among fxadapt's and passes' modules; passes never import fxadapt.

Every ``import`` statement counts, also one inside a function: a lazy import hides a cycle from the
interpreter, not from a reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fxadapt", "passes")


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of a relative import's base module."""
    if level == 0:
        return target or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def import_graph(root: Path, packages: tuple[str, ...] = PACKAGES) -> nx.DiGraph:
    """Modules of ``packages`` under ``root`` and the imports between them."""
    files = [f for p in packages for f in sorted((root / p).rglob("*.py"))]
    modules = {_module_name(f, root): f for f in files}
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node.level, node.module)
                # "from pkg import sub" imports the module pkg.sub; "from mod import x" imports mod
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
                targets = subs if subs and len(subs) == len(node.names) else [base, *subs]
            for target in targets:
                while target and target not in modules:  # "import a.b.c" of a package member
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph.add_edge(name, target)
    return graph


def test_no_import_cycles() -> None:
    graph = import_graph(ROOT)
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join([*c, c[0]]) for c in cycles[:5])


def test_passes_import_nothing_from_fxadapt() -> None:
    graph = import_graph(ROOT)
    bad = [(a, b) for a, b in graph.edges if a.split(".")[0] == "passes" and b.split(".")[0] == "fxadapt"]
    assert not bad, f"passes/ must not import fxadapt: {bad}"


def test_the_walk_finds_a_cycle(tmp_path: Path) -> None:
    """The check itself: a lazy import that closes a loop is a cycle."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import x\n")
    (pkg / "c.py").write_text("from . import a\nimport pkg.sub.b\n")
    graph = import_graph(tmp_path, ("pkg",))
    assert set(graph.edges) >= {("pkg.a", "pkg.sub.b"), ("pkg.sub.b", "pkg.a"), ("pkg.c", "pkg.a")}
    assert ("pkg.c", "pkg.sub.b") in graph.edges
    assert [set(c) for c in nx.simple_cycles(graph)] == [{"pkg.a", "pkg.sub.b"}]


@pytest.mark.parametrize("package", PACKAGES)
def test_every_module_says_what_it_is(package: str) -> None:
    """A file's first docstring line says what it is."""
    missing = [
        str(f.relative_to(ROOT))
        for f in sorted((ROOT / package).rglob("*.py"))
        if f.name != "__main__.py" and not ast.get_docstring(ast.parse(f.read_text()))
    ]
    assert not missing, f"modules without a docstring: {missing}"
