"""Small files a run writes and other processes read (run status, summary, metrics, data splits): written whole
or not at all, so a reader or a resumed run never finds half of one after a crash."""

from __future__ import annotations

import os
from pathlib import Path


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling and a rename (atomic on POSIX).

    The temporary name carries the process id, so two writers of one path never share a temporary file.

    >>> import tempfile; d = Path(tempfile.mkdtemp())
    >>> write_text_atomic(d / "a.json", "{}"); (d / "a.json").read_text(), sorted(p.name for p in d.iterdir())
    ('{}', ['a.json'])
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
