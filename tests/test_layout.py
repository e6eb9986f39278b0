"""The package's import rules: plugins depend on the plugin contract, never on the policy
loader; the product does not depend on its test support; modules import each other without a
cycle. Read from the source with ``ast``, so a violation fails here, not in a user's install."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO_MAY_USE_TESTING = {"rotator/demo.py"}
"""``rotator demo`` runs the fakes and the sample agent: the one product module allowed them."""


def _sources(*folders: str) -> Iterator[Path]:
    for folder in folders:
        yield from sorted((ROOT / folder).rglob("*.py"))


def _imports(path: Path, *, top_level_only: bool = False) -> set[str]:
    """Modules ``path`` imports; with ``top_level_only``, only at import time (not inside
    functions, not under ``if TYPE_CHECKING``)."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if top_level_only and isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            if (top_level_only and isinstance(child, ast.If)
                    and "TYPE_CHECKING" in ast.unparse(child.test)):
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.add(child.module)
                found.update(f"{child.module}.{alias.name}" for alias in child.names)
            visit(child)

    visit(tree)
    return found


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def test_no_plugin_imports_the_policy_loader():
    offenders = {str(p.relative_to(ROOT)): sorted(i for i in _imports(p)
                                                  if i.startswith("rotator.config"))
                 for p in _sources("providers", "rotator/vaults")}
    assert {k: v for k, v in offenders.items() if v} == {}, \
        "plugins import SecretRef and the rest from rotator.interfaces"


def test_the_product_does_not_import_its_test_support():
    offenders = {}
    for path in _sources("rotator", "providers"):
        name = str(path.relative_to(ROOT))
        if name.startswith("rotator/testing/") or name in DEMO_MAY_USE_TESTING:
            continue
        used = sorted(i for i in _imports(path) if i.startswith("rotator.testing"))
        if used:
            offenders[name] = used
    assert offenders == {}


def test_no_import_cycle_at_import_time():
    modules = {_module(p): p for p in _sources("rotator", "providers")}
    graph = {name: {m for m in _imports(path, top_level_only=True) if m in modules}
             for name, path in modules.items()}
    for name in graph:  # a package's submodule imports the package first
        graph[name] = {m for m in graph[name] if not name.startswith(f"{m}.")}
    visiting: list[str] = []
    done: set[str] = set()

    def walk(name: str) -> None:
        if name in done:
            return
        assert name not in visiting, "import cycle: " + " -> ".join(
            [*visiting[visiting.index(name):], name])
        visiting.append(name)
        for dependency in sorted(graph[name]):
            walk(dependency)
        visiting.pop()
        done.add(name)

    for name in sorted(graph):
        walk(name)


def test_python_dash_m_rotator_runs_the_cli():
    answer = subprocess.run([sys.executable, "-m", "rotator", "--version"], capture_output=True,
                            text=True, timeout=60, cwd=ROOT)
    assert answer.returncode == 0 and "rotator" in answer.stdout, answer.stderr
