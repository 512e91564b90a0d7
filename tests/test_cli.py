"""The `daxfs` command line: every bad input gives one clear line on stderr, a non-zero exit
status and leaves the image bytes alone; mount/umount/SIGTERM/stale-mount/mount(8) work for real."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import (DAXFS, daemon_log, daxfs_cli, force_cleanup, have_fuse, have_root,
                      is_mounted, mount, remount, sha256, umount, wait_unlocked)
from daxfs import format as fmt
from daxfs.daemon import (_unmangle, fuse_opt_escape, lock_holder, parse_mount_options)
from daxfs.errors import UsageError

needs_fuse = pytest.mark.skipif(not have_fuse(), reason="needs /dev/fuse and fusermount3")
needs_root = pytest.mark.skipif(not have_root(), reason="needs root")


def one_line_error(p: subprocess.CompletedProcess, *needles: str, code: int | None = None) -> str:
    """Assert a failed run reported exactly one 'daxfs: ...' line naming the problem."""
    assert p.returncode != 0, f"expected failure, got 0; stdout={p.stdout!r} stderr={p.stderr!r}"
    if code is not None:
        assert p.returncode == code, p.stderr
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {p.stderr!r}"
    assert lines[0].startswith("daxfs: "), lines[0]
    for n in needles:
        assert n.lower() in lines[0].lower(), f"{n!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture
def small_image(tmp_path):
    """A 16 MiB image in tmp_path (cheap to hash); its path as str."""
    path = tmp_path / "small.img"
    daxfs_cli("mkfs", path, "--size", "16M")
    return str(path)


def wait_stale(path, timeout: float = 10.0) -> bool:
    """Wait until stat(path) fails with ENOTCONN (the daemon of a mount there has died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.stat(path)
        except OSError as e:
            if e.errno == errno.ENOTCONN:
                return True
            raise
        time.sleep(0.02)
    return False


def superblock(path) -> np.void:
    with open(path, "rb") as f:
        raw = f.read(fmt.BLOCK_SIZE)
    sb, _ = fmt.parse_superblock(raw, os.path.getsize(path))
    return sb


def rewrite_superblock(path, **fields) -> None:
    """Set superblock fields and recompute the checksum (a well-formed but different image)."""
    with open(path, "r+b") as f:
        raw = bytearray(f.read(fmt.SUPERBLOCK_DTYPE.itemsize))
        sb = np.frombuffer(bytes(raw), fmt.SUPERBLOCK_DTYPE)[0].copy()
        for k, v in fields.items():
            sb[k] = v
        sb["checksum"] = fmt.superblock_checksum(sb)
        f.seek(0)
        f.write(sb.tobytes())


# ---------------------------------------------------------------------------------------------
# command line basics

def test_no_command():
    one_line_error(daxfs_cli(check=False), "no command", code=2)


def test_unknown_command():
    one_line_error(daxfs_cli("frobnicate", check=False), "frobnicate", code=2)


def test_missing_argument():
    one_line_error(daxfs_cli("mkfs", check=False), "IMAGE", code=2)


def test_help_and_version():
    p = daxfs_cli("--help")
    for cmd in ("mkfs", "mount", "umount", "fsck", "info"):
        assert cmd in p.stdout
    assert "daxfs" in daxfs_cli("--version").stdout
    assert "allow_other" in daxfs_cli("mount", "--help").stdout


def test_mount_options_parsing():
    mo = parse_mount_options(["rw,nosuid,nodev,allow_other", "ro,debug,x-systemd.automount",
                              "min_tasks=3,max_tasks=7,defaults,_netdev,default_permissions"])
    assert (mo.allow_other, mo.ro, mo.debug, mo.min_tasks, mo.max_tasks) == (True, True, True, 3, 7)
    assert mo.default_permissions
    opts = mo.fuse_options("/x/y.img")
    assert {"fsname=/x/y.img", "subtype=daxfs", "default_permissions", "allow_other", "ro",
            "debug"} <= opts
    assert "noexec" not in opts
    assert "noexec" in parse_mount_options(["user,noexec"]).fuse_options("/i")
    assert "noexec" not in parse_mount_options(["noexec,exec"]).fuse_options("/i")
    assert parse_mount_options(None).spin_us == 50
    assert parse_mount_options(["spin_us=0"]).spin_us == 0
    for bad in ("bogus", "ro=1", "min_tasks=x", "min_tasks=0", "min_tasks=5,max_tasks=2", "log=",
                "spin_us=-1", "spin_us=2000000", "spin_us=fast"):
        with pytest.raises(UsageError):
            parse_mount_options([bad])


def test_fsname_escaping_roundtrip():
    name = "/dev/shm/a b,c\\d\u00e9.img"
    esc = fuse_opt_escape(name)
    assert "," not in esc and " " in esc and esc.isascii()
    assert _unmangle("/dev/shm/a\\040b,c\\134d\u00e9.img") == name


# ---------------------------------------------------------------------------------------------
# mkfs

def test_mkfs_and_info(tmp_path):
    img = tmp_path / "a.img"
    p = daxfs_cli("mkfs", img, "--size", "64M", "--inodes", "1000")
    assert "created" in p.stdout and p.stderr == ""
    assert img.stat().st_size == 64 << 20
    sb = superblock(img)
    assert int(sb["clean"]) == 1 and int(sb["inode_count"]) == 1000

    out = daxfs_cli("info", img).stdout
    assert "format version: 1" in out
    assert "state:          clean" in out
    assert "mounted:        no" in out
    assert "block size:     4096" in out
    assert f"blocks:         {(64 << 20) // 4096} " in out
    assert "inodes:         1 used of 999" in out
    assert "data blocks:    0 used" in out
    for region in ("superblock", "journal", "inodes", "dirents", "extents", "refcounts", "data"):
        assert region in out

    d = json.loads(daxfs_cli("info", img, "--json").stdout)
    _, g = fmt.parse_superblock(img.read_bytes()[:4096], img.stat().st_size)
    assert d["blocks"] == g.nblocks and d["version"] == fmt.VERSION and d["clean"] is True
    assert d["regions"]["data"] == {"start": g.data_start, "blocks": g.data_blocks}
    assert d["regions"]["inodes"]["start"] == g.inode_start
    assert d["data_free"] == g.data_blocks and d["data_used"] == 0
    assert d["inodes_used"] == 1 and d["inode_count"] == 1000
    assert d["uuid"].count("-") == 4


def test_mkfs_default_size(tmp_path):
    img = tmp_path / "d.img"
    daxfs_cli("mkfs", img)
    assert img.stat().st_size == 1 << 30


def test_mkfs_refuses_existing_image(small_image):
    before = sha256(small_image)
    one_line_error(daxfs_cli("mkfs", small_image, "--size", "16M", check=False), "--force")
    assert sha256(small_image) == before
    daxfs_cli("mkfs", small_image, "--size", "32M", "--force")
    assert os.path.getsize(small_image) == 32 << 20
    assert sha256(small_image) != before


def test_mkfs_refuses_other_file(tmp_path):
    f = tmp_path / "precious.txt"
    f.write_bytes(b"precious data\n" * 100)
    one_line_error(daxfs_cli("mkfs", f, "--size", "16M", check=False), "non-empty file", "--force")
    assert f.read_bytes() == b"precious data\n" * 100


@pytest.mark.parametrize("size", ["1M", "4096", "0", "-5G"])
def test_mkfs_size_too_small(tmp_path, size):
    img = tmp_path / "small.img"
    one_line_error(daxfs_cli("mkfs", img, "--size", size, check=False), "size")
    assert not img.exists()


def test_mkfs_bad_size(tmp_path):
    img = tmp_path / "x.img"
    one_line_error(daxfs_cli("mkfs", img, "--size", "lots", check=False), "invalid size", "lots")
    assert not img.exists()


def test_mkfs_missing_directory(tmp_path):
    one_line_error(daxfs_cli("mkfs", tmp_path / "no" / "such" / "x.img", check=False),
                   "cannot create", "No such file or directory")


def test_mkfs_onto_directory(tmp_path):
    one_line_error(daxfs_cli("mkfs", tmp_path, "--size", "16M", check=False), str(tmp_path))


@contextlib.contextmanager
def tmpfs_at(path: Path, options: str):
    """A tmpfs mounted at `path` (created) for the duration; skips the test where it cannot."""
    path.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs ({options}) here: {p.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@needs_root
def test_mkfs_read_only_filesystem(tmp_path):
    with tmpfs_at(tmp_path / "ro", "ro,size=1M") as ro:
        one_line_error(daxfs_cli("mkfs", ro / "x.img", "--size", "16M", check=False),
                       "Read-only file system", str(ro / "x.img"))


@needs_root
def test_mkfs_reserves_the_space_and_says_when_the_host_has_too_little(tmp_path):
    """A store into a hole the host filesystem cannot fill is a SIGBUS in the daemon, so mkfs
    reserves the whole image; where that does not fit it says so and leaves nothing behind."""
    with tmpfs_at(tmp_path / "small", "size=16M") as small:
        one_line_error(daxfs_cli("mkfs", small / "big.img", "--size", "64M", check=False),
                       "cannot reserve", "No space left on device")
        assert not (small / "big.img").exists()
        assert os.statvfs(small).f_bfree * os.statvfs(small).f_frsize >= 15 << 20
        daxfs_cli("mkfs", small / "fits.img", "--size", "8M")
        assert os.stat(small / "fits.img").st_blocks * 512 >= 8 << 20      # reserved
        os.unlink(small / "fits.img")
        daxfs_cli("mkfs", small / "sparse.img", "--size", "64M", "--sparse")
        assert os.stat(small / "sparse.img").st_blocks * 512 < 1 << 20


def test_mkfs_permission_denied_sysfs():
    # /sys refuses file creation even for root
    one_line_error(daxfs_cli("mkfs", "/sys/daxfs-test.img", "--size", "16M", check=False),
                   "cannot create")


# ---------------------------------------------------------------------------------------------
# info / fsck on bad input

def test_info_not_daxfs(tmp_path):
    f = tmp_path / "junk"
    f.write_bytes(os.urandom(8192))
    one_line_error(daxfs_cli("info", f, check=False), "not a daxfs image")


def test_info_missing():
    one_line_error(daxfs_cli("info", "/nonexistent/x.img", check=False), "no such")


def test_fsck_missing_image():
    one_line_error(daxfs_cli("fsck", "/nonexistent/x.img", check=False), "no such", code=8)


def test_fsck_exit_codes(small_image, tmp_path):
    p = daxfs_cli("fsck", small_image, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    junk = tmp_path / "junk.img"
    junk.write_bytes(b"x" * 100000)
    p = daxfs_cli("fsck", junk, check=False)
    assert p.returncode == 8 and "Traceback" not in p.stderr and p.stderr.strip()


# ---------------------------------------------------------------------------------------------
# mount: refused before anything happens (image bytes unchanged, nothing mounted)

def _corrupt_not_daxfs(path):
    with open(path, "r+b") as f:
        f.write(b"NOTDAXFS")


def _corrupt_truncate(path):
    os.truncate(path, os.path.getsize(path) // 2)


def _corrupt_flip(path):
    off = fmt.SUPERBLOCK_DTYPE.fields["uuid"][1] + 3
    with open(path, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0x40]))


def _corrupt_newer(path):
    rewrite_superblock(path, version=fmt.VERSION + 1)


def _corrupt_empty(path):
    os.truncate(path, 0)


@pytest.mark.parametrize("corrupt,needles", [
    (_corrupt_not_daxfs, ["not a daxfs image"]),
    (_corrupt_truncate, ["truncated"]),
    (_corrupt_flip, ["checksum"]),
    (_corrupt_newer, ["version", "newer"]),
    (_corrupt_empty, ["not a daxfs image"]),
], ids=["not-daxfs", "truncated", "flipped-byte", "newer-version", "empty"])
def test_mount_refuses_bad_image(small_image, mnt, corrupt, needles):
    corrupt(small_image)
    before = sha256(small_image)
    line = one_line_error(daxfs_cli("mount", small_image, mnt, check=False), *needles)
    assert small_image in line
    assert sha256(small_image) == before
    assert not is_mounted(mnt)
    # the same for info
    one_line_error(daxfs_cli("info", small_image, check=False), *needles)


@needs_fuse
def test_mount_refuses_corrupt_journal(small_image, mnt):
    """Caught by FileSystem.open in the daemon (the superblock is fine): the reason still comes
    back through the handshake as one line, and nothing is written or mounted."""
    _, g = fmt.parse_superblock(open(small_image, "rb").read(4096), os.path.getsize(small_image))
    with open(small_image, "r+b") as f:
        f.seek(g.journal_start * fmt.BLOCK_SIZE)
        f.write(b"GARBAGE!")
    before = sha256(small_image)
    one_line_error(daxfs_cli("mount", small_image, mnt, "-o", f"log={daemon_log(mnt)}",
                             check=False), small_image, "journal")
    assert sha256(small_image) == before
    assert not is_mounted(mnt)
    assert lock_holder(small_image) is None


def test_mount_missing_image(tmp_path, mnt):
    one_line_error(daxfs_cli("mount", tmp_path / "nope.img", mnt, check=False), "no such")
    assert not is_mounted(mnt)


def test_mount_directory_as_image(tmp_path, mnt):
    one_line_error(daxfs_cli("mount", tmp_path, mnt, check=False), "directory")


def test_mount_missing_mountpoint(small_image, tmp_path):
    before = sha256(small_image)
    one_line_error(daxfs_cli("mount", small_image, tmp_path / "nope", check=False),
                   "does not exist", str(tmp_path / "nope"))
    assert sha256(small_image) == before


def test_mount_mountpoint_not_a_directory(small_image, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    before = sha256(small_image)
    one_line_error(daxfs_cli("mount", small_image, f, check=False), "not a directory")
    assert sha256(small_image) == before


def test_mount_nonempty_mountpoint(small_image, mnt):
    (mnt / "something").write_text("x")
    before = sha256(small_image)
    one_line_error(daxfs_cli("mount", small_image, mnt, check=False), "not empty", str(mnt))
    assert sha256(small_image) == before
    assert not is_mounted(mnt)


def test_mount_unknown_option(small_image, mnt):
    before = sha256(small_image)
    one_line_error(daxfs_cli("mount", small_image, mnt, "-o", "rw,frobnicate", check=False),
                   "unknown mount option", "frobnicate")
    assert sha256(small_image) == before


def test_umount_not_mounted(tmp_path):
    one_line_error(daxfs_cli("umount", tmp_path, check=False), "not mounted")


def test_umount_missing(tmp_path):
    one_line_error(daxfs_cli("umount", tmp_path / "nope", check=False), "no such")


def test_umount_not_daxfs():
    # /proc is mounted, but it is not ours
    one_line_error(daxfs_cli("umount", "/proc", check=False), "not a daxfs mount")


# ---------------------------------------------------------------------------------------------
# real mounts

@needs_fuse
def test_mount_write_umount_remount(mounted, image):
    (mounted / "hello.txt").write_text("hello daxfs\n")
    (mounted / "dir").mkdir()
    info = daxfs_cli("info", image).stdout
    assert "dirty" in info and "mounted:        yes" in info and str(mounted) in info
    assert int(superblock(image)["clean"]) == 0
    remount(image, mounted)
    assert (mounted / "hello.txt").read_text() == "hello daxfs\n"
    assert (mounted / "dir").is_dir()
    st = os.statvfs(mounted)
    assert st.f_bsize == 4096 or st.f_frsize == 4096
    with open("/proc/mounts") as f:
        line = next(ln for ln in f if f" {mounted} " in ln)
    assert line.split()[0] == image and line.split()[2] == "fuse.daxfs"
    assert "default_permissions" in line


@needs_fuse
def test_umount_leaves_image_clean(image, mnt):
    mount(image, mnt)
    (mnt / "f").write_bytes(b"x" * 10000)
    daxfs_cli("umount", mnt)
    assert not is_mounted(mnt)
    assert lock_holder(image) is None            # daemon gone when umount returns
    sb = superblock(image)
    assert int(sb["clean"]) == 1 and int(sb["mount_count"]) == 1
    d = json.loads(daxfs_cli("info", image, "--json").stdout)
    assert d["clean"] and not d["mounted"] and d["inodes_used"] == 2 and d["data_used"] >= 3


@needs_fuse
def test_second_mount_refused(mounted, image, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    pid = lock_holder(image)
    assert pid
    before_sb = superblock(image).tobytes()
    line = one_line_error(daxfs_cli("mount", image, other, check=False), "already mounted")
    assert f"pid {pid}" in line
    assert not is_mounted(other)
    # onto the same mountpoint as well
    one_line_error(daxfs_cli("mount", image, mounted, check=False), "already mounted")
    assert superblock(image).tobytes() == before_sb
    # and mkfs --force / fsck refuse a mounted image
    one_line_error(daxfs_cli("mkfs", image, "--size", "256M", "--force", check=False),
                   "already mounted")
    one_line_error(daxfs_cli("fsck", image, check=False), "mounted", code=8)
    assert (mounted / ".").is_dir()              # the first mount is unharmed


@needs_fuse
def test_daxfs_umount_by_image_path(image, mnt):
    mount(image, mnt)
    daxfs_cli("umount", image)
    assert not is_mounted(mnt) and lock_holder(image) is None


@needs_fuse
def test_umount_busy(mounted):
    f = open(mounted / "busy", "w")
    try:
        one_line_error(daxfs_cli("umount", mounted, check=False), "busy")
        assert is_mounted(mounted)
    finally:
        f.close()


@needs_fuse
def test_sigterm_unmounts_cleanly(image, mnt):
    mount(image, mnt)
    (mnt / "data").write_bytes(os.urandom(50000))
    pid = lock_holder(image)
    assert pid and pid != os.getpid()
    os.kill(pid, signal.SIGTERM)
    assert wait_unlocked(image, 30), "daemon did not exit after SIGTERM"
    deadline = time.monotonic() + 10
    while is_mounted(mnt) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not is_mounted(mnt)
    assert int(superblock(image)["clean"]) == 1
    assert "state:          clean" in daxfs_cli("info", image).stdout
    log = daemon_log(mnt).read_text()
    assert "signal 15" in log and "closed" in log
    mount(image, mnt)
    assert len((mnt / "data").read_bytes()) == 50000
    umount(mnt)


@needs_fuse
def test_stale_mount_is_cleaned_up(image, mnt):
    mount(image, mnt)
    (mnt / "kept").write_text("survives a crash\n")
    pid = lock_holder(image)
    os.kill(pid, signal.SIGKILL)
    assert wait_unlocked(image, 10)
    assert wait_stale(mnt)
    assert int(superblock(image)["clean"]) == 0
    p = daxfs_cli("mount", image, mnt, "-o", f"log={daemon_log(mnt)}")
    assert "stale" in p.stderr and "Traceback" not in p.stderr
    assert (mnt / "kept").read_text() == "survives a crash\n"
    # and a stale mount given to umount
    os.kill(lock_holder(image), signal.SIGKILL)
    assert wait_unlocked(image, 10)
    assert wait_stale(mnt)
    p = daxfs_cli("umount", mnt)
    assert "stale" in p.stderr
    assert not is_mounted(mnt)
    mount(image, mnt)                # recovers again
    assert (mnt / "kept").read_text() == "survives a crash\n"
    umount(mnt)


@needs_fuse
def test_mount_read_only(image, mnt):
    mount(image, mnt)
    (mnt / "f").write_text("x")
    umount(mnt)
    before = sha256(image)
    mount(image, mnt, "-o", "ro")
    assert (mnt / "f").read_text() == "x"
    with pytest.raises(OSError) as ei:
        (mnt / "g").write_text("y")
    assert ei.value.errno == errno.EROFS
    umount(mnt)
    assert sha256(image) == before


@needs_fuse
def test_foreground_mount(image, mnt, tmp_path):
    logf = tmp_path / "fg.log"
    proc = subprocess.Popen([str(DAXFS), "mount", "-f", image, str(mnt)],
                            stdout=subprocess.PIPE, stderr=open(logf, "w"), text=True)
    try:
        deadline = time.monotonic() + 30
        while not is_mounted(mnt):
            assert proc.poll() is None, f"foreground mount exited: {logf.read_text()}"
            assert time.monotonic() < deadline, "foreground mount did not come up"
            time.sleep(0.05)
        (mnt / "fg").write_text("fg")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0, logf.read_text()
        assert not is_mounted(mnt)
        assert int(superblock(image)["clean"]) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        force_cleanup(image, mnt)


@needs_fuse
@needs_root
def test_mount_helper_form(image, mnt):
    """`mount -t fuse.daxfs IMAGE MNT -o OPTS` -> mount.fuse3 -> `daxfs IMAGE MNT -o OPTS`."""
    if shutil.which("mount.fuse3", path="/sbin:/usr/sbin") is None:
        pytest.skip("mount.fuse3 (fuse3 package) not installed")
    helper = shutil.which("daxfs", path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    if helper is None or Path(helper).resolve() != DAXFS.resolve():
        pytest.skip(f"mount(8) finds no daxfs of this venv on its PATH: "
                    f"run `ln -sf {DAXFS} /usr/local/bin/daxfs` (make setup does)")
    # also the direct helper form
    daxfs_cli(image, mnt, "-o", f"rw,nosuid,nodev,log={daemon_log(mnt)}")
    assert is_mounted(mnt)
    umount(mnt)
    p = subprocess.run(["mount", "-t", "fuse.daxfs", image, str(mnt), "-o",
                        f"allow_other,noexec,nosuid,nodev,log={daemon_log(mnt)}"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    try:
        assert is_mounted(mnt)
        (mnt / "via-mount").write_text("ok")
        with open("/proc/mounts") as f:
            line = next(ln for ln in f if f" {mnt} " in ln)
        assert "allow_other" in line and line.split()[2] == "fuse.daxfs"
        assert "noexec" in line.split()[3].split(",")
    finally:
        p = subprocess.run(["umount", str(mnt)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert wait_unlocked(image)
    assert int(superblock(image)["clean"]) == 1
    # a bad image through mount(8): the one-line reason comes through, nothing mounted
    with open(image, "r+b") as f:
        f.write(b"NOTDAXFS")
    p = subprocess.run(["mount", "-t", "fuse.daxfs", image, str(mnt)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "not a daxfs image" in p.stderr and "Traceback" not in p.stderr
    assert not is_mounted(mnt)


@needs_fuse
def test_info_on_mounted_image(mounted, image):
    (mounted / "a").write_bytes(b"y" * 8192)
    os.sync()
    d = json.loads(daxfs_cli("info", image, "--json").stdout)
    assert d["mounted"] and d["mounted_on"] == str(mounted) and d["daemon_pid"] == lock_holder(image)
    assert not d["clean"]
