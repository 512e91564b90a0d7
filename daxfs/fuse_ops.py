"""The pyfuse3 adapter: argument translation only. Engine errors become errno here, in one
place (`_errors`); anything unexpected is logged with its traceback and answered with EIO,
because in pyfuse3 one uncaught exception would end the whole daemon.

No handler awaits inside an engine call, so each FUSE request runs atomically (see fs.py).

O_DIRECT opens get FOPEN_DIRECT_IO: the kernel then sends their reads and writes straight
here, and skips the getxattr("security.capability") round trip it makes before every write
that goes through its page cache (FUSE clears SB_NOSEC), which halves the requests per 4 KiB
direct write. The kernel (6.x) still invalidates the cached pages such a write overlaps, so
buffered descriptors and mappings of the same file stay coherent
(tests/test_mount_mmap.py::test_o_direct_writes_reach_cached_descriptors_mappings_and_new_opens).

Setuid/setgid and security.capability (ext4's rules, tests/test_posix.py): the daemon answers
INIT with FUSE_HANDLE_KILLPRIV_V2 (daemon/server.py, _fusehook.c): the superblock is then
SB_NOSEC, so the kernel stops asking getxattr("security.capability") before every write
through its page cache (once per inode and attribute refresh instead), and leaves the clearing
to us: `write_sync` clears setuid/setgid when a WRITE carries FUSE_WRITE_KILL_SUIDGID (a writer
without CAP_FSETID) and drops security.capability on every write that is not page-cache
writeback (as ext4 does for root's writes too); the hook calls `kill_privileges` before a
SETATTR with FATTR_KILL_SUIDGID (truncate by such a caller, chown) or a size change, and before
fallocate and a copy_file_range target (uid 0 standing in for CAP_FSETID: those requests carry
no flag). A security.* setxattr ends the inode's S_NOSEC (the VFS does that), so a later
write through the page cache is checked again. Atomic O_TRUNC stays off:
open(O_TRUNC) arrives as SETATTR(size); if O_TRUNC does reach OPEN (a session without the
hook), OPEN truncates.

The page cache is kept (keep_cache on every open, attribute and entry timeouts of an hour,
FUSE_CAP_AUTO_INVAL_DATA off: daemon/kcache.py says why that is coherent); the one attribute
change the kernel does not learn of, setuid/setgid cleared by `write_sync`, is followed by an
attribute invalidation.

`-o writeback` (FUSE_CAP_WRITEBACK_CACHE): buffered writes stay in the kernel's page cache and
come here as page-cache writeback (FUSE_WRITE_CACHE) in merged runs, at fsync, close, msync or
the kernel's own writeback. The kernel then trusts its own size and times, so: O_DIRECT opens
do not get FOPEN_DIRECT_IO (the kernel's generic direct I/O writes dirty pages back first),
every writable open counts as a cached writer, and SEEK_DATA/SEEK_HOLE is left to the kernel.

File handles: `fh` is the inode number, with CACHED_WRITER set for an O_RDWR open that goes
through the page cache (not O_DIRECT), the kind that can be mapped MAP_SHARED for writing:
while such an open exists the kernel may hold dirty pages of the file (a MAP_SHARED mapping keeps its open until munmap, and the kernel writes the
pages back at the latest at munmap/close), so lseek(SEEK_DATA/SEEK_HOLE) answers "all data"
(see FileSystem.lseek).
"""
from __future__ import annotations

import errno
import functools
import logging
import os
import reprlib
from typing import TYPE_CHECKING, Callable, Sequence

import pyfuse3
from pyfuse3 import (EntryAttributes, FileHandleT, FileInfo, FileNameT, FlagT, InodeT, ModeT,
                     ReaddirToken, RequestContext, SetattrFields, StatvfsData, XAttrNameT)

from .errors import FsError
from .fs import Attr, FileSystem

if TYPE_CHECKING:
    from .dataplane import DataPlane

log = logging.getLogger(__name__)

CACHED_WRITER = 1 << 62            # in a file handle: writable open through the page cache
FH_INO = CACHED_WRITER - 1
# The root's attributes are cached briefly whatever the attribute timeout: stat(MOUNTPOINT) is
# how programs (and the tests' helpers) notice a dead daemon (ENOTCONN), and a cached answer
# would hide it for the whole timeout
ROOT_ATTR_TIMEOUT = 1.0
READDIR_BATCH = 64           # entries taken from the engine at a time (a reply holds ~30)
FUSE_WRITE_CACHE = 1 << 0          # write_flags of a WRITE (<linux/fuse.h>)
FUSE_WRITE_KILL_SUIDGID = 1 << 2


