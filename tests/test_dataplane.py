"""The C data plane (daxfs/_dataplane.c, daxfs/dataplane.py): reads and in-place overwrites
answered by C threads must be the bytes and timestamps Python would give, and must stop the
moment a file's blocks become shared, freed or cut off: every test checks, through the
daemon's counters, that the data plane really served what it tests, so none passes by
having been served in Python."""
from __future__ import annotations

import ctypes
import json
import mmap
import os
import subprocess
import sys
import time

import pytest

from conftest import (check_daemon_log, check_fsck, force_cleanup, have_fuse, mount, remount,
                      umount, wait_unlocked)
from daxfs.daemon import lock_holder

pytestmark = pytest.mark.skipif(not have_fuse(), reason="needs /dev/fuse and fusermount3")

BS = 4096


def stats(mnt) -> dict:
    return json.loads(os.getxattr(mnt, "user.daxfs.stats"))


def pread_direct(path, off: int, n: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, n)
        got = os.preadv(fd, [buf], off)
        return bytes(buf[:got])
    finally:
        os.close(fd)


def pwrite_direct(path, off: int, data: bytes) -> None:
    buf = mmap.mmap(-1, len(data))
    buf[:] = data
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        assert os.pwritev(fd, [buf], off) == len(data)
    finally:
        os.close(fd)


@pytest.fixture
def hold():
    """hold(path): an open descriptor until the test ends, so the kernel keeps the inode (no
    FORGET, which takes a file back from the data plane, even if someone drops the caches)."""
    fds = []
    yield lambda path: fds.append(os.open(path, os.O_RDONLY))
    for fd in fds:
        os.close(fd)


@pytest.fixture
def dp(image, mnt):
    mount(image, mnt)
    try:
        assert stats(mnt)["dp_threads"] >= 1
        yield mnt
        check_daemon_log(mnt)
        umount(mnt)
        check_fsck(image)
    finally:
        force_cleanup(image, mnt)


def test_reads_and_overwrites_are_served_in_c_and_match(dp, hold):
    f = dp / "f"
    data = bytearray(os.urandom(64 * BS + 100))
    f.write_bytes(data)
    hold(f)
    pread_direct(f, 0, BS)                        # one read through Python hands it over
    s0 = stats(dp)
    for off in (0, 5 * BS, 63 * BS):
        assert pread_direct(f, off, 2 * BS) == bytes(data[off:off + 2 * BS])
    piece = os.urandom(BS)
    pwrite_direct(f, 7 * BS, piece)
    data[7 * BS:8 * BS] = piece
    s1 = stats(dp)
    assert s1["dp_reads_served"] - s0["dp_reads_served"] >= 3
    assert s1["dp_writes_served"] - s0["dp_writes_served"] >= 1
    assert f.read_bytes() == data                # a buffered reader sees the C write
    assert pread_direct(f, 64 * BS, 2 * BS) == bytes(data[64 * BS:])   # EOF clips


def test_write_served_in_c_moves_mtime_and_survives_remount(dp, image):
    f = dp / "f"
    f.write_bytes(os.urandom(16 * BS))
    held = os.open(f, os.O_RDONLY)                # keeps the inode (see `hold`)
    pread_direct(f, 0, BS)
    os.utime(f, ns=(10**18, 10**18))              # far in the past of any clock here
    pread_direct(f, 0, BS)                        # the setattr took it back: hand over again
    s0 = stats(dp)
    pwrite_direct(f, BS, b"x" * BS)
    assert stats(dp)["dp_writes_served"] > s0["dp_writes_served"]
    time.sleep(1.2)                                # attribute timeout of the kernel's cache
    m = os.stat(f).st_mtime_ns
    assert m > 10**18 and abs(m - time.time_ns()) < 60 * 10**9
    os.close(held)
    remount(image, dp)
    assert (dp / "f").read_bytes()[BS:2 * BS] == b"x" * BS
    assert os.stat(dp / "f").st_mtime_ns == m


def test_clone_source_is_not_written_in_place_after_reflink(dp, hold):
    """The source's map said its blocks were owned; after copy_file_range shares them a
    write to the source must COW-break, never reach the clone."""
    src, dst = dp / "src", dp / "dst"
    orig = os.urandom(32 * BS)
    src.write_bytes(orig)
    hold(src)
    pread_direct(src, 0, BS)
    pwrite_direct(src, 0, orig[:BS])              # served in C: src is published, writable
    s0 = stats(dp)
    subprocess.run(["cp", "--reflink=auto", str(src), str(dst)], check=True)
    new = os.urandom(BS)
    for off in (0, 5 * BS, 31 * BS):
        pwrite_direct(src, off, new)
        pread_direct(src, off, BS)
    assert dst.read_bytes() == orig
    assert pread_direct(src, 5 * BS, BS) == new
    assert stats(dp)["dp_reads_served"] > s0["dp_reads_served"]


