"""Reflink on a real mount: cp shares blocks (copy_file_range through the libfuse hook), the
design's W/X/Y/Z table, unaligned copy_file_range against a byte model, COW breaks from write(2)
and from mmap, lseek/fallocate, `daxfs stat` and `daxfs reflink`. Remount + fsck after each."""
from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

import pytest

from conftest import daxfs_cli, remount
from daxfs.fs import FileSystem

BS = 4096


def stats(mnt) -> dict:
    return json.loads(os.getxattr(str(mnt), "user.daxfs.stats"))


def clone(src, dst, off_in, off_out, length) -> int:
    """copy_file_range loop, as cp does."""
    with open(src, "rb") as s, open(dst, "r+b" if os.path.exists(dst) else "w+b") as d:
        done = 0
        while done < length:
            n = os.copy_file_range(s.fileno(), d.fileno(), length - done, off_in + done, off_out + done)
            if n == 0:
                break
            done += n
        return done


def test_cp_shares_every_block_and_cow_grows_by_one(mounted, image):
    src = mounted / "src"
    payload = os.urandom(64 << 20)
    src.write_bytes(payload)
    os.sync()
    before = stats(mounted)
    free_before = os.statvfs(mounted).f_bfree
    subprocess.run(["cp", str(src), str(mounted / "copy")], check=True)
    after = stats(mounted)
    assert after["physical_bytes"] == before["physical_bytes"]
    assert os.statvfs(mounted).f_bfree == free_before          # df shows no growth
    assert after["cloned_blocks"] - before["cloned_blocks"] == (64 << 20) // BS
    assert after["shared_blocks"] == (64 << 20) // BS
    assert (mounted / "copy").read_bytes() == payload
    assert os.stat(mounted / "copy").st_blocks * 512 >= len(payload)
    with open(mounted / "copy", "r+b") as f:
        f.seek(12345 * BS)
        f.write(b"w" * BS)
    assert os.statvfs(mounted).f_bfree == free_before - 1       # one block broken out
    assert stats(mounted)["cow_breaks"] - after["cow_breaks"] == 1
    assert (mounted / "src").read_bytes() == payload
    want = bytearray(payload)
    want[12345 * BS:12346 * BS] = b"w" * BS
    remount(image, mounted)
    assert (mounted / "copy").read_bytes() == bytes(want)
    assert (mounted / "src").read_bytes() == payload
    assert stats(mounted)["shared_blocks"] == (64 << 20) // BS - 1


def test_wxyz_table_on_the_mount(mounted, image):
    """The design's example, built with copy_file_range at offsets; checked through the
    reverse map after unmount, and COW-broken for one block of one file."""
    blocks = [c * BS for c in (b"A", b"B", b"C", b"D", b"E", b"F")]
    (mounted / "W").write_bytes(b"".join(blocks))
    for rot, name in enumerate("XYZ", start=1):
        assert clone(mounted / "W", mounted / name, rot * BS, 0, (6 - rot) * BS) == (6 - rot) * BS
        assert clone(mounted / "W", mounted / name, 0, (6 - rot) * BS, rot * BS) == rot * BS
    st = stats(mounted)
    assert (st["shared_blocks"], st["aliases"], st["bytes_saved"]) == (6, 24, 18 * BS)
    for rot, name in enumerate("WXYZ"):
        assert (mounted / name).read_bytes() == b"".join(blocks[rot:] + blocks[:rot])
    out = daxfs_cli("stat", mounted).stdout
    assert "shared blocks (refcount > 1)     6" in out
    inos = {n: os.stat(mounted / n).st_ino for n in "WXYZ"}
    # a write to block A in Y (index 4) breaks only Y's alias of A
    with open(mounted / "Y", "r+b") as f:
        f.seek(4 * BS + 7)
        f.write(b"new")
    remount(image, mounted)
    expect = {n: b"".join(blocks[r:] + blocks[:r]) for r, n in enumerate("WXYZ")}
    y = bytearray(expect["Y"])
    y[4 * BS + 7:4 * BS + 10] = b"new"
    expect["Y"] = bytes(y)
    for n in "WXYZ":
        assert (mounted / n).read_bytes() == expect[n]
    subprocess.run(["umount", str(mounted)], check=True)
    from conftest import wait_unlocked
    assert wait_unlocked(image)
    fs = FileSystem.open(str(image), readonly=True)
    try:
        a = fs.inodes.get(inos["W"]).extents.lookup(0)
        assert fs.aliases_of(a) == sorted([(inos["W"], 0), (inos["X"], 5), (inos["Z"], 3)])
        assert fs.alloc.count(a) == 3
        b = fs.inodes.get(inos["W"]).extents.lookup(1)
        assert fs.aliases_of(b) == sorted([(inos["W"], 1), (inos["X"], 0), (inos["Y"], 5),
                                           (inos["Z"], 4)])
    finally:
        fs.close()
    from conftest import mount
    mount(image, mounted)


@pytest.mark.parametrize("off_in", [0, 1, 4095, 4096])
def test_unaligned_copy_file_range_matrix(mounted, off_in):
    sdata = os.urandom(6 * BS + 77)
    (mounted / "s").write_bytes(sdata)
    for off_out in (0, 1, 4095, 4096):
        for length in (1, BS, 3 * BS + 5, 10 * BS):      # the last ones cross source EOF
            dst = mounted / f"d-{off_out}-{length}"
            ddata = bytearray(os.urandom(2 * BS + 3))
            dst.write_bytes(ddata)
            got = clone(mounted / "s", dst, off_in, off_out, length)
            piece = sdata[off_in:off_in + length]
            assert got == len(piece)
            if off_out > len(ddata):
                ddata.extend(bytes(off_out - len(ddata)))
            ddata[off_out:off_out + len(piece)] = piece
            assert dst.read_bytes() == bytes(ddata), (off_in, off_out, length)
    assert (mounted / "s").read_bytes() == sdata


