"""-o uring: FUSE-over-io_uring for the data plane (daxfs/_uring.c). Every test checks through
the daemon's counters that its requests really came through the rings (dp_uring_requests), so
none passes by having been served through /dev/fuse; the content is compared with what was
written, the image is fsck'ed after unmounting, and the daemon log must hold no traceback."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from conftest import (check_daemon_log, check_fsck, finish_mount, force_cleanup, have_fuse,
                      mount, remount, wait_unlocked)
from daxfs.daemon import lock_holder
from test_dataplane import pread_direct, pwrite_direct, stats

ENABLE = "/sys/module/fuse/parameters/enable_uring"
BS = 4096

pytestmark = [
    pytest.mark.skipif(not have_fuse(), reason="needs /dev/fuse and fusermount3"),
    pytest.mark.skipif(not os.path.exists(ENABLE),
                       reason=f"kernel without FUSE-over-io_uring ({ENABLE} is absent)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="-o uring turns enable_uring on: needs root"),
]


def sh(*cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, timeout=120,
                          **kw)


@pytest.fixture
def um(image, mnt):
    """A -o uring mount whose rings are in use; unmounted, fsck'ed, log checked afterwards."""
    mount(image, mnt, "-o", "uring")
    try:
        s = stats(mnt)
        assert s["uring"] == 1 and s["dp_uring"] == 1, s
        assert s["dp_uring_queues"] >= 1
        yield mnt
        finish_mount(image, mnt)
    finally:
        force_cleanup(image, mnt)


def through_rings(mnt, before: dict, at_least: int = 1) -> dict:
    s = stats(mnt)
    assert s["dp_uring_requests"] - before["dp_uring_requests"] >= at_least, (before, s)
    return s


def test_reads_writes_appends_truncate_served_through_the_rings(um):
    f = um / "f"
    s0 = stats(um)
    data = bytearray(os.urandom(64 * BS + 100))
    f.write_bytes(data)
    hold = os.open(f, os.O_RDONLY)                # keeps the inode published (no FORGET)
    try:
        assert pread_direct(f, 0, BS) == bytes(data[:BS])       # Python hands it over
        s1 = stats(um)
        for off in (0, 5 * BS, 63 * BS):
            assert pread_direct(f, off, 2 * BS) == bytes(data[off:off + 2 * BS])
        piece = os.urandom(BS)
        pwrite_direct(f, 7 * BS, piece)
        data[7 * BS:8 * BS] = piece
        s2 = through_rings(um, s0, 10)
        assert s2["dp_reads_served"] - s1["dp_reads_served"] >= 3   # in C, from a ring
        assert s2["dp_writes_served"] - s1["dp_writes_served"] >= 1
        assert f.read_bytes() == data
        with open(f, "ab") as a:                    # appends grow the file: Python
            a.write(b"tail" * 1000)
        data += b"tail" * 1000
        assert f.read_bytes() == data
        os.truncate(f, 10 * BS + 5)
        del data[10 * BS + 5:]
        assert pread_direct(f, 0, 16 * BS) == bytes(data)
        os.truncate(f, 12 * BS)
        data += bytes(12 * BS - len(data))
        assert f.read_bytes() == data
    finally:
        os.close(hold)


def test_mmap_by_a_child_and_copy_file_range(um):
    f = um / "f"
    f.write_bytes(bytes(16 * BS))
    s0 = stats(um)
    code = ("import mmap, os, sys\n"
            "fd = os.open(sys.argv[1], os.O_RDWR)\n"
            "m = mmap.mmap(fd, 16 * 4096)\n"
            "m[4096:4096 + 5] = b'hello'\n"
            "m.flush()\n")
    subprocess.run([sys.executable, "-c", code, str(f)], check=True, timeout=60)
    assert pread_direct(f, BS, BS)[:5] == b"hello"
    sh("cp", f, um / "g")                          # copy_file_range: a reflink
    assert (um / "g").read_bytes() == f.read_bytes()
    pwrite_direct(um / "g", BS, b"x" * BS)         # COW break: f keeps its bytes
    assert pread_direct(f, BS, BS)[:5] == b"hello"
    assert pread_direct(um / "g", BS, BS) == b"x" * BS
    through_rings(um, s0, 5)


