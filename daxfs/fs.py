"""The filesystem engine's facade: one mounted image, and the operations the adapter calls.

No FUSE here. The work is done by one part per responsibility, each in its own module:

    namespace.py   names, directories, links, renames, readdir
    filedata.py    read, write, truncate, clone (reflink), lseek, fallocate, punch
    xattrs.py      extended attributes (XattrStore) and the capability tracking
    orphans.py     unlinked inodes: reclaim now or at the next mount
    txn.py         the typed transaction every part records into, commit, failsafe

below which lie the in-memory indexes (inodes.py, dirs.py, extents.py), the data path
(bufcache.py), the allocator (alloc.py), the journal and the mapping (pmem.py), laid out by
format.py.

What is atomic: every public method is synchronous and never awaits, so under trio each
operation is atomic with respect to every other one served in Python. The C data plane
(dataplane.py) serves reads and in-place overwrites of the files it was handed in other
threads; an operation that reads and then changes a file's data or mapping takes the file
back first (`tx.changing`), and every commit takes back the files it changed (txn.py). Each
mutating operation validates, settles the space it needs, then mutates and commits one
transaction (large ones: several, each leaving a valid state); an unexpected error after
mutation began means memory and image may disagree, so the engine turns read-only
(failsafe) instead of writing more. Errors are FsError(errno); the adapter maps them.
"""
from __future__ import annotations

import dataclasses
import errno
import logging
import os
import stat
from typing import TYPE_CHECKING, Callable


from . import format as fmt
from . import usage
from .alloc import BlockAllocator, implied_refcounts
from .bufcache import BufCache
from .cowlog import CowLog
from .dirs import Directories
from .errors import FsError, MountError
# the parts' constants, for callers of the engine
from .filedata import (FALLOC_KEEP_SIZE, FALLOC_PUNCH_HOLE, FALLOC_ZERO_RANGE,  # noqa: F401
                       MAX_CLONE_BYTES, FileData)  # noqa: F401
from .frames import FrameIndex
from .inodes import Inode, InodeTable, now_ns
from .journal import Journal
from .namespace import MAX_LINKS, MAX_SYMLINK, RENAME_EXCHANGE, RENAME_NOREPLACE  # noqa: F401
from .namespace import Namespace
from .orphans import Orphans
from .pmem import PMem
from .txn import Buffer, Transactions
from .xattrs import XattrStore

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

BS = fmt.BLOCK_SIZE
# Bounds on one transaction's work: big truncates, unlinks and clones run as several
# (the default of FileSystem(txn_blocks=...); the crash harness explores with smaller ones).
TXN_BLOCKS = 4096


@dataclasses.dataclass
class Attr:
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blocks: int          # 512-byte sectors mapped
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    generation: int


@dataclasses.dataclass
class StatFs:
    bsize: int
    blocks: int
    bfree: int
    files: int
    ffree: int
    namemax: int = fmt.MAX_NAME


