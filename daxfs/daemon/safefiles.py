"""Files the CLI and the daemon create (logs, the crash log), opened so that a symlink or a
file planted by another user cannot redirect them.

- The default logs live in a private directory: /run/daxfs for root, $XDG_RUNTIME_DIR/daxfs or
  /tmp/daxfs-<uid> for other users. The directory is created 0700 and used only if it is a real
  directory (not a symlink), owned by us, and not accessible to group or others.
- Every log file is opened with O_NOFOLLOW (a symlink as last component is refused), O_NONBLOCK
  (a planted FIFO cannot hang the open), must be a regular file owned by us, and is created 0600.
"""
from __future__ import annotations

import errno
import os
import stat
import tempfile

from ..errors import UsageError

ROOT_DIR = "/run/daxfs"
LOG_MODE = 0o600


def _check_private_dir(path: str) -> None:
    """UsageError unless `path` is a directory (not a symlink) owned by us with mode 0700 or
    stricter."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{path} is not a directory (a symlink or a file is in the way); "
                         f"remove it or use -o log=FILE")
    if st.st_uid != os.geteuid():
        raise UsageError(f"{path} belongs to uid {st.st_uid}, not to us; remove it or use "
                         f"-o log=FILE")
    if st.st_mode & 0o077:
        raise UsageError(f"{path} is accessible to other users (mode "
                         f"{stat.S_IMODE(st.st_mode):04o}); chmod 700 it or use -o log=FILE")


def _ensure_private_dir(path: str) -> str:
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise UsageError(f"cannot create {path}: {e.strerror}") from None
    _check_private_dir(path)
    return path


def _candidates() -> list[str]:
    uid = os.geteuid()
    out = []
    if uid == 0:
        out.append(ROOT_DIR)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if uid != 0 and xdg and os.path.isabs(xdg):
        try:
            st = os.lstat(xdg)
            if stat.S_ISDIR(st.st_mode) and st.st_uid == uid and not st.st_mode & 0o077:
                out.append(os.path.join(xdg, "daxfs"))
        except OSError:
            pass
    out.append(os.path.join(tempfile.gettempdir(), f"daxfs-{uid}"))
    return out


def private_dir() -> str:
    """The private directory for our logs (created if needed); UsageError when none is safe."""
    last: UsageError | None = None
    for path in _candidates():
        if not os.path.isdir(os.path.dirname(path)):
            continue
        try:
            return _ensure_private_dir(path)
        except UsageError as e:
            last = e
    raise last or UsageError("no private directory for the daxfs logs; use -o log=FILE")


def open_private_append(path: str) -> int:
    """Open (create 0600) `path` for appending without following a symlink or blocking on a
    FIFO; the fd (O_CLOEXEC). Refuses anything but a regular file that belongs to us.
    OSError from open itself is passed on (ELOOP for a symlink)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK
                 | os.O_CLOEXEC, LOG_MODE)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{path} is not a regular file")
        if st.st_uid != os.geteuid():
            raise UsageError(f"{path} belongs to uid {st.st_uid}, not to us; refusing to write "
                             f"into it")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_log(path: str) -> int:
    """open_private_append with a one-line UsageError for every failure."""
    try:
        return open_private_append(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UsageError(f"log file {path} is a symbolic link; refusing to follow it") from None
        raise UsageError(f"cannot open log file {path}: {e.strerror}") from None
