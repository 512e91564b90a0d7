"""kill -9 harness, mount helpers (shared with tests/test_mount_crash.py, test_mount_full.py
and test_mount_kill.py): the `daxfs` CLI, mount / umount, the daemon of an image, kill -9 and a
lazy unmount of its dead mount, fsck of a crashed image, cleanup, daemon-log problems, fsync'ed
writes, and the checks that a recovered filesystem still works and gives all space back."""
from __future__ import annotations

import errno
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

from daxfs.daemon import find_mount, is_locked, lock_holder, mounts_of_image

from .kill_workloads import BS

MiB = 1 << 20
DAXFS = Path(sys.executable).parent / "daxfs"
CLI_TIMEOUT = 120
LOG_PROBLEMS = (" ERROR ", " CRITICAL ", "Traceback")


class CheckFailed(AssertionError):
    """A kill point broke the durability contract (or the harness could not run it)."""


def require(cond: object, msg: str) -> None:
    """`assert` that survives `python -O` and names the failure."""
    if not cond:
        raise CheckFailed(msg)


def cli(*args: object, check: bool = True,
        timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess:
    """Run `daxfs ARGS...`; with check=True a non-zero exit raises with its output."""
    cmd = [str(DAXFS), *map(str, args)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    require(not check or p.returncode == 0, f"{' '.join(cmd)} exited with {p.returncode}\n"
            f"--- stdout:\n{p.stdout}--- stderr:\n{p.stderr}")
    return p


def is_mounted(mnt: os.PathLike | str) -> bool:
    return find_mount(os.path.realpath(mnt)) is not None


def wait_unlocked(image: os.PathLike | str, timeout: float = 30.0) -> bool:
    """Wait until nobody holds the image's lock (its daemon has exited)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not os.path.exists(image) or not is_locked(str(image)):
            return True
        time.sleep(0.02)
    return False


def mount(image: os.PathLike | str, mnt: os.PathLike | str, log: os.PathLike | str) -> None:
    cli("mount", image, mnt, "-o", f"log={log}")
    require(is_mounted(mnt), f"daxfs mount returned 0 but {mnt} is not in /proc/mounts")


def umount(mnt: os.PathLike | str) -> None:
    cli("umount", mnt)
    require(not is_mounted(mnt), f"daxfs umount returned 0 but {mnt} is still mounted")


def check_fsck(image: os.PathLike | str) -> None:
    """`daxfs fsck IMAGE` must exit 0."""
    p = cli("fsck", image, check=False)
    require(p.returncode == 0, f"daxfs fsck {image} exited {p.returncode}\n"
            f"--- stdout:\n{p.stdout}--- stderr:\n{p.stderr}")


def _fd_targets(pid: int) -> set[str]:
    out = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in fds:
        try:
            out.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return out


def daemon_pid(image: os.PathLike | str) -> int:
    """Pid of the daemon serving `image`: the flock holder, which must have the image and
    /dev/fuse open (so we never signal anything else). Falls back to a /proc scan if
    /proc/locks names nobody."""
    image = os.path.realpath(image)
    pid = lock_holder(image)
    if pid is not None:
        fds = _fd_targets(pid)
        require(image in fds and "/dev/fuse" in fds,
                f"pid {pid} holds the lock of {image} but has open: {sorted(fds)}")
    else:
        hits = [int(p) for p in os.listdir("/proc") if p.isdigit()
                and {image, "/dev/fuse"} <= _fd_targets(int(p))]
        require(len(hits) == 1, f"daemon of {image}: candidates {hits}")
        pid = hits[0]
    require(pid != os.getpid(), "the daemon is this process")
    return pid


def wait_stale(mnt: os.PathLike | str, timeout: float = 10.0) -> None:
    """Wait until the dead mount answers ENOTCONN."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.stat(mnt)
        except OSError as e:
            if e.errno == errno.ENOTCONN:
                return
            raise
        require(time.monotonic() < deadline, f"{mnt} did not go stale after the daemon died")
        time.sleep(0.02)


def kill9(image: os.PathLike | str, mnt: os.PathLike | str) -> int:
    """SIGKILL the daemon of `image`; returns its pid once it is gone and `mnt` is stale."""
    pid = daemon_pid(image)
    os.kill(pid, signal.SIGKILL)
    require(wait_unlocked(image, 15), f"pid {pid} still holds {image} after SIGKILL")
    wait_stale(mnt)
    return pid


def lazy_umount(mnt: os.PathLike | str) -> None:
    p = subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, text=True,
                       timeout=30)
    require(p.returncode == 0, f"fusermount3 -uz {mnt}: {p.stderr}")
    require(not is_mounted(mnt), f"{mnt} still mounted after fusermount3 -uz")


def image_clean_flag(image: os.PathLike | str) -> bool:
    out = cli("info", image).stdout
    require("state:" in out, f"daxfs info printed no state:\n{out}")
    return "state:          clean" in out


def _same_bytes(path: os.PathLike | str, data: bytes) -> bool:
    view = memoryview(data)
    with open(path, "rb") as f:
        for off in range(0, max(len(data), 1), 16 * MiB):
            chunk = f.read(16 * MiB)
            if chunk != view[off:off + 16 * MiB]:
                return False
        return f.read(1) == b""


def fsck_crashed(image: os.PathLike | str) -> subprocess.CompletedProcess:
    """fsck of an image whose daemon was killed, before it is mounted again: the journal makes
    such an image consistent, so the check (which replays the journal into a private mapping and
    never writes) must find no error: exit 0 (pending replay and the clean flag are notes).
    The image bytes must be unchanged by a plain check."""
    before = Path(image).read_bytes()
    p = cli("fsck", image, check=False)
    require(p.returncode == 0, f"fsck of the crashed image: {p.returncode}\n{p.stdout}{p.stderr}")
    require("Traceback" not in p.stderr, f"fsck of the crashed image:\n{p.stderr}")
    require(_same_bytes(image, before), "a plain fsck modified the image")
    return p


def stop_daemon(image: os.PathLike | str, mnt: os.PathLike | str | None = None) -> None:
    """Best effort cleanup: lazily unmount `mnt` and every mount of `image`, then stop the
    image's daemon (the holder of ITS lock, i.e. one we started): SIGTERM, then SIGKILL."""
    targets = [str(mnt)] if mnt is not None else []
    if os.path.exists(image):
        targets += [e.target for e in mounts_of_image(str(image))]
    for t in dict.fromkeys(targets):
        if is_mounted(t):
            subprocess.run(["fusermount3", "-u", "-z", t], capture_output=True, timeout=30)
    pid = lock_holder(os.path.realpath(image)) if os.path.exists(image) else None
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not pid or pid == os.getpid():
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if wait_unlocked(image, 15 if sig == signal.SIGTERM else 5):
            return


def log_problems(log: os.PathLike | str) -> list[str]:
    """ERROR/CRITICAL/Traceback lines of a daemon log (a missing log has none)."""
    try:
        text = Path(log).read_text(errors="replace")
    except FileNotFoundError:
        return []
    return [ln for ln in text.splitlines() if any(p in ln for p in LOG_PROBLEMS)]


def fsync_path(path: os.PathLike | str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_fsync(path: os.PathLike | str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view[:256 * 1024])
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)


def walk_read(root: Path) -> int:
    """lstat every name and read every regular file (no error allowed); returns bytes read."""
    total = 0

    def onerror(e):
        raise e

    for dirpath, _dirnames, filenames in os.walk(root, onerror=onerror):
        for name in filenames:
            p = os.path.join(dirpath, name)
            if stat.S_ISREG(os.lstat(p).st_mode):
                with open(p, "rb") as f:
                    while chunk := f.read(MiB):
                        total += len(chunk)
    return total


def still_works(mnt: Path) -> None:
    """After recovery: write+fsync, read back, clone with cp, COW-break the clone, delete."""
    data = os.urandom(MiB + 123)
    write_fsync(mnt / "probe", data)
    require((mnt / "probe").read_bytes() == data, "probe: read back differs")
    subprocess.run(["cp", str(mnt / "probe"), str(mnt / "probe.clone")], check=True, timeout=60)
    with open(mnt / "probe.clone", "r+b") as f:
        f.seek(5 * BS)
        f.write(b"cow" * 100)
        os.fsync(f.fileno())
    want = data[:5 * BS] + b"cow" * 100 + data[5 * BS + 300:]
    require((mnt / "probe.clone").read_bytes() == want, "probe.clone: COW write lost")
    require((mnt / "probe").read_bytes() == data, "probe: changed by a write into its clone")
    os.unlink(mnt / "probe")
    os.unlink(mnt / "probe.clone")


def remove_all(mnt: Path) -> None:
    for p in mnt.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def wait_free(mnt: Path, want: tuple[int, int], timeout: float = 10.0) -> None:
    """statvfs (free blocks, free inodes) back to `want` (unlinked inodes are freed when the
    kernel forgets them, which can lag a little)."""
    deadline = time.monotonic() + timeout
    while True:
        st = os.statvfs(mnt)
        got = (st.f_bfree, st.f_ffree)
        if got == want:
            return
        require(time.monotonic() < deadline, f"after deleting everything: (free blocks, free "
                f"inodes) = {got}, the fresh image had {want}")
        time.sleep(0.05)