class FileSystem:
    def __init__(self, pm: PMem, sb: np.void, g: fmt.Geometry, readonly: bool,
                 txn_blocks: int | None = None) -> None:
        self.pm = pm
        self.g = g
        self.sb = sb
        self.journal = Journal(pm, g)
        if not self.journal.header_ok():
            raise fmt.FormatError("journal header corrupt (run daxfs fsck --repair)")
        self.journal.replay()
        self._load_tables(readonly)
        self.tx = Transactions(pm, g, self.journal, self.alloc, readonly)
        self.inodes.on_corruption = self.tx.fail
        self.extra_stats: Callable[[], dict] | None = None     # the daemon's own counters
        self.xattrs = XattrStore(self)
        self.data = FileData(self, TXN_BLOCKS if txn_blocks is None else txn_blocks)
        self.names = Namespace(self)
        self.orphans = Orphans(self)
        self.cow = CowLog(self)
        self.cow.recover()
        self.tx.on_fail = self.cow.strand
        if not readonly:
            self._set_clean(False)
            self.orphans.recover()

    # ---------------------------------------------------------------- open / close
    @classmethod
    def open(cls, path: str, *, readonly: bool = False,
             make_pmem: Callable[[str], PMem] | None = None,
             txn_blocks: int | None = None) -> "FileSystem":
        """Validate and mount the image at `path`. `make_pmem` maps it another way (the
        crash harness records every store through its own PMem subclass); `txn_blocks`
        bounds the blocks of one transaction (default TXN_BLOCKS)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise MountError(f"cannot open {path}: {e.strerror}") from None
        try:
            sb, g = fmt.read_superblock(fd)
        finally:
            os.close(fd)
        pm = make_pmem(path) if make_pmem else PMem(path, private=readonly)
        try:
            return cls(pm, sb, g, readonly, txn_blocks)
        except BaseException:
            pm.close()
            raise

    def _load_tables(self, readonly: bool) -> None:
        g, pm = self.g, self.pm
        iv = g.table(pm.mm, "inodes")
        ev = g.table(pm.mm, "extents")
        dv = g.table(pm.mm, "dirents")
        rv = g.table(pm.mm, "refcounts")
        self.alloc = BlockAllocator(rv, g)
        self.inodes = InodeTable(iv, ev, g)
        if not readonly:
            e = ev[ev["ino"] != 0]
            bad = self.alloc.undercounted(implied_refcounts(e["pblk"], e["length"], iv,
                                                            g.nblocks))
            if bad.size:
                raise MountError(
                    f"refcount table undercounts {bad.size} block(s) in use (first: {bad[0]}); "
                    "writing could overwrite files (run daxfs fsck --repair)")
        self.dirs = Directories(dv)
        isdir = (iv["mode"] & fmt.S_IFMT_BITS) == stat.S_IFDIR
        if not isdir[fmt.ROOT_INO]:
            raise fmt.FormatError("root inode is not a directory (image corrupt; run daxfs fsck)")
        self.dirs.note_dir_parents(lambda ino: 0 < ino < isdir.size and bool(isdir[ino]))
        self.frames = FrameIndex.build(*self.inodes.extent_arrays(), self.alloc.counts())
        self.bufcache = BufCache(pm, self.alloc, self.inodes, self.frames)

    @property
    def readonly(self) -> bool:
        return self.tx.readonly

    @property
    def failed(self) -> str | None:
        """Why the engine turned read-only (failsafe), or None."""
        return self.tx.failed

    def close(self) -> None:
        if self.pm.mm is None:
            return
        if self.tx.writable:
            for node in self.inodes.cached_nodes():
                if node.nlink == 0 and node.flags & fmt.IFLAG_ORPHAN:
                    node.lookups = node.opens = 0
                    self.orphans.reclaim(node)
            self.tx.flush_times()
            self.journal.checkpoint()
            self._set_clean(True)
        self.pm.close()

    def _set_clean(self, clean: bool) -> None:
        sb = self.sb
        sb["clean"] = int(clean)
        if not clean:
            sb["mount_count"] = (int(sb["mount_count"]) + 1) & 0xFFFFFFFF     # wraps
        fmt.store_superblock(self.pm, sb)

    def sync(self) -> None:
        """Make everything done so far durable (fsync, fdatasync, syncfs)."""
        if self.readonly:
            return
        self.tx.flush_times()
        self.pm.persist(0, self.pm.size)
        self.pm.fence()

    def fsync(self, ino: int, datasync: bool = False) -> None:
        self.sync()

    # ---------------------------------------------------------------- attributes
    def attr(self, node: Inode) -> Attr:
        self.tx.sync_times(node.ino)
        blocks = self.inodes.mapped_blocks(node) if node.has_data else 0
        if node.xattr_blk:
            blocks += 1
        return Attr(node.ino, node.mode, node.nlink, node.uid, node.gid, node.rdev, node.size,
                    blocks * (BS // 512), node.atime, node.mtime, node.ctime, node.generation)

    def getattr(self, ino: int) -> Attr:
        return self.attr(self.inodes.get(ino))

    def remember(self, ino: int) -> None:
        self.inodes.get(ino).lookups += 1

    def forget(self, ino: int, n: int) -> None:
        node = self.inodes.cached(ino)
        if node is None:
            return
        node.lookups = max(0, node.lookups - n)
        self.orphans.maybe_reclaim(node)

    def setattr(self, ino: int, *, mode: int | None = None, uid: int | None = None,
                gid: int | None = None, size: int | None = None, atime_ns: int | None = None,
                mtime_ns: int | None = None, ctime_ns: int | None = None) -> Attr:
        node = self.inodes.get(ino)
        self.tx.changing(ino)
        if size is not None:
            if node.is_dir:
                raise FsError(errno.EISDIR)
            if not node.is_reg:
                raise FsError(errno.EINVAL)
            self.data.truncate(node, size)
        with self.tx.open() as t:
            if mode is not None:
                node.mode = stat.S_IFMT(node.mode) | (mode & 0o7777)
            if uid is not None or gid is not None:
                if not node.is_dir and (uid not in (None, node.uid) or gid not in (None, node.gid)):
                    node.mode &= ~(stat.S_ISUID | (stat.S_ISGID if node.mode & 0o010 else 0))
                node.uid = node.uid if uid is None else uid
                node.gid = node.gid if gid is None else gid
            if atime_ns is not None:
                node.atime = atime_ns
            if mtime_ns is not None:
                node.mtime = mtime_ns
            node.ctime = now_ns() if ctime_ns is None else ctime_ns
            t.inode(node)
        return self.attr(node)

    # ---------------------------------------------------------------- the parts' operations
    # names (namespace.py)
    def lookup(self, parent: int, name: bytes) -> Attr:
        return self.names.lookup(parent, name)

    def create(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> Attr:
        return self.names.create(parent, name, mode, uid, gid)

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, uid: int, gid: int) -> Attr:
        return self.names.mknod(parent, name, mode, rdev, uid, gid)

    def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> Attr:
        return self.names.mkdir(parent, name, mode, uid, gid)

    def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int) -> Attr:
        return self.names.symlink(parent, name, target, uid, gid)

    def readlink(self, ino: int) -> bytes:
        return self.names.readlink(ino)

    def link(self, ino: int, parent: int, name: bytes) -> Attr:
        return self.names.link(ino, parent, name)

    def unlink(self, parent: int, name: bytes) -> None:
        self.names.unlink(parent, name)

    def rmdir(self, parent: int, name: bytes) -> None:
        self.names.rmdir(parent, name)

    def rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes,
               flags: int = 0) -> None:
        self.names.rename(old_parent, old_name, new_parent, new_name, flags)

    def opendir(self, ino: int) -> int:
        return self.names.opendir(ino)

    def readdir(self, fh: int, start: int, limit: int | None = None, dots: bool = False
                ) -> list[tuple[int, bytes, int]]:
        return self.names.readdir(fh, start, limit, dots)

    def releasedir(self, fh: int) -> None:
        self.names.releasedir(fh)

    # file data (filedata.py)
    def open_file(self, ino: int, truncate: bool = False, kill_suidgid: bool = False,
                  cached_writer: bool = False) -> None:
        if truncate:
            self.tx.changing(ino)
        self.data.open_file(ino, truncate, kill_suidgid, cached_writer)

    def release_file(self, ino: int, cached_writer: bool = False) -> None:
        self.data.release_file(ino, cached_writer)

    def kill_privileges(self, ino: int, suidgid: bool) -> bool:
        return self.data.kill_privileges(ino, suidgid)

    def read(self, ino: int, off: int, size: int, view: bool = False) -> bytes | memoryview:
        data = self.data.read(ino, off, size, view)
        if self.cow.stranded:               # the failsafe left C's last breaks in the ring
            data = self.cow.patch(ino, off, data)
        return data

    def write(self, ino: int, off: int, data: Buffer, whole: bool = False) -> int:
        return self.data.write(ino, off, data, whole)

    def truncate(self, node: Inode, size: int) -> None:
        self.data.truncate(node, size)

    def clone_range(self, ino_in: int, off_in: int, ino_out: int, off_out: int, length: int,
                    flags: int = 0) -> int:
        self.tx.changing(ino_in, ino_out)
        return self.data.clone_range(ino_in, off_in, ino_out, off_out, length, flags)

    def lseek(self, ino: int, off: int, whence: int) -> int:
        return self.data.lseek(ino, off, whence)

    def fallocate(self, ino: int, mode: int, off: int, length: int) -> None:
        self.tx.changing(ino)
        self.data.fallocate(ino, mode, off, length)

    def note_write_time(self, ino: int, t_ns: int) -> None:
        """A write served outside Python (the data plane) at `t_ns`: mtime and ctime, kept
        lazily like those of in-place overwrites."""
        node = self.inodes.cached(ino)
        if node is not None and t_ns > node.mtime:
            node.mtime = node.ctime = t_ns
            self.tx.note_times(node)

    def plane_map(self, ino: int) -> tuple[int, bool, np.ndarray] | None:
        """What the data plane needs to serve `ino`: (size, in-place writes allowed, mapped
        runs with their owned flag, see BufCache.owned_runs); None for anything but a
        regular file, and for one whose reads `cow.patch` must mend (failsafe)."""
        node = self.inodes.cached(ino)
        if node is None or not node.is_reg or ino in self.cow.stranded:
            return None
        writable = self.tx.writable and not node.mode & (stat.S_ISUID | stat.S_ISGID)
        return node.size, writable, self.bufcache.owned_runs(node)

    # extended attributes (xattrs.py)
    def getxattr(self, ino: int, name: bytes, uid: int = 0) -> bytes:
        return self.xattrs.get(ino, name, uid)

    def listxattr(self, ino: int) -> list[bytes]:
        return self.xattrs.list(ino)

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0, uid: int = 0,
                 gid: int = 0) -> None:
        self.xattrs.set(ino, name, value, flags, uid, gid)

    def removexattr(self, ino: int, name: bytes) -> None:
        self.xattrs.remove(ino, name)

    # ---------------------------------------------------------------- whole filesystem
    @property
    def cow_breaks(self) -> int:
        """COW breaks since mount (cheap: the adapter looks before and after a write)."""
        return self.bufcache.stats.cow_breaks

    def stats(self) -> dict[str, int]:
        """Space and sharing counters (`daxfs stat`), O(1): running totals kept by the
        allocator and the inode table (scan_stats() computes the same from the tables)."""
        g, a = self.g, self.alloc
        free = a.free + a.pooled        # the data plane's COW pool is free on the image
        used = g.data_blocks - free
        out = {"logical_bytes": self.inodes.logical_bytes, "physical_bytes": used * BS,
               "free_bytes": free * BS, "total_bytes": g.data_blocks * BS,
               "files": self.inodes.used, "shared_blocks": a.shared,
               "aliases": a.refs - a.pooled - self.inodes.xattr_blocks,
               # aliases - data frames == refs - used blocks (xattr blocks cancel out)
               "bytes_saved": max(0, a.refs - a.pooled - used) * BS}
        b = self.bufcache.stats
        out.update(clones=b.clones, cloned_blocks=b.cloned_blocks, cow_breaks=b.cow_breaks,
                   cow_ring_applied=self.cow.applied_records,
                   cow_ring_dropped=self.cow.mismatches, journal_commits=self.journal.commits)
        if self.extra_stats:
            out.update(self.extra_stats())
        return out

    def scan_stats(self) -> dict[str, int]:
        """The space figures of stats(), computed by a full scan of the committed tables."""
        g, mm = self.g, self.pm.mm
        return usage.usage(self.inodes.view, g.table(mm, "extents"), g.table(mm, "refcounts"), g)

    def aliases_of(self, pblk: int) -> list[tuple[int, int]]:
        """The aliases of physical block `pblk`, from the frame index: (inode, file block) of
        every inode mapping it while it is shared, [] while one inode owns it."""
        return self.frames.aliases(pblk)

    def frames_match_tables(self) -> bool:
        """The frame index equals a rebuild from the committed tables (tests, fsck)."""
        g, mm = self.g, self.pm.mm
        ev = g.table(mm, "extents")
        used = ev[ev["ino"] != 0]
        fresh = FrameIndex.build(used["ino"], used["lblk"], used["pblk"], used["length"],
                                 g.table(mm, "refcounts"))
        return fresh.blocks() == self.frames.blocks()

    def statfs(self) -> StatFs:
        g = self.g
        # f_files excludes the never-used slot 0; root counts as used
        # a new name takes an inode and a directory entry (hard links only the entry): `df -i`
        # shows what can still be created, whichever table runs out first
        return StatFs(BS, g.data_blocks, self.alloc.free + self.alloc.pooled, g.inode_count - 1,
                      min(len(self.inodes.pool), len(self.dirs.pool)))
