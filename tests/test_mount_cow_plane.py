"""COW breaks done by the data plane's C threads (daxfs/_cowplane.c, cowlog.py) on a real
mount: writes into a fresh `cp` must give the bytes a model says, leave the original alone,
survive a remount and a kill -9 of the daemon, and keep `daxfs stat` and fsck truthful. Every
test checks through the daemon's counters that C really did the breaks it tests."""
from __future__ import annotations

import errno
import mmap
import os
import random
import signal
import subprocess
import threading

import pytest

from conftest import (check_daemon_log, check_fsck, daemon_log, daxfs_cli, force_cleanup,
                      have_fuse, mount, remount, umount, wait_unlocked)
from daxfs.daemon import lock_holder
from daxfs.fs import FileSystem
from test_cow_ring import NO_SUCH_TYPE, _crash_breaks, _expect, swap_mode
from test_dataplane import pread_direct, pwrite_direct, stats

pytestmark = pytest.mark.skipif(not have_fuse(), reason="needs /dev/fuse and fusermount3")

BS = 4096
NBLK = 512                                       # 2 MiB


@pytest.fixture
def fs(image, mnt):
    mount(image, mnt)
    try:
        yield mnt
        check_daemon_log(mnt)
        umount(mnt)
        check_fsck(image)
        assert "dropped" not in daemon_log(mnt).read_text()
    finally:
        force_cleanup(image, mnt)


def _clone(mnt, nblk: int = NBLK) -> tuple[bytes, bytearray]:
    """orig (random bytes) and clone (its cp: every block shared); clone handed to C."""
    data = os.urandom(nblk * BS)
    (mnt / "orig").write_bytes(data)
    subprocess.run(["cp", mnt / "orig", mnt / "clone"], check=True)
    assert stats(mnt)["shared_blocks"] == nblk
    pread_direct(mnt / "clone", 0, BS)          # one read in Python publishes it
    pread_direct(mnt / "clone", BS, BS)
    return data, bytearray(data)


