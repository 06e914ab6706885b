"""The package's shape: an acyclic import graph at module AND package level (imports inside functions
included), no import inside a function of a package module (no lazy import dodging a cycle), no
module-level ``__getattr__``, no module using another module's ``_private`` names, files under 400
lines, and a written-down public API.

Each rule is a function of a package directory, run on ``xent_triton`` and on small packages made
up in ``tmp_path`` that break it (so each check is shown able to fail)."""
from __future__ import annotations

import ast
import pathlib
import textwrap

import pytest

import xent_triton

PKG = pathlib.Path(xent_triton.__file__).resolve().parent
REPO = PKG.parent
MAX_LINES = 400


def module_name(pkg: pathlib.Path, path: pathlib.Path) -> str:
    parts = list(path.relative_to(pkg.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules(pkg: pathlib.Path) -> dict[str, pathlib.Path]:
    return {module_name(pkg, p): p for p in sorted(pkg.rglob("*.py"))}


def resolve(mod: str, level: int, target: str | None, is_pkg: bool) -> str:
    if level == 0:
        return target or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imports(mod: str, path: pathlib.Path):
    """(imported module, imported names or None, node, inside a function) for every import."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    nested: set[int] = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            nested.update(id(n) for n in ast.walk(fn))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, None, node, id(node) in nested
        elif isinstance(node, ast.ImportFrom):
            yield (resolve(mod, node.level, node.module, is_pkg), [a.name for a in node.names], node,
                   id(node) in nested)


def module_graph(pkg: pathlib.Path) -> dict[str, set[str]]:
    """Module -> modules of the package it imports (a module's own parent packages left out: their
    ``__init__`` runs first, importing them is no cycle)."""
    mods = modules(pkg)
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for target, names, _, _ in imports(mod, path):
            hits = {target} | {f"{target}.{n}" for n in names or []}
            edges[mod] |= {h for h in hits if h in mods}
        parts = mod.split(".")
        edges[mod] -= {".".join(parts[:i]) for i in range(1, len(parts))}
    return edges


def package_of(mod: str, root: str) -> str:
    """The top-level unit a module belongs to: ``root.sub`` for everything under a subpackage, the
    module itself for a module directly under the root."""
    parts = mod.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else mod


def package_graph(pkg: pathlib.Path) -> dict[str, set[str]]:
    """Subpackage -> subpackages (and top-level modules) it imports; the root package (which
    re-exports the public API) is left out."""
    root = pkg.name
    mods = modules(pkg)
    edges: dict[str, set[str]] = {}
    for mod, targets in module_graph(pkg).items():
        if mod == root:
            continue
        a = package_of(mod, root)
        edges.setdefault(a, set())
        edges[a] |= {b for t in targets if t != root and (b := package_of(t, root)) != a}
    assert all(package_of(m, root) in edges or m == root for m in mods)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (c := visit(n)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (c := visit(m)):
            return c
    return None


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_uses(pkg: pathlib.Path) -> list[str]:
    """Imports of another module's ``_name`` and ``module._name`` attribute reads across modules."""
    mods, root, bad = modules(pkg), pkg.name, []
    for mod, path in mods.items():
        aliases: dict[str, str] = {}  # local name -> package module it refers to
        for target, names, node, _ in imports(mod, path):
            if not target.startswith(root):
                continue
            for a in node.names:
                local = a.asname or a.name
                if names is not None and private(a.name):
                    bad.append(f"{mod}:{node.lineno} imports {a.name} from {target}")
                sub = f"{target}.{a.name}" if names is not None else a.name
                if sub in mods:
                    aliases[local.split(".")[0] if names is None else local] = sub
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and private(node.attr) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases):
                bad.append(f"{mod}:{node.lineno} accesses {node.value.id}.{node.attr}")
    return bad


def lazy_imports(pkg: pathlib.Path) -> list[str]:
    """Imports of the package's own modules inside a function, and a module-level ``__getattr__``
    that imports (a lazy attribute). Deferred imports of optional third-party frameworks (torchtitan's
    loss class built on first access) are not cycles and stay allowed."""
    mods, root, bad = modules(pkg), pkg.name, []
    for mod, path in mods.items():
        for target, _, node, nested in imports(mod, path):
            if nested and (target == root or target.startswith(root + ".")):
                bad.append(f"{mod}:{node.lineno} imports {target} inside a function")
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name == "__getattr__" and any(
                    isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(node)):
                bad.append(f"{mod}:{node.lineno} defines a module __getattr__ that imports")
    return bad


# ------------------------------------------------------------------------------ the package itself
def test_module_graph_is_acyclic():
    cycle = find_cycle(module_graph(PKG))
    assert cycle is None, "module import cycle: " + " -> ".join(cycle or [])


def test_package_graph_is_acyclic():
    cycle = find_cycle(package_graph(PKG))
    assert cycle is None, "package import cycle: " + " -> ".join(cycle or [])


def test_packages_import_only_downward():
    """The layering written down in README/docs: core at the bottom, then the op packages, the
    adapters on top."""
    layers = [{"xent_triton.core"}, {"xent_triton.cross_entropy"}, {"xent_triton.linear"}, {"xent_triton.kl"},
              {"xent_triton.parallel", "xent_triton.integrations", "xent_triton.roofline",
               "xent_triton.roofline_fused"}]
    rank = {p: i for i, layer in enumerate(layers) for p in layer}
    graph = package_graph(PKG)
    assert set(graph) <= set(rank), f"a package outside the layering: {set(graph) - set(rank)}"
    up = [f"{a} -> {b}" for a, bs in graph.items() for b in bs if rank[b] > rank[a]]
    assert not up, "imports against the layering: " + ", ".join(up)


def test_no_private_names_across_modules():
    bad = private_uses(PKG)
    assert not bad, "private names used across modules:\n" + "\n".join(bad)


def test_no_lazy_imports():
    bad = lazy_imports(PKG)
    assert not bad, "lazy imports:\n" + "\n".join(bad)


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


# --------------------------------------------------------------- injected fixtures: each check fails
def make_package(tmp_path: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    pkg = tmp_path / "fake"
    for rel, text in files.items():
        f = pkg / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(textwrap.dedent(text))
    for d in [pkg, *[p for p in pkg.rglob("*") if p.is_dir()]]:
        (d / "__init__.py").touch()
    return pkg


FIXTURES = {
    # a.x -> b.y and b.z -> a.w: no module cycle, a package cycle a <-> b
    "package cycle": ({"a/x.py": "from ..b import y\n", "a/w.py": "", "b/y.py": "",
                       "b/z.py": "from ..a import w\n"}, "package"),
    "module cycle": ({"a/x.py": "from . import y\n", "a/y.py": "from .x import f\n"}, "module"),
    "private import": ({"a/x.py": "from .y import _hidden\n", "a/y.py": "def _hidden(): pass\n"}, "private"),
    "private attribute": ({"a/x.py": "from . import y\nv = y._hidden\n", "a/y.py": "_hidden = 1\n"},
                          "private"),
    "lazy __getattr__": ({"a/__init__.py": "def __getattr__(name):\n    from .x import X\n    return X\n",
                          "a/x.py": "X = 1\n"}, "lazy"),
    "import inside a function": ({"a/x.py": "def f():\n    from ..b import y\n    return y\n", "b/y.py": ""},
                                 "lazy"),
}


@pytest.mark.parametrize("name", list(FIXTURES))
def test_each_check_fails_on_an_injected_fixture(tmp_path, name):
    files, check = FIXTURES[name]
    pkg = make_package(tmp_path, files)
    checks = {"package": lambda: find_cycle(package_graph(pkg)),
              "module": lambda: find_cycle(module_graph(pkg)),
              "private": lambda: private_uses(pkg), "lazy": lambda: lazy_imports(pkg)}
    found = checks[check]()
    assert found, f"the {check} check missed the injected {name}"
    if check == "package":  # and the module graph alone would not have caught it
        assert find_cycle(module_graph(pkg)) is None


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
                        elif target in sources and private(n):
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
