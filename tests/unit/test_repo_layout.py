"""The repository's layout rules, checked by reading the source (no imports run).

- pytest imports test modules by basename (rootdir mode): two `test_x.py` in different folders
  break collection of the whole suite, so basenames must be unique.
- Layers (STYLE.md): `rl/` sits on top; `rollout/`, `trainer/`, `rewards/`, `adapters/` never
  import `rl`, and `rollout/` and `trainer/` never import each other; `common/`, below them all,
  imports none of them.
"""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# package -> packages it must not import
FORBIDDEN_IMPORTS = {
    "rollout": {"rl", "trainer"},
    "trainer": {"rl", "rollout"},
    "rewards": {"rl"},
    "adapters": {"rl"},
    "common": {"rl", "rollout", "trainer", "rewards", "adapters"},
}


def test_test_module_basenames_are_unique():
    names = Counter(p.name for p in (ROOT / "tests").rglob("test_*.py"))
    assert [n for n, c in names.items() if c > 1] == []


def _imported_top_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_lower_layers_do_not_import_upward():
    violations = []
    for package, forbidden in FORBIDDEN_IMPORTS.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            bad = _imported_top_packages(path) & forbidden
            if bad:
                violations.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert violations == []