def _storm(mnt, model: bytearray, n: int, seed: int, partial: float = 0.3,
           keep_open: bool = False) -> int | None:
    """n O_DIRECT writes into clone through one descriptor (an open or a close reaches Python,
    which applies C's breaks first), whole blocks or 512-byte aligned parts of one. With
    `keep_open` the descriptor is returned, still open."""
    rng = random.Random(seed)
    nblk = len(model) // BS
    buf = mmap.mmap(-1, BS)
    fd = os.open(mnt / "clone", os.O_WRONLY | os.O_DIRECT)
    try:
        for _ in range(n):
            b = rng.randrange(nblk)
            if rng.random() < partial:
                o = rng.randrange(8) * 512
                k = rng.randrange(1, 9 - o // 512) * 512
            else:
                o, k = 0, BS
            data = os.urandom(k)
            buf[:k] = data
            assert os.pwritev(fd, [memoryview(buf)[:k]], b * BS + o) == k
            model[b * BS + o:b * BS + o + k] = data
    except BaseException:
        os.close(fd)
        raise
    if keep_open:
        return fd
    os.close(fd)
    return None


def _same(mnt, orig: bytes, model: bytearray) -> None:
    assert pread_direct(mnt / "clone", 0, len(model)) == bytes(model)
    assert (mnt / "clone").read_bytes() == bytes(model)
    assert pread_direct(mnt / "orig", 0, len(orig)) == orig


def test_cow_writes_into_a_clone_are_broken_in_c_and_match(fs, image):
    orig, model = _clone(fs)
    s0 = stats(fs)
    _storm(fs, model, 600, seed=1)
    s1 = stats(fs)
    c_breaks = s1["dp_cow_breaks"] - s0["dp_cow_breaks"]
    assert c_breaks > 300, f"C broke only {c_breaks} of the COW writes"
    assert s1["cow_ring_dropped"] == 0
    _same(fs, orig, model)
    s2 = stats(fs)
    broken = sum(1 for b in range(NBLK) if model[b * BS:(b + 1) * BS] != orig[b * BS:(b + 1) * BS])
    # every broken block is the clone's alone now: df and stat tell the truth
    assert s2["shared_blocks"] == NBLK - broken
    assert s2["cow_breaks"] == broken
    remount(image, fs)
    _same(fs, orig, model)


def test_overwrites_of_blocks_c_broke_stay_in_place(fs):
    orig, model = _clone(fs, 64)
    _storm(fs, model, 64 * 3, seed=2, partial=0.5)  # most blocks broken, then written again
    s = stats(fs)
    assert s["dp_cow_breaks"] > 0 and s["dp_writes"] > 0
    _same(fs, orig, model)


def test_concurrent_partial_writes_to_the_same_shared_blocks_all_land(fs):
    """Two writers store disjoint halves of the same shared blocks at once: whether C or
    Python breaks a block, neither half may be lost."""
    orig, model = _clone(fs, 128)
    halves = [os.urandom(128 * BS // 2) for _ in range(2)]

    def writer(i):
        for b in range(128):
            pwrite_direct(fs / "clone", b * BS + i * BS // 2,
                          halves[i][b * BS // 2:(b + 1) * BS // 2])

    ts = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for b in range(128):
        for i in range(2):
            model[b * BS + i * BS // 2:b * BS + (i + 1) * BS // 2] = \
                halves[i][b * BS // 2:(b + 1) * BS // 2]
    assert stats(fs)["dp_cow_breaks"] > 0
    _same(fs, orig, model)


def test_kill9_after_c_breaks_loses_no_acknowledged_write(image, mnt):
    mount(image, mnt)
    try:
        orig, model = _clone(mnt)
        _storm(mnt, model, 200, seed=3)
        assert stats(mnt)["dp_cow_breaks"] > 100      # (a request to Python applies them)
        fd = _storm(mnt, model, 200, seed=5, keep_open=True)   # these stay in the ring only
        pid = lock_holder(str(image))
        os.kill(pid, signal.SIGKILL)
        try:
            os.close(fd)                    # its flush meets the dead connection
        except OSError:
            pass
        assert wait_unlocked(image, 15)
        subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True, timeout=30)
        p = daxfs_cli("fsck", image, check=False)      # consistent without them, and says so
        assert p.returncode == 0 and "COW break" in p.stdout, p.stdout
        mount(image, mnt)
        _same(mnt, orig, model)
        assert stats(mnt)["cow_ring_applied"] > 0
        umount(mnt)
        check_fsck(image)
    finally:
        force_cleanup(image, mnt)


def test_cow_c_off_serves_every_break_in_python(image, mnt):
    mount(image, mnt, "-o", "cow=python")
    try:
        orig, model = _clone(mnt, 64)
        _storm(mnt, model, 100, seed=4)
        assert stats(mnt)["dp_cow_breaks"] == 0
        _same(mnt, orig, model)
        umount(mnt)
        check_fsck(image)
    finally:
        force_cleanup(image, mnt)


def test_cow_breaks_on_a_disk_image_are_msynced_and_survive_kill9(tmp_path):
    """An image on ext4 (/tmp here): the threads msync the new block and its ring record
    before the reply (persist mode msync), and kill -9 loses nothing acknowledged."""
    image, mnt = tmp_path / "disk.img", tmp_path / "mnt"
    mnt.mkdir()
    daxfs_cli("mkfs", "--size", "64M", image)
    mount(image, mnt)
    try:
        orig, model = _clone(mnt, 128)
        fd = _storm(mnt, model, 150, seed=6, keep_open=True)
        os.kill(lock_holder(str(image)), signal.SIGKILL)
        try:
            os.close(fd)
        except OSError:
            pass
        assert wait_unlocked(image, 15)
        subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True, timeout=30)
        mount(image, mnt)
        _same(mnt, orig, model)
        s = stats(mnt)
        assert s["cow_ring_applied"] > 50          # only C writes ring records
        umount(mnt)
        check_fsck(image)
    finally:
        force_cleanup(image, mnt)


def test_failsafe_reads_show_breaks_still_in_the_ring(image, mnt, tmp_path):
    """The engine turns read-only (failsafe) while COW breaks C did wait in the image's ring
    (done after Python last applied them): until the next mount applies them, every read --
    served by Python, or by C from a map Python hands it again -- must show C's bytes, not
    the shared block Python's map still names (Python's reads showed the old bytes). The
    ring state is written by hand behind the daemon's back, byte for byte as _cowplane.c
    stores it: the real window, a break between a request's settle and the corrupt metadata
    it meets, is microseconds wide."""
    nblk, broken = 16, [9, 0, 14]
    data = os.urandom(nblk * BS)
    mount(image, mnt)
    try:
        (mnt / "orig").write_bytes(data)
        subprocess.run(["cp", mnt / "orig", mnt / "clone"], check=True)
        (mnt / "victim").write_bytes(b"v")
        umount(mnt)
        mount(image, mnt)                           # nothing loaded but what the test touches
        assert pread_direct(mnt / "clone", 0, BS) == data[:BS]    # the clone loaded, O_DIRECT:
        ro = FileSystem.open(str(image), readonly=True)           # no page cache to go stale
        clone, victim = (ro.lookup(1, name).ino for name in (b"clone", b"victim"))
        applied = ro.cow.applied
        ro.close()
        new, _ = _crash_breaks(str(image), clone, broken, first_seq=applied)
        want = _expect(data, new)
        mode = swap_mode(str(image), victim, NO_SUCH_TYPE)
        with pytest.raises(OSError) as ei:
            os.stat(mnt / "victim")                 # corrupt metadata met: the failsafe
        assert ei.value.errno == errno.EIO
        for _ in range(4):                          # Python first; then C, if it got a map
            assert pread_direct(mnt / "clone", 0, nblk * BS) == want
        (tmp_path / "want").write_bytes(want)
        subprocess.run(["cmp", mnt / "clone", tmp_path / "want"], check=True)
        with pytest.raises(OSError) as ei:
            (mnt / "new").write_bytes(b"x")
        assert ei.value.errno == errno.EROFS
        assert "COW break(s) of the data plane stay in the ring" in daemon_log(mnt).read_text()
        daxfs_cli("umount", mnt, check=False)       # the failsafe leaves it not marked clean
        assert wait_unlocked(image, 15)
        swap_mode(str(image), victim, mode)
        mount(image, mnt)                           # which applies them
        assert pread_direct(mnt / "clone", 0, nblk * BS) == want
        assert (mnt / "orig").read_bytes() == data
        assert stats(mnt)["cow_ring_applied"] == len(broken)
        umount(mnt)
        check_fsck(image)
    finally:
        force_cleanup(image, mnt)
    check_daemon_log(mnt)
