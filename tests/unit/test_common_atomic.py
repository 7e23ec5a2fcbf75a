"""common.atomic.atomic_directory: a directory appears whole or not at all, and nothing is left beside it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from common.atomic import atomic_directory


def _tree(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): p.read_text() for p in sorted(d.rglob("*")) if p.is_file()}


def _old(parent: Path) -> Path:
    target = parent / "target"
    target.mkdir()
    (target / "a.txt").write_text("old")
    return target


def test_success_creates_the_target_and_leaves_nothing_beside_it(tmp_path):
    target = tmp_path / "sub" / "target"  # the parent is created too
    with atomic_directory(target) as tmp:
        assert tmp.parent == target.parent and tmp.is_dir() and not target.exists()  # beside it: one filesystem
        (tmp / "nested").mkdir()
        (tmp / "nested" / "b.txt").write_text("new")
    assert _tree(target) == {"nested/b.txt": "new"}
    assert os.listdir(target.parent) == ["target"]


def test_replace_swaps_an_existing_target_for_the_new_one(tmp_path):
    target = _old(tmp_path)
    with atomic_directory(target, replace=True, durable=True) as tmp:
        (tmp / "b.txt").write_text("new")
    assert _tree(target) == {"b.txt": "new"}  # the old files are gone, not merged
    assert os.listdir(tmp_path) == ["target"]  # no temporary or trash directory left


def test_without_replace_an_existing_target_is_kept_and_the_rename_fails(tmp_path):
    target = _old(tmp_path)
    with pytest.raises(OSError):
        with atomic_directory(target) as tmp:
            (tmp / "b.txt").write_text("new")
    assert _tree(target) == {"a.txt": "old"}
    assert os.listdir(tmp_path) == ["target"]


@pytest.mark.parametrize("replace", [False, True])
def test_an_exception_leaves_the_old_target_intact_and_no_temp_dir(tmp_path, replace):
    target = _old(tmp_path)
    with pytest.raises(RuntimeError, match="write failed"):
        with atomic_directory(target, replace=replace) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("write failed")
    assert _tree(target) == {"a.txt": "old"}
    assert os.listdir(tmp_path) == ["target"]


def test_an_exception_with_no_target_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(tmp_path / "target"):
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_a_failed_swap_puts_the_old_target_back(tmp_path, monkeypatch):
    target = _old(tmp_path)
    real_rename = os.rename

    def rename(src, dst):
        if Path(src).name.startswith(".tmp-"):
            raise OSError("disk gone")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="disk gone"):
        with atomic_directory(target, replace=True) as tmp:
            (tmp / "b.txt").write_text("new")
    assert _tree(target) == {"a.txt": "old"}
    assert os.listdir(tmp_path) == ["target"]


def test_a_named_temp_dir_left_by_an_interrupted_write_is_cleared_first(tmp_path):
    stale = tmp_path / "target.tmp"
    stale.mkdir()
    (stale / "junk.txt").write_text("from a crash")
    with atomic_directory(tmp_path / "target", temp_name="target.tmp") as tmp:
        assert tmp == stale and list(tmp.iterdir()) == []
        (tmp / "b.txt").write_text("new")
    assert _tree(tmp_path / "target") == {"b.txt": "new"}
    assert os.listdir(tmp_path) == ["target"]