def test_clone_destination_published_before_reflink_reads_new_blocks(dp):
    a, b = dp / "a", dp / "b"
    a.write_bytes(b"A" * 8 * BS)
    b.write_bytes(b"B" * 8 * BS)
    with open(b, "rb") as hb:                    # b stays open: its map would stay too
        pread_direct(b, 0, BS)
        fa = os.open(a, os.O_RDONLY)
        fb = os.open(b, os.O_WRONLY)
        try:
            assert os.copy_file_range(fa, fb, 8 * BS, 0, 0) == 8 * BS
        finally:
            os.close(fa)
            os.close(fb)
        assert pread_direct(b, 0, 8 * BS) == b"A" * 8 * BS
        hb.read(1)


def test_truncate_then_extend_reads_zeros_not_old_bytes(dp):
    f = dp / "f"
    f.write_bytes(b"\xaa" * 8 * BS)
    fd = os.open(f, os.O_RDWR)
    try:
        os.pread(fd, BS, 0)
        pwrite_direct(f, 0, b"\xbb" * BS)          # published and written in C
        os.truncate(fd, 100)
        os.truncate(fd, 8 * BS)
        assert pread_direct(f, 0, 8 * BS) == b"\xbb" * 100 + bytes(8 * BS - 100)
    finally:
        os.close(fd)


def test_punched_hole_reads_zeros(dp):
    f = dp / "f"
    f.write_bytes(b"\xcc" * 8 * BS)
    pread_direct(f, 0, BS)
    fd = os.open(f, os.O_RDWR)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        punch, keep_size = 0x02, 0x01
        assert libc.fallocate(fd, punch | keep_size, ctypes.c_long(2 * BS),
                              ctypes.c_long(3 * BS)) == 0
    finally:
        os.close(fd)
    want = b"\xcc" * 2 * BS + bytes(3 * BS) + b"\xcc" * 3 * BS
    assert pread_direct(f, 0, 8 * BS) == want
    pwrite_direct(f, 3 * BS, b"\xdd" * BS)         # into the hole: Python allocates
    assert pread_direct(f, 0, 8 * BS) == want[:3 * BS] + b"\xdd" * BS + want[4 * BS:]


def test_child_process_mmap_stores_reach_readers(dp):
    f = dp / "f"
    f.write_bytes(bytes(16 * BS))
    pread_direct(f, 0, BS)
    code = ("import mmap, os, sys\n"
            "fd = os.open(sys.argv[1], os.O_RDWR)\n"
            "m = mmap.mmap(fd, 16 * 4096)\n"
            "m[4096:4096 + 5] = b'hello'\n"
            "m.flush()\n")
    subprocess.run([sys.executable, "-c", code, str(f)], check=True)
    assert pread_direct(f, BS, BS)[:5] == b"hello"


def test_lazy_unmount_with_open_file_lets_the_daemon_exit(image, mnt):
    """Workers blocked in read(2) on a connection that stays alive (an open file keeps a lazy
    unmount's connection up) must still stop when the daemon shuts down."""
    mount(image, mnt)
    try:
        (mnt / "f").write_bytes(b"x" * BS)
        holder = subprocess.Popen([sys.executable, "-c",
                                   "import sys,time; f=open(sys.argv[1]); time.sleep(30)",
                                   str(mnt / "f")])
        try:
            time.sleep(0.5)
            subprocess.run(["umount", "-l", str(mnt)], check=True)
            t0 = time.monotonic()
            pid = lock_holder(image)
            if pid:
                os.kill(pid, 15)
            assert wait_unlocked(image, timeout=10), "daemon did not exit"
            assert time.monotonic() - t0 < 10
        finally:
            holder.kill()
            holder.wait()
    finally:
        force_cleanup(image, mnt)
    check_fsck(image)


def test_threads_zero_serves_everything_in_python(image, mnt):
    mount(image, mnt, "-o", "threads=0")
    try:
        f = mnt / "f"
        f.write_bytes(b"y" * 4 * BS)
        assert pread_direct(f, 0, 4 * BS) == b"y" * 4 * BS
        s = stats(mnt)
        assert s["dp_threads"] == 0 and s["dp_reads_served"] == 0
        check_daemon_log(mnt)
        umount(mnt)
    finally:
        force_cleanup(image, mnt)
