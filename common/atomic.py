"""Directories written whole or not at all: a checkpoint, a library expert, a published LoRA.

Every such write goes through ``atomic_directory``: the files are written into a temporary directory beside the
target (the same parent, so the final rename never crosses a filesystem) and renamed into place only when all of
them are there, so a crash leaves the old target (or none) and a temporary directory, never half a target.
"""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory, so renames in it are durable; errors are ignored (not every filesystem allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_directory(target: str | os.PathLike, *, replace: bool = False, temp_name: str | None = None,
                     durable: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``target``; when the block ends without an exception, rename it
    to ``target``. On any exception (the block's or the rename's) the temporary directory is removed and the
    exception propagates; ``target`` is left as it was.

    - ``replace``: an existing ``target`` is moved aside (``.trash-<name>-<hex>``), the new one renamed into its
      place, and the old one deleted, so the name never points at half a directory. If the second rename fails,
      the old one is moved back. Without ``replace``, the rename fails (``OSError``) when a non-empty ``target``
      exists by then; callers that must not replace check for it first.
    - ``temp_name``: the temporary directory's name (default ``.tmp-<name>-<hex>``, hidden and unique), for a
      caller whose readers recognise leftovers by name. A directory of that name left by an interrupted earlier
      write is removed first.
    - ``durable``: fsync the temporary directory before the rename and the parent after it (the files' own
      contents are the caller's to fsync).

    The parent directory is created if missing.

    >>> import tempfile; d = Path(tempfile.mkdtemp())
    >>> with atomic_directory(d / "out") as tmp:
    ...     _ = (tmp / "a.txt").write_text("a")
    >>> sorted(p.name for p in d.iterdir()), (d / "out" / "a.txt").read_text()
    (['out'], 'a')
    """
    target = Path(target)
    tmp = target.with_name(temp_name or f".tmp-{target.name}-{uuid.uuid4().hex[:8]}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if durable:
            fsync_dir(tmp)
        if replace and target.exists():
            trash = target.with_name(f".trash-{target.name}-{uuid.uuid4().hex[:8]}")
            os.rename(target, trash)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(trash, target)
                raise
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, target)
        if durable:
            fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
