"""Security of what the CLI and the daemon create (issue 9, defects 7 and 8): the image is 0600
and its lock cannot be taken by a user who may not write it; no path the CLI or daemon creates
(image, default log, log=FILE, crash log) follows a planted symlink or FIFO, and logs are 0600."""
from __future__ import annotations

import errno
import os
import stat
import traceback
import uuid
from pathlib import Path

import pytest

from conftest import daxfs_cli, force_cleanup, have_fuse, have_root, is_mounted, umount
from daxfs.daemon import mounttab, safefiles

needs_fuse = pytest.mark.skipif(not have_fuse(), reason="needs /dev/fuse and fusermount3")
needs_root = pytest.mark.skipif(not have_root(), reason="needs root (to act as a second user)")
NOBODY = 65534
SHM = Path("/dev/shm")


def as_user(uid: int, fn) -> tuple[int, str]:
    """Run fn() in a forked child with uid/gid `uid`: (exit code, its error text). fn returns
    an int exit code (or raises: code 99 and the traceback)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            code = int(fn() or 0)
        except BaseException:                           # noqa: BLE001
            os.write(w, traceback.format_exc().encode())
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        text = f.read().decode()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), text


@pytest.fixture
def shm_image():
    """A 16 MiB image on /dev/shm (reachable by another user, unlike pytest's tmp dirs)."""
    path = SHM / f"daxfs-sec-{os.getpid()}-{uuid.uuid4().hex[:8]}.img"
    daxfs_cli("mkfs", path, "--size", "16M")
    yield str(path)
    force_cleanup(str(path))
    path.unlink(missing_ok=True)


# ------------------------------------------------------------------------- the image (7)

def test_mkfs_creates_the_image_0600(tmp_path):
    img = tmp_path / "a.img"
    daxfs_cli("mkfs", img, "--size", "16M")
    assert stat.S_IMODE(img.stat().st_mode) == 0o600


def test_mkfs_force_tightens_an_existing_files_mode(tmp_path):
    img = tmp_path / "a.img"
    img.write_bytes(b"x" * 100)
    img.chmod(0o644)
    daxfs_cli("mkfs", img, "--size", "16M", "--force")
    assert stat.S_IMODE(img.stat().st_mode) == 0o600


def test_in_process_make_image_is_0600(tmp_path):
    from daxfs.mkfs import make_image
    make_image(str(tmp_path / "b.img"), 16 << 20)
    assert stat.S_IMODE((tmp_path / "b.img").stat().st_mode) == 0o600


@needs_root
def test_other_user_cannot_read_the_image(shm_image):
    def read():
        try:
            os.open(shm_image, os.O_RDONLY)
        except PermissionError:
            return 0
        return 1
    code, err = as_user(NOBODY, read)
    assert code == 0, f"another user could open the image for reading {err}"


@needs_root
def test_lock_needs_write_access(shm_image):
    """Even on an image left world-readable (made before 0600), a user who cannot write it
    cannot take (or probe) its lock, so cannot block root's mount or fsck."""
    os.chmod(shm_image, 0o644)

    def lock():
        try:
            fd = mounttab.try_lock(shm_image)
        except PermissionError:
            pass
        else:
            os.close(fd)
            return 1
        return 0 if mounttab.is_locked(shm_image) is False else 2
    code, err = as_user(NOBODY, lock)
    assert code == 0, f"an unprivileged user took the image's lock (code {code}) {err}"


@needs_root
def test_is_locked_for_a_reader_uses_proc_locks(shm_image):
    """A reader's probe answers from /proc/locks: it sees root's lock without touching it."""
    os.chmod(shm_image, 0o644)
    fd = mounttab.try_lock(shm_image)
    assert fd is not None
    try:
        code, err = as_user(NOBODY, lambda: 0 if mounttab.is_locked(shm_image) else 1)
        assert code == 0, err
    finally:
        os.close(fd)


def test_fsck_and_mount_warn_about_an_exposed_image(tmp_path):
    img = tmp_path / "a.img"
    daxfs_cli("mkfs", img, "--size", "16M")
    img.chmod(0o644)
    p = daxfs_cli("fsck", img)
    assert "accessible to other users" in p.stderr and "chmod 600" in p.stderr
    img.chmod(0o600)
    assert "warning" not in daxfs_cli("fsck", img).stderr


# ------------------------------------------------------------------------- symlinks (8)

def test_mkfs_refuses_a_dangling_symlink(tmp_path):
    target = tmp_path / "elsewhere.img"
    link = tmp_path / "a.img"
    link.symlink_to(target)
    p = daxfs_cli("mkfs", link, "--size", "16M", check=False)
    assert p.returncode != 0 and "symbolic link" in p.stderr and "Traceback" not in p.stderr
    assert not target.exists(), "mkfs created the image at the symlink's target"


def test_mkfs_force_refuses_a_symlink_to_a_file(tmp_path):
    target = tmp_path / "precious"
    target.write_bytes(b"precious data")
    link = tmp_path / "a.img"
    link.symlink_to(target)
    p = daxfs_cli("mkfs", link, "--size", "16M", "--force", check=False)
    assert p.returncode != 0 and "symbolic link" in p.stderr
    assert target.read_bytes() == b"precious data"


def test_log_open_refuses_symlink_fifo_and_foreign_files(tmp_path):
    from daxfs.errors import UsageError
    victim = tmp_path / "victim"
    victim.write_bytes(b"")
    (tmp_path / "link.log").symlink_to(victim)
    with pytest.raises(UsageError, match="symbolic link"):
        safefiles.open_log(str(tmp_path / "link.log"))
    assert victim.read_bytes() == b""
    os.mkfifo(tmp_path / "fifo.log")
    with pytest.raises(UsageError, match="not a regular file|No such device"):  # no hang
        safefiles.open_log(str(tmp_path / "fifo.log"))
    if have_root():
        foreign = tmp_path / "foreign.log"
        foreign.write_bytes(b"")
        os.chown(foreign, NOBODY, NOBODY)
        with pytest.raises(UsageError, match="belongs to uid"):
            safefiles.open_log(str(foreign))
    fd = safefiles.open_log(str(tmp_path / "new.log"))
    os.close(fd)
    assert stat.S_IMODE((tmp_path / "new.log").stat().st_mode) == 0o600


def test_private_dir_is_verified(tmp_path, monkeypatch):
    from daxfs.errors import UsageError
    base = tmp_path / "base"
    base.mkdir()
    monkeypatch.setattr(safefiles, "_candidates", lambda: [str(base / "daxfs")])
    d = safefiles.private_dir()
    st = os.lstat(d)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
    assert st.st_uid == os.geteuid()
    os.chmod(d, 0o755)
    with pytest.raises(UsageError, match="accessible to other users"):
        safefiles.private_dir()
    os.rmdir(d)
    (base / "attacker").mkdir()
    (base / "daxfs").symlink_to(base / "attacker")
    with pytest.raises(UsageError, match="not a directory"):
        safefiles.private_dir()
    if have_root():
        (base / "daxfs").unlink()
        (base / "daxfs").mkdir(0o700)
        os.chown(base / "daxfs", NOBODY, NOBODY)
        with pytest.raises(UsageError, match="belongs to uid"):
            safefiles.private_dir()


def test_default_log_path_is_private():
    from daxfs.daemon import default_log_path
    p = Path(default_log_path("/some/dir/x.img"))
    assert p.name == "daxfs-x.img.log"
    st = p.parent.lstat()
    assert stat.S_ISDIR(st.st_mode) and not st.st_mode & 0o077 and st.st_uid == os.geteuid()
    assert not str(p.parent).rstrip("/") in ("/tmp", "/var/tmp")


def test_crash_log_does_not_follow_a_symlink(tmp_path, monkeypatch):
    from daxfs.cli import main as cli_main
    priv = tmp_path / "priv"
    priv.mkdir(0o700)
    monkeypatch.setattr(safefiles, "_candidates", lambda: [str(priv)])
    victim = tmp_path / "victim"
    victim.write_bytes(b"")
    (priv / cli_main.CRASH_LOG_NAME).symlink_to(victim)
    assert cli_main._crash_log(RuntimeError("boom")) == ""
    assert victim.read_bytes() == b""
    (priv / cli_main.CRASH_LOG_NAME).unlink()
    path = cli_main._crash_log(RuntimeError("boom"))
    assert path == str(priv / cli_main.CRASH_LOG_NAME)
    assert "boom" in Path(path).read_text()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


@needs_fuse
def test_mount_default_log_ignores_planted_tmp_symlink(tmp_path, shm_image):
    """The old default log /tmp/daxfs-<image>.log was a symlink target for any user: a mount
    without log= must not write there, and the log it does write is 0600 in a private dir."""
    from daxfs.daemon import default_log_path
    import tempfile
    name = os.path.basename(shm_image)
    planted = Path(tempfile.gettempdir()) / f"daxfs-{name}.log"
    victim = tmp_path / "victim"
    victim.write_bytes(b"")
    planted.symlink_to(victim)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        daxfs_cli("mount", shm_image, mnt)
        assert is_mounted(mnt)
        umount(mnt)
        assert victim.read_bytes() == b"", "the daemon wrote its log through a planted symlink"
        log = Path(default_log_path(shm_image))
        assert "daemon starting" in log.read_text()
        assert stat.S_IMODE(log.stat().st_mode) == 0o600
        log.unlink()
    finally:
        planted.unlink(missing_ok=True)
        force_cleanup(shm_image, mnt)


@needs_fuse
def test_mount_log_option_refuses_a_symlink(tmp_path, shm_image):
    victim = tmp_path / "victim"
    victim.write_bytes(b"")
    (tmp_path / "x.log").symlink_to(victim)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for fg in ([], ["-f"]):
        p = daxfs_cli("mount", shm_image, mnt, *fg, "-o", f"log={tmp_path / 'x.log'}",
                      check=False, timeout=30)
        assert p.returncode != 0 and "symbolic link" in p.stderr, p.stderr
        assert "Traceback" not in p.stderr
        assert not is_mounted(mnt)
    assert victim.read_bytes() == b""
