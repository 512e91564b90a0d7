"""Shared pytest fixtures and helpers.

- `daxfs_cli(*args, check=True)`: run the venv's `daxfs` executable (CompletedProcess, text mode).
- `image` fixture: a fresh 256 MiB image on /dev/shm (made with `daxfs mkfs`), removed afterwards.
- `mounted` fixture: the mountpoint (Path) of a live mount of `image`; teardown unmounts with
  `daxfs umount`, requires `daxfs fsck IMAGE` to exit 0, and in any case makes sure the mount and
  its daemon are gone so later tests cannot hang.
- No traceback anywhere: `umount()` and the `mounted` fixture fail the test when the daemon log that
  `mount()` made (`daemon_log(mnt)`) contains "Traceback" (`check_daemon_log`).
- `remount(image, mnt)`: `daxfs umount` + `daxfs mount` again.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

DAXFS = Path(sys.executable).parent / "daxfs"
CLI_TIMEOUT = 120
IMAGE_SIZE = "256M"
SHM = Path("/dev/shm")


def daxfs_cli(*args, check: bool = True, timeout: float = CLI_TIMEOUT, env: dict | None = None,
              input: str | None = None) -> subprocess.CompletedProcess:
    """Run `daxfs ARGS...`; with check=True a non-zero exit fails the test with its output."""
    cmd = [str(DAXFS), *map(str, args)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, input=input)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited with {p.returncode}\n"
                             f"--- stdout:\n{p.stdout}--- stderr:\n{p.stderr}")
    return p


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def is_mounted(mnt) -> bool:
    from daxfs.daemon import find_mount
    return find_mount(os.path.realpath(mnt)) is not None


def _image_daemon(image) -> int | None:
    from daxfs.daemon import lock_holder
    return lock_holder(str(image)) if os.path.exists(image) else None


def wait_unlocked(image, timeout: float = 30.0) -> bool:
    """Wait until nobody holds the image's lock (its daemon has exited)."""
    from daxfs.daemon import is_locked
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not os.path.exists(image) or not is_locked(str(image)):
            return True
        time.sleep(0.05)
    return False


def force_cleanup(image, mnt=None) -> None:
    """Best effort: lazily unmount `mnt` (and any mount of `image`) and stop the image's daemon.
    Only ever signals the pid that holds this image's lock, i.e. a daemon a test started."""
    from daxfs.daemon import mounts_of_image
    targets = [str(mnt)] if mnt is not None else []
    if image is not None and os.path.exists(image):
        targets += [e.target for e in mounts_of_image(str(image))]
    for t in dict.fromkeys(targets):
        if is_mounted(t):
            subprocess.run(["fusermount3", "-u", "-z", t], capture_output=True, timeout=30)
    if image is None or not os.path.exists(image):
        return
    pid = _image_daemon(image)
    if pid and pid != os.getpid():
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        if not wait_unlocked(image, 15):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            wait_unlocked(image, 5)


def daemon_log(mnt) -> Path:
    """Where `mount()` makes the daemon log: a file beside the mountpoint (in pytest's tmp dir)."""
    return Path(f"{mnt}.daxfs.log")


def mount(image, mnt, *opts: str) -> None:
    """`daxfs mount IMAGE MNT [opts...]` (daemon log in `daemon_log(mnt)` unless opts name one),
    failing the test if it does not succeed."""
    if not any("log=" in o for o in opts):
        opts = (*opts, "-o", f"log={daemon_log(mnt)}")
    daxfs_cli("mount", image, mnt, *opts)
    assert is_mounted(mnt), f"daxfs mount returned 0 but {mnt} is not in /proc/mounts"


def umount(mnt) -> None:
    daxfs_cli("umount", mnt)
    assert not is_mounted(mnt), f"daxfs umount returned 0 but {mnt} is still mounted"
    check_daemon_log(mnt)


