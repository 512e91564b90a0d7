"""Offline consistency check and repair of a daxfs image (the engine of `daxfs fsck`).

The check is a pipeline of small named checks (s3ql style), run in order over one shared
`Context`: superblock, journal, inodes, dirents, orphans, tree, links, extents, xattrs,
refcounts. Each is a function of the context that reports `Problem` records (check name,
object, message, repairable, severity) and is vectorized with numpy: no Python loop runs per
block, extent, inode or entry of a healthy image, only per problem found.

Working model: the context holds *copies* of the tables (the inode table, the used dirent and
extent records), never edits the mapping, and every check applies its repair to those copies
straight away. So a later check sees the image as the earlier repairs leave it, and a plain
check reports exactly what `--repair` would do. With `--repair` the copies are compared with the
image at the end and only records that differ are written back (undamaged files are never
touched), the refcount table gets the recomputed counts, the image is msync'ed, and a fresh check
of the result must come out clean.

Before anything is checked, an image that was not cleanly unmounted (superblock `clean` == 0) or
whose journal holds committed transactions is replayed: into the file with --repair, else into a
private copy-on-write mapping (MAP_PRIVATE), so a plain check never writes the image.

Exit codes (`main_check`) follow fsck(8): 0 no errors, 1 errors corrected (or the image was
otherwise modified: journal replayed, orphans reclaimed), 4 errors left uncorrected, 8
operational error (cannot open / lock / not a usable daxfs image).
"""
from __future__ import annotations

from .checks import CHECKS, check_step
from .context import Context
from ..errors import EXIT_CORRECTED, EXIT_OK, EXIT_OPERATIONAL, EXIT_UNCORRECTED
from .report import ERROR, INFO, TYPE_NAMES, FsckError, FsckReport, Problem
from .run import check, main, main_check

__all__ = ["check", "main_check", "main", "FsckError", "FsckReport", "Problem",
           "EXIT_OK", "EXIT_CORRECTED", "EXIT_UNCORRECTED", "EXIT_OPERATIONAL", "ERROR", "INFO",
           "TYPE_NAMES", "CHECKS", "check_step", "Context"]
