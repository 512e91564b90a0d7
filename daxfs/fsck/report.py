"""fsck results: one `Problem` per finding, the `FsckReport` of a run, `FsckError` (the image
cannot be checked at all), severities and the fsck(8) exit code of a report (the codes are
named in errors.py)."""
from __future__ import annotations

import dataclasses
import stat

from ..errors import EXIT_CORRECTED, EXIT_OK, EXIT_UNCORRECTED

ERROR, INFO = "error", "info"

TYPE_NAMES = {stat.S_IFREG: "regular file", stat.S_IFDIR: "directory", stat.S_IFLNK: "symlink",
              stat.S_IFCHR: "character device", stat.S_IFBLK: "block device",
              stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket"}


# ------------------------------------------------------------------------------------ results
@dataclasses.dataclass
class Problem:
    check: str            # name of the check that found it
    obj: str              # what is affected: "inode 12", "entry 7", "blocks 300-310", ...
    message: str          # what is wrong
    repairable: bool
    action: str | None = None   # what --repair does about it
    severity: str = ERROR  # ERROR, or INFO for expected leftovers of a crash (orphans, journal)
    repaired: bool = False

    def line(self) -> str:
        text = f"{self.severity}: {self.check}: {self.obj}: {self.message}"
        if self.repaired:
            return f"{text}: {self.action} [repaired]" if self.action else f"{text} [repaired]"
        if self.repairable:
            return f"{text} [repairable: {self.action}]" if self.action else text
        return f"{text} [NOT repairable]" if self.severity == ERROR else text

    __str__ = line


@dataclasses.dataclass
class FsckReport:
    path: str
    problems: list[Problem]
    counts: dict[str, int]
    clean: bool             # no error is left in the image (after repair, if --repair)
    repaired: bool          # the image file was modified
    seconds: float = 0.0

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == ERROR]

    @property
    def exit_code(self) -> int:
        if not self.clean:
            return EXIT_UNCORRECTED
        return EXIT_CORRECTED if self.repaired else EXIT_OK

    def summary(self) -> str:
        c = self.counts
        errs = self.errors
        fixed = sum(p.repaired for p in errs)
        notes = len(self.problems) - len(errs)
        state = ("clean" if not errs else "clean after repair") if self.clean else "NOT CLEAN"
        if self.clean and self.repaired and not errs:
            state = "clean (modified)"
        return (f"{self.path}: {c.get('inodes', 0)} inodes ({c.get('directories', 0)} directories), "
                f"{c.get('dirents', 0)} entries, {c.get('extents', 0)} extents, "
                f"{c.get('data_used', 0)}/{c.get('data_blocks', 0)} data blocks used; "
                f"{len(errs)} errors ({fixed} repaired), {notes} notes; {state} "
                f"[{self.seconds:.2f}s]")


class FsckError(Exception):
    """The image cannot be checked at all; str() is the one line shown to the user."""
