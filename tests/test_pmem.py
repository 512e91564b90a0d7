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
