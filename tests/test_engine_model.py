"""Randomized model test of the engine (in-process, no FUSE): random sequences of create,
aligned/unaligned writes, truncate, rename, link, unlink and remount, compared after every
step with a plain in-memory model. A failure prints the seed to replay it."""
from __future__ import annotations

import errno
import os
import random

import pytest

from daxfs.errors import FsError
from daxfs.fs import FileSystem

from enginetools import fsck_clean

BS = 4096


class Model:
    def __init__(self):
        self.files: dict[str, bytearray] = {}     # name -> content (names in root)
        self.links: dict[str, str] = {}           # name -> canonical file id

    def content(self, name):
        return self.files[self.links[name]]


def ino_of(fs, name):
    return fs.lookup(1, name.encode()).ino


def check(fs, m: Model):
    names = sorted(n.decode() for _c, n, _i in fs.dirs.listing(1))
    assert names == sorted(m.links), (names, sorted(m.links))
    for name in m.links:
        ino = ino_of(fs, name)
        want = bytes(m.content(name))
        a = fs.getattr(ino)
        assert a.size == len(want), name
        assert a.nlink == sum(1 for v in m.links.values() if v == m.links[name])
        got = fs.read(ino, 0, len(want) + 10)
        assert got == want, f"{name}: content differs"


def random_step(fs, m: Model, rng: random.Random, step: int):
    ops = ["create", "write", "write", "write", "truncate", "rename", "link", "unlink", "clone"]
    op = rng.choice(ops if m.links else ["create"])
    if op == "create":
        name = f"f{step}"
        fs.create(1, name.encode(), 0o644, 0, 0)
        m.files[name] = bytearray()
        m.links[name] = name
        return
    name = rng.choice(sorted(m.links))
    data = m.content(name)
    ino = ino_of(fs, name)
    if op == "write":
        off = rng.choice([0, rng.randrange(0, 3 * BS), rng.randrange(0, 64 * BS), len(data),
                          rng.randrange(0, 8) * BS])
        n = rng.choice([1, 100, BS, 2 * BS, rng.randrange(1, 5 * BS), 40 * BS])
        buf = rng.randbytes(n)
        fs.write(ino, off, buf)
        if off > len(data):
            data.extend(bytes(off - len(data)))
        data[off:off + n] = buf
    elif op == "truncate":
        size = rng.choice([0, rng.randrange(0, len(data) + 1), len(data) + rng.randrange(0, 3 * BS),
                           rng.randrange(0, 10) * BS])
        fs.setattr(ino, size=size)
        if size < len(data):
            del data[size:]
        else:
            data.extend(bytes(size - len(data)))
    elif op == "rename":
        new = rng.choice([f"r{step}", rng.choice(sorted(m.links))])
        fs.rename(1, name.encode(), 1, new.encode())
        if new != name and m.links.get(new) != m.links[name]:   # same inode: POSIX no-op
            old = m.links.pop(new, None)
            m.links[new] = m.links.pop(name)
            if old is not None and old not in m.links.values():
                del m.files[old]
    elif op == "link":
        new = f"l{step}"
        fs.link(ino, 1, new.encode())
        m.links[new] = m.links[name]
    elif op == "unlink":
        fs.unlink(1, name.encode())
        fid = m.links.pop(name)
        if fid not in m.links.values():
            del m.files[fid]
    elif op == "clone":
        # share a block-aligned range of another file into this one (reflink core)
        src = rng.choice(sorted(m.links))
        sdata = m.content(src)
        if len(sdata) < BS:
            return
        sl = rng.randrange(0, len(sdata) // BS)
        n = rng.randrange(1, len(sdata) // BS - sl + 1)
        dl = rng.randrange(0, 6)
        if m.links[src] == m.links[name] and sl < dl + n and dl < sl + n:
            with pytest.raises(FsError) as ei:      # same file, overlapping ranges
                fs.clone_range(ino_of(fs, src), sl * BS, ino, dl * BS, n * BS)
            assert ei.value.errno == errno.EINVAL
            return
        got = fs.clone_range(ino_of(fs, src), sl * BS, ino, dl * BS, n * BS)
        piece = bytes(sdata[sl * BS:sl * BS + got])
        if dl * BS > len(data):
            data.extend(bytes(dl * BS - len(data)))
        data[dl * BS:dl * BS + len(piece)] = piece


@pytest.mark.parametrize("seed", list(range(6)))
def test_random_model(tmp_image, seed):
    rng = random.Random(seed)
    fs = FileSystem.open(tmp_image)
    m = Model()
    try:
        for step in range(250):
            try:
                random_step(fs, m, rng, step)
            except FsError as e:
                raise AssertionError(f"seed {seed} step {step}: {e}") from None
            if step % 10 == 0:
                check(fs, m)
            if rng.random() < 0.04:
                fs.close()
                fs = FileSystem.open(tmp_image)
        check(fs, m)
    finally:
        fs.close()
    fsck_clean(tmp_image)
    fs = FileSystem.open(tmp_image)
    try:
        check(fs, m)
    finally:
        fs.close()


def test_enospc_is_clean(tmp_image_small):
    fs = FileSystem.open(tmp_image_small)
    a = fs.create(1, b"big", 0o644, 0, 0)
    written = last = 0
    chunk = os.urandom(1 << 20)
    with pytest.raises(FsError) as ei:
        for _ in range(10_000):
            last = fs.write(a.ino, written, chunk)
            written += last
    assert ei.value.errno == errno.ENOSPC
    assert fs.statfs().bfree == 0
    assert fs.getattr(a.ino).size == written
    assert fs.read(a.ino, written - 100, 100) == chunk[last - 100:last]
    fs.unlink(1, b"big")
    fs.forget(a.ino, 1)
    assert fs.statfs().bfree == fs.statfs().blocks
    fs.close()
    fsck_clean(tmp_image_small)


def test_st_blocks_after_remount_without_loading_maps(tmp_image):
    """getattr after a mount takes st_blocks from a per-inode count made at mount, not from
    the extent map (built only when the file is read or written): both must agree."""
    fs = FileSystem.open(tmp_image)
    want, block0 = {}, {}
    for i, layout in enumerate([[(0, 3)], [(0, 1), (5, 2), (100, 7)], [], [(2, 1)]]):
        ino = fs.create(1, b"f%d" % i, 0o644, 0, 0).ino
        for blk, n in layout:
            fs.write(ino, blk * 4096, b"x" * (n * 4096))
        if i == 3:
            fs.setxattr(ino, b"user.k", b"v")                   # its block counts too
        want[ino] = (sum(n for _b, n in layout) + (i == 3)) * 8
        block0[ino] = any(b == 0 for b, _n in layout)
    fs.close()
    fs = FileSystem.open(tmp_image)
    try:
        for ino, blocks in want.items():
            assert fs.getattr(ino).blocks == blocks
            assert fs.inodes.get(ino)._extents is None          # the map was not built
        for ino, blocks in want.items():
            fs.write(ino, 0, b"y")                               # builds the map
            assert fs.getattr(ino).blocks == blocks + (0 if block0[ino] else 8)
    finally:
        fs.close()
    fsck_clean(tmp_image)
