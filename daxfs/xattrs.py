"""Extended attributes: all of an inode's xattrs packed in one 4 KiB block (as ext4 does by
default), journaled whole on every change. Namespaces user., trusted., security.; system.*
(POSIX ACLs) is not supported."""
from __future__ import annotations

import errno
import json
from typing import TYPE_CHECKING, Callable

import numpy as np

from . import format as fmt
from . import dedupe, sharing
from .errors import FsError

if TYPE_CHECKING:
    from .inodes import Inode
    from .fs import FileSystem

NAMESPACES = (b"user.", b"trusted.", b"security.")
XATTR_CREATE, XATTR_REPLACE = 1, 2
XATTR_SIZE_MAX = 65536       # the kernel's limit on one value (E2BIG past it)
# A read-only virtual xattr of the root: the running daemon's counters as JSON (`daxfs stat`).
STATS_XATTR = b"user.daxfs.stats"
SHARING_XATTR = b"user.daxfs.sharing"     # of a file: its shared ranges (sharing.py)
VIRTUAL = (STATS_XATTR, SHARING_XATTR)
CAPABILITY_XATTR = b"security.capability"


def check_name(name: bytes) -> None:
    if not name or len(name) > 255:
        raise FsError(errno.ERANGE if name else errno.EINVAL)
    if not name.startswith(NAMESPACES):
        raise FsError(errno.EOPNOTSUPP)


def encode(attrs: dict[bytes, bytes]) -> bytes:
    """The xattr block holding `attrs` (layout: format.py); ENOSPC (as ext4 says for a value
    that fits no block) when they do not fit in one, checked before anything is packed."""
    if fmt.xattr_block_bytes(attrs) > fmt.BLOCK_SIZE:
        raise FsError(errno.ENOSPC, "xattrs exceed one block")
    return fmt.pack_xattrs(attrs)


class XattrStore:
    """The xattrs of inodes: one block each, decoded on first use and cached in the inode.

    It also tracks which inodes hold security.capability: while none does, the C hook
    answers the kernel's getxattr before every write without a trip through Python."""

    def __init__(self, fs: FileSystem) -> None:
        self.fs = fs
        self.g, self.pm, self.tx = fs.g, fs.pm, fs.tx
        self.alloc, self.inodes = fs.alloc, fs.inodes
        self.capability_listener: Callable[[bool], None] | None = None   # set by the daemon
        self.capability_inodes = self.scan_capabilities()

    def scan_capabilities(self) -> set[int]:
        found = set()
        for ino in np.flatnonzero(self.inodes.view["xattr_blk"]).tolist():
            try:
                if CAPABILITY_XATTR in self.load(self.inodes.get(ino)):
                    found.add(ino)
            except FsError:
                found.add(ino)          # unreadable: assume it may have one
        return found

    def note_capability(self, ino: int, present: bool) -> None:
        before = bool(self.capability_inodes)
        (self.capability_inodes.add if present else self.capability_inodes.discard)(ino)
        if before != bool(self.capability_inodes) and self.capability_listener:
            self.capability_listener(bool(self.capability_inodes))

    def load(self, node: Inode) -> dict[bytes, bytes]:
        if node.xattrs is None:
            if node.xattr_blk == 0:
                node.xattrs = {}
            else:
                off = node.xattr_blk * fmt.BLOCK_SIZE
                if not self.g.data_start <= node.xattr_blk < self.g.nblocks:
                    self.inodes.corrupt(f"inode {node.ino}: xattr block out of range")
                try:
                    node.xattrs = fmt.unpack_xattrs(self.pm.read(off, fmt.BLOCK_SIZE))
                except ValueError as e:
                    self.inodes.corrupt(f"inode {node.ino}: {e}")
        return node.xattrs

    def get(self, ino: int, name: bytes, uid: int = 0) -> bytes:
        """The value of `name`; two are virtual and read-only: the root's STATS_XATTR (the
        daemon's counters) and a regular file's SHARING_XATTR (sharing.py; `uid` is the
        caller, who sees the names of other files only as root or as their owner)."""
        if ino == fmt.ROOT_INO and name == STATS_XATTR:
            return json.dumps(self.fs.stats(), sort_keys=True).encode()
        if name == SHARING_XATTR:
            return json.dumps(sharing.report(self.fs, ino, uid)).encode()
        attrs = self.load(self.inodes.get(ino))
        if name not in attrs:
            raise FsError(errno.ENODATA)
        return attrs[name]

    def list(self, ino: int) -> list[bytes]:
        return list(self.load(self.inodes.get(ino)))

    def set(self, ino: int, name: bytes, value: bytes, flags: int = 0, uid: int = 0,
            gid: int = 0) -> None:
        check_name(name)
        if name == dedupe.DEDUPE_XATTR:          # a request, not an attribute (dedupe.py)
            dedupe.dedupe(self.fs, ino, value, uid, gid)
            return
        if name in VIRTUAL:
            raise FsError(errno.EPERM)
        if len(value) > XATTR_SIZE_MAX:
            raise FsError(errno.E2BIG)
        node = self.inodes.get(ino)
        attrs = self.load(node)
        if flags & XATTR_CREATE and name in attrs:
            raise FsError(errno.EEXIST)
        if flags & XATTR_REPLACE and name not in attrs:
            raise FsError(errno.ENODATA)
        new = dict(attrs)
        new[name] = bytes(value)
        self._store(node, new)

    def remove(self, ino: int, name: bytes) -> None:
        if name in VIRTUAL:
            raise FsError(errno.EPERM)
        node = self.inodes.get(ino)
        attrs = self.load(node)
        if name not in attrs:
            raise FsError(errno.ENODATA)
        new = dict(attrs)
        del new[name]
        self._store(node, new)

    def _store(self, node: Inode, attrs: dict[bytes, bytes]) -> None:
        block = encode(attrs) if attrs else None      # ENOSPC before anything changes
        if block is not None and not node.xattr_blk and not self.alloc.room(1):
            raise FsError(errno.ENOSPC)
        with self.tx.open() as t:
            if block is None:
                if node.xattr_blk:
                    self.alloc.decref(node.xattr_blk, 1)
                    node.xattr_blk = 0
                    self.inodes.xattr_blocks -= 1
            else:
                if not node.xattr_blk:
                    node.xattr_blk = self.alloc.alloc(1)[0][0]
                    self.inodes.xattr_blocks += 1
                t.xattr_block(node.xattr_blk, block)
            node.xattrs = attrs
            node.touch()
            t.inode(node)
        self.note_capability(node.ino, CAPABILITY_XATTR in attrs)