def _errors(fn):
    @functools.wraps(fn)
    async def wrapper(self, *args):
        try:
            if self.plane is not None:
                self.plane.settle()         # the COW breaks C did (dataplane.py)
            return await fn(self, *args)
        except FsError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        except pyfuse3.FUSEError:
            raise
        except Exception:
            log.exception("unexpected error in %s(%s)", fn.__name__, _short(args[:3]))
            raise pyfuse3.FUSEError(errno.EIO) from None
    return wrapper


def _short(args) -> str:
    """Arguments for a log line: never a user's data in bulk (xattr values, write buffers)."""
    return ", ".join(reprlib.repr(a) for a in args)


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, fs: FileSystem, *, timeout: float = 1.0, dax: bool = False,
                 writeback: bool = False, invalidator=None):
        super().__init__()
        self.fs = fs
        self.timeout = timeout
        self.dax = dax          # -o dax: every open direct I/O, no page-cache copy per inode
        self.plane: DataPlane | None = None     # the C data plane, when the daemon runs one
        # -o writeback: pyfuse3 asks for FUSE_CAP_WRITEBACK_CACHE at INIT when this is set
        self.enable_writeback_cache = self.writeback = writeback
        self.invalidator = invalidator      # daemon.kcache.Invalidator, once mounted

    # -- helpers --------------------------------------------------------------------------------
    def _entry(self, a: Attr) -> EntryAttributes:
        e = EntryAttributes()
        e.st_ino = a.ino
        e.generation = a.generation
        e.entry_timeout = self.timeout
        e.attr_timeout = self.timeout if a.ino != pyfuse3.ROOT_INODE else ROOT_ATTR_TIMEOUT
        e.st_mode = a.mode
        e.st_nlink = a.nlink
        e.st_uid = a.uid
        e.st_gid = a.gid
        e.st_rdev = a.rdev
        e.st_size = a.size
        e.st_blksize = 1 << 17
        e.st_blocks = a.blocks
        e.st_atime_ns = a.atime_ns
        e.st_mtime_ns = a.mtime_ns
        e.st_ctime_ns = a.ctime_ns
        return e

    # -- names ----------------------------------------------------------------------------------
    @_errors
    async def lookup(self, parent_inode: InodeT, name: FileNameT,
                     ctx: RequestContext | None = None) -> EntryAttributes:
        return self._entry(self.fs.lookup(parent_inode, name))

    async def forget(self, inode_list: Sequence[tuple[InodeT, int]]) -> None:
        for ino, n in inode_list:
            try:
                self.fs.forget(ino, n)
                if self.plane is not None:
                    self.plane.forgotten(ino)
            except Exception:
                log.exception("forget(%d, %d)", ino, n)

    @_errors
    async def getattr(self, inode: InodeT, ctx: RequestContext | None = None) -> EntryAttributes:
        return self._entry(self.fs.getattr(inode))

    @_errors
    async def setattr(self, inode: InodeT, attr: EntryAttributes, fields: SetattrFields,
                      fh: FileHandleT | None, ctx: RequestContext) -> EntryAttributes:
        a = self.fs.setattr(
            inode,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            ctime_ns=attr.st_ctime_ns if fields.update_ctime else None)
        return self._entry(a)

    @_errors
    async def readlink(self, inode: InodeT, ctx: RequestContext) -> FileNameT:
        return self.fs.readlink(inode)

    @_errors
    async def mknod(self, parent_inode: InodeT, name: FileNameT, mode: ModeT, rdev: int,
                    ctx: RequestContext) -> EntryAttributes:
        return self._entry(self.fs.mknod(parent_inode, name, mode, rdev, ctx.uid, ctx.gid))

    @_errors
    async def mkdir(self, parent_inode: InodeT, name: FileNameT, mode: ModeT,
                    ctx: RequestContext) -> EntryAttributes:
        return self._entry(self.fs.mkdir(parent_inode, name, mode & ~ctx.umask, ctx.uid, ctx.gid))

    @_errors
    async def unlink(self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext) -> None:
        self.fs.unlink(parent_inode, name)

    @_errors
    async def rmdir(self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext) -> None:
        self.fs.rmdir(parent_inode, name)

    @_errors
    async def symlink(self, parent_inode: InodeT, name: FileNameT, target: FileNameT,
                      ctx: RequestContext) -> EntryAttributes:
        return self._entry(self.fs.symlink(parent_inode, name, target, ctx.uid, ctx.gid))

    @_errors
    async def rename(self, parent_inode_old: InodeT, name_old: FileNameT,
                     parent_inode_new: InodeT, name_new: FileNameT, flags: FlagT,
                     ctx: RequestContext) -> None:
        self.fs.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    @_errors
    async def link(self, inode: InodeT, new_parent_inode: InodeT, new_name: FileNameT,
                   ctx: RequestContext) -> EntryAttributes:
        return self._entry(self.fs.link(inode, new_parent_inode, new_name))

    # -- files ----------------------------------------------------------------------------------
    def _open(self, ino: int, flags: int, ctx: RequestContext,
              truncate: bool = False) -> FileInfo:
        # With the writeback cache, O_DIRECT opens go through the kernel's generic direct I/O
        # (no FOPEN_DIRECT_IO), which writes dirty cached pages back before a direct read or
        # write of their range; FOPEN_DIRECT_IO reads would miss them.
        direct = self.dax or (bool(flags & os.O_DIRECT) and not self.writeback)
        # Without the writeback cache only a shared writable mapping leaves dirty pages in the
        # kernel (write(2) is write-through), and mmap(MAP_SHARED, PROT_WRITE) needs O_RDWR;
        # direct-I/O opens cannot be mapped shared, but in dax mode (FUSE_DIRECT_IO_ALLOW_MMAP).
        # With it, every writable open may leave dirty pages until its close.
        acc = flags & os.O_ACCMODE
        writer = ((acc == os.O_RDWR or (self.writeback and acc == os.O_WRONLY))
                  and (self.dax or not direct))
        # O_TRUNC only arrives when atomic O_TRUNC was negotiated (not by our daemon): then no
        # SETATTR follows, and who may keep setuid/setgid is judged by uid alone
        self.fs.open_file(ino, truncate=truncate, kill_suidgid=truncate and ctx.uid != 0,
                          cached_writer=writer)
        return FileInfo(fh=ino | (CACHED_WRITER if writer else 0), keep_cache=True,
                                direct_io=direct)

    @_errors
    async def open(self, inode: InodeT, flags: FlagT, ctx: RequestContext) -> FileInfo:
        return self._open(inode, flags, ctx, truncate=bool(flags & os.O_TRUNC))

    @_errors
    async def create(self, parent_inode: InodeT, name: FileNameT, mode: ModeT, flags: FlagT,
                     ctx: RequestContext) -> tuple[FileInfo, EntryAttributes]:
        a = self.fs.create(parent_inode, name, mode & ~ctx.umask, ctx.uid, ctx.gid)
        return self._open(a.ino, flags, ctx), self._entry(a)

    @_errors
    async def read(self, fh: FileHandleT, off: int, size: int) -> bytes | memoryview:
        return self.fs.read(fh & FH_INO, off, size, view=True)

    @_errors
    async def write(self, fh: FileHandleT, off: int, buf: bytes) -> int:
        return self.fs.write(fh & FH_INO, off, buf, True)     # whole: cannot tell writeback

    async def flush(self, fh: FileHandleT) -> None:
        pass

    @_errors
    async def release(self, fh: FileHandleT) -> None:
        self.fs.release_file(fh & FH_INO, cached_writer=bool(fh & CACHED_WRITER))

    @_errors
    async def fsync(self, fh: FileHandleT, datasync: bool) -> None:
        self.fs.fsync(fh & FH_INO, datasync)

    # -- directories ----------------------------------------------------------------------------
    @_errors
    async def opendir(self, inode: InodeT, ctx: RequestContext) -> FileHandleT:
        return self.fs.opendir(inode)

    @_errors
    async def readdir(self, fh: FileHandleT, start_id: int, token: ReaddirToken) -> None:
        fs = self.fs
        while batch := fs.readdir(fh, start_id, READDIR_BATCH, dots=True):
            for cookie, name, ino in batch:
                if not pyfuse3.readdir_reply(token, name, self._entry(fs.getattr(ino)), cookie):
                    return
                if cookie > 2:          # the kernel keeps no reference to `.` and `..`
                    fs.remember(ino)
                start_id = cookie

    @_errors
    async def releasedir(self, fh: FileHandleT) -> None:
        self.fs.releasedir(fh)

    @_errors
    async def fsyncdir(self, fh: FileHandleT, datasync: bool) -> None:
        self.fs.sync()

    @_errors
    async def statfs(self, ctx: RequestContext) -> StatvfsData:
        s = self.fs.statfs()
        st = StatvfsData()
        st.f_bsize = st.f_frsize = s.bsize
        st.f_blocks = s.blocks
        st.f_bfree = st.f_bavail = s.bfree
        st.f_files = s.files
        st.f_ffree = st.f_favail = s.ffree
        st.f_namemax = s.namemax
        return st

    # -- xattrs ---------------------------------------------------------------------------------
    @_errors
    async def setxattr(self, inode: InodeT, name: XAttrNameT, value: bytes,
                       ctx: RequestContext) -> None:
        self.fs.setxattr(inode, name, value, 0, ctx.uid, ctx.gid)

    @_errors
    async def getxattr(self, inode: InodeT, name: XAttrNameT, ctx: RequestContext) -> bytes:
        return self.fs.getxattr(inode, name, ctx.uid)

    @_errors
    async def listxattr(self, inode: InodeT, ctx: RequestContext) -> Sequence[XAttrNameT]:
        return self.fs.listxattr(inode)

    @_errors
    async def removexattr(self, inode: InodeT, name: XAttrNameT, ctx: RequestContext) -> None:
        self.fs.removexattr(inode, name)

    async def access(self, inode: InodeT, mode: ModeT, ctx: RequestContext) -> bool:
        return True     # default_permissions: the kernel checks mode bits itself

    # -- called synchronously by daxfs._fusehook (ops pyfuse3 does not register) ----------------
    def _settle(self) -> None:
        """The sync handlers' part of _errors: Python's maps first catch up with C's breaks."""
        if self.plane is not None:
            _sync(self.plane.settle)

    def copy_file_range(self, ino_in: int, fh_in: int, off_in: int, ino_out: int, fh_out: int,
                        off_out: int, length: int, flags: int) -> int:
        self._settle()
        return _sync(self.fs.clone_range, ino_in, off_in, ino_out, off_out, length, flags)

    def kill_privileges(self, ino: int, suidgid: bool) -> None:
        self._settle()
        if _sync(self.fs.kill_privileges, ino, bool(suidgid)) and self.invalidator is not None:
            self.invalidator.attrs(ino)

    def lseek(self, ino: int, fh: int, off: int, whence: int) -> int:
        self._settle()
        return _sync(self.fs.lseek, ino, off, whence)

    def fallocate(self, ino: int, fh: int, mode: int, off: int, length: int) -> None:
        self._settle()
        _sync(self.fs.fallocate, ino, mode, off, length)

    # the fast path (fusehook.set_fast_path): read/write called from C, replied at once
    # (reads and in-place writes of files handed to the data plane never get here)
    def read_sync(self, fh: int, off: int, size: int) -> bytes | memoryview:
        self._settle()
        data = _sync(self.fs.read, fh & FH_INO, off, size, True)
        if self.plane is not None:
            _sync(self.plane.offer, fh & FH_INO)
        return data

    def write_sync(self, fh: int, off: int, data: memoryview, write_flags: int = 0) -> int:
        ino = fh & FH_INO
        if self.plane is not None:
            # a file C serves: C may break COW in it while this write runs, from a map that
            # does not know this write; take it back and catch up first (dataplane.py)
            if self.plane.cow_fd is not None and ino in self.plane.published:
                _sync(self.plane.changed, (ino,))
            self._settle()
        changes = self.plane.changes if self.plane is not None else 0
        breaks = self.fs.cow_breaks
        if not write_flags & FUSE_WRITE_CACHE:      # write(2), not page-cache writeback
            if (_sync(self.fs.kill_privileges, ino, bool(write_flags & FUSE_WRITE_KILL_SUIDGID))
                    and self.invalidator is not None):
                self.invalidator.attrs(ino)         # the kernel's cached mode is stale now
            n = _sync(self.fs.write, ino, off, data)
        else:
            # writeback: the kernel ignores a short count, so all of it is stored or ENOSPC
            n = _sync(self.fs.write, ino, off, data, True)
        if self.plane is not None and (self.plane.changes == changes or (
                self.plane.cow_fd is not None and self.fs.cow_breaks != breaks)):
            # bytes and timestamps only, or a COW break C could have done: hand it over
            _sync(self.plane.offer, ino)
        return n

    def hook_handlers(self) -> dict[str, Callable | None]:
        # writeback cache: the kernel sends FUSE_LSEEK without writing dirty pages back, and its
        # size may be ahead of ours; without a handler (ENOSYS) it answers SEEK_DATA/SEEK_HOLE
        # itself, from its own size (all data, the hole at EOF)
        return {"copy_file_range": self.copy_file_range,
                "lseek": None if self.writeback else self.lseek, "fallocate": self.fallocate,
                "kill_privileges": self.kill_privileges}


def _sync(fn, *args):
    """The hook's error convention: OSError(errno) becomes the reply."""
    try:
        return fn(*args)
    except FsError as e:
        raise OSError(e.errno, str(e)) from None
    except Exception:
        log.exception("unexpected error in %s(%s)", fn.__name__, _short(args[:4]))
        raise OSError(errno.EIO, "internal error") from None
