"""dax mode (issue 11): `daxfs mount -o dax` serves every open straight from the primary
frames with no page-cache copy per inode, so N clones read by N processes cost one copy in
memory; MAP_SHARED mappings still work (FUSE_DIRECT_IO_ALLOW_MMAP, which the hook adds to the
INIT reply because libfuse 3.14 cannot)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from conftest import check_fsck, fresh_image, have_fuse, mount, umount

pytestmark = pytest.mark.skipif(not have_fuse(), reason="needs /dev/fuse and fusermount3")

MiB = 1 << 20


def cached_pages(path) -> int:
    """Pages of `path` in the kernel's page cache (fincore, util-linux)."""
    out = subprocess.run(["fincore", "-b", "-n", "-o", "PAGES", str(path)], capture_output=True,
                         text=True, check=True).stdout.split()
    return int(out[0])


def read_in_children(paths) -> None:
    procs = [subprocess.Popen([sys.executable, "-c",
                               "import sys\nwith open(sys.argv[1], 'rb') as f:\n"
                               "    while f.read(1 << 20): pass", str(p)]) for p in paths]
    assert all(p.wait(120) == 0 for p in procs)


@pytest.fixture(params=["default", "dax"])
def mode_mount(request, tmp_path_factory, tmp_path):
    gen = fresh_image(tmp_path_factory, size="512M", tag="dax")
    image = next(gen)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    opts = ("-o", "dax") if request.param == "dax" else ()
    mount(image, mnt, *opts)
    try:
        yield request.param, mnt
        umount(mnt)
        check_fsck(image)
    finally:
        next(gen, None)


@pytest.mark.skipif(not shutil.which("fincore"), reason="needs fincore (util-linux)")
def test_clones_read_by_processes_cache_one_copy_in_dax_mode(mode_mount):
    mode, mnt = mode_mount
    src = mnt / "src"
    with open(src, "wb") as f:
        for _ in range(32):
            f.write(os.urandom(MiB))
    clones = [mnt / f"clone{i}" for i in range(4)]
    for c in clones:
        subprocess.run(["cp", str(src), str(c)], check=True)
    read_in_children(clones)
    pages = sum(cached_pages(c) for c in clones)
    if mode == "dax":
        assert pages == 0, f"dax mode: {pages} pages of the clones in the page cache"
    else:
        assert pages >= 4 * 32 * MiB // 4096 * 0.9, pages     # one copy per clone
    assert all(c.read_bytes() == src.read_bytes() for c in clones[:1])


MAPPER = r"""
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
m = mmap.mmap(fd, 8192, mmap.MAP_SHARED)
assert m[:5] == b"hello"
m[4096:4101] = b"world"
m.flush()
m.close()
os.close(fd)
"""


def test_map_shared_works_in_both_modes(mode_mount):
    mode, mnt = mode_mount
    f = mnt / "mapped"
    f.write_bytes(b"hello" + bytes(8187))
    p = subprocess.run([sys.executable, "-c", MAPPER, str(f)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    data = f.read_bytes()
    assert data[4096:4101] == b"world" and data[:5] == b"hello"
