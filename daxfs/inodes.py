"""Inodes: the in-memory inode cache over the on-image inode table.

An `Inode` is loaded from its table record on first use and stays cached while the daemon
runs; from then on the object is the truth and the table is written only by transactions
(`pack()` -> journal). Timestamp-only changes (an overwrite's mtime) are flushed lazily with
the next transaction, at fsync and at checkpoint: a killed daemon may lose them, never sizes
or block maps.

Extent maps are built lazily too: at mount the extent table is sorted once by (inode, file
block) and an inode's slice becomes its `ExtentMap` when the inode is first read or written.
"""
from __future__ import annotations

import errno
import stat
import time

import numpy as np

from . import format as fmt
from .alloc import SlotPool
from .errors import CorruptionError, FsError
from .extents import ExtentMap

_KINDS = (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFIFO, stat.S_IFCHR, stat.S_IFBLK,
          stat.S_IFSOCK)


def now_ns() -> int:
    return time.time_ns()


class Inode:
    __slots__ = ("ino", "mode", "uid", "gid", "nlink", "_size", "atime", "mtime", "ctime", "btime",
                 "generation", "flags", "xattr_blk", "rdev", "_extents", "lookups", "opens",
                 "xattrs", "table")

    def __init__(self, table: "InodeTable", ino: int, rec: tuple):
        """`rec`: the record's fmt.INODE_FIELDS, in order (fmt.unpack_inode)."""
        self.table = table
        self.ino = ino
        (self.mode, self.uid, self.gid, self.nlink, self._size, self.atime, self.mtime, self.ctime,
         self.btime, self.generation, self.flags, self.xattr_blk, self.rdev) = rec
        self._extents: ExtentMap | None = None
        self.lookups = 0          # kernel references (lookup counts not yet forgotten)
        self.opens = 0            # open file handles
        self.xattrs: dict[bytes, bytes] | None = None

    @property
    def size(self) -> int:
        return self._size

    @size.setter
    def size(self, value: int) -> None:
        # the sum of regular files' sizes is kept up to date for `daxfs stat` (O(1) reads)
        if stat.S_ISREG(self.mode):
            self.table.logical_bytes += value - self._size
        self._size = value

    def pack(self) -> bytes:
        return fmt.pack_inode(self.mode, self.uid, self.gid, self.nlink, self._size, self.atime,
                              self.mtime, self.ctime, self.btime, self.generation, self.flags,
                              self.xattr_blk, self.rdev)

    @property
    def extents(self) -> ExtentMap:
        if self._extents is None:
            self._extents = self.table.load_extents(self.ino)
        return self._extents

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def has_data(self) -> bool:
        return stat.S_ISREG(self.mode) or stat.S_ISLNK(self.mode)

    @property
    def in_use(self) -> bool:
        return self.lookups > 0 or self.opens > 0

    def touch(self, *, m: bool = False, c: bool = True, a: bool = False) -> None:
        t = now_ns()
        if m:
            self.mtime = t
        if c:
            self.ctime = t
        if a:
            self.atime = t