def check_daemon_log(mnt) -> None:
    """Fail if the daemon log `mount()` made for `mnt` holds a Python traceback: every error a
    request meets must become an errno (and at most a one-line log message), never a crash."""
    path = daemon_log(mnt)
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return
    i = text.find("Traceback")
    if i >= 0:
        start = text.rfind("\n", 0, max(0, i - 300)) + 1
        raise AssertionError(f"the daemon log {path} contains a traceback:\n"
                             f"{text[start:i + 3000]}")


def finish_mount(image, mnt) -> None:
    """The end of a test's mount: unmount, the daemon gone, no traceback in its log, fsck
    clean."""
    if is_mounted(mnt):
        umount(mnt)
    assert wait_unlocked(image), f"the daemon of {image} did not exit after umount"
    check_daemon_log(mnt)
    check_fsck(image)


def remount(image, mnt, *opts: str) -> Path:
    """Unmount and mount again (everything must survive); returns the mountpoint."""
    umount(mnt)
    mount(image, mnt, *opts)
    return Path(mnt)


def check_fsck(image) -> None:
    """`daxfs fsck IMAGE` must exit 0."""
    p = daxfs_cli("fsck", image, check=False)
    assert p.returncode == 0, (f"daxfs fsck {image} exited {p.returncode}\n"
                               f"--- stdout:\n{p.stdout}--- stderr:\n{p.stderr}")


def fresh_image(tmp_path_factory, size: str = IMAGE_SIZE, tag: str = "test"):
    """Generator for image fixtures: yields the path (str) of a new image made by `daxfs mkfs`
    on /dev/shm (else a temp dir); afterwards stops whatever still serves it and removes it."""
    base = SHM if SHM.is_dir() and os.access(SHM, os.W_OK) else tmp_path_factory.mktemp("img")
    path = base / f"daxfs-{tag}-{os.getpid()}-{uuid.uuid4().hex[:12]}.img"
    daxfs_cli("mkfs", path, "--size", size)
    try:
        yield str(path)
    finally:
        try:
            force_cleanup(str(path))
        finally:
            path.unlink(missing_ok=True)


@pytest.fixture
def image(tmp_path_factory):
    """Path (str) of a fresh 256 MiB daxfs image on /dev/shm; removed afterwards."""
    yield from fresh_image(tmp_path_factory)


@pytest.fixture
def mounted(image, tmp_path):
    """Mountpoint (Path) of a live mount of `image`; unmounted and fsck'ed afterwards."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        mount(image, mnt)
    except BaseException:
        force_cleanup(image, mnt)
        raise
    try:
        yield mnt
        finish_mount(image, mnt)
    finally:
        if is_mounted(mnt) or _image_daemon(image):
            force_cleanup(image, mnt)


@pytest.fixture
def mnt(tmp_path):
    """An empty mountpoint directory; lazily unmounted afterwards if a test left it mounted."""
    m = tmp_path / "mnt"
    m.mkdir()
    yield m
    if is_mounted(m):
        subprocess.run(["fusermount3", "-u", "-z", str(m)], capture_output=True, timeout=30)


def have_root() -> bool:
    return os.geteuid() == 0


def have_fuse() -> bool:
    return os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None


# --- engine fixtures (lead) ---


@pytest.fixture
def tmp_image():
    """A fresh 64 MiB image on /dev/shm for in-process engine tests."""
    from daxfs.mkfs import make_image
    path = f"/dev/shm/daxfs-engine-{os.getpid()}-{next(_engine_seq)}.img"
    make_image(path, 64 << 20, force=True)
    yield path
    os.unlink(path)


@pytest.fixture
def tmp_image_small():
    """The smallest image mkfs accepts (8 MiB), to hit ENOSPC quickly."""
    from daxfs.mkfs import make_image
    path = f"/dev/shm/daxfs-small-{os.getpid()}-{next(_engine_seq)}.img"
    make_image(path, 8 << 20, force=True)
    yield path
    os.unlink(path)


_engine_seq = __import__("itertools").count()
