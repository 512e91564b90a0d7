"""Crash safety on a real mount: the daemon is killed with SIGKILL (no chance to commit, checkpoint
or mark the image clean), the dead mount is lazily detached, the image is mounted again (journal
replay, orphan recovery) and checked: what was fsync'ed is there, `daxfs fsck` is clean, the
tree is readable, and the recovered filesystem keeps working (and gives all space back).

The daemon is found as the holder of the image's flock (/proc/locks, as `daxfs` itself does),
cross-checked against /proc/PID/fd: the process must have both the image and /dev/fuse open.
"""
from __future__ import annotations

import errno
import hashlib
import os
import random
import stat
import subprocess
import time

import pytest

from conftest import (check_fsck, daemon_log, daxfs_cli, force_cleanup, have_fuse,
                      is_mounted, mount, sha256, umount, wait_unlocked)
from harness.kill_models import check_partial_copy, make_small_tree
from harness.kill_mount import (fsck_crashed, fsync_path, image_clean_flag, kill9, lazy_umount,
                                write_fsync)

pytestmark = pytest.mark.skipif(not have_fuse(), reason="needs /dev/fuse and fusermount3")

MiB = 1 << 20


# ---------------------------------------------------------------------------------------------
# helpers: daemon_pid, kill9, lazy_umount, fsck_crashed, ... live in tests/harness/kill_mount.py
# (imported above), shared with tests/test_mount_kill.py

@pytest.fixture
def mnt(image, tmp_path):
    m = tmp_path / "mnt"
    m.mkdir()
    yield m
    force_cleanup(image, m)          # fusermount3 -u -z and stop our daemon if still there


# ---------------------------------------------------------------------------------------------
# kill -9 after fsync'ed work

