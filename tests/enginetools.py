"""Helpers for in-process engine tests."""
from __future__ import annotations

from daxfs import fsck


def fsck_clean(path: str) -> None:
    """The image must pass every fsck check (run after every engine test)."""
    report = fsck.check(path, repair=False)
    assert report.clean, "\n".join(str(p) for p in report.problems)