class InodeTable:
    def __init__(self, view: np.ndarray, extent_view: np.ndarray, g: fmt.Geometry):
        self.view = view                        # the on-image table (read-only by convention)
        self.data_start, self.nblocks = g.data_start, g.nblocks
        self.on_corruption = None               # set by the engine: enter failsafe
        self.cache: dict[int, Inode] = {}
        modes = view["mode"]
        free = np.flatnonzero(modes == 0)
        self.pool = SlotPool(free[free > fmt.ROOT_INO], "inodes")
        self.used = int(view.size - free.size)  # counts slot 0 as used; statfs subtracts it
        # running totals for `daxfs stat`: regular files' sizes, inodes holding an xattr block
        reg = (modes & fmt.S_IFMT_BITS) == stat.S_IFREG
        self.logical_bytes = int(np.minimum(view["size"][reg], np.uint64(fmt.MAX_FILE_BYTES))
                                 .astype(np.int64).sum())
        self.xattr_blocks = int(np.count_nonzero(view["xattr_blk"][modes != 0]))
        # sort the extent table once; per-inode slices become ExtentMaps on demand
        used = np.flatnonzero(extent_view["ino"] != 0)
        recs = extent_view[used]
        order = np.lexsort((recs["lblk"], recs["ino"]))
        self._ext_ino = recs["ino"][order].astype(np.int64)
        self._ext_lblk = recs["lblk"][order].astype(np.int64)
        self._ext_pblk = recs["pblk"][order].astype(np.int64)
        self._ext_len = recs["length"][order].astype(np.uint32)
        self._ext_slot = used[order].astype(np.uint32)
        # blocks each inode maps as of mount: st_blocks without building its extent map
        ok = self._ext_ino < view.size
        self._mapped0 = np.bincount(self._ext_ino[ok], weights=self._ext_len[ok],
                                    minlength=view.size).astype(np.int64)
        self.extent_pool = SlotPool(np.flatnonzero(extent_view["ino"] == 0), "extent records")

    def extent_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(ino, lblk, pblk, length) of the extent records as of mount, sorted by inode."""
        return self._ext_ino, self._ext_lblk, self._ext_pblk, self._ext_len

    def load_extents(self, ino: int) -> ExtentMap:
        a = int(np.searchsorted(self._ext_ino, ino, "left"))
        b = int(np.searchsorted(self._ext_ino, ino, "right"))
        lb, pb, ln = self._ext_lblk[a:b], self._ext_pblk[a:b], self._ext_len[a:b].astype(np.int64)
        if b > a and ((ln < 1).any() or (lb < 0).any() or (lb + ln > fmt.MAX_FILE_BLOCKS).any()
                      or (pb < self.data_start).any() or (pb + ln > self.nblocks).any()
                      or (lb[1:] < lb[:-1] + ln[:-1]).any()):
            self.corrupt(f"inode {ino}: extent map out of bounds or overlapping")
        return ExtentMap(self._ext_lblk[a:b].copy(), self._ext_pblk[a:b].copy(),
                         self._ext_len[a:b].copy(), self._ext_slot[a:b].copy())

    def cached(self, ino: int) -> Inode | None:
        """The inode if it is loaded (in use since mount), else None; never reads the table."""
        return self.cache.get(ino)

    def cached_nodes(self) -> list[Inode]:
        return list(self.cache.values())

    def get(self, ino: int) -> Inode:
        node = self.cache.get(ino)
        if node is not None:
            return node
        if ino <= 0 or ino >= self.view.size:
            raise FsError(errno.ENOENT)
        rec = self.view[ino]
        if rec["mode"] == 0:
            raise FsError(errno.ENOENT)
        node = Inode(self, ino, fmt.unpack_inode(rec))
        kind = stat.S_IFMT(node.mode)
        if kind not in _KINDS or (kind == stat.S_IFREG and node.size >= fmt.MAX_FILE_BYTES) or \
                (kind == stat.S_IFLNK and not 0 < node.size < fmt.BLOCK_SIZE) or \
                node.size >= 1 << 63:             # st_size is signed: cannot be reported
            self.corrupt(f"inode {ino}: bad mode {node.mode:o} or size {node.size}")
        self.cache[ino] = node
        return node

    def mapped_blocks(self, node: Inode) -> int:
        """Blocks `node` maps. An inode whose map was never built has not changed since mount
        (the cache keeps every inode it loads), so the count taken at mount still holds."""
        if node._extents is not None:
            return node._extents.mapped
        return int(self._mapped0[node.ino])

    def corrupt(self, detail: str):
        """Corrupt metadata met at run time: the engine turns read-only, the caller gets EIO."""
        err = CorruptionError(detail)
        if self.on_corruption:
            self.on_corruption(err)
        raise err

    def allocate(self, mode: int, uid: int, gid: int, rdev: int = 0) -> Inode:
        ino = self.pool.take()
        gen = int(self.view[ino]["generation"]) + 1
        t = now_ns()
        node = Inode(self, ino, (mode, uid, gid, 1, 0, t, t, t, t, gen & 0xFFFFFFFF, 0, 0, rdev))
        node._extents = ExtentMap()
        self.cache[ino] = node
        self.used += 1
        return node

    def release(self, node: Inode) -> None:
        """The slot becomes free (the caller journals the zeroed record)."""
        self.cache.pop(node.ino, None)
        self.pool.give(node.ino)
        self.used -= 1
        if node.is_reg:
            self.logical_bytes -= node._size

    def flagged(self, flag: int) -> list[int]:
        v = self.view
        return np.flatnonzero(((v["flags"] & flag) != 0) & (v["mode"] != 0)).tolist()
