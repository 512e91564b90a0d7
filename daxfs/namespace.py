"""The namespace: names, directories, links and renames.

Each method validates first, then mutates the directory index and inodes inside one
transaction (see txn.py), so a crash shows a name operation entirely or not at all. Every
method that hands an entry to the kernel (lookup, create, mkdir, mknod, symlink, link) adds
one kernel lookup reference; `FileSystem.forget` drops them, and an unlinked inode lives
until its last reference and open handle are gone (orphans.py).

Space is settled before a transaction opens: a new name needs a free inode (but for a hard
link) and a free directory entry; a rename to a new name keeps its entry's slot.
"""
from __future__ import annotations

import errno
import stat
from typing import TYPE_CHECKING

from . import format as fmt
from .dirs import check_name
from .errors import CorruptionError, FsError
from .inodes import Inode

if TYPE_CHECKING:
    from .fs import Attr, FileSystem
    from .txn import Transaction

RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
MAX_LINKS = 65000
MAX_SYMLINK = fmt.BLOCK_SIZE - 1


class Namespace:
    def __init__(self, fs: FileSystem) -> None:
        self.fs = fs
        self.g, self.tx = fs.g, fs.tx
        self.inodes, self.dirs, self.bufcache = fs.inodes, fs.dirs, fs.bufcache
        self.dir_handles: dict[int, int] = {}        # fh -> directory inode
        self._next_fh = 1

    def lookup(self, parent: int, name: bytes) -> Attr:
        self._dir(parent)
        if len(name) > fmt.MAX_NAME:
            raise FsError(errno.ENAMETOOLONG)
        ino = self.dirs.lookup(parent, name)
        if ino is None:
            raise FsError(errno.ENOENT)
        return self._entry(self.inodes.get(ino))

    def _dir(self, ino: int) -> Inode:
        node = self.inodes.get(ino)
        if not node.is_dir:
            raise FsError(errno.ENOTDIR)
        return node

    def _entry(self, node: Inode) -> Attr:
        node.lookups += 1
        return self.fs.attr(node)

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
        with self.tx.open() as t:
            node = self.inodes.allocate(mode, uid, gid, rdev)
            if is_dir:
                node.nlink = 2
                pnode.nlink += 1
                self.dirs.set_parent(node.ino, parent)
            slot, rec = self.dirs.add(parent, name, node.ino)
            t.dirent(slot, rec)
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
        node = self.inodes.get(ino)
        if not stat.S_ISLNK(node.mode):
            raise FsError(errno.EINVAL)
        return self.bufcache.read(node, 0, node.size)

    def link(self, ino: int, parent: int, name: bytes) -> Attr:
        check_name(name)
        node = self.inodes.get(ino)
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
        with self.tx.open() as t:
            slot, rec = self.dirs.add(parent, name, ino)
            t.dirent(slot, rec)
            node.nlink += 1
            node.touch()
            pnode.touch(m=True)
            t.inode(node)
            t.inode(pnode)
        return self._entry(node)

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
        node = self.inodes.get(ino)
        if want_dir and not node.is_dir:
            raise FsError(errno.ENOTDIR)
        if not want_dir and node.is_dir:
            raise FsError(errno.EISDIR)
        if want_dir and not self.dirs.is_empty(ino):
            raise FsError(errno.ENOTEMPTY)
        with self.tx.open() as t:
            slot, rec = self.dirs.remove(parent, name)
            t.dirent(slot, rec)
            pnode.touch(m=True)
            t.inode(pnode)
            self._drop_link(t, node, pnode)
        self.fs.orphans.maybe_reclaim(node)

    def _drop_link(self, t: Transaction, node: Inode, pnode: Inode) -> None:
        """One name of `node` in directory `pnode` is gone (the dirent is already removed)."""
        if node.is_dir:
            node.nlink = 0
            pnode.nlink -= 1
            self.dirs.drop_parent(node.ino)
        else:
            node.nlink -= 1
        node.touch()
        if node.nlink == 0:
            node.flags |= fmt.IFLAG_ORPHAN
        t.inode(node)

    def rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes,
               flags: int = 0) -> None:
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == RENAME_NOREPLACE | RENAME_EXCHANGE:
            raise FsError(errno.EINVAL)
        check_name(new_name)
        op, np_ = self._dir(old_parent), self._dir(new_parent)
        src_ino = self.dirs.lookup(old_parent, old_name)
        if src_ino is None:
            raise FsError(errno.ENOENT)
        src = self.inodes.get(src_ino)
        dst_ino = self.dirs.lookup(new_parent, new_name)
        dst = self.inodes.get(dst_ino) if dst_ino is not None else None
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
        with self.tx.open() as t:
            if flags & RENAME_EXCHANGE:
                t.dirent(*(self.dirs.retarget(old_parent, old_name, dst_ino)))
                t.dirent(*(self.dirs.retarget(new_parent, new_name, src_ino)))
                self._moved_dir(src, op, np_)
                self._moved_dir(dst, np_, op)
                dst.touch()
                t.inode(dst)
            else:
                if dst is not None:
                    t.dirent(*(self.dirs.retarget(new_parent, new_name, src_ino)))
                    self._drop_link(t, dst, np_)
                    t.dirent(*(self.dirs.remove(old_parent, old_name)))
                else:
                    t.dirent(*(
                        self.dirs.move(old_parent, old_name, new_parent, new_name)))
                self._moved_dir(src, op, np_)
            src.touch()
            op.touch(m=True)
            np_.touch(m=True)
            for n in (src, op, np_):
                t.inode(n)
        if dst is not None and not flags & RENAME_EXCHANGE:
            self.fs.orphans.maybe_reclaim(dst)

    def _moved_dir(self, node: Inode, old_parent: Inode, new_parent: Inode) -> None:
        if node.is_dir and old_parent is not new_parent:
            old_parent.nlink -= 1
            new_parent.nlink += 1
            self.dirs.set_parent(node.ino, new_parent.ino)

    def _is_ancestor(self, anc: int, ino: int) -> bool:
        """True if `anc` is `ino` or one of its ancestors."""
        seen = 0
        while True:
            if ino == anc:
                return True
            if ino == fmt.ROOT_INO:
                return False
            ino = self.dirs.parent_of(ino, fmt.ROOT_INO)
            seen += 1
            if seen > self.g.inode_count:
                raise CorruptionError("directory cycle")

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
        directory's names in slot order; with `dots` (what the kernel is served) first `.` (cookie 1) and `..`
        (cookie 2). The kernel takes no lookup reference for `.` and `..`
        (fuse_direntplus_link skips them), so the adapter must not count one either."""
        ino = self.dir_handles.get(fh)
        if ino is None:
            raise FsError(errno.EBADF)
        out: list[tuple[int, bytes, int]] = []
        if dots and start < 1:
            out.append((1, b".", ino))
        if dots and start < 2:
            out.append((2, b"..", self.dirs.parent_of(ino, ino)))
        return out + self.dirs.listing(ino, start, None if limit is None else limit - len(out))

    def releasedir(self, fh: int) -> None:
        self.dir_handles.pop(fh, None)
