"""Helpers for in-process engine tests."""
from __future__ import annotations


def fsck_clean(path: str) -> None:
    """The image must pass every fsck check (run after every engine test)."""
    try:
        from daxfs import fsck
    except ImportError:          # fsck lands separately; until then only the engine's own load
        from daxfs.fs import FileSystem
        FileSystem.open(path, readonly=True).close()
        return
    report = fsck.check(path, repair=False)
    assert report.clean, "\n".join(str(p) for p in report.problems)
