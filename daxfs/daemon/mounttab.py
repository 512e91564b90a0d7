"""The mount table (/proc/self/mounts) and the image lock (flock, /proc/locks): which image is
mounted where, who holds it, stale FUSE mounts and fusermount3."""
from __future__ import annotations

import dataclasses
import errno
import fcntl
import os
import shutil
import stat
import subprocess
import sys

from .. import format as fmt
from .options import FSTYPE


@dataclasses.dataclass(frozen=True)
class MountEntry:
    source: str
    target: str
    fstype: str
    options: str


def _unmangle(field: str) -> str:
    """Undo the octal escapes of /proc/mounts (space, tab, newline, backslash, ...)."""
    if "\\" not in field:
        return field
    raw = bytearray()
    b = os.fsencode(field)
    i = 0
    while i < len(b):
        digits = b[i + 1:i + 4]
        if b[i] == 0x5C and len(digits) == 3 and all(0x30 <= c <= 0x37 for c in digits):
            raw.append(int(digits, 8) & 0xFF)
            i += 4
        else:
            raw.append(b[i])
            i += 1
    return os.fsdecode(bytes(raw))


def proc_mounts() -> list[MountEntry]:
    try:
        with open("/proc/self/mounts", "rb") as f:
            lines = f.read().decode("utf-8", "surrogateescape").splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split(" ")
        if len(parts) >= 4:
            out.append(MountEntry(_unmangle(parts[0]), _unmangle(parts[1]), parts[2], parts[3]))
    return out


def find_mount(mountpoint: str) -> MountEntry | None:
    """The topmost mount on `mountpoint` (an absolute, symlink-free path), or None."""
    hit = None
    for e in proc_mounts():
        if e.target == mountpoint:
            hit = e
    return hit


def mounts_below(mountpoint: str, image: str) -> MountEntry | None:
    """After mounting `image` on `mountpoint`: the mount our daxfs mount was stacked on, if
    any (the topmost one under ours), else None."""
    on = [e for e in proc_mounts() if e.target == mountpoint]
    ours = [i for i, e in enumerate(on) if e.fstype == FSTYPE and e.source == image]
    if not ours or ours[-1] == 0:
        return None
    return on[ours[-1] - 1]


def mounts_of_image(image: str) -> list[MountEntry]:
    image = os.path.abspath(image)
    return [e for e in proc_mounts() if e.fstype == FSTYPE and e.source == image]


def _proc_locks_on(path: str) -> list[tuple[str, int]]:
    """(kind, pid) of every lock /proc/locks lists on `path` (FLOCK, POSIX, OFDLCK ...;
    waiters `->` left out); [] when the file or /proc/locks cannot be read."""
    try:
        st = os.stat(path)
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    want = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    out = []
    for line in lines:
        parts = line.split()
        if len(parts) < 6 or parts[1] == "->":
            continue
        try:
            maj, mnr, ino = parts[5].split(":")
            if (int(maj, 16), int(mnr, 16), int(ino)) == want:
                out.append((parts[1], int(parts[4])))
        except ValueError:
            continue
    return out


def lock_holder(path: str) -> int | None:
    """Pid holding a flock on `path` according to /proc/locks (None if unknown / unlocked)."""
    for kind, pid in _proc_locks_on(path):
        if kind == "FLOCK":
            return pid if pid > 0 else None
    return None


def open_for_lock(path: str) -> int:
    """Open `path` the way the image lock needs it: read-write, so that only someone who may
    write the image can hold (or even probe) its lock. Read-only only where nobody can write
    it anyway (EROFS: the image sits on a read-only filesystem). OSError otherwise (EACCES for
    a user without write permission)."""
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        if e.errno != errno.EROFS:
            raise
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


def try_lock(path: str) -> int | None:
    """Open `path` (open_for_lock) and take an exclusive flock without blocking: the fd, or
    None if locked."""
    fd = open_for_lock(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise
    return fd


def is_locked(path: str) -> bool:
    """Is the image locked (mounted)? A user who may not write the image does not probe the
    lock (that would take it for a moment); /proc/locks answers instead."""
    try:
        fd = try_lock(path)
    except PermissionError:
        return _listed_in_proc_locks(path)
    if fd is None:
        return True
    os.close(fd)
    return False


def _listed_in_proc_locks(path: str) -> bool:
    """Does /proc/locks list any lock (flock, POSIX or OFD) on `path`?"""
    return bool(_proc_locks_on(path))


def exposed_image_warning(path: str) -> str | None:
    """A one-line warning if the image is readable or writable by group or others: they can
    read every file's data out of it, and lock it (which blocks mount and fsck)."""
    try:
        st = os.stat(path)
        is_image = fmt.has_magic(path)
    except OSError:
        return None
    mode = stat.S_IMODE(st.st_mode)
    if not mode & 0o077 or not stat.S_ISREG(st.st_mode) or not is_image:
        return None
    return (f"warning: {path} is accessible to other users (mode {mode:04o}): they can read "
            f"every file's data from it and lock it against mounting; chmod 600 {path}")


def describe_lock(image: str) -> str:
    """'IMAGE is already mounted on MNT (locked by pid N)' with whatever parts are known."""
    where = mounts_of_image(image)
    pid = lock_holder(image)
    msg = f"{image} is already mounted"
    if where:
        msg += f" on {where[-1].target}"
    msg += f" (locked by pid {pid})" if pid else " (locked by another process)"
    return msg


def run_fusermount(mountpoint: str, lazy: bool) -> tuple[bool, str]:
    """Unmount a FUSE mount: (success, one-line error)."""
    if shutil.which("fusermount3"):
        cmd = ["fusermount3", "-u"] + (["-z"] if lazy else []) + ["--", mountpoint]
    else:
        cmd = ["umount"] + (["-l"] if lazy else []) + ["--", mountpoint]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"{cmd[0]} failed: {e}"
    if p.returncode == 0:
        return True, ""
    lines = [ln.strip() for ln in (p.stderr or p.stdout or "").splitlines() if ln.strip()]
    detail = lines[-1] if lines else f"{cmd[0]} exited with status {p.returncode}"
    for prefix in ("fusermount3: ", "umount: "):
        detail = detail.removeprefix(prefix)
    return False, detail


def is_stale(path: str) -> bool:
    """Whether `path` is a FUSE mount whose daemon is gone. statfs, not stat: the kernel always
    asks the daemon for it, while stat may be answered from cached attributes."""
    try:
        os.statvfs(path)
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


def notice(msg: str) -> None:
    print(f"daxfs: {msg}", file=sys.stderr, flush=True)
