"""Layering: ``ml_backend`` (the bottom package) imports nothing from ``sampler`` or ``projects``,
neither at module level nor inside functions (every import statement in every file counts)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UPPER = ("projects", "sampler")


def upward_imports(source: str, filename: str, package: str = "ml_backend") -> list[str]:
    """``file:line: module`` for every import of an upper package in ``source``.

    Walks the whole tree (imports in functions, classes, ``if TYPE_CHECKING`` blocks included);
    relative imports are resolved against ``package`` (the file's package) so ``from ..projects``
    style escapes are caught too.
    """
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                names = [".".join([*base, node.module] if node.module else base)]
            else:
                names = [node.module or ""]
        else:
            continue
        for name in names:
            if name.split(".")[0] in UPPER:
                found.append(f"{filename}:{node.lineno}: {name}")
    return found


def test_ml_backend_imports_no_upper_package() -> None:
    files = sorted((ROOT / "ml_backend").rglob("*.py"))
    assert len(files) > 20  # the walk sees the package
    bad = []
    for path in files:
        rel = path.relative_to(ROOT)
        package = ".".join(rel.parent.parts)
        bad += upward_imports(path.read_text(encoding="utf-8"), str(rel), package)
    assert bad == [], "ml_backend must not import projects/sampler:\n" + "\n".join(bad)


def test_the_walker_flags_upward_imports() -> None:
    """Positive control: the same walker catches each way of importing an upper package."""
    src = '''
import numpy as np
from .errors import MadsegError
import projects.experiment
import sampler as s

def f():
    from projects.admin import export_masks
    import sampler.store

class C:
    def g(self):
        from sampler import candidates
'''
    bad = upward_imports(src, "x.py")
    assert [b.split(": ")[1] for b in bad] == [
        "projects.experiment", "sampler", "projects.admin", "sampler.store", "sampler",
    ]
    assert upward_imports("from ...projects import cli", "y.py", "ml_backend.labelstudio") == [
        "y.py:1: projects"
    ]
    assert upward_imports("from ml_backend.labelstudio import rle\nimport numpy", "z.py") == []