def test_metadata_ops_and_tar_then_remount(um, image, tmp_path):
    s0 = stats(um)
    src = tmp_path / "src"
    for i in range(20):
        d = src / f"d{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}").write_bytes(os.urandom(100 + 997 * i))
    os.symlink("d0/f0", src / "link")
    sh("cp", "-a", src, um / "copy")
    (um / "copy" / "d1").rename(um / "copy" / "d1-renamed")
    os.mkdir(um / "empty")
    names = sorted(os.listdir(um / "copy"))
    assert names == ["d0", "d1-renamed", "d2", "d3", "link"]
    assert "f1" in sh("ls", "-la", um / "copy" / "d1-renamed").stdout.decode()
    tarball = sh("tar", "-cf", "-", "-C", um / "copy", ".").stdout
    os.mkdir(um / "tarx")
    sh("tar", "-xf", "-", "-C", um / "tarx", input=tarball)
    sh("diff", "-r", "--no-dereference", um / "copy", um / "tarx")
    through_rings(um, s0, 100)
    remount(image, um, "-o", "uring")
    assert stats(um)["uring"] == 1
    sh("diff", "-r", "--no-dereference", um / "copy", um / "tarx")
    (src / "d1").rename(src / "d1-renamed")
    sh("diff", "-r", "--no-dereference", src, um / "tarx")


def test_lazy_unmount_with_an_open_file(image, mnt):
    mount(image, mnt, "-o", "uring")
    try:
        assert stats(mnt)["uring"] == 1
        (mnt / "f").write_bytes(b"x" * 2 * BS)
        holder = subprocess.Popen(
            [sys.executable, "-c",
             "import sys,time; f=open(sys.argv[1],'rb'); print(f.read(3).decode(), flush=True);"
             " time.sleep(30)", str(mnt / "f")], stdout=subprocess.PIPE)
        try:
            assert holder.stdout.readline() == b"xxx\n"
            subprocess.run(["umount", "-l", str(mnt)], check=True, timeout=30)
            pid = lock_holder(image)
            assert pid
            os.kill(pid, 15)                        # the connection is still up: stop anyway
            t0 = time.monotonic()
            assert wait_unlocked(image, timeout=15), "daemon did not exit"
            assert time.monotonic() - t0 < 15
        finally:
            holder.kill()
            holder.wait()
        check_daemon_log(mnt)
    finally:
        force_cleanup(image, mnt)
    check_fsck(image)


def test_fusermount_and_kill9(image, mnt):
    mount(image, mnt, "-o", "uring")
    try:
        (mnt / "f").write_bytes(b"y" * BS)
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True, timeout=30)
        assert wait_unlocked(image, timeout=15)
        check_daemon_log(mnt)
        check_fsck(image)
        mount(image, mnt, "-o", "uring")
        assert (mnt / "f").read_bytes() == b"y" * BS
        pwrite_direct(mnt / "f", 0, b"z" * BS)     # returned: survives the kill
        os.kill(lock_holder(image), 9)
        assert wait_unlocked(image, timeout=15)
        with pytest.raises(OSError):
            os.stat(mnt / "f")                      # the kernel aborted the connection
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], timeout=30)
        mount(image, mnt, "-o", "uring")
        assert (mnt / "f").read_bytes() == b"z" * BS
        finish_mount(image, mnt)
    finally:
        force_cleanup(image, mnt)


def test_uring_needs_the_data_plane(image, mnt):
    from conftest import daxfs_cli
    p = daxfs_cli("mount", image, mnt, "-o", "uring,threads=0", check=False)
    assert p.returncode != 0 and "uring" in p.stderr
