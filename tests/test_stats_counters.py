"""`user.daxfs.stats` / `daxfs stat` figures are running totals (issue 9 #13): reading them is
O(1), and after every kind of change they equal a full scan of the tables."""
from __future__ import annotations

import errno
import random
import time

import pytest

from daxfs.errors import FsError
from daxfs.fs import FALLOC_KEEP_SIZE, FALLOC_PUNCH_HOLE, FALLOC_ZERO_RANGE, FileSystem

from enginetools import fsck_clean

BS = 4096
SPACE = ("logical_bytes", "physical_bytes", "free_bytes", "total_bytes", "files",
         "shared_blocks", "aliases", "bytes_saved")


def same_as_scan(fs: FileSystem, what: str) -> None:
    got = {k: fs.stats()[k] for k in SPACE}
    want = {k: fs.scan_stats()[k] for k in SPACE}
    assert got == want, f"after {what}: counters {got} != full scan {want}"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_counters_match_a_full_scan_after_every_operation(tmp_image_small, seed):
    rnd = random.Random(seed)
    fs = FileSystem.open(tmp_image_small)
    files: list[int] = []
    name_of: dict[int, bytes] = {}
    opened: set[int] = set()
    max_shared = 0
    try:
        same_as_scan(fs, "mount")
        for step in range(400):
            op = rnd.choice(["create", "write", "write", "clone", "clone", "truncate", "punch",
                             "zero", "prealloc", "xattr", "rmxattr", "unlink", "unlink_open",
                             "rename", "symlink", "mkdir", "release"])
            f = rnd.choice(files) if files else None
            try:
                if op == "create" or f is None:
                    files.append(fs.create(1, b"f%d" % step, 0o644, 0, 0).ino)
                    name_of[files[-1]] = b"f%d" % step
                    op = "create"
                elif op == "write":
                    off = rnd.randrange(0, 20 * BS)
                    fs.write(f, off, rnd.randbytes(rnd.randrange(1, 6 * BS)))
                elif op == "clone":
                    g = rnd.choice(files)
                    n = rnd.randrange(1, 16) * BS
                    fs.clone_range(f, rnd.randrange(0, 4) * BS, g, rnd.randrange(0, 8) * BS, n)
                elif op == "truncate":
                    fs.setattr(f, size=rnd.randrange(0, 80 * BS))
                elif op in ("punch", "zero", "prealloc"):
                    mode = {"punch": FALLOC_PUNCH_HOLE | FALLOC_KEEP_SIZE,
                            "zero": FALLOC_ZERO_RANGE, "prealloc": FALLOC_KEEP_SIZE}[op]
                    fs.fallocate(f, mode, rnd.randrange(0, 40 * BS), rnd.randrange(1, 8 * BS))
                elif op == "xattr":
                    fs.setxattr(f, b"user.x%d" % rnd.randrange(3), rnd.randbytes(rnd.randrange(100)))
                elif op == "rmxattr":
                    for name in fs.listxattr(f):
                        fs.removexattr(f, name)
                elif op in ("unlink", "unlink_open"):
                    name = name_of.pop(f)
                    if op == "unlink_open":
                        fs.open_file(f)
                        opened.add(f)
                    fs.unlink(1, name)
                    files.remove(f)
                elif op == "release" and opened:
                    ino = opened.pop()
                    fs.release_file(ino)
                elif op == "rename" and len(files) > 1:
                    g = rnd.choice(files)
                    if g != f:
                        fs.rename(1, name_of[f], 1, name_of[g])
                        name_of[f] = name_of.pop(g)
                        files.remove(g)
                elif op == "symlink":
                    fs.symlink(1, b"l%d" % step, b"t" * rnd.randrange(1, 200), 0, 0)
                elif op == "mkdir":
                    fs.mkdir(1, b"d%d" % step, 0o755, 0, 0)
            except FsError as e:
                assert e.errno in (errno.ENOSPC, errno.EFBIG, errno.ENODATA, errno.EINVAL), e
            same_as_scan(fs, f"step {step}: {op}")
            max_shared = max(max_shared, fs.stats()["shared_blocks"])
        for ino in list(opened):
            fs.release_file(ino)
        same_as_scan(fs, "releases")
        assert max_shared > 0, "the sequence never shared a block"
    finally:
        fs.close()
    fs = FileSystem.open(tmp_image_small, readonly=True)
    try:
        same_as_scan(fs, "remount")
    finally:
        fs.close()
    fsck_clean(tmp_image_small)


def test_reading_the_stats_does_not_scan(tmp_image, monkeypatch):
    """A read of the figures must not touch the tables (it was a full scan per read)."""
    from daxfs import usage
    fs = FileSystem.open(tmp_image)
    try:
        ino = fs.create(1, b"a", 0o644, 0, 0).ino
        fs.write(ino, 0, b"x" * 10 * BS)
        monkeypatch.setattr(usage, "usage", lambda *a, **k: pytest.fail("stats() scanned"))
        t0 = time.perf_counter()
        for _ in range(1000):
            fs.getxattr(1, b"user.daxfs.stats")
        assert time.perf_counter() - t0 < 1.0
        assert fs.stats()["logical_bytes"] == 10 * BS
    finally:
        fs.close()


@pytest.mark.skipif(not __import__("conftest").have_fuse(), reason="needs /dev/fuse")
def test_daxfs_stat_of_a_mount_equals_a_full_scan(mounted, image):
    """`daxfs stat MNT` (the running totals) == a full scan of the image after unmounting."""
    import json
    import os
    from conftest import daxfs_cli, umount
    (mounted / "a").write_bytes(os.urandom(10 * BS + 7))
    daxfs_cli("reflink", mounted / "a", mounted / "b")
    with open(mounted / "b", "r+b") as f:
        f.write(b"x" * 100)                                  # one COW break
    os.setxattr(mounted / "a", "user.k", b"v")
    with open(mounted / "c", "wb") as f:
        f.truncate(1 << 20)
    os.symlink("a", mounted / "s")
    os.mkdir(mounted / "d")
    live = json.loads(daxfs_cli("stat", mounted, "--json").stdout)
    umount(mounted)
    fs = FileSystem.open(image, readonly=True)
    try:
        scan = fs.scan_stats()
    finally:
        fs.close()
    assert {k: live[k] for k in SPACE} == {k: scan[k] for k in SPACE}
    assert live["shared_blocks"] == 10 and live["cow_breaks"] == 1
