"""Checks before mounting, made by the CLI process before it forks: the image is a daxfs image
nobody holds, the mountpoint an empty directory (a stale FUSE mount on it is cleaned up)."""
from __future__ import annotations

import os
import stat

from .. import format as fmt
from ..errors import UsageError
from .mounttab import describe_lock, find_mount, is_locked, is_stale, notice, run_fusermount
from .options import FSTYPE


def check_image(image: str) -> None:
    """UsageError unless `image` is a daxfs image we could mount now (FormatError -> UsageError)."""
    try:
        st = os.stat(image)
    except FileNotFoundError:
        raise UsageError(f"{image}: no such image file") from None
    except OSError as e:
        raise UsageError(f"{image}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{image} is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{image} is not a regular file")
    try:
        fmt.read_superblock(image)
    except OSError as e:
        raise UsageError(f"cannot read {image}: {e.strerror}") from None
    except fmt.FormatError as e:
        raise UsageError(f"{image}: {e}") from None
    if is_locked(image):
        raise UsageError(describe_lock(image))


def check_mountpoint(mountpoint: str) -> str:
    """Validate the mountpoint (cleaning up a stale FUSE mount on it): its absolute path."""
    mnt = os.path.realpath(mountpoint)
    if is_stale(mnt):
        ok, err = run_fusermount(mnt, lazy=True)
        if not ok:
            raise UsageError(f"{mountpoint} is a stale FUSE mount and cleaning it up failed: {err}")
        notice(f"{mountpoint} was a stale FUSE mount (its daemon is gone); lazily unmounted it")
    try:
        st = os.stat(mnt)
    except FileNotFoundError:
        raise UsageError(f"mountpoint {mountpoint} does not exist") from None
    except OSError as e:
        raise UsageError(f"mountpoint {mountpoint}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"mountpoint {mountpoint} is not a directory")
    entry = find_mount(mnt)
    if entry is not None:
        # never stack mounts: the lower one would be hidden (and a second daxfs on top of the
        # first made both unreachable by `daxfs umount MNT` as the user meant it)
        what = "a daxfs mount point" if entry.fstype == FSTYPE else f"a mount point ({entry.fstype})"
        raise UsageError(f"{mountpoint} is already {what} (of {entry.source}); unmount it first")
    try:
        with os.scandir(mnt) as it:
            nonempty = any(True for _ in it)
    except OSError as e:
        raise UsageError(f"mountpoint {mountpoint}: {e.strerror}") from None
    if nonempty:
        raise UsageError(f"mountpoint {mountpoint} is not empty")
    return mnt
