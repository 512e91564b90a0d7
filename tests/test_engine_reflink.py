"""Engine tests for the shared-page model: clone_range, aliases, COW break, the seed's
W/X/Y/Z table, lseek and fallocate. In-process; fsck after each."""
from __future__ import annotations

import errno
import os

import pytest

from daxfs.errors import FsError
from daxfs.fs import FALLOC_KEEP_SIZE, FALLOC_PUNCH_HOLE, FALLOC_ZERO_RANGE, FileSystem

from enginetools import fsck_clean

BS = 4096


@pytest.fixture
def fs(tmp_image):
    f = FileSystem.open(tmp_image)
    yield f
    f.close()
    fsck_clean(tmp_image)


def block(ch: bytes) -> bytes:
    return ch * BS


def test_wxyz_rotated_aliases(fs):
    """The design's table: each of blocks A..F mapped by four files at rotated indexes."""
    names = [b"W", b"X", b"Y", b"Z"]
    w = fs.create(1, b"W", 0o644, 0, 0).ino
    fs.write(w, 0, b"".join(block(c) for c in (b"A", b"B", b"C", b"D", b"E", b"F")))
    inos = {b"W": w}
    for rot, name in enumerate(names[1:], start=1):
        ino = fs.create(1, name, 0o644, 0, 0).ino
        # file[i] = W[(i + rot) % 6]: two clones, the tail of W then its head
        assert fs.clone_range(w, rot * BS, ino, 0, (6 - rot) * BS) == (6 - rot) * BS
        assert fs.clone_range(w, 0, ino, (6 - rot) * BS, rot * BS) == rot * BS
        inos[name] = ino
    phys = {c: fs.inodes.get(w).extents.lookup(i) for i, c in enumerate("ABCDEF")}
    st = fs.stats()
    assert st["shared_blocks"] == 6 and st["aliases"] == 24
    assert st["bytes_saved"] == 18 * BS
    for i, c in enumerate("ABCDEF"):
        assert fs.alloc.count(phys[c]) == 4
        want = sorted((inos[n], (i - rot) % 6) for rot, n in enumerate(names))
        assert fs.aliases_of(phys[c]) == want
    # block A sits at index 0 in W, 5 in X, 4 in Y, 3 in Z
    assert fs.aliases_of(phys["A"]) == sorted([(w, 0), (inos[b"X"], 5), (inos[b"Y"], 4), (inos[b"Z"], 3)])
    for rot, n in enumerate(names):
        assert fs.read(inos[n], 0, 6 * BS) == b"".join(block(c.encode()) for c in ("ABCDEF" * 2)[rot:rot + 6])
    # a write to block A in Y (index 4) breaks only Y's alias of A
    fs.write(inos[b"Y"], 4 * BS + 10, b"new")
    assert fs.alloc.count(phys["A"]) == 3
    assert (inos[b"Y"], 4) not in fs.aliases_of(phys["A"])
    ynew = fs.inodes.get(inos[b"Y"]).extents.lookup(4)
    assert ynew != phys["A"] and fs.alloc.count(ynew) == 1
    assert fs.read(inos[b"Y"], 4 * BS, BS) == b"A" * 10 + b"new" + b"A" * (BS - 13)
    for n in (b"W", b"X", b"Z"):
        data = fs.read(inos[n], 0, 6 * BS)
        assert b"new" not in data and data.count(b"A") == BS
    assert fs.stats()["cow_breaks"] == 1


def test_clone_shares_and_cow_grows_by_one_block(fs):
    src = fs.create(1, b"src", 0o644, 0, 0).ino
    payload = os.urandom(64 * BS + 123)
    fs.write(src, 0, payload)
    free0 = fs.statfs().bfree
    dst = fs.create(1, b"dst", 0o644, 0, 0).ino
    assert fs.clone_range(src, 0, dst, 0, len(payload)) == len(payload)
    assert fs.statfs().bfree == free0                  # every block shared, EOF block too
    assert fs.read(dst, 0, len(payload) + 10) == payload
    assert fs.getattr(dst).blocks == fs.getattr(src).blocks
    fs.write(dst, 5 * BS, b"z" * BS)
    assert fs.statfs().bfree == free0 - 1
    assert fs.read(src, 0, len(payload)) == payload
    # growing the clone past the shared EOF block must not leak the source's tail bytes
    fs.setattr(src, size=len(payload) - 100)
    fs.write(dst, len(payload) + 50, b"!")
    assert fs.read(dst, len(payload) - 10, 61) == payload[-10:] + bytes(50) + b"!"


