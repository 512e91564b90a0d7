"""`daxfs umount`: find the mount, run fusermount3, wait until the daemon released the image
and check that it left the image marked clean."""
from __future__ import annotations

import os
import time

from .. import format as fmt
from ..errors import UsageError
from .mounttab import (MountEntry, find_mount, is_locked, is_stale, lock_holder, mounts_of_image,
                       notice, run_fusermount)
from .options import FSTYPE

UMOUNT_TIMEOUT = 60.0


def _check_closed_cleanly(target: str, image: str, entry: MountEntry) -> int:
    """After the daemon exited: a read-write mount must have left the image marked clean."""
    if "ro" in entry.options.split(","):
        return 0
    try:
        sb, _ = fmt.read_superblock(image)
    except (OSError, fmt.FormatError) as e:
        raise UsageError(f"unmounted {target}, but {image} is unreadable afterwards: {e}") from None
    if not int(sb["clean"]):
        raise UsageError(f"unmounted {target}, but the daemon did not close {image} cleanly "
                         f"(see its log; the journal is replayed at the next mount)")
    return 0


def umount(target: str, *, lazy: bool = False, timeout: float = UMOUNT_TIMEOUT) -> int:
    """`daxfs umount MOUNTPOINT|IMAGE`: unmount and wait for the daemon to finish."""
    mnt = os.path.realpath(target)
    stale = is_stale(mnt)
    entry = find_mount(mnt)
    if entry is None and not stale and os.path.isfile(mnt):
        # given the image: find where it is mounted
        found = mounts_of_image(mnt)
        if not found:
            raise UsageError(f"{target} is not mounted")
        entry = found[-1]
        mnt = entry.target
        stale = is_stale(mnt)
    if entry is None:
        if not stale and not os.path.lexists(mnt):
            raise UsageError(f"{target}: no such file or directory")
        raise UsageError(f"{target} is not mounted")
    if entry.fstype != FSTYPE:
        raise UsageError(f"{target} is not a daxfs mount (it is {entry.fstype})")
    image = entry.source
    if stale:
        ok, err = run_fusermount(mnt, lazy=True)
        if not ok:
            raise UsageError(f"cannot clean up the stale mount {target}: {err}")
        notice(f"{target} was a stale mount (its daemon was gone); lazily unmounted it")
        return 0
    pid = lock_holder(image) if os.path.exists(image) else None
    ok, err = run_fusermount(mnt, lazy=lazy)
    if not ok:
        hint = " (files are open on it; close them or use --lazy)" if "busy" in err.lower() else ""
        raise UsageError(f"cannot unmount {target}: {err}{hint}")
    if lazy:
        return 0        # detached; the daemon exits once the last open file on it is closed
    if not os.path.exists(image):
        notice(f"unmounted {target}, but its image {image} is gone; not waiting for the daemon")
        return 0
    deadline = time.monotonic() + timeout
    while True:
        try:
            if not is_locked(image):
                return _check_closed_cleanly(target, image, entry)
        except OSError as e:
            notice(f"unmounted {target}; cannot watch {image} for the daemon to finish: "
                   f"{e.strerror}")
            return 0
        if time.monotonic() > deadline:
            who = f"pid {pid}" if pid else "the daemon"
            raise UsageError(f"unmounted {target}, but {who} still holds {image} after "
                             f"{timeout:.0f} s; see its log")
        time.sleep(0.05)
