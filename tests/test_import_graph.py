"""The shape of the code, read from its syntax: no import cycles (neither among the imports run
when a module is imported, nor through the imports deferred into functions: two modules that
need each other are one module, or a third is missing), and no module reaching into another
module's private (`_name`) names.

Both checks read the sources with `ast` (nothing is imported), over every module of llmquant,
llmquant.serve (serve/) and llmquant.eval (eval/). Each is also run on a small made-up package
with the fault it looks for, so a check that stopped seeing anything would fail too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"llmquant": ROOT / "llmquant", "llmquant.serve": ROOT / "serve", "llmquant.eval": ROOT / "eval"}


def project_modules(packages: dict[str, Path]) -> dict[str, tuple[ast.Module, bool]]:
    """module name -> (its syntax tree, whether it is a package's __init__)."""
    modules = {}
    for name, top in packages.items():
        for path in sorted(top.rglob("*.py")):
            parts = path.relative_to(top).with_suffix("").parts
            is_package = parts[-1] == "__init__"
            dotted = ".".join((name, *(parts[:-1] if is_package else parts)))
            modules[dotted] = (ast.parse(path.read_text(), str(path)), is_package)
    return modules


def _top_level(tree: ast.Module):
    """Statements run when the module is imported: not function bodies, not `if TYPE_CHECKING:`."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        yield node
        for field in ("body", "orelse", "finalbody", "handlers"):
            stack.extend(getattr(node, field, []) or [])


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base[:len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(modules, deferred: bool = False) -> dict[str, set[str]]:
    """module -> the project modules its top-level imports load (with `deferred`, also those
    imported inside functions)."""
    graph = {}
    for name, (tree, is_package) in modules.items():
        edges = set()
        for node in ast.walk(tree) if deferred else _top_level(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                source = _absolute(name, is_package, node)
                # `from pkg import mod` loads pkg.mod; `from mod import name` loads mod.
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
            else:
                continue
            edges.update(t for t in targets if t in modules and t != name)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_definitions(tree: ast.Module) -> set[str]:
    """The private names a module defines: module-level names, class attributes and methods, and
    attributes it sets (on `self`, or on an instance it builds, as a classmethod does)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
    return {n for n in names if _private(n)}


def private_reaches(modules) -> list[str]:
    """`module:line: what` for each use of another project module's private name: imported from
    it, read as an attribute of anything but self/cls/super(), or named in getattr/setattr/hasattr."""
    defined = {name: private_definitions(tree) for name, (tree, _) in modules.items()}
    found = []
    for name, (tree, is_package) in modules.items():
        foreign = set().union(*(d for other, d in defined.items() if other != name)) - defined[name]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and _absolute(name, is_package, node).startswith("llmquant"):
                found += [f"{name}:{node.lineno}: imports {a.name}" for a in node.names if _private(a.name)]
            elif isinstance(node, ast.Attribute) and node.attr in foreign:
                owner = node.value
                if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                    continue
                if isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "super":
                    continue
                found.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                    and node.func.id in ("getattr", "setattr", "hasattr") and len(node.args) >= 2 \
                    and isinstance(node.args[1], ast.Constant) and node.args[1].value in foreign:
                found.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
    return sorted(found, key=lambda line: (line.split(':')[0], int(line.split(':')[1]), line))


def _made_up_package(tmp_path: Path, files: dict[str, str]) -> dict:
    top = tmp_path / "pkg"
    top.mkdir()
    (top / "__init__.py").write_text("")
    for rel, text in files.items():
        (top / rel).write_text(text)
    return project_modules({"llmquant": top})


@pytest.mark.parametrize("deferred", [False, True], ids=["top-level", "with-deferred"])
def test_no_import_cycles(deferred):
    assert cycles(import_graph(project_modules(PACKAGES), deferred)) == []


def test_no_module_reaches_into_another_modules_private_names():
    assert private_reaches(project_modules(PACKAGES)) == []


def test_the_cycle_check_sees_a_cycle(tmp_path):
    modules = _made_up_package(tmp_path, {
        "a.py": "from llmquant.b import f\n\ndef k():\n    from llmquant import d\n",
        "b.py": "from llmquant import c\n",
        "c.py": "from . import a\n\ndef g():\n    from llmquant import b  # lazy: no cycle at import time\n",
        "d.py": "def h():\n    from llmquant import a\n",
    })
    assert cycles(import_graph(modules)) == [["llmquant.a", "llmquant.b", "llmquant.c"]]
    assert cycles(import_graph(modules, deferred=True)) == [["llmquant.a", "llmquant.b", "llmquant.c", "llmquant.d"]]


def test_the_private_check_sees_a_reach(tmp_path):
    # The shape the serving code had: a forward growing another module's cache layer by hand.
    modules = _made_up_package(tmp_path, {
        "cache.py": "class Layer:\n    def __init__(self):\n        self._k = None\n\n"
                    "    def _reserve(self, n):\n        self._k = n\n\n    def grow(self, other):\n"
                    "        other._reserve(1)  # the same module: its own business\n",
        "forward.py": "from llmquant.cache import Layer, _helper\n\n"
                      "def step(layer, module):\n    layer._reserve(2)\n    buffers = [layer._k]\n"
                      "    kernels = getattr(module, '_k', None)\n    return super()._k, layer.__class__, layer._other\n",
    })
    assert private_reaches(modules) == [
        "llmquant.forward:1: imports _helper",
        "llmquant.forward:4: layer._reserve",
        "llmquant.forward:5: layer._k",
        "llmquant.forward:6: getattr(module, '_k', None)",
    ]