def test_kill9_after_fsync_keeps_everything_synced(image, mnt):
    rng = random.Random(5)
    mount(image, mnt)
    expected: dict[str, bytes] = {}          # relative path -> content
    gone: list[str] = []
    m = mnt

    # 1. plain files, each fsync'ed, then the directory
    (m / "plain").mkdir()
    for i, size in enumerate([0, 1, 4095, 4096, 4097, 65541, MiB, 3 * MiB + 7]):
        data = rng.randbytes(size)
        write_fsync(m / f"plain/f{i}", data)
        expected[f"plain/f{i}"] = data
    fsync_path(m / "plain")
    # 2. atomic replace: old version fsync'ed, new one written + fsync'ed, renamed over, dir fsync
    (m / "replace").mkdir()
    for i in range(6):
        write_fsync(m / f"replace/t{i}", b"old version %d\n" % i * (i * 500 + 1))
        new = rng.randbytes(rng.randrange(1, 70000))
        write_fsync(m / f"replace/.t{i}.tmp", new)
        os.rename(m / f"replace/.t{i}.tmp", m / f"replace/t{i}")
        expected[f"replace/t{i}"] = new
        gone.append(f"replace/.t{i}.tmp")
    fsync_path(m / "replace")
    # 3. a directory tree, files fsync'ed, every directory fsync'ed bottom-up
    os.makedirs(m / "tree/a/b/c")
    os.makedirs(m / "tree/x/y")
    for d in ("tree", "tree/a", "tree/a/b", "tree/a/b/c", "tree/x", "tree/x/y"):
        for j in range(3):
            data = rng.randbytes(rng.randrange(0, 20000))
            write_fsync(m / d / f"file{j}", data)
            expected[f"{d}/file{j}"] = data
    for d in ("tree/a/b/c", "tree/a/b", "tree/a", "tree/x/y", "tree/x", "tree", "."):
        fsync_path(m / d)
    # 4. overwrite in place (no size change), fsync
    data = bytearray(expected["plain/f6"])
    patch = rng.randbytes(10000)
    with open(m / "plain/f6", "r+b") as f:
        f.seek(300000)
        f.write(patch)
        f.flush()
        os.fsync(f.fileno())
    data[300000:310000] = patch
    expected["plain/f6"] = bytes(data)
    mtime_f6 = os.stat(m / "plain/f6").st_mtime_ns       # an in-place write changes only times
    # 5. truncate shrink and grow, fsync
    with open(m / "plain/f7", "r+b") as f:
        f.truncate(1234567)
        os.fsync(f.fileno())
    expected["plain/f7"] = expected["plain/f7"][:1234567]
    with open(m / "plain/f4", "r+b") as f:
        f.truncate(100000)
        f.seek(50000)
        f.write(b"after the hole")
        os.fsync(f.fileno())
    expected["plain/f4"] = (expected["plain/f4"] + bytes(50000 - 4097) + b"after the hole"
                            + bytes(100000 - 50000 - 14))
    # 6. unlink and rmdir, dir fsync
    os.unlink(m / "plain/f1")
    del expected["plain/f1"]
    gone.append("plain/f1")
    os.mkdir(m / "tree/empty")
    fsync_path(m / "tree")
    os.rmdir(m / "tree/empty")
    gone.append("tree/empty")
    fsync_path(m / "tree")
    # 7. xattr, hard link, symlink, chmod, utime -- each followed by fsync
    os.setxattr(m / "plain/f2", "user.crash", b"xattr value")
    fsync_path(m / "plain/f2")
    os.link(m / "plain/f3", m / "tree/hard")
    expected["tree/hard"] = expected["plain/f3"]
    os.symlink("../plain/f5", m / "tree/sym")
    fsync_path(m / "tree")
    os.chmod(m / "plain/f5", 0o4750)
    os.utime(m / "plain/f5", ns=(1_000_000_000_123_456_789, 1_111_111_111_222_222_222))
    fsync_path(m / "plain/f5")
    # 8. not synced at all, and an unlinked-but-open file (an orphan at the crash)
    (m / "unsynced").write_bytes(rng.randbytes(50000))
    orphan = open(m / "orphan", "wb")
    orphan.write(rng.randbytes(3 * MiB))
    orphan.flush()
    os.fsync(orphan.fileno())
    os.unlink(m / "orphan")
    gone.append("orphan")
    st_free = os.statvfs(m).f_bfree

    try:
        kill9(image, mnt)
    finally:
        try:
            orphan.close()
        except OSError:
            pass
    lazy_umount(mnt)
    assert not image_clean_flag(image), "a killed daemon cannot have marked the image clean"
    fsck_crashed(image)

    mount(image, mnt)
    try:
        for rel, data in expected.items():
            got = (m / rel).read_bytes()
            assert len(got) == len(data), f"{rel}: size {len(got)}, fsync'ed {len(data)}"
            assert got == data, f"{rel}: content differs from what was fsync'ed"
        for rel in gone:
            assert not os.path.lexists(m / rel), f"{rel} was removed (and fsync'ed) but is back"
        assert os.getxattr(m / "plain/f2", "user.crash") == b"xattr value"
        assert os.stat(m / "plain/f3").st_nlink == 2
        assert os.stat(m / "tree/hard").st_ino == os.stat(m / "plain/f3").st_ino
        assert os.readlink(m / "tree/sym") == "../plain/f5"
        st = os.stat(m / "plain/f5")
        assert stat.S_IMODE(st.st_mode) == 0o4750
        assert st.st_mtime_ns == 1_111_111_111_222_222_222
        assert os.stat(m / "plain/f6").st_mtime_ns == mtime_f6, "fsync'ed mtime lost"
        assert sorted(os.listdir(m / "tree")) == sorted(
            ["a", "x", "file0", "file1", "file2", "hard", "sym"])
        assert len((m / "unsynced").read_bytes()) in (0, 50000)     # whatever, but readable
        # the orphan's 3 MiB came back when it was reclaimed during recovery
        assert os.statvfs(m).f_bfree >= st_free + 3 * MiB // 4096
        # and the recovered filesystem works
        (m / "after").write_bytes(b"written after recovery")
        umount(mnt)
        assert image_clean_flag(image)
        check_fsck(image)
        mount(image, mnt)
        assert (m / "after").read_bytes() == b"written after recovery"
        assert sha256(m / "plain/f7") == sha256_bytes(expected["plain/f7"])
        umount(mnt)
        check_fsck(image)
    finally:
        force_cleanup(image, mnt)


def sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


# ---------------------------------------------------------------------------------------------
# kill -9 in the middle of cp -a

