"""The filesystem engine: POSIX operations over one mapped image. No FUSE here.

Every public method is synchronous and never awaits, so under trio each operation is atomic
with respect to every other one: the daemon needs no locks. Each mutating operation follows
"validate, then mutate, then commit one transaction"; an unexpected error after mutation began
means memory and image may disagree, so the engine turns read-only (failsafe) instead of
writing more. Errors are FsError(errno); the adapter maps them to FUSE replies in one place.

Lookup counts: every method that hands an entry to the kernel (lookup, create, mkdir, mknod,
symlink, link, and `remember` for readdirplus) adds one kernel reference; `forget` drops them.
An unlinked inode lives until its last reference and open handle are gone (IFLAG_ORPHAN keeps
the promise across a crash: orphans are reclaimed at the next mount).
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import stat
from typing import Callable

import numpy as np

from . import format as fmt
from . import usage
from . import xattrs as xa
from .alloc import BlockAllocator, implied_refcounts
from .bufcache import BufCache
from .dirs import Directories, check_name
from .errors import CorruptionError, FsError
from .extents import HOLE
from .inodes import INODE_REC, Inode, InodeTable, now_ns
from .journal import Journal
from .pmem import PMem

log = logging.getLogger(__name__)

BS = fmt.BLOCK_SIZE
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
MAX_LINKS = 65000
MAX_SYMLINK = BS - 1
# Bounds on one transaction's work: big truncates, unlinks and clones run as several.
TXN_BLOCKS = 4096
MAX_CLONE_BYTES = 1 << 30    # per call: the FUSE reply count is 32-bit; callers loop
# A read-only virtual xattr of the root: the running daemon's counters as JSON (`daxfs stat`).
STATS_XATTR = b"user.daxfs.stats"
CAPABILITY_XATTR = b"security.capability"
FALLOC_KEEP_SIZE, FALLOC_PUNCH_HOLE, FALLOC_ZERO_RANGE = 0x01, 0x02, 0x10


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


class Txn:
    """What one operation changes: table records, inodes, data ranges to persist first."""

    __slots__ = ("writes", "nodes", "data")

    def __init__(self):
        self.writes: dict[int, bytes] = {}
        self.nodes: dict[int, Inode] = {}
        self.data: list[tuple[int, int]] = []

    def write(self, off: int, data: bytes) -> None:
        self.writes[off] = data

    def inode(self, node: Inode) -> None:
        self.nodes[node.ino] = node

    def persist_data(self, off: int, length: int) -> None:
        self.data.append((off, length))


class FileSystem:
    def __init__(self, pm: PMem, sb, g: fmt.Geometry, readonly: bool):
        self.pm = pm
        self.g = g
        self.sb = sb
        self.readonly = readonly
        self.failed: str | None = None
        self.journal = Journal(pm, g)
        self.inode_base = g.region("inodes")[0]
        self.rc_base = g.region("refcounts")[0]
        if not self.journal.header_ok():
            raise fmt.FormatError("journal header corrupt (run daxfs fsck --repair)")
        self.journal.replay()
        self._load_tables()
        self.dirty_times: dict[int, Inode] = {}
        # inodes holding security.capability: while there are none, the kernel's check before
        # every write (file_remove_privs) can be answered without a trip through Python
        self.capability_inodes = self._scan_capabilities()
        self.capability_listener = None     # callable(bool), set by the daemon
        self.extra_stats: Callable[[], dict] | None = None     # the daemon's own counters
        self.dir_handles: dict[int, int] = {}        # fh -> directory inode
        # inode -> writable opens through the kernel's page cache: the kernel may hold dirty
        # pages of these files (lseek must not call their unwritten ranges holes)
        self.cached_writers: dict[int, int] = {}
        self._next_fh = 1
        if not readonly:
            self._set_clean(False)
            self._recover()

    # ---------------------------------------------------------------- open / close
    @classmethod
    def open(cls, path: str, *, readonly: bool = False,
             make_pmem: Callable[[str], PMem] | None = None) -> "FileSystem":
        """Validate and mount the image at `path`. `make_pmem` maps it another way (the
        crash harness records every store through its own PMem subclass)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise fmt.FormatError(f"cannot open {path}: {e.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            raw = os.pread(fd, BS, 0)
        finally:
            os.close(fd)
        sb, g = fmt.parse_superblock(raw, size)
        pm = make_pmem(path) if make_pmem else PMem(path, private=readonly)
        try:
            return cls(pm, sb.copy(), g, readonly)
        except BaseException:
            pm.close()
            raise

    def _load_tables(self) -> None:
        g, pm = self.g, self.pm
        iv = pm.view(self.inode_base, fmt.INODE_DTYPE, g.inode_count)
        ev = self._extent_view()
        dv = pm.view(g.region("dirents")[0], fmt.DIRENT_DTYPE, g.dirent_count)
        rv = pm.view(self.rc_base, np.uint32, g.nblocks)
        self.alloc = BlockAllocator(rv, g)
        self.inodes = InodeTable(iv, ev, g)
        self.inodes.on_corruption = self._fail
        if not self.readonly:
            e = ev[ev["ino"] != 0]
            bad = self.alloc.undercounted(implied_refcounts(e["pblk"], e["length"], iv,
                                                            g.nblocks))
            if bad.size:
                raise fmt.FormatError(
                    f"refcount table undercounts {bad.size} block(s) in use (first: {bad[0]}); "
                    "writing could overwrite files (run daxfs fsck --repair)")
        self.dirs = Directories(dv)
        isdir = (iv["mode"] & 0o170000) == stat.S_IFDIR
        if not isdir[fmt.ROOT_INO]:
            raise fmt.FormatError("root inode is not a directory (image corrupt; run daxfs fsck)")
        self.dirs.note_dir_parents(lambda ino: 0 < ino < isdir.size and bool(isdir[ino]))
        self.bufcache = BufCache(pm, g, self.alloc, self.inodes)

    def _scan_capabilities(self) -> set[int]:
        found = set()
        for ino in np.flatnonzero(self.inodes.view["xattr_blk"]).tolist():
            try:
                if CAPABILITY_XATTR in self._xattrs(self.inodes.get(ino)):
                    found.add(ino)
            except FsError:
                found.add(ino)          # unreadable: assume it may have one
        return found

    def _note_capability(self, ino: int, present: bool) -> None:
        before = bool(self.capability_inodes)
        (self.capability_inodes.add if present else self.capability_inodes.discard)(ino)
        if before != bool(self.capability_inodes) and self.capability_listener:
            self.capability_listener(bool(self.capability_inodes))

    def _recover(self) -> None:
        """Finish what a crash interrupted: reclaim orphans, complete pending trims."""
        for ino in self.inodes.flagged(fmt.IFLAG_ORPHAN | fmt.IFLAG_TRIM):
            node = self.inodes.get(ino)
            if node.nlink == 0:
                log.info("reclaiming orphan inode %d", ino)
                self._reclaim(node)
            else:
                log.info("finishing truncate of inode %d", ino)
                self._trim(node)

    def close(self) -> None:
        if self.pm.mm is None:
            return
        if not self.readonly and not self.failed:
            for node in list(self.inodes.cache.values()):
                if node.nlink == 0 and node.flags & fmt.IFLAG_ORPHAN:
                    node.lookups = node.opens = 0
                    self._reclaim(node)
            self._flush_times()
            self.journal.checkpoint()
            self._set_clean(True)
        self.pm.close()

    def _set_clean(self, clean: bool) -> None:
        sb = self.sb
        sb["clean"] = int(clean)
        if not clean:
            sb["mount_count"] = (int(sb["mount_count"]) + 1) & 0xFFFFFFFF     # wraps
        sb["checksum"] = fmt.superblock_checksum(sb)
        self.pm.store(0, sb.tobytes())
        self.pm.persist(0, fmt.SUPERBLOCK_DTYPE.itemsize)
        self.pm.fence()

    # ---------------------------------------------------------------- transactions
    @contextlib.contextmanager
    def _txn(self):
        if self.readonly:
            raise FsError(errno.EROFS)
        if self.failed:
            raise FsError(errno.EROFS, f"read-only after an internal error: {self.failed}")
        t = Txn()
        try:
            yield t
        except FsError as e:
            if t.writes or t.nodes or self.alloc.dirty or isinstance(e, CorruptionError):
                self._fail(e)
            raise
        except BaseException as e:
            self._fail(e)
            raise
        self._commit(t)

    def _fail(self, e: BaseException) -> None:
        if isinstance(e, CorruptionError):
            log.error("corrupt metadata, daxfs is now read-only (failsafe; run daxfs fsck): %s",
                      e.args[1])
        else:
            log.error("internal error, daxfs is now read-only (failsafe): %r", e, exc_info=e)
        self.failed = repr(e)

    def _commit(self, t: Txn) -> None:
        writes = self.alloc.take_dirty(self.rc_base)
        if self.dirty_times and len(self.dirty_times) < 512:
            t.nodes.update(self.dirty_times)
            self.dirty_times.clear()
        base, size = self.inode_base, fmt.INODE_DTYPE.itemsize
        writes += [(base + ino * size, node.pack()) for ino, node in t.nodes.items()]
        writes += t.writes.items()
        if t.data:
            for off, length in t.data:
                self.pm.persist(off, length)
            self.pm.fence()
        self.journal.commit(writes)

    def _flush_times(self) -> None:
        while self.dirty_times and not self.readonly and not self.failed:
            batch = dict(list(self.dirty_times.items())[:512])
            for ino in batch:
                del self.dirty_times[ino]
            with self._txn() as t:
                t.nodes.update(batch)

    def sync(self) -> None:
        """Make everything done so far durable (fsync, fdatasync, syncfs)."""
        if self.readonly:
            return
        self._flush_times()
        self.pm.persist(0, self.pm.size)
        self.pm.fence()

    # ---------------------------------------------------------------- attributes
    def _node(self, ino: int) -> Inode:
        return self.inodes.get(ino)

    def attr(self, node: Inode) -> Attr:
        blocks = self.inodes.mapped_blocks(node) if node.has_data else 0
        if node.xattr_blk:
            blocks += 1
        return Attr(node.ino, node.mode, node.nlink, node.uid, node.gid, node.rdev, node.size,
                    blocks * (BS // 512), node.atime, node.mtime, node.ctime, node.generation)

    def getattr(self, ino: int) -> Attr:
        return self.attr(self._node(ino))

    def _entry(self, node: Inode) -> Attr:
        node.lookups += 1
        return self.attr(node)

    def remember(self, ino: int) -> None:
        self._node(ino).lookups += 1

    def forget(self, ino: int, n: int) -> None:
        node = self.inodes.cache.get(ino)
        if node is None:
            return
        node.lookups = max(0, node.lookups - n)
        self._maybe_reclaim(node)

    def lookup(self, parent: int, name: bytes) -> Attr:
        self._dir(parent)
        if len(name) > fmt.MAX_NAME:
            raise FsError(errno.ENAMETOOLONG)
        ino = self.dirs.lookup(parent, name)
        if ino is None:
            raise FsError(errno.ENOENT)
        return self._entry(self._node(ino))

    def _dir(self, ino: int) -> Inode:
        node = self._node(ino)
        if not node.is_dir:
            raise FsError(errno.ENOTDIR)
        return node

    def setattr(self, ino: int, *, mode: int | None = None, uid: int | None = None,
                gid: int | None = None, size: int | None = None, atime_ns: int | None = None,
                mtime_ns: int | None = None, ctime_ns: int | None = None) -> Attr:
        node = self._node(ino)
        if size is not None:
            if node.is_dir:
                raise FsError(errno.EISDIR)
            if not node.is_reg:
                raise FsError(errno.EINVAL)
            self.truncate(node, size)
        with self._txn() as t:
            if mode is not None:
                node.mode = (node.mode & 0o170000) | (mode & 0o7777)
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

    # ---------------------------------------------------------------- creating names
    def _create(self, parent: int, name: bytes, mode: int, uid: int, gid: int, rdev: int = 0,
                target: bytes | None = None) -> Attr:
        check_name(name)
        pnode = self._dir(parent)
        if pnode.nlink == 0:
            raise FsError(errno.ENOENT)
        if self.dirs.lookup(parent, name) is not None:
            raise FsError(errno.EEXIST)
        is_dir = stat.S_ISDIR(mode)
        if is_dir and pnode.nlink >= MAX_LINKS:
            raise FsError(errno.EMLINK)
        if len(self.dirs.pool) == 0 or len(self.inodes.pool) == 0:
            raise FsError(errno.ENOSPC)
        if target is not None:
            self.bufcache.reserve(1, 2)
        if pnode.mode & stat.S_ISGID:
            gid = pnode.gid
            if is_dir:
                mode |= stat.S_ISGID
        with self._txn() as t:
            node = self.inodes.allocate(mode, uid, gid, rdev)
            if is_dir:
                node.nlink = 2
                pnode.nlink += 1
                self.dirs.parent[node.ino] = parent
            slot, rec = self.dirs.add(parent, name, node.ino)
            t.write(self.g.region("dirents")[0] + slot * fmt.DIRENT_DTYPE.itemsize, rec)
            if target is not None:
                self.bufcache.write(t, node, 0, target)
            pnode.touch(m=True)
            t.inode(node)
            t.inode(pnode)
        return self._entry(node)

    def create(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> Attr:
        return self._create(parent, name, stat.S_IFREG | (mode & 0o7777), uid, gid)

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, uid: int, gid: int) -> Attr:
        if stat.S_IFMT(mode) not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFCHR, stat.S_IFBLK,
                                     stat.S_IFSOCK):
            raise FsError(errno.EINVAL)
        return self._create(parent, name, mode, uid, gid, rdev)

    def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> Attr:
        return self._create(parent, name, stat.S_IFDIR | (mode & 0o7777), uid, gid)

    def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int) -> Attr:
        if len(target) > MAX_SYMLINK:
            raise FsError(errno.ENAMETOOLONG)
        if not target:
            raise FsError(errno.ENOENT)
        return self._create(parent, name, stat.S_IFLNK | 0o777, uid, gid, target=target)

    def readlink(self, ino: int) -> bytes:
        node = self._node(ino)
        if not stat.S_ISLNK(node.mode):
            raise FsError(errno.EINVAL)
        return self.bufcache.read(node, 0, node.size)

    def link(self, ino: int, parent: int, name: bytes) -> Attr:
        check_name(name)
        node = self._node(ino)
        pnode = self._dir(parent)
        if node.is_dir:
            raise FsError(errno.EPERM)
        if node.nlink == 0:
            raise FsError(errno.ENOENT)
        if node.nlink >= MAX_LINKS:
            raise FsError(errno.EMLINK)
        if self.dirs.lookup(parent, name) is not None:
            raise FsError(errno.EEXIST)
        if len(self.dirs.pool) == 0:
            raise FsError(errno.ENOSPC, "no free directory entries")
        with self._txn() as t:
            slot, rec = self.dirs.add(parent, name, ino)
            t.write(self._dirent_off(slot), rec)
            node.nlink += 1
            node.touch()
            pnode.touch(m=True)
            t.inode(node)
            t.inode(pnode)
        return self._entry(node)

    def _dirent_off(self, slot: int) -> int:
        return self.g.region("dirents")[0] + slot * fmt.DIRENT_DTYPE.itemsize

    # ---------------------------------------------------------------- removing names
    def unlink(self, parent: int, name: bytes) -> None:
        self._remove(parent, name, want_dir=False)

    def rmdir(self, parent: int, name: bytes) -> None:
        self._remove(parent, name, want_dir=True)

    def _remove(self, parent: int, name: bytes, want_dir: bool) -> None:
        pnode = self._dir(parent)
        if len(name) > fmt.MAX_NAME:
            raise FsError(errno.ENAMETOOLONG)
        ino = self.dirs.lookup(parent, name)
        if ino is None:
            raise FsError(errno.ENOENT)
        node = self._node(ino)
        if want_dir and not node.is_dir:
            raise FsError(errno.ENOTDIR)
        if not want_dir and node.is_dir:
            raise FsError(errno.EISDIR)
        if want_dir and not self.dirs.is_empty(ino):
            raise FsError(errno.ENOTEMPTY)
        with self._txn() as t:
            slot, rec = self.dirs.remove(parent, name)
            t.write(self._dirent_off(slot), rec)
            pnode.touch(m=True)
            t.inode(pnode)
            self._drop_link(t, node, pnode)
        self._maybe_reclaim(node)

    def _drop_link(self, t: Txn, node: Inode, pnode: Inode) -> None:
        """One name of `node` in directory `pnode` is gone (the dirent is already removed)."""
        if node.is_dir:
            node.nlink = 0
            pnode.nlink -= 1
            self.dirs.parent.pop(node.ino, None)
        else:
            node.nlink -= 1
        node.touch()
        if node.nlink == 0:
            node.flags |= fmt.IFLAG_ORPHAN
        t.inode(node)

    def _maybe_reclaim(self, node: Inode) -> None:
        # IFLAG_ORPHAN, not just nlink 0: a damaged link count must never delete a named file
        if not (node.nlink == 0 and node.flags & fmt.IFLAG_ORPHAN and not self.readonly
                and not self.failed and node.ino in self.inodes.cache):
            return
        if not node.in_use:
            self._reclaim(node)
        elif node.opens == 0 and node.has_data:
            # only the kernel's lookup reference is left (it forgets a few ms later): nobody
            # can read the data any more, so give the space back now and `df` is exact at once
            self._punch_chunked(node, 0)

    def _reclaim(self, node: Inode) -> None:
        """Free an orphan: its blocks (in bounded transactions), xattr block, then the slot."""
        self._punch_chunked(node, 0)
        with self._txn() as t:
            if node.xattr_blk:
                self.alloc.decref(node.xattr_blk, 1)
                node.xattr_blk = 0
                self.inodes.xattr_blocks -= 1
            free_rec = INODE_REC.pack(0, 0, 0, 0, 0, 0, 0, 0, 0, node.generation, 0, 0, 0)
            t.write(self.inode_base + node.ino * fmt.INODE_DTYPE.itemsize, free_rec)
            self.inodes.release(node)
            self.dirty_times.pop(node.ino, None)
        self._note_capability(node.ino, False)

    def _punch_chunked(self, node: Inode, from_blk: int) -> None:
        """Unmap every block at or past `from_blk`, at most TXN_BLOCKS blocks per transaction,
        from the end backwards so each intermediate state is a valid shorter file."""
        if not node.has_data:
            return
        em = node.extents
        while len(em) and em.end_block() > from_blk:
            hi = em.end_block()
            lo = max(from_blk, hi - TXN_BLOCKS)
            with self._txn() as t:
                self.bufcache.punch(t, node, lo, hi)

    def _trim(self, node: Inode) -> None:
        self._punch_chunked(node, -(-node.size // BS))
        with self._txn() as t:
            node.flags &= ~fmt.IFLAG_TRIM
            t.inode(node)

    # ---------------------------------------------------------------- rename
    def rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes,
               flags: int = 0) -> None:
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == RENAME_NOREPLACE | RENAME_EXCHANGE:
            raise FsError(errno.EINVAL)
        check_name(new_name)
        op, np_ = self._dir(old_parent), self._dir(new_parent)
        src_ino = self.dirs.lookup(old_parent, old_name)
        if src_ino is None:
            raise FsError(errno.ENOENT)
        src = self._node(src_ino)
        dst_ino = self.dirs.lookup(new_parent, new_name)
        dst = self._node(dst_ino) if dst_ino is not None else None
        if flags & RENAME_EXCHANGE:
            if dst is None:
                raise FsError(errno.ENOENT)
        elif dst is not None and flags & RENAME_NOREPLACE:
            raise FsError(errno.EEXIST)
        if src_ino == dst_ino:
            return
        if src.is_dir and self._is_ancestor(src_ino, new_parent):
            raise FsError(errno.EINVAL)
        if dst is not None and flags & RENAME_EXCHANGE:
            if dst.is_dir and self._is_ancestor(dst_ino, old_parent):
                raise FsError(errno.EINVAL)
        elif dst is not None:
            if src.is_dir and not dst.is_dir:
                raise FsError(errno.ENOTDIR)
            if not src.is_dir and dst.is_dir:
                raise FsError(errno.EISDIR)
            if dst.is_dir and not self.dirs.is_empty(dst_ino):
                raise FsError(errno.ENOTEMPTY)
        with self._txn() as t:
            if flags & RENAME_EXCHANGE:
                t.write(*self._dirent_write(self.dirs.retarget(old_parent, old_name, dst_ino)))
                t.write(*self._dirent_write(self.dirs.retarget(new_parent, new_name, src_ino)))
                self._moved_dir(src, op, np_)
                self._moved_dir(dst, np_, op)
                dst.touch()
                t.inode(dst)
            else:
                if dst is not None:
                    t.write(*self._dirent_write(self.dirs.retarget(new_parent, new_name, src_ino)))
                    self._drop_link(t, dst, np_)
                    t.write(*self._dirent_write(self.dirs.remove(old_parent, old_name)))
                else:
                    t.write(*self._dirent_write(
                        self.dirs.move(old_parent, old_name, new_parent, new_name)))
                self._moved_dir(src, op, np_)
            src.touch()
            op.touch(m=True)
            np_.touch(m=True)
            for n in (src, op, np_):
                t.inode(n)
        if dst is not None and not flags & RENAME_EXCHANGE:
            self._maybe_reclaim(dst)

    def _dirent_write(self, slot_rec: tuple[int, bytes]) -> tuple[int, bytes]:
        slot, rec = slot_rec
        return self._dirent_off(slot), rec

    def _moved_dir(self, node: Inode, old_parent: Inode, new_parent: Inode) -> None:
        if node.is_dir and old_parent is not new_parent:
            old_parent.nlink -= 1
            new_parent.nlink += 1
            self.dirs.parent[node.ino] = new_parent.ino

    def _is_ancestor(self, anc: int, ino: int) -> bool:
        """True if `anc` is `ino` or one of its ancestors."""
        seen = 0
        while True:
            if ino == anc:
                return True
            if ino == fmt.ROOT_INO:
                return False
            ino = self.dirs.parent.get(ino, fmt.ROOT_INO)
            seen += 1
            if seen > self.g.inode_count:
                raise CorruptionError("directory cycle")

    # ---------------------------------------------------------------- directories
    def opendir(self, ino: int) -> int:
        """A handle is just the directory: entries are served from the cookie (no copy)."""
        self._dir(ino)
        fh = self._next_fh
        self._next_fh += 1
        self.dir_handles[fh] = ino
        return fh

    def readdir(self, fh: int, start: int, limit: int | None = None, dots: bool = False
                ) -> list[tuple[int, bytes, int]]:
        """Up to `limit` (default: all) entries (cookie, name, ino) with cookie > start, the
        directory's names
        in slot order; with `dots` (what the kernel is served) first `.` (cookie 1) and `..`
        (cookie 2). The kernel takes no lookup reference for `.` and `..`
        (fuse_direntplus_link skips them), so the adapter must not count one either."""
        ino = self.dir_handles.get(fh)
        if ino is None:
            raise FsError(errno.EBADF)
        out: list[tuple[int, bytes, int]] = []
        if dots and start < 1:
            out.append((1, b".", ino))
        if dots and start < 2:
            out.append((2, b"..", self.dirs.parent.get(ino, ino)))
        return out + self.dirs.listing(ino, start, None if limit is None else limit - len(out))

    def releasedir(self, fh: int) -> None:
        self.dir_handles.pop(fh, None)

    # ---------------------------------------------------------------- files
    def open_file(self, ino: int, truncate: bool = False, kill_suidgid: bool = False,
                  cached_writer: bool = False) -> None:
        """An open of `ino`. `truncate`: O_TRUNC (size 0, and mtime/ctime even when it was
        empty, as Linux does), clearing setuid/setgid first if `kill_suidgid`.
        `cached_writer`: a writable open through the kernel's page cache (see lseek)."""
        node = self._node(ino)
        if truncate and node.is_reg:
            self.kill_privileges(ino, kill_suidgid)
            self.truncate(node, 0)
        node.opens += 1
        if cached_writer:
            self.cached_writers[ino] = self.cached_writers.get(ino, 0) + 1

    def release_file(self, ino: int, cached_writer: bool = False) -> None:
        if cached_writer:
            n = self.cached_writers.pop(ino, 0) - 1
            if n > 0:
                self.cached_writers[ino] = n
        node = self.inodes.cache.get(ino)
        if node is None:
            return
        node.opens = max(0, node.opens - 1)
        self._maybe_reclaim(node)

    def kill_privileges(self, ino: int, suidgid: bool) -> None:
        """What ext4's file_remove_privs() does before a write, for the writes whose kernel path
        leaves it to us (direct I/O): drop security.capability (whoever writes), and with
        `suidgid` (a writer without CAP_FSETID) clear setuid, and setgid if group-exec is set.
        Cheap when there is nothing to do: called before every write."""
        node = self._node(ino)
        kill = 0
        if suidgid and node.mode & (stat.S_ISUID | stat.S_ISGID) and node.is_reg:
            kill = node.mode & stat.S_ISUID
            if node.mode & (stat.S_ISGID | stat.S_IXGRP) == stat.S_ISGID | stat.S_IXGRP:
                kill |= stat.S_ISGID
        if ino in self.capability_inodes and CAPABILITY_XATTR in self._xattrs(node):
            self.removexattr(ino, CAPABILITY_XATTR)
        if kill:
            with self._txn() as t:
                node.mode &= ~kill
                node.touch()
                t.inode(node)

    def read(self, ino: int, off: int, size: int, view: bool = False):
        """File bytes; `view=True` may return a zero-copy memoryview of the image (the FUSE
        reply path), valid only until the next mutating call."""
        node = self._node(ino)
        if node.is_dir:
            raise FsError(errno.EISDIR)
        return self.bufcache.read(node, off, size, view=view)

    def write(self, ino: int, off: int, data, whole: bool = False) -> int:
        """Store `data` at `off`; returns the count stored. On a nearly full image a write
        stores the blocks that fit and returns a short count, like ext4's write(2); with
        `whole` (page-cache writeback, whose short counts the kernel ignores) it is stored
        entirely or fails with ENOSPC, never in part."""
        node = self._node(ino)
        if node.is_dir:
            raise FsError(errno.EISDIR)
        if off < 0:
            raise FsError(errno.EINVAL)
        if not len(data):
            return 0
        if (off + len(data) + BS - 1) // BS >= fmt.MAX_FILE_BLOCKS:
            raise FsError(errno.EFBIG)
        l0, l1 = off // BS, (off + len(data) + BS - 1) // BS
        segs = node.extents.segments(l0, l1)
        if len(segs) == 1 and segs[0][2] >= 0 and off + len(data) <= node.size \
                and not self.alloc.any_shared(segs[0][2], segs[0][1]) and not self.readonly \
                and not self.failed:
            # overwrite of owned blocks: no metadata but timestamps, no transaction
            self.bufcache.overwrite(segs[0], off, data)
            node.mtime = node.ctime = now_ns()
            self.dirty_times[ino] = node
            return len(data)
        if whole:
            self.bufcache.reserve(*self.bufcache.write_needs(node, off, off + len(data), segs))
        else:
            end = self.bufcache.fit_write(node, off, off + len(data), segs)
            if end < off + len(data):
                data, segs = memoryview(data).cast("B")[:end - off], None
        with self._txn() as t:
            n = self.bufcache.write(t, node, off, data, segs)
            node.touch(m=True)
            t.inode(node)
        return n

    def truncate(self, node: Inode, size: int) -> None:
        if size < 0:
            raise FsError(errno.EINVAL)
        if size // BS >= fmt.MAX_FILE_BLOCKS:
            raise FsError(errno.EFBIG)
        if size >= node.size:
            self.bufcache.reserve(*self.bufcache.grow_needs(node))
            with self._txn() as t:
                self.bufcache.zero_tail(t, node)
                node.size = size
                node.touch(m=True)
                t.inode(node)
            return
        keep = -(-size // BS)
        em = node.extents
        small = len(em) == 0 or em.end_block() - keep <= TXN_BLOCKS
        with self._txn() as t:
            node.size = size
            node.touch(m=True)
            if small:
                self.bufcache.punch(t, node, keep, max(keep, em.end_block()))
            else:
                node.flags |= fmt.IFLAG_TRIM
            t.inode(node)
        if not small:
            self._trim(node)

    def fsync(self, ino: int, datasync: bool = False) -> None:
        self.sync()

    # ---------------------------------------------------------------- reflink
    def clone_range(self, ino_in: int, off_in: int, ino_out: int, off_out: int, length: int,
                    flags: int = 0) -> int:
        """copy_file_range: the block-aligned middle is shared (reflink), unaligned head and
        tail bytes are copied. Returns bytes done (0 at/after source EOF; may be short)."""
        if flags:
            raise FsError(errno.EINVAL)
        src, dst = self._node(ino_in), self._node(ino_out)
        if src.is_dir or dst.is_dir:
            raise FsError(errno.EISDIR)
        if not (src.is_reg and dst.is_reg) or off_in < 0 or off_out < 0:
            raise FsError(errno.EINVAL)
        length = min(length, src.size - off_in, MAX_CLONE_BYTES)
        if length <= 0:
            return 0
        if src is dst and off_in < off_out + length and off_out < off_in + length:
            raise FsError(errno.EINVAL)
        if (off_out + length + BS - 1) // BS >= fmt.MAX_FILE_BLOCKS:
            raise FsError(errno.EFBIG)
        end_in = off_in + length
        if (off_in - off_out) % BS:
            return self._copy_bytes(src, off_in, dst, off_out, length)
        # [a, b) in source bytes: the part that can be shared block for block
        a = -(-off_in // BS) * BS
        b = end_in // BS * BS
        if end_in == src.size and off_out + length >= dst.size:
            b = -(-end_in // BS) * BS     # the EOF block too: its tail is invisible in dst
        if b <= a:
            return self._copy_bytes(src, off_in, dst, off_out, length)
        # One transaction per chunk of TXN_BLOCKS: the first also copies the unaligned head,
        # the last the unaligned tail, so a clone of up to 16 MiB is atomic and a larger one
        # grows dst chunk by chunk (a crash leaves a shorter, consistent clone).
        shift = off_out - off_in
        head = self.bufcache.read(src, off_in, a - off_in) if a > off_in else b""
        tail = self.bufcache.read(src, b, end_in - b) if b < end_in else b""
        done = 0
        for c in range(a, b, TXN_BLOCKS * BS):
            c_end = min(b, c + TXN_BLOCKS * BS)
            first, last = c == a, c_end == b
            try:
                self.bufcache.reserve(*self._clone_chunk_needs(
                    src, c, c_end, dst, shift, head if first else b"", off_out,
                    tail if last else b"", b + shift, min(c_end, end_in) + shift))
            except FsError:
                if first:
                    raise                                  # ENOSPC/EMLINK, nothing changed
                break                                      # a short count: what is cloned
            with self._txn() as t:
                if first and head:
                    done += self.bufcache.write(t, dst, off_out, head)
                new_end = min(c_end, end_in) + shift
                if dst.size < new_end:
                    self.bufcache.zero_tail(t, dst)
                self.bufcache.share(t, src, c // BS, dst, (c + shift) // BS, (c_end - c) // BS)
                done += min(c_end, end_in) - c
                dst.size = max(dst.size, new_end)
                if last and tail:
                    done += self.bufcache.write(t, dst, b + shift, tail)
                dst.touch(m=True)
                t.inode(dst)
        self.bufcache.stats.clones += 1
        return done

    def _clone_chunk_needs(self, src: Inode, c: int, c_end: int, dst: Inode, shift: int,
                           head: bytes, head_at: int, tail: bytes, tail_at: int,
                           new_end: int) -> tuple[int, int]:
        """(blocks, extent records) one clone transaction may take: sharing source bytes
        [c, c_end) adds at most one record per mapped source segment plus one for splitting
        the destination extent around the range; the head and tail copies and the growth of
        dst are writes. EMLINK when a block's reference count is at its limit."""
        blocks = records = 0
        for _l, k, p in src.extents.segments(c // BS, c_end // BS):
            if p != HOLE:
                records += 1
                if self.alloc.max_count(p, k) >= fmt.MAX_REFCOUNT:
                    raise FsError(errno.EMLINK, "block reference count limit reached")
        records += 1
        for data, at in ((head, head_at), (tail, tail_at)):
            if data:
                nb, nr = self.bufcache.write_needs(dst, at, at + len(data))
                blocks, records = blocks + nb, records + nr
        if new_end > dst.size:
            nb, nr = self.bufcache.grow_needs(dst)
            blocks, records = blocks + nb, records + nr
        return blocks, records

    # ---------------------------------------------------------------- lseek, fallocate
    def lseek(self, ino: int, off: int, whence: int) -> int:
        """SEEK_DATA / SEEK_HOLE. A shared block is data, never a hole."""
        node = self._node(ino)
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise FsError(errno.EINVAL)
        if off < 0 or off >= node.size:
            raise FsError(errno.ENXIO)
        if not node.has_data or ino in self.cached_writers:
            # no extent map, or the kernel may hold dirty pages we cannot see (it does not
            # write back before FUSE_LSEEK): "all data" is the answer that is always safe
            return off if whence == os.SEEK_DATA else node.size
        want_hole = whence == os.SEEK_HOLE
        for l, _n, p in node.extents.segments(off // BS, -(-node.size // BS)):
            if (p < 0) == want_hole:
                return min(node.size, max(off, l * BS))
        if want_hole:
            return node.size
        raise FsError(errno.ENXIO)

    def fallocate(self, ino: int, mode: int, off: int, length: int) -> None:
        node = self._node(ino)
        if off < 0 or length <= 0:
            raise FsError(errno.EINVAL)
        if node.is_dir:
            raise FsError(errno.EISDIR)
        if not node.is_reg:
            raise FsError(errno.ENODEV)
        if mode & ~(FALLOC_KEEP_SIZE | FALLOC_PUNCH_HOLE | FALLOC_ZERO_RANGE):
            raise FsError(errno.EOPNOTSUPP)
        if mode & FALLOC_PUNCH_HOLE and not mode & FALLOC_KEEP_SIZE:
            raise FsError(errno.EINVAL)
        end = off + length
        if (end + BS - 1) // BS >= fmt.MAX_FILE_BLOCKS:
            raise FsError(errno.EFBIG)
        if mode & (FALLOC_PUNCH_HOLE | FALLOC_ZERO_RANGE):
            keep = bool(mode & FALLOC_KEEP_SIZE)
            self._zero_range(node, off, min(end, node.size) if keep else end,
                             node.size if keep else max(end, node.size))
            return
        self._preallocate(node, off // BS, -(-end // BS))
        if not mode & FALLOC_KEEP_SIZE and end > node.size:
            self.truncate(node, end)
        node.touch(m=True)              # as ext4 (file_modified), even when nothing changed
        self.dirty_times[ino] = node

    def _zero_range(self, node: Inode, start: int, end: int, new_size: int) -> None:
        """Bytes [start, end) read as zeros afterwards and the size becomes `new_size`: whole
        blocks are unmapped (a shared one just loses this alias), the partial head and tail
        blocks get zeros written (breaking sharing). A range holding up to TXN_BLOCKS mapped
        blocks is one transaction, so a crash shows all of it or none; a larger one is
        punched from the top down, one transaction per chunk, the tail in the first and the
        head in the last. The work follows the mapped extents, not the byte range: punching
        a terabyte of holes is one small transaction."""
        if end <= start:
            if new_size != node.size:
                self.truncate(node, new_size)
            return
        a, b = -(-start // BS) * BS, end // BS * BS
        if b < a:                                    # inside one block
            pieces = [(start, end)]
        else:
            pieces = [(start, a)] if start < a else []
            pieces += [(b, end)] if b < end else []
        # zeros are written only over mapped bytes below EOF: holes and bytes past EOF read
        # as zeros already (zero_tail clears the old EOF block when the size grows)
        pieces = [(lo, min(hi, node.size)) for lo, hi in pieces
                  if lo < node.size and node.extents.lookup(lo // BS) != HOLE]
        chunks = self._punch_chunks(node, a // BS, max(a, b) // BS)
        blocks, records = 0, len(chunks)             # a punch splits at most one extent
        for p0, p1 in pieces:
            nb, nr = self.bufcache.write_needs(node, p0, p1)
            blocks, records = blocks + nb, records + nr
        if new_size > node.size:
            nb, nr = self.bufcache.grow_needs(node)
            blocks, records = blocks + nb, records + nr
        self.bufcache.reserve(blocks, records)
        for i, (lo, hi) in enumerate(chunks):
            first, last = i == 0, i == len(chunks) - 1
            with self._txn() as t:
                for p0, p1 in pieces:
                    if (first and p0 >= b) or (last and p1 <= a) or (first and last):
                        self.bufcache.write(t, node, p0, bytes(p1 - p0))
                self.bufcache.punch(t, node, lo, hi)
                if last and new_size != node.size:
                    if new_size > node.size:
                        self.bufcache.zero_tail(t, node)
                    node.size = new_size
                node.touch(m=True)
                t.inode(node)

    @staticmethod
    def _punch_chunks(node: Inode, la: int, lb: int) -> list[tuple[int, int]]:
        """Block ranges covering [la, lb) from the top down, each holding at most TXN_BLOCKS
        mapped blocks (holes cost nothing); always at least one, the last starting at la."""
        chunks: list[tuple[int, int]] = []
        hi, count = lb, 0
        runs = [(l, n) for l, n, p in node.extents.segments(la, lb) if p != HOLE] \
            if lb > la and node.has_data else []
        for l, n in reversed(runs):
            e = l + n
            while e > l:
                take = min(e - l, TXN_BLOCKS - count)
                e, count = e - take, count + take
                if count == TXN_BLOCKS:
                    chunks.append((e, hi))
                    hi, count = e, 0
        if count or not chunks:
            chunks.append((la, hi))
        else:
            chunks[-1] = (la, chunks[-1][1])
        return chunks

    def _preallocate(self, node: Inode, l0: int, l1: int) -> None:
        """Map every hole in [l0, l1) to fresh zeroed blocks, one transaction per TXN_BLOCKS.
        ENOSPC before the first changes nothing; a later chunk that cannot get its extent
        records stops there (what is preallocated stays, like ext4's)."""
        holes = [(l, n) for l, n, p in node.extents.segments(l0, l1) if p == HOLE]
        if sum(n for _l, n in holes) > self.alloc.available():
            raise FsError(errno.ENOSPC)
        for l, n in holes:
            for c in range(l, l + n, TXN_BLOCKS):
                k = min(TXN_BLOCKS, l + n - c)
                goal = max(node.extents.lookup(c - 1) + 1 if c > 0 else 0, 0)
                runs = self.alloc.plan(k, goal, home=node.ino)
                self.bufcache.reserve(k, 2 * len(runs))
                with self._txn() as t:
                    for q, m in self.alloc.alloc(k, goal, home=node.ino):
                        self.pm.zero(q * BS, m * BS)
                        t.persist_data(q * BS, m * BS)
                        self.bufcache.remap(t, node, c, m, q)
                        c += m
                    node.touch()

    def _copy_bytes(self, src: Inode, off_in: int, dst: Inode, off_out: int, length: int) -> int:
        """Copy in 1 MiB writes; a later one that meets ENOSPC ends the call with a short
        count (what was copied), the first one's error is the caller's."""
        done = 0
        while done < length:
            n = min(length - done, 1 << 20)
            data = self.bufcache.read(src, off_in + done, n)
            if not data:
                break
            try:
                done += self.write(dst.ino, off_out + done, data)
            except FsError:
                if not done:
                    raise
                break
        return done

    # ---------------------------------------------------------------- xattrs
    def _xattrs(self, node: Inode) -> dict[bytes, bytes]:
        if node.xattrs is None:
            if node.xattr_blk == 0:
                node.xattrs = {}
            else:
                off = node.xattr_blk * BS
                if not self.g.data_start <= node.xattr_blk < self.g.nblocks:
                    self.inodes.corrupt(f"inode {node.ino}: xattr block out of range")
                try:
                    node.xattrs = xa.decode(self.pm.buf[off:off + BS])
                except ValueError as e:
                    self.inodes.corrupt(f"inode {node.ino}: {e}")
        return node.xattrs

    def getxattr(self, ino: int, name: bytes) -> bytes:
        if ino == fmt.ROOT_INO and name == STATS_XATTR:
            return json.dumps(self.stats(), sort_keys=True).encode()
        attrs = self._xattrs(self._node(ino))
        if name not in attrs:
            raise FsError(errno.ENODATA)
        return attrs[name]

    def listxattr(self, ino: int) -> list[bytes]:
        return list(self._xattrs(self._node(ino)))

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        xa.check_name(name)
        if name == STATS_XATTR:
            raise FsError(errno.EPERM)
        if len(value) > 65536:
            raise FsError(errno.E2BIG)
        node = self._node(ino)
        attrs = self._xattrs(node)
        if flags & xa.XATTR_CREATE and name in attrs:
            raise FsError(errno.EEXIST)
        if flags & xa.XATTR_REPLACE and name not in attrs:
            raise FsError(errno.ENODATA)
        new = dict(attrs)
        new[name] = bytes(value)
        self._store_xattrs(node, new)

    def removexattr(self, ino: int, name: bytes) -> None:
        if name == STATS_XATTR:
            raise FsError(errno.EPERM)
        node = self._node(ino)
        attrs = self._xattrs(node)
        if name not in attrs:
            raise FsError(errno.ENODATA)
        new = dict(attrs)
        del new[name]
        self._store_xattrs(node, new)

    def _store_xattrs(self, node: Inode, attrs: dict[bytes, bytes]) -> None:
        block = xa.encode(attrs) if attrs else None      # ENOSPC before anything changes
        if block is not None and not node.xattr_blk and self.alloc.available() < 1:
            raise FsError(errno.ENOSPC)
        with self._txn() as t:
            if block is None:
                if node.xattr_blk:
                    self.alloc.decref(node.xattr_blk, 1)
                    node.xattr_blk = 0
                    self.inodes.xattr_blocks -= 1
            else:
                if not node.xattr_blk:
                    node.xattr_blk = self.alloc.alloc(1)[0][0]
                    self.inodes.xattr_blocks += 1
                t.write(node.xattr_blk * BS, block)
            node.xattrs = attrs
            node.touch()
            t.inode(node)
        self._note_capability(node.ino, CAPABILITY_XATTR in attrs)

    # ---------------------------------------------------------------- whole filesystem
    def stats(self) -> dict[str, int]:
        """Space and sharing counters (`daxfs stat`), O(1): running totals kept by the
        allocator and the inode table (scan_stats() computes the same from the tables)."""
        g, a = self.g, self.alloc
        used = g.data_blocks - a.free
        out = {"logical_bytes": self.inodes.logical_bytes, "physical_bytes": used * BS,
               "free_bytes": a.free * BS, "total_bytes": g.data_blocks * BS,
               "files": self.inodes.used, "shared_blocks": a.shared,
               "aliases": a.refs - self.inodes.xattr_blocks,
               # aliases - data frames == refs - used blocks (xattr blocks cancel out)
               "bytes_saved": max(0, a.refs - used) * BS}
        b = self.bufcache.stats
        out.update(clones=b.clones, cloned_blocks=b.cloned_blocks, cow_breaks=b.cow_breaks,
                   journal_commits=self.journal.commits)
        if self.extra_stats:
            out.update(self.extra_stats())
        return out

    def scan_stats(self) -> dict[str, int]:
        """The space figures of stats(), computed by a full scan of the committed tables."""
        g = self.g
        return usage.usage(self.inodes.view, self._extent_view(),
                           self.pm.view(self.rc_base, np.uint32, g.nblocks), g)

    def aliases_of(self, pblk: int) -> list[tuple[int, int]]:
        """The reverse map: (inode, file block) pairs that alias physical block `pblk`."""
        return usage.reverse_map(self._extent_view(), pblk)

    def _extent_view(self) -> np.ndarray:
        return self.pm.view(self.g.region("extents")[0], fmt.EXTENT_DTYPE, self.g.extent_count)

    def statfs(self) -> StatFs:
        g = self.g
        # f_files excludes the never-used slot 0; root counts as used
        # a new name takes an inode and a directory entry (hard links only the entry): `df -i`
        # shows what can still be created, whichever table runs out first
        return StatFs(BS, g.data_blocks, self.alloc.free, g.inode_count - 1,
                      min(len(self.inodes.pool), len(self.dirs.pool)))
