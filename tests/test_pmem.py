"""The mapping layer (daxfs/pmem.py): background prefault of a reserved image."""
from __future__ import annotations

import os

import pytest

from daxfs.mkfs import make_image
from daxfs.pmem import PMem

MiB = 1 << 20


@pytest.fixture
def img_path(tmp_path):
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else str(tmp_path)
    path = os.path.join(base, f"daxfs-pmem-{os.getpid()}.img")
    yield path
    if os.path.exists(path):
        os.unlink(path)


def test_prefault_keeps_the_bytes_and_only_runs_on_reserved_images(img_path):
    make_image(img_path, 64 * MiB, force=True, sparse=False)
    pattern = os.urandom(MiB)
    with open(img_path, "r+b") as f:
        f.seek(40 * MiB)
        f.write(pattern)
    pm = PMem(img_path)
    try:
        assert pm.prefault(MiB, 63 * MiB)
        pm._prefault_thread.join(30)
        assert not pm._prefault_thread.is_alive()
        assert bytes(pm.buf[40 * MiB:41 * MiB]) == pattern     # populating writes nothing
        pm.store(50 * MiB, b"after")
    finally:
        pm.close()
    with open(img_path, "rb") as f:
        f.seek(40 * MiB)
        assert f.read(MiB) == pattern
        f.seek(50 * MiB)
        assert f.read(5) == b"after"
    # a sparse image is never populated (that would allocate all of it), nor one on disk
    # (write faults would dirty, i.e. write back, every page)
    make_image(img_path, 64 * MiB, force=True, sparse=True)
    pm = PMem(img_path)
    try:
        assert not pm.prefault(MiB, 63 * MiB)
    finally:
        pm.close()
    assert os.stat(img_path).st_blocks * 512 < 8 * MiB


def test_no_prefault_on_a_disk_filesystem(tmp_path):
    path = str(tmp_path / "disk.img")
    make_image(path, 16 * MiB, force=True, sparse=False)
    pm = PMem(path)
    try:
        if pm.volatile:
            pytest.skip("the temp directory is itself on tmpfs")
        assert not pm.prefault(0, pm.size)
    finally:
        pm.close()


def test_close_stops_a_running_prefault(img_path):
    make_image(img_path, 512 * MiB, force=True, sparse=False)
    pm = PMem(img_path)
    assert pm.prefault(0, pm.size)
    pm.close()                       # joins the thread before munmap: no crash, no hang
    assert pm.mm is None


def test_forced_dax_flushes_every_line_and_fences(tmp_path):
    """The DAX branch (issue 11): on a MAP_SYNC mapping without libpmem, persist writes back
    every 64-byte line of its range and fence is an SFENCE. Forced here on a tmpfs image so
    the flush calls run; real persistent memory was not available to test."""
    from daxfs import _pmemflush
    from daxfs.pmem import PMem
    if _pmemflush.method() == "none":
        pytest.skip("no cache-line flush instruction on this CPU")
    path = "/dev/shm" if os.path.isdir("/dev/shm") else str(tmp_path)
    path = os.path.join(path, f"daxfs-forced-dax-{os.getpid()}.img")
    with open(path, "wb") as f:
        f.truncate(1 << 20)
    pm = PMem(path, force_dax=True)
    try:
        assert pm.dax and not pm.volatile
        lines0, fences0 = _pmemflush.counters()
        pm.store(100, b"x" * 200)            # bytes 100..299: the lines at 64, 128, 192, 256
        pm.persist(100, 200)
        pm.fence()
        lines, fences = _pmemflush.counters()
        assert (lines - lines0, fences - fences0) == (4, 1)
    finally:
        pm.close()
    with open(path, "rb") as f:
        assert f.read(300)[100:] == b"x" * 200
    os.unlink(path)


def test_engine_on_forced_dax_mapping_stays_consistent(tmp_path):
    from daxfs import _pmemflush
    from daxfs.fs import FileSystem
    from daxfs.mkfs import make_image
    from daxfs.pmem import PMem
    if _pmemflush.method() == "none":
        pytest.skip("no cache-line flush instruction on this CPU")
    path = f"/dev/shm/daxfs-forced-dax-fs-{os.getpid()}.img"
    make_image(path, 16 << 20, force=True)
    try:
        lines0, _ = _pmemflush.counters()
        fs = FileSystem.open(path, make_pmem=lambda p: PMem(p, force_dax=True))
        f = fs.create(1, b"f", 0o644, 0, 0).ino
        fs.write(f, 0, b"d" * 10000)
        g = fs.create(1, b"g", 0o644, 0, 0).ino
        fs.clone_range(f, 0, g, 0, 10000)
        fs.write(g, 4096, b"e" * 10)
        fs.sync()
        fs.close()
        assert _pmemflush.counters()[0] > lines0
        fs = FileSystem.open(path)
        assert fs.read(g, 4090, 20) == b"d" * 6 + b"e" * 10 + b"d" * 4
        fs.close()
        from enginetools import fsck_clean
        fsck_clean(path)
    finally:
        os.unlink(path)