def test_kill9_during_cp_a(image, mnt, tmp_path):
    seed = int(os.environ.get("DAXFS_CRASH_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    src = tmp_path / "src"
    nfiles = make_small_tree(src, random.Random(1))
    # a few moments across the copy (a full copy takes ~3 s here): one early, one middle, one
    # late; jittered by the seed (rerun with DAXFS_CRASH_SEED=<seed> to repeat)
    delays = [0.3 + rng.random() * 0.15, 0.55 + rng.random() * 0.2, 0.85 + rng.random() * 0.15]
    mount(image, mnt)
    free0 = os.statvfs(mnt).f_bfree
    ffree0 = os.statvfs(mnt).f_ffree
    umount(mnt)
    report = []
    try:
        for rnd, delay in enumerate(delays):
            mount(image, mnt)
            dst = mnt / f"round{rnd}"
            cp = subprocess.Popen(["cp", "-a", str(src), str(dst)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE)
            time.sleep(delay)
            still_running = cp.poll() is None
            kill9(image, mnt)
            _, err = cp.communicate(timeout=60)
            assert still_running, (f"seed {seed}: cp -a finished within {delay:.2f} s, before "
                                   f"the kill (make the tree bigger)")
            assert cp.returncode != 0      # it lost its filesystem mid-way
            lazy_umount(mnt)
            assert not image_clean_flag(image)
            fsck_crashed(image)
            mount(image, mnt)
            for r in range(rnd + 1):       # this round's copy and the older ones
                got = check_partial_copy(src, mnt / f"round{r}")
                if r == rnd:
                    report.append((round(delay, 2), *got))
                    assert got[0] > 0, f"seed {seed}: nothing copied after {delay:.2f} s"
            umount(mnt)
            assert image_clean_flag(image)
            check_fsck(image)

        # a crash in the middle of `rm -r` (unlink storm, orphans): what is left is still a
        # valid partial copy
        mount(image, mnt)
        rm = subprocess.Popen(["rm", "-r", "--"] + [str(mnt / f"round{r}") for r in
                                                     range(len(delays))],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.05 + rng.random() * 0.1)
        rm_running = rm.poll() is None
        kill9(image, mnt)
        rm.wait(timeout=60)
        lazy_umount(mnt)
        fsck_crashed(image)
        mount(image, mnt)
        for r in range(len(delays)):
            if (mnt / f"round{r}").exists():
                check_partial_copy(src, mnt / f"round{r}")
        report.append(("rm -r", "running" if rm_running else "finished before the kill"))
        umount(mnt)
        check_fsck(image)

        # the recovered filesystem still works: a full copy is exact, and removing everything
        # gives back every block and inode
        mount(image, mnt)
        subprocess.run(["cp", "-a", str(src), str(mnt / "final")], check=True, timeout=120)
        p = subprocess.run(["diff", "-r", "--no-dereference", str(src), str(mnt / "final")],
                           capture_output=True, text=True)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        complete, partial, _ = check_partial_copy(src, mnt / "final")
        assert (complete, partial) == (nfiles + 30, 0)      # + one hard link per directory
        subprocess.run(["rm", "-r", "--"] + [str(p) for p in mnt.iterdir()], check=True,
                       timeout=120)
        deadline = time.monotonic() + 10
        while os.statvfs(mnt).f_bfree != free0 and time.monotonic() < deadline:
            time.sleep(0.05)
        st = os.statvfs(mnt)
        assert (st.f_bfree, st.f_ffree) == (free0, ffree0), (
            f"seed {seed}: after crashes and rm -r: f_bfree {st.f_bfree} (fresh {free0}), "
            f"f_ffree {st.f_ffree} (fresh {ffree0})")
        umount(mnt)
        check_fsck(image)
    finally:
        print(f"seed {seed}: (delay, complete, partial, dirs) per round: {report}")
        force_cleanup(image, mnt)


# ---------------------------------------------------------------------------------------------
# daxfs mount / umount on a stale mountpoint

def _no_traceback(p: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout, p.stderr


def test_mount_over_stale_mountpoint(image, mnt, tmp_path):
    mnt2 = tmp_path / "mnt2"
    mnt2.mkdir()
    mount(image, mnt)
    try:
        write_fsync(mnt / "kept", b"fsync'ed before the crash\n")
        kill9(image, mnt)
        # not lazily unmounted: `daxfs mount` on the stale mountpoint cleans it up and says so
        p = daxfs_cli("mount", image, mnt, "-o", f"log={daemon_log(mnt)}", check=False)
        _no_traceback(p)
        assert p.returncode == 0, p.stderr
        assert "stale" in p.stderr and str(mnt) in p.stderr, p.stderr
        assert (mnt / "kept").read_bytes() == b"fsync'ed before the crash\n"

        # crash again; this time mount on ANOTHER mountpoint while the stale one is still there
        kill9(image, mnt)
        p = daxfs_cli("mount", image, mnt2, "-o", f"log={daemon_log(mnt2)}", check=False)
        _no_traceback(p)
        assert p.returncode == 0, p.stderr
        assert (mnt2 / "kept").read_bytes() == b"fsync'ed before the crash\n"
        # the stale mountpoint cannot take the (now mounted) image: one clear line
        p = daxfs_cli("mount", image, mnt, check=False)
        _no_traceback(p)
        assert p.returncode == 1, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and "already mounted" in lines[0], p.stderr
        # `daxfs umount IMAGE` picks the live mount, not the stale one
        p = daxfs_cli("umount", image, check=False)
        _no_traceback(p)
        assert p.returncode == 0, p.stderr
        assert not is_mounted(mnt2)
        assert wait_unlocked(image, 1)
        assert image_clean_flag(image)
        # the stale one is still there; `daxfs umount` on it cleans it up with a message
        with pytest.raises(OSError) as ei:
            os.stat(mnt)
        assert ei.value.errno == errno.ENOTCONN
        p = daxfs_cli("umount", mnt, check=False)
        _no_traceback(p)
        assert p.returncode == 0 and "stale" in p.stderr, p.stderr
        assert not is_mounted(mnt)
        check_fsck(image)
        mount(image, mnt)
        assert (mnt / "kept").read_bytes() == b"fsync'ed before the crash\n"
        umount(mnt)
        check_fsck(image)
    finally:
        force_cleanup(image, mnt2)
        force_cleanup(image, mnt)