@pytest.mark.parametrize("off_in", [0, 1, 4095, 4096])
@pytest.mark.parametrize("off_out", [0, 1, 4095, 4096])
@pytest.mark.parametrize("length", [1, 4096, 3 * 4096 + 7, 10 * 4096])
def test_unaligned_clone_matrix(tmp_image, off_in, off_out, length):
    fs = FileSystem.open(tmp_image)
    src = fs.create(1, b"s", 0o644, 0, 0).ino
    dst = fs.create(1, b"d", 0o644, 0, 0).ino
    sdata = os.urandom(8 * BS + 100)
    ddata = bytearray(os.urandom(3 * BS + 5))
    fs.write(src, 0, sdata)
    fs.write(dst, 0, ddata)
    got = fs.clone_range(src, off_in, dst, off_out, length)
    piece = sdata[off_in:off_in + length]
    assert got == len(piece)
    if off_out > len(ddata):
        ddata.extend(bytes(off_out - len(ddata)))
    ddata[off_out:off_out + len(piece)] = piece
    assert fs.read(dst, 0, len(ddata) + 100) == bytes(ddata)
    assert fs.read(src, 0, len(sdata)) == sdata
    assert fs.clone_range(src, len(sdata), dst, 0, 10) == 0      # at source EOF
    fs.close()
    fsck_clean(tmp_image)


def test_clone_errors(fs):
    f = fs.create(1, b"f", 0o644, 0, 0).ino
    fs.write(f, 0, b"x" * 5 * BS)
    d = fs.mkdir(1, b"d", 0o755, 0, 0).ino
    with pytest.raises(FsError) as ei:
        fs.clone_range(f, 0, f, BS, 2 * BS)
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(FsError) as ei:
        fs.clone_range(f, 0, d, 0, BS)
    assert ei.value.errno == errno.EISDIR
    with pytest.raises(FsError) as ei:
        fs.clone_range(f, 0, f, 3 * BS, BS, flags=1)
    assert ei.value.errno == errno.EINVAL
    assert fs.clone_range(f, 0, f, 3 * BS, 2 * BS) == 2 * BS     # same file, disjoint: fine


def test_truncate_and_unlink_of_shared_file(fs):
    a = fs.create(1, b"a", 0o644, 0, 0).ino
    data = os.urandom(20 * BS)
    fs.write(a, 0, data)
    b = fs.create(1, b"b", 0o644, 0, 0).ino
    fs.clone_range(a, 0, b, 0, len(data))
    fs.setattr(b, size=5 * BS + 1)                  # drops b's aliases past block 5
    assert fs.read(a, 0, len(data)) == data
    fs.unlink(1, b"a")
    fs.forget(a, 1)
    assert fs.read(b, 0, 10 * BS) == data[:5 * BS + 1]
    assert fs.stats()["shared_blocks"] == 0


def test_lseek_data_hole(fs):
    f = fs.create(1, b"f", 0o644, 0, 0).ino
    fs.write(f, 2 * BS, b"d" * BS)
    fs.setattr(f, size=6 * BS)
    assert fs.lseek(f, 0, os.SEEK_DATA) == 2 * BS
    assert fs.lseek(f, 0, os.SEEK_HOLE) == 0
    assert fs.lseek(f, 2 * BS + 5, os.SEEK_HOLE) == 3 * BS
    with pytest.raises(FsError) as ei:
        fs.lseek(f, 3 * BS, os.SEEK_DATA)
    assert ei.value.errno == errno.ENXIO
    g = fs.create(1, b"g", 0o644, 0, 0).ino
    fs.clone_range(f, 2 * BS, g, 0, BS)
    assert fs.lseek(g, 0, os.SEEK_DATA) == 0 and fs.lseek(g, 0, os.SEEK_HOLE) == BS


def test_fallocate_modes(fs):
    f = fs.create(1, b"f", 0o644, 0, 0).ino
    fs.fallocate(f, 0, 0, 10 * BS)
    a = fs.getattr(f)
    assert a.size == 10 * BS and a.blocks == 10 * 8
    assert fs.read(f, 0, 10 * BS) == bytes(10 * BS)
    fs.fallocate(f, FALLOC_KEEP_SIZE, 10 * BS, 2 * BS)
    assert fs.getattr(f).size == 10 * BS and fs.getattr(f).blocks == 12 * 8
    assert fs.read(f, 0, 20 * BS) == bytes(10 * BS)
    fs.sync()
    fsck_clean(fs.pm.path)                           # preallocation past EOF is legal
    fs.write(f, 0, b"y" * 10 * BS)
    g = fs.create(1, b"g", 0o644, 0, 0).ino
    fs.clone_range(f, 0, g, 0, 10 * BS)
    fs.fallocate(g, FALLOC_PUNCH_HOLE | FALLOC_KEEP_SIZE, BS + 100, 3 * BS)
    want = b"y" * (BS + 100) + bytes(3 * BS) + b"y" * (6 * BS - 100)
    assert fs.read(g, 0, 10 * BS) == want
    assert fs.read(f, 0, 10 * BS) == b"y" * 10 * BS           # the clone's punch left f alone
    fs.fallocate(f, FALLOC_ZERO_RANGE, 9 * BS, 3 * BS)
    assert fs.getattr(f).size == 12 * BS
    assert fs.read(f, 8 * BS, 4 * BS) == b"y" * BS + bytes(3 * BS)
    with pytest.raises(FsError) as ei:
        fs.fallocate(f, FALLOC_PUNCH_HOLE, 0, BS)
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(FsError) as ei:
        fs.fallocate(f, 0x08, 0, BS)                  # COLLAPSE_RANGE
    assert ei.value.errno == errno.EOPNOTSUPP
