"""The package's import graph has no circle (function-level imports included), and ruff's checks pass."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("rl", "trainer", "rollout", "rewards", "adapters", "common")


def package_modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            rel = f.relative_to(ROOT).with_suffix("")
            mods[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = f
    return mods


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its body (``from pkg import submodule`` counts
    the submodule; an import of a name counts the module that defines it)."""

    def known(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in mods.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges.update(known(a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
                edges.update(known(f"{base}.{a.name}") if f"{base}.{a.name}" in mods else known(base) for a in node.names)
        graph[name] = {e for e in edges if e and e != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
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

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_circle_finder_sees_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circles():
    assert circles(import_graph(package_modules())) == []


def test_ruff():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent))
    assert ruff, "ruff is in the dev extra (scripts/setup.sh installs it)"
    proc = subprocess.run([ruff, "check", "--output-format", "concise", *PACKAGES, "experiments", "scripts", "tests"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_scripts_put_the_repository_on_the_path_before_importing_experiments():
    """``experiments/`` is a folder of the repository, not an installed package: a script reaches it only after
    putting the repository root on ``sys.path`` at module level (an import inside a function fails only when
    that function runs, which a ``--help`` check does not reach)."""
    problems = []
    for script in sorted((ROOT / "scripts").glob("*.py")):
        tree = ast.parse(script.read_text())
        top_level = set(map(id, tree.body))
        path_set_at = min((n.lineno for n in tree.body if "sys.path" in ast.unparse(n)), default=None)
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if not any(n == "experiments" or n.startswith("experiments.") for n in names):
                continue
            if path_set_at is None or (id(node) in top_level and path_set_at > node.lineno):
                problems.append(f"{script.name}:{node.lineno} imports experiments before sys.path holds the repository")
    assert not problems, problems
