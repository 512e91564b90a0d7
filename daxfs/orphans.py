"""Orphans: inodes whose last name is gone.

An unlinked inode lives while the kernel holds a lookup reference or a handle is open
(IFLAG_ORPHAN keeps that promise across a crash); its data goes as soon as nobody can read
it, the inode when nobody can name it. At mount, `recover` finishes what a crash
interrupted: orphans are reclaimed and truncates flagged IFLAG_TRIM are completed.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from . import format as fmt
from .inodes import Inode

if TYPE_CHECKING:
    from .fs import FileSystem

log = logging.getLogger(__name__)


class Orphans:
    def __init__(self, fs: FileSystem) -> None:
        self.fs = fs
        self.tx, self.alloc, self.inodes = fs.tx, fs.alloc, fs.inodes

    def maybe_reclaim(self, node: Inode) -> None:
        # IFLAG_ORPHAN, not just nlink 0: a damaged link count must never delete a named file
        if not (node.nlink == 0 and node.flags & fmt.IFLAG_ORPHAN and not self.tx.readonly
                and not self.tx.failed and self.inodes.cached(node.ino) is node):
            return
        if not node.in_use:
            self.reclaim(node)
        elif node.opens == 0 and node.has_data:
            # only the kernel's lookup reference is left (it forgets a few ms later): nobody
            # can read the data any more, so give the space back now and `df` is exact at once
            self.fs.data.punch_chunked(node, 0)

    def reclaim(self, node: Inode) -> None:
        """Free an orphan: its blocks (in bounded transactions), xattr block, then the slot."""
        self.fs.data.punch_chunked(node, 0)
        with self.tx.open() as t:
            if node.xattr_blk:
                self.alloc.decref(node.xattr_blk, 1)
                node.xattr_blk = 0
                self.inodes.xattr_blocks -= 1
            t.free_inode(node.ino, fmt.free_inode_record(node.generation))
            self.inodes.release(node)
            self.tx.drop_times(node.ino)
        self.fs.xattrs.note_capability(node.ino, False)

    def recover(self) -> None:
        """Finish what a crash interrupted: reclaim orphans, complete pending trims."""
        for ino in self.inodes.flagged(fmt.IFLAG_ORPHAN | fmt.IFLAG_TRIM):
            node = self.inodes.get(ino)
            if node.nlink == 0:
                log.info("reclaiming orphan inode %d", ino)
                self.reclaim(node)
            else:
                log.info("finishing truncate of inode %d", ino)
                self.fs.data.trim(node)
