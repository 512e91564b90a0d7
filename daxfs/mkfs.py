"""Create a fresh daxfs image (the engine of `daxfs mkfs`)."""
from __future__ import annotations

import errno
import logging
import os
import stat
import time
import uuid as uuidlib

import numpy as np

from . import format as fmt
from .errors import UsageError

log = logging.getLogger(__name__)

IMAGE_MODE = 0o600          # images hold all data; see the README's Limits / security


def parse_size(text: str) -> int:
    """'4G', '512M', '1048576' -> bytes (binary units)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    try:
        if t and t[-1] in mult:
            return int(float(t[:-1]) * mult[t[-1]])
        return int(t)
    except ValueError:
        raise UsageError(f"invalid size {text!r} (use e.g. 1G, 512M)") from None


def is_daxfs_image(path: str) -> bool:
    try:
        return fmt.has_magic(path)
    except OSError:
        return False


def _reserve(fd: int, path: str, size: int, created: bool) -> None:
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
            log.warning("%s: cannot reserve space (%s); the image stays sparse", path, e.strerror)
            return
        os.ftruncate(fd, 0)          # give back what was reserved before it ran out
        if created:
            os.unlink(path)
        raise UsageError(f"cannot reserve {size} bytes for {path}: {e.strerror}") from None


def _refuse_to_overwrite(path: str, force: bool) -> None:
    if os.path.islink(path):
        # a symlink planted where the image goes (dangling or not) must not redirect mkfs
        raise UsageError(f"{path} is a symbolic link; mkfs does not follow it (give the "
                         f"target's path)")
    if os.path.exists(path) and not force:
        st = os.stat(path)
        if stat.S_ISREG(st.st_mode) and st.st_size > 0:
            what = "a daxfs image" if is_daxfs_image(path) else "a non-empty file"
            raise UsageError(f"{path} is {what}; use --force to overwrite it")


def _write_empty_fs(fd: int, g: fmt.Geometry) -> None:
    """The journal header, the root directory, the reserved refcounts, and last (after an
    fsync) the superblock, which makes it an image; the file is zeroed and sized already."""
    now = time.time_ns()
    os.pwrite(fd, fmt.pack_journal_header(1), g.journal_start * fmt.BLOCK_SIZE)
    root = fmt.pack_inode(stat.S_IFDIR | 0o755, os.getuid(), os.getgid(), 2, 0, now, now, now,
                          now, 1, 0, 0, 0)
    os.pwrite(fd, root, g.record_offset("inodes", fmt.ROOT_INO))
    reserved = np.full(g.data_start, fmt.REFCOUNT_RESERVED, dtype=fmt.REFCOUNT_DTYPE)
    os.pwrite(fd, reserved.tobytes(), g.region("refcounts")[0])
    os.fsync(fd)
    fmt.store_superblock(fd, fmt.make_superblock(g, uuidlib.uuid4().bytes, now))
    os.fsync(fd)


def make_image(path: str, size: int, *, force: bool = False, inode_count: int | None = None,
               extent_count: int | None = None, sparse: bool = True) -> fmt.Geometry:
    """Format `path` as an empty daxfs of `size` bytes. Refuses to overwrite data (a daxfs
    image or any non-empty file) unless `force`. Unless `sparse`, the file's space is
    reserved (posix_fallocate) first: the daemon stores into the image through a mapping, and
    a store into a hole the host filesystem has no room for is a SIGBUS, not an ENOSPC."""
    size -= size % fmt.BLOCK_SIZE
    try:
        g = fmt.Geometry.for_size(size, inode_count, extent_count)
    except fmt.FormatError as e:
        raise UsageError(str(e)) from None
    _refuse_to_overwrite(path, force)
    created = not os.path.lexists(path)
    # O_NOFOLLOW, and O_EXCL when creating: a symlink or file planted between the checks above
    # and the open makes it fail instead of writing elsewhere. 0600: the image holds every
    # file's data, and whoever can open it can also take its lock.
    flags = os.O_RDWR | os.O_NOFOLLOW | (os.O_CREAT | os.O_EXCL if created else 0)

    def open_error(e: OSError) -> UsageError:
        if e.errno == errno.ELOOP:
            return UsageError(f"{path} is a symbolic link; mkfs does not follow it")
        if e.errno == errno.EEXIST:
            return UsageError(f"{path} appeared while mkfs was creating it; try again")
        return UsageError(f"cannot create {path}: {e.strerror}")

    fd, st = fmt.open_regular(path, flags, mode=IMAGE_MODE, open_error=open_error,
                              not_regular=UsageError(f"{path} is not a regular file"))
    try:
        if st.st_mode & 0o077:
            os.fchmod(fd, stat.S_IMODE(st.st_mode) & 0o700)
        # Wipe the old superblock first so a half-made image is never taken for a valid one.
        os.pwrite(fd, bytes(fmt.BLOCK_SIZE), 0)
        os.ftruncate(fd, 0)
        os.ftruncate(fd, size)
        if not sparse:
            _reserve(fd, path, size, created)
        _write_empty_fs(fd, g)
    except OSError as e:
        if created:                    # leave nothing behind that looks like an image attempt
            try:
                os.unlink(path)
            except OSError:
                pass
        raise UsageError(f"cannot write {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    return g
