"""The package's shape: an acyclic import graph (imports inside functions included), no module
using another module's ``_private`` names, files under 400 lines, and a written-down public API."""
from __future__ import annotations

import ast
import pathlib

import pytest

import xent_triton

PKG = pathlib.Path(xent_triton.__file__).resolve().parent
REPO = PKG.parent
MAX_LINES = 400


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _resolve(mod: str, level: int, target: str | None, is_pkg: bool) -> str:
    if level == 0:
        return target or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _imports(mod: str, path: pathlib.Path):
    """(imported module, imported names or None, node) for every import in the file."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, None, node
        elif isinstance(node, ast.ImportFrom):
            yield _resolve(mod, node.level, node.module, is_pkg), [a.name for a in node.names], node


def _graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for mod, path in MODULES.items():
        for target, names, _ in _imports(mod, path):
            if target in MODULES:
                edges[mod].add(target)
            for n in names or []:
                sub = f"{target}.{n}"
                if sub in MODULES:
                    edges[mod].add(sub)
    return edges


def _package_parents(mod: str) -> set[str]:
    """A module's own packages (their __init__ runs first: importing them is no cycle)."""
    parts = mod.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def test_import_graph_is_acyclic():
    edges = _graph()
    for mod in edges:
        edges[mod] -= _package_parents(mod)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_the_check_can_fail():
    """The cycle detector and the private-name scan find what they look for (on a made-up module)."""
    tree = ast.parse("from .ops import _alloc\nimport xent_triton.runtime as rt\nrt._hidden()\n")
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names]
    attrs = [n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)]
    assert "_alloc" in names and "_hidden" in attrs


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_private_names_across_modules():
    bad = []
    for mod, path in MODULES.items():
        tree = ast.parse(path.read_text())
        aliases: dict[str, str] = {}  # local name -> package module it refers to
        for target, names, node in _imports(mod, path):
            if not target.startswith("xent_triton"):
                continue
            for n in names or []:
                if _private(n):
                    bad.append(f"{mod}:{node.lineno} imports {n} from {target}")
                if f"{target}.{n}" in MODULES:
                    aliases[n] = f"{target}.{n}"
            if names is None:
                for a in node.names:
                    aliases[(a.asname or a.name).split(".")[0]] = a.name
            elif target in MODULES and any(a.asname for a in node.names):
                for a in node.names:
                    if a.asname and f"{target}.{a.name}" in MODULES:
                        aliases[a.asname] = f"{target}.{a.name}"
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr):
                base = node.value
                if isinstance(base, ast.Name) and base.id in aliases:
                    bad.append(f"{mod}:{node.lineno} accesses {base.id}.{node.attr}")
    assert not bad, "private names used across modules:\n" + "\n".join(bad)


@pytest.mark.parametrize("folder", ["xent_triton", "tests", "perf"])
def test_files_are_short(folder):
    long = {str(p.relative_to(REPO)): n for p in sorted((REPO / folder).rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_public_api_is_written_down():
    for name in xent_triton.__all__:
        assert hasattr(xent_triton, name), name
    readme = (REPO / "README.md").read_text()
    missing = [n for n in xent_triton.__all__ if n not in readme]
    assert not missing, f"public names missing from README.md: {missing}"


def test_perf_imports_no_tests_and_has_no_cycle():
    """perf/ (the lab: scripts and measurement helpers) imports no test code (tests/, its harness,
    conftest), no perf module imports another's ``_private`` name, and perf's import graph (imports
    inside functions included) is acyclic. The check is first run on made-up modules it must flag."""
    def graph(sources: dict[str, str]) -> tuple[dict[str, set[str]], list[str]]:
        edges: dict[str, set[str]] = {m: set() for m in sources}
        bad = []
        for mod, text in sources.items():
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, ast.Import):
                    targets = [(a.name, []) for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    base = "perf" + (f".{node.module}" if node.module else "") if node.level else node.module
                    targets = [(base or "", [a.name for a in node.names])]
                else:
                    continue
                for target, names in targets:
                    if target.split(".")[0] in ("tests", "harness", "conftest"):
                        bad.append(f"{mod}:{node.lineno} imports {target}")
                    if target in sources and target != "perf":
                        edges[mod].add(target)
                    for n in names:
                        if f"{target}.{n}" in sources:
                            edges[mod].add(f"{target}.{n}")
                        elif target in sources and _private(n):
                            bad.append(f"{mod}:{node.lineno} imports {n} from {target}")
        return edges, bad

    def cycle(edges: dict[str, set[str]]) -> list[str]:
        state: dict[str, int] = {}
        stack: list[str] = []

        def visit(m: str) -> list[str]:
            state[m] = 1
            stack.append(m)
            for n in sorted(edges[m]):
                if state.get(n) == 1:
                    return stack[stack.index(n):] + [n]
                found = visit(n) if n not in state else []
                if found:
                    return found
            stack.pop()
            state[m] = 2
            return []

        for m in sorted(edges):
            found = visit(m) if m not in state else []
            if found:
                return found
        return []

    made_up = {"perf.a": "def f():\n    from perf import b\n",
               "perf.b": "import perf.a\nfrom perf.a import _helper\nfrom tests.harness import traffic\n"}
    edges, bad = graph(made_up)
    assert cycle(edges) == ["perf.a", "perf.b", "perf.a"] and len(bad) == 2, (edges, bad)

    sources = {("perf" if p.stem == "__init__" else f"perf.{p.stem}"): p.read_text()
               for p in sorted((REPO / "perf").glob("*.py"))}
    edges, bad = graph(sources)
    assert not bad, "perf/ imports test code or private names:\n" + "\n".join(bad)
    found = cycle(edges)
    assert not found, "import cycle in perf/: " + " -> ".join(found)
