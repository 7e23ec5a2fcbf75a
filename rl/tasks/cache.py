"""The cache every builtin build lives in (``$RL_CACHE_DIR``, else ``~/.cache/rl-post-train``): a build goes
into a temporary sibling directory renamed into place, so a killed build never leaves half a cache and
concurrent builds of the same thing agree.

Some builds ship with the package (``rl/tasks/shipped/<kind>/<name>/``, checksummed in ``SHA256SUMS``): a build's
name hashes everything it is built from (spec, data, format), so a shipped build of the same name is that build,
made once on one machine. It is copied instead of trained (``rl.tasks.shipped_model``) into ``<name>-shipped``,
which makes it the same on every CPU (training rounds differently on another CPU model) and saves the build's time.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

from rl.tasks.shipped_model import SHIPPED_SUFFIX, copy_shipped, shipped_build


def default_cache_dir() -> Path:
    """``$RL_CACHE_DIR`` if set, else ``~/.cache/rl-post-train``."""
    env = os.environ.get("RL_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rl-post-train"


def _remove_stale_temps(parent: Path, name: str) -> None:
    """Delete temp build dirs of ``name`` left by processes that no longer run."""
    for tmp in parent.glob(f".tmp-{name}-*"):
        try:
            pid = int(tmp.name.rsplit("-", 2)[-2])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            pass


def cached_build(parent: Path, dirname: str, build: Callable[[Path], dict], label: str,
                 log: Callable[[str], None]) -> tuple[Path, dict | None]:
    """``parent/dirname``, built once by ``build(tmp_dir) -> info`` and reused after.

    Complete when ``build_info.json`` exists. The build goes into a temporary sibling directory
    renamed into place, so a killed build never leaves a half-written cache; when two processes
    build at once, the first rename wins and the other discards its copy. Returns (directory,
    info) with info None when an existing build was reused.
    """
    shipped = shipped_build(parent.name, dirname)
    if shipped is not None:
        # Cached under a name of its own: a build this machine made of the same name earlier (before it shipped,
        # and so trained on this CPU) is not the shipped one.
        dirname += SHIPPED_SUFFIX
    final = parent / dirname
    if (final / "build_info.json").is_file():
        log(f"{label}: reusing {final}")
        return final, None
    parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(parent, dirname)
    t0 = time.time()
    if shipped is not None:
        build = lambda out: copy_shipped(shipped, out)  # noqa: E731
        log(f"{label}: {dirname} ships with the package; copying it into {parent}")
    else:
        log(f"{label}: building {dirname} (once; cached in {parent})")
    # Not common.atomic.atomic_directory: the temporary name carries the pid (``_remove_stale_temps`` sweeps those
    # of dead processes), and losing the rename race keeps the other process's finished build.
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dirname}-{os.getpid()}-", dir=parent))
    try:
        info = build(tmp)
        info["build_seconds"] = round(time.time() - t0, 1)
        (tmp / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:
            if (final / "build_info.json").is_file():  # another process won the race
                log(f"{label}: another process finished the same build first; using it")
                shutil.rmtree(tmp, ignore_errors=True)
                return final, None
            # A directory without build_info.json is not a build (e.g. made by hand): replace it.
            shutil.rmtree(final, ignore_errors=True)
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final, info