MMAP_WRITER = r"""
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
m = mmap.mmap(fd, 0, mmap.MAP_SHARED)
for off in (0, 5 * 4096 + 100, 15 * 4096):
    m[off:off + 5] = b"MMAP!"
m.flush()
m.close()
os.fsync(fd)
os.close(fd)
"""


def test_mmap_write_into_reflinked_file_breaks_only_that_file(mounted, image):
    payload = os.urandom(16 * BS)
    (mounted / "orig").write_bytes(payload)
    subprocess.run(["cp", str(mounted / "orig"), str(mounted / "clone")], check=True)
    st0 = stats(mounted)
    assert st0["shared_blocks"] == 16
    subprocess.run([sys.executable, "-c", MMAP_WRITER, str(mounted / "clone")], check=True)
    st1 = stats(mounted)
    assert st1["cow_breaks"] - st0["cow_breaks"] == 3
    assert st1["shared_blocks"] == 13
    want = bytearray(payload)
    for off in (0, 5 * BS + 100, 15 * BS):
        want[off:off + 5] = b"MMAP!"
    assert (mounted / "orig").read_bytes() == payload
    remount(image, mounted)
    assert (mounted / "clone").read_bytes() == bytes(want)
    assert (mounted / "orig").read_bytes() == payload


def test_seek_data_hole_and_punch_on_mount(mounted):
    p = mounted / "sparse"
    with open(p, "wb") as f:
        f.truncate(10 * BS)
        f.seek(4 * BS)
        f.write(b"d" * BS)
    fd = os.open(p, os.O_RDONLY)     # while an O_RDWR open exists, lseek says "all data"
    try:
        assert os.lseek(fd, 0, os.SEEK_DATA) == 4 * BS
        assert os.lseek(fd, 4 * BS, os.SEEK_HOLE) == 5 * BS
    finally:
        os.close(fd)
    fd = os.open(p, os.O_RDWR)
    try:
        assert os.lseek(fd, 0, os.SEEK_DATA) == 0 and os.lseek(fd, 0, os.SEEK_HOLE) == 10 * BS
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
        assert libc.fallocate(fd, 0x01 | 0x02, 4 * BS + 10, 100) == 0     # PUNCH_HOLE|KEEP_SIZE
        os.posix_fallocate(fd, 0, 2 * BS)
    finally:
        os.close(fd)
    data = p.read_bytes()
    assert len(data) == 10 * BS
    assert data[4 * BS:5 * BS] == b"d" * 10 + bytes(100) + b"d" * (BS - 110)
    assert os.stat(p).st_blocks == 3 * 8


def test_daxfs_reflink_cli(mounted, tmp_path):
    (mounted / "a").write_bytes(os.urandom(40 * BS + 1))
    p = daxfs_cli("reflink", mounted / "a", mounted / "b")
    assert "41 blocks shared" in p.stdout
    assert (mounted / "b").read_bytes() == (mounted / "a").read_bytes()
    p = daxfs_cli("reflink", mounted / "a", tmp_path / "elsewhere", check=False)
    assert p.returncode == 1 and "same daxfs mount" in p.stderr and "Traceback" not in p.stderr


def test_daxfs_stat_file_names_what_it_shares_with(mounted):
    """`daxfs stat FILE` (issue 11): each shared range of a file, the other file and offset;
    --json in the documented shape; a COW break takes its block out of the report."""
    src = mounted / "src"
    src.write_bytes(os.urandom(8 * BS))
    (mounted / "d").mkdir()
    part = mounted / "d" / "part"
    with open(src, "rb") as s, open(part, "wb") as d:
        assert os.copy_file_range(s.fileno(), d.fileno(), 4 * BS, 2 * BS, 0) == 4 * BS
    rep = json.loads(daxfs_cli("stat", "--json", part).stdout)
    assert rep["path"] == str(part) and rep["size"] == 4 * BS
    assert [(r["offset"], r["length"], r["other"], r["other_offset"]) for r in rep["shared"]] \
        == [(0, 4 * BS, "/src", 2 * BS)]
    rep = json.loads(daxfs_cli("stat", "--json", src).stdout)
    assert [(r["offset"], r["length"], r["other"], r["other_offset"]) for r in rep["shared"]] \
        == [(2 * BS, 4 * BS, "/d/part", 0)]
    with open(part, "r+b") as f:                      # COW break of part's block 1
        f.seek(BS)
        f.write(b"x" * BS)
    rep = json.loads(daxfs_cli("stat", "--json", part).stdout)
    assert [(r["offset"], r["length"], r["other_offset"]) for r in rep["shared"]] == \
        [(0, BS, 2 * BS), (2 * BS, 2 * BS, 4 * BS)]
    text = daxfs_cli("stat", src).stdout
    assert "shared with /d/part at offset 0" in text
    assert json.loads(daxfs_cli("stat", "--json", mounted / "nothing-shared"
                                if (mounted / "nothing-shared").write_bytes(b"x") else src)
                      .stdout)["shared"] == []
