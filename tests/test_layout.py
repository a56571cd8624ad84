"""The layout rules of STYLE.md, checked on the source: no import cycle, no module over 600 lines, tests independent.

Imports are read with ``ast``, including those inside functions: a lazy import
that closes a cycle is still a cycle (it only moves the failure to run time).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sfpo_kernels", "sfpo_train")
MAX_LINES = 600


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The package modules ``path`` imports anywhere in its code (``from a import b`` counts as ``a.b`` when that is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            for a in node.names:
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return {m for m in out if m in known and m != name}


def test_no_import_cycle_even_through_lazy_imports():
    modules = _modules()
    graph = {name: _imports(path, name, set(modules)) for name, path in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_module_over_the_line_limit():
    files = [p for folder in (*PACKAGES, "tests", "bench", "scripts") for p in (ROOT / folder).rglob("*.py")]
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_no_test_module_imports_another():
    offenders = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            offenders += [
                f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[-1].startswith(("test_", "conftest"))
            ]
    assert not offenders, offenders


def test_no_test_folder_shadows_an_installed_package():
    """``tests/`` itself is never on ``sys.path``: its folders (``tests/verl``) would hide the package of the same
    name, so ``import_or_skip("verl")`` would find the folder and never skip where verl is not installed."""
    import importlib.util
    import sys

    tests_dir = ROOT / "tests"
    on_path = [p for p in sys.path if p and Path(p).resolve() == tests_dir]
    assert not on_path, f"{tests_dir} is on sys.path; tests/ folders would shadow installed packages"
    for name in ("verl", "trl", "vllm"):
        spec = importlib.util.find_spec(name)
        origin = Path(spec.origin or next(iter(spec.submodule_search_locations or []), "")) if spec else None
        assert origin is None or tests_dir not in origin.resolve().parents, f"import {name} finds {origin}"
