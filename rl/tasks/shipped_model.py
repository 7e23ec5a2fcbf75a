"""Builds that ship with the package instead of being trained on the user's machine.

Any cache build (``rl.tasks.cache.cached_build``) can ship: ``rl/tasks/shipped/<kind>/<name>/`` holds the build
as it was made, with ``SHA256SUMS``. Its name hashes everything it is built from, so a shipped build of that name
is the build; it is copied after the checksums are checked. Shipped: the default embedded model
(``builtin:tiny-arithmetic``, 1.05M parameters in 4.2 MB of safetensors, with its task data), and the RLHF
recipe's ``builtin:tiny-text`` and ``builtin:tiny-hh-rm`` for the HH harmless-base test file. Add one with
``python -m rl.tasks.shipped_model ship <build dir>``.

Building the default model from scratch is deterministic on one machine but not across CPUs: the SFT stops when
the train split reaches its target accuracy, and where it crosses depends on the float kernels (one AMD machine
stopped at step 370 where the shipped build stopped at 410, and started the quickstart at 29.6% instead of
36.5%). With the build shipped, every machine starts from the same model. Other specs are still built.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Optional

SHIPPED_ROOT = Path(__file__).parent / "shipped"
CHECKSUMS = "SHA256SUMS"
SHIPPED_SUFFIX = "-shipped"  # added to a shipped build's cache directory (rl.tasks.cache.cached_build)


def build_name(directory: Path) -> str:
    """The name a cached build was made under: its directory's name, less the suffix a shipped copy is cached with."""
    return Path(directory).name.removesuffix(SHIPPED_SUFFIX)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != CHECKSUMS)


def shipped_build(kind: str, dirname: str) -> Optional[Path]:
    """The shipped build ``rl/tasks/shipped/<kind>/<dirname>``, or None."""
    path = SHIPPED_ROOT / kind / dirname
    return path if (path / CHECKSUMS).is_file() else None


def copy_shipped(shipped: Path, out: Path) -> dict:
    """Copy a shipped build into ``out`` (an empty build directory) after checking every file against
    ``SHA256SUMS``; returns its build info, marked ``shipped``."""
    listed = {}
    for line in (shipped / CHECKSUMS).read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        listed[name] = digest
    present = {p.relative_to(shipped).as_posix() for p in _files(shipped)}
    if present != set(listed):
        raise RuntimeError(f"{shipped}: files {sorted(present ^ set(listed))} differ from {CHECKSUMS} (a damaged checkout; "
                           "restore it with git)")
    for name, digest in listed.items():
        if _sha256(shipped / name) != digest:
            raise RuntimeError(f"{shipped / name}: sha256 differs from {CHECKSUMS} (a damaged checkout; restore it with git)")
    shutil.copytree(shipped, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns(CHECKSUMS, "build_info.json"))
    info = json.loads((shipped / "build_info.json").read_text())
    return {**info, "shipped": True, "shipped_build_seconds": info.get("build_seconds")}


def ship(build_dir: Path, root: Path = SHIPPED_ROOT) -> Path:
    """Copy a finished cache build into ``root/<kind>/<name>`` with its checksums. Absolute paths in its build info
    (where the data lay on the machine that built it) are cut to their file names."""
    build_dir = Path(build_dir).resolve()
    info = json.loads((build_dir / "build_info.json").read_text())

    def local_paths_cut(value):
        if isinstance(value, dict):
            return {k: local_paths_cut(v) for k, v in value.items()}
        if isinstance(value, str) and value.startswith("/"):
            return Path(value).name
        return value

    dest = root / build_dir.parent.name / build_name(build_dir)  # a shipped copy ships as its build
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(build_dir, dest, ignore=shutil.ignore_patterns("build_info.json"))
    (dest / "build_info.json").write_text(json.dumps(local_paths_cut(info), indent=2) + "\n")
    (dest / CHECKSUMS).write_text("".join(f"{_sha256(p)}  {p.relative_to(dest).as_posix()}\n" for p in _files(dest)))
    return dest


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "ship":
        sys.exit("usage: python -m rl.tasks.shipped_model ship <build dir>   (a finished build under the cache, e.g. "
                 "~/.cache/rl-post-train/tiny-rm/hh-harmless-l128-s300-<hash>)")
    print(ship(Path(sys.argv[2])))
