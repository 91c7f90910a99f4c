"""The package's layers, as an allow-list: each package imports only the packages listed for it.

Bottom to top: ``_utils`` and ``results`` (imports nothing of flatness) → ``algorithms`` (the
numerical layer: operators as matvecs, vectors in a VectorSpace) → ``objective`` (models, data,
backends) → ``operators`` (curvature matrices) → the measures ``spectrum``, ``landscape``,
``sharpness`` (packages) → ``monitor`` and ``plot`` → ``integrations``; the package face (``flatness``)
re-exports. Every import counts, also one inside a function. See docs/architecture.md.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).parents[1] / "src" / "flatness"

BASE = {"_utils", "results"}
ALLOWED: dict[str, set[str]] = {
    "_utils": set(),
    "results": set(),
    "algorithms": BASE,
    "objective": BASE | {"algorithms"},
    "operators": BASE | {"algorithms", "objective"},
    "spectrum": BASE | {"algorithms", "objective", "operators"},
    "landscape": BASE | {"algorithms", "objective", "operators", "spectrum"},
    "sharpness": BASE | {"algorithms", "objective"},
    "plot": BASE | {"landscape", "spectrum", "algorithms"},
    "monitor": BASE | {"objective", "spectrum", "sharpness", "plot"},
    "integrations": BASE | {"monitor", "objective"},
}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "flatness"


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import on line {node.lineno}; use absolute imports"
            if node.module:
                out.append((node.lineno, node.module))
    return [(line, m) for line, m in out if m == "flatness" or m.startswith("flatness.")]


def _modules() -> list[pathlib.Path]:
    return sorted(ROOT.rglob("*.py"))


def test_every_package_is_in_the_allow_list():
    packages = {p.relative_to(ROOT).parts[0].removesuffix(".py") for p in _modules()} - {"__init__"}
    assert packages == set(ALLOWED), "a new package: give it a place in ALLOWED (and docs/architecture.md)"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_follow_the_layers(path):
    rel = path.relative_to(ROOT)
    if rel == pathlib.Path("__init__.py"):
        return  # the face re-exports every layer
    own = rel.parts[0].removesuffix(".py")
    for line, target in _imports(path):
        pkg = _package(target)
        if pkg == own:
            continue
        assert pkg != "flatness", (
            f"{rel}:{line} imports the package face; import from the module that defines it"
        )
        assert pkg in ALLOWED[own], (
            f"{rel}:{line} imports {target}: {own!r} may import only {sorted(ALLOWED[own])}"
        )


def test_the_check_catches_a_violation(tmp_path):
    bad = tmp_path / "algorithms_bad.py"
    bad.write_text("def f():\n    from flatness.objective import Objective\n")
    assert [m for _, m in _imports(bad)] == ["flatness.objective"]
    assert "objective" not in ALLOWED["algorithms"]


def test_the_numerical_layer_reaches_nothing_of_the_model_layer_transitively():
    reach, todo = set(), ["algorithms"]
    while todo:
        for pkg in ALLOWED[todo.pop()]:
            if pkg not in reach:
                reach.add(pkg)
                todo.append(pkg)
    assert reach == BASE
