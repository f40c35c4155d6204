"""Layering, enforced: ``ml_backend`` < ``sampler`` < ``projects``.

Every ``import`` statement of every ``.py`` file under the three packages counts — at module level,
inside functions and classes, under ``if TYPE_CHECKING`` — with relative imports resolved against
the file's package. The suite fails when

- a lower package imports a higher one (``ml_backend`` imports ``sampler``/``projects``, ``sampler``
  imports ``projects``), or
- modules import each other: any cycle in the module import graph (found by a strongly-connected-
  components search, so ``a -> b -> c -> a`` counts as well as ``a <-> b``).

Each check sits beside a positive control on synthetic sources.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS: dict[str, int] = {"ml_backend": 0, "sampler": 1, "projects": 2}
UPPER = ("projects", "sampler")  # above ml_backend


def _resolve(node: ast.ImportFrom, package: str) -> str:
    """The absolute module ``from <...> import`` names (``package``: the importing file's package)."""
    if not node.level:
        return node.module or ""
    base = package.split(".")
    base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
    return ".".join([*base, node.module] if node.module else base)


def imported_names(source: str, filename: str, package: str) -> list[tuple[int, str, list[str]]]:
    """``(line, module, names)`` for every import statement anywhere in ``source``; ``names``: what a
    ``from`` import takes from the module (empty for ``import x``)."""
    out = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.lineno, _resolve(node, package), [a.name for a in node.names]))
    return out


def upward_imports(source: str, filename: str, package: str = "ml_backend") -> list[str]:
    """``file:line: module`` for every import in ``source`` of a package above ``package``'s own
    (for ``ml_backend``: ``projects``, ``sampler``)."""
    own = LAYERS[package.split(".")[0]]
    found = []
    for line, name, _ in imported_names(source, filename, package):
        top = name.split(".")[0]
        if top in LAYERS and LAYERS[top] > own:
            found.append(f"{filename}:{line}: {name}")
    return found


def import_graph(sources: Mapping[str, tuple[str, bool]]) -> dict[str, set[str]]:
    """Module -> the modules of ``sources`` it imports. ``sources``: module name -> (source text,
    is a package ``__init__``). ``from p import x`` points at module ``p.x`` when there is one,
    else at ``p``."""
    graph: dict[str, set[str]] = {}
    for mod, (src, is_pkg) in sources.items():
        package = mod if is_pkg else mod.rpartition(".")[0]
        targets: set[str] = set()
        for _, name, names in imported_names(src, mod, package):
            subs = [f"{name}.{n}" for n in names if f"{name}.{n}" in sources]
            hits = subs or ([name] if name in sources else [])
            if not names:  # import a.b.c: the deepest module we hold
                parts = name.split(".")
                hits = next(([".".join(parts[:k])] for k in range(len(parts), 0, -1)
                             if ".".join(parts[:k]) in sources), [])
            targets.update(h for h in hits if h != mod)
        graph[mod] = targets
    return graph


def import_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (each a set of modules that
    import each other, directly or through others), sorted; iterative Tarjan."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return sorted(out)


def _tree_sources() -> dict[str, tuple[str, bool]]:
    sources = {}
    for top in LAYERS:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            is_pkg = parts[-1] == "__init__"
            if is_pkg:
                parts = parts[:-1]
            sources[".".join(parts)] = (path.read_text(encoding="utf-8"), is_pkg)
    return sources


# ----------------------------------------------------------------------------------------------
# the tree
# ----------------------------------------------------------------------------------------------


def test_no_package_imports_a_higher_one() -> None:
    sources = _tree_sources()
    assert sum(1 for m in sources if m.startswith("ml_backend.")) > 20  # the walk sees the packages
    assert any(m.startswith("sampler.") for m in sources) and any(m.startswith("projects.") for m in sources)
    bad = []
    for mod, (src, is_pkg) in sources.items():
        package = mod if is_pkg else mod.rpartition(".")[0]
        bad += upward_imports(src, mod, package)
    assert bad == [], "lower packages must not import higher ones (ml_backend < sampler < projects):\n" + \
        "\n".join(bad)


def test_ml_backend_imports_no_upper_package() -> None:
    """The bottom package in particular: nothing from ``projects``/``sampler``, anywhere."""
    bad = []
    for path in sorted((ROOT / "ml_backend").rglob("*.py")):
        rel = path.relative_to(ROOT)
        bad += upward_imports(path.read_text(encoding="utf-8"), str(rel), ".".join(rel.parent.parts))
    assert bad == [], "ml_backend must not import projects/sampler:\n" + "\n".join(bad)


def test_no_two_modules_import_each_other() -> None:
    graph = import_graph(_tree_sources())
    assert sum(len(t) for t in graph.values()) > 100  # the graph sees the imports
    assert "projects.evaluation.evaluate" in graph["projects.pipeline"]  # e.g. the pipeline above evaluation
    cycles = import_cycles(graph)
    assert cycles == [], "import cycles (modules that import each other):\n" + \
        "\n".join(" <-> ".join(c) for c in cycles)


# ----------------------------------------------------------------------------------------------
# positive controls: the same checks catch what they must
# ----------------------------------------------------------------------------------------------


def test_the_walker_flags_upward_imports() -> None:
    src = '''
import numpy as np
from .errors import MadsegError
import projects.experiment
import sampler as s

def f():
    from projects.rating import collect_ratings
    import sampler.store

class C:
    def g(self):
        from sampler import candidates
'''
    bad = upward_imports(src, "x.py")
    assert [b.split(": ")[1] for b in bad] == [
        "projects.experiment", "sampler", "projects.rating", "sampler.store", "sampler",
    ]
    assert upward_imports("from ...projects import cli", "y.py", "ml_backend.labelstudio") == [
        "y.py:1: projects"
    ]
    assert upward_imports("from ml_backend.labelstudio import rle\nimport numpy", "z.py") == []
    # sampler may use ml_backend but not projects
    assert upward_imports("from ml_backend import atomic\nimport sampler.store", "s.py", "sampler") == []
    escape = "def f():\n    from ..projects import rounds"
    assert upward_imports(escape, "s.py", "sampler") == ["s.py:2: projects"]
    assert upward_imports("from sampler import store\nimport ml_backend", "p.py", "projects") == []


def test_the_cycle_search_finds_direct_and_indirect_cycles() -> None:
    sources = {
        "pkg": ("", True),
        "pkg.a": ("from . import b\n", False),                       # a -> b
        "pkg.b": ("def f():\n    from .a import thing\n", False),    # b -> a, inside a function
        "pkg.c": ("import pkg.d\n", False),                          # c -> d -> e -> c
        "pkg.d": ("from pkg import e\n", False),
        "pkg.e": ("if TYPE_CHECKING:\n    from .c import X\n", False),
        "pkg.f": ("from .a import y\nfrom . import g\nimport numpy\n", False),  # f -> a, g: no cycle
        "pkg.g": ("", False),
    }
    graph = import_graph(sources)
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.a"}
    assert graph["pkg.f"] == {"pkg.a", "pkg.g"}
    assert import_cycles(graph) == [["pkg.a", "pkg.b"], ["pkg.c", "pkg.d", "pkg.e"]]
    # positive control the other way: the same modules without the back edges have no cycle
    acyclic = {**sources, "pkg.b": ("", False), "pkg.e": ("", False)}
    assert import_cycles(import_graph(acyclic)) == []
