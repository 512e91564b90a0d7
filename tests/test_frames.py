"""The frame index (issue 11): shared blocks and their aliases, indexed by physical block.

It must equal a rebuild from the committed extent and refcount tables after every operation
(clone, COW break, punch, truncate, unlink, remount), hold aliases only for shared blocks, and
give a block back to single ownership (no alias) when its last sharer breaks away."""
from __future__ import annotations

import os
import random

import pytest

from daxfs.fs import FALLOC_KEEP_SIZE, FALLOC_PUNCH_HOLE, FileSystem
from daxfs.frames import FrameIndex

from enginetools import fsck_clean

BS = 4096


@pytest.fixture
def img(tmp_image):
    return tmp_image


def test_clone_then_break_back_to_single_owner(img):
    fs = FileSystem.open(img)
    a = fs.create(1, b"a", 0o644, 0, 0).ino
    fs.write(a, 0, os.urandom(8 * BS))
    p = fs.inodes.get(a).extents.lookup(3)
    assert fs.aliases_of(p) == [] and len(fs.frames) == 0      # one owner: nothing indexed
    b = fs.create(1, b"b", 0o644, 0, 0).ino
    fs.clone_range(a, 0, b, 0, 8 * BS)
    assert fs.aliases_of(p) == [(a, 3), (b, 3)]
    assert len(fs.frames) == 2                                   # one run per inode
    fs.write(b, 3 * BS, b"x" * BS)                               # COW break of block 3
    assert fs.aliases_of(p) == []                                # back to one owner
    assert fs.aliases_of(fs.inodes.get(a).extents.lookup(4)) == [(a, 4), (b, 4)]
    assert fs.frames_match_tables()
    fs.close()
    fsck_clean(img)


def test_w_x_y_z_through_the_index(img):
    """The design's table: W, X, Y, Z map blocks A..F at rotated offsets."""
    fs = FileSystem.open(img)
    w = fs.create(1, b"W", 0o644, 0, 0).ino
    fs.write(w, 0, b"".join(bytes([65 + i]) * BS for i in range(6)))
    inos = {"W": w}
    for name, rot in (("X", 1), ("Y", 2), ("Z", 3)):
        f = fs.create(1, name.encode(), 0o644, 0, 0).ino
        for i in range(6):               # file block i holds block (i + rot) % 6 of W
            fs.clone_range(w, ((i + rot) % 6) * BS, f, i * BS, BS)
        inos[name] = f
    frame = {c: fs.inodes.get(w).extents.lookup(i) for i, c in enumerate("ABCDEF")}
    for i, c in enumerate("ABCDEF"):
        want = sorted([(w, i)] + [(inos[n], (i - rot) % 6)
                                  for n, rot in (("X", 1), ("Y", 2), ("Z", 3))])
        assert fs.aliases_of(frame[c]) == want, c
    fs.write(inos["Y"], 4 * BS, b"y" * BS)                       # Y breaks its alias of A
    assert (inos["Y"], 4) not in fs.aliases_of(frame["A"])
    assert len(fs.aliases_of(frame["A"])) == 3
    assert fs.frames_match_tables()
    fs.close()
    fs = FileSystem.open(img)                                    # rebuilt at mount: the same
    assert len(fs.aliases_of(frame["A"])) == 3 and fs.frames_match_tables()
    fs.close()
    fsck_clean(img)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_index_matches_a_rebuild_after_every_operation(img, seed):
    rng = random.Random(seed)
    fs = FileSystem.open(img)
    files = [fs.create(1, b"f%d" % i, 0o644, 0, 0).ino for i in range(4)]
    for f in files:
        fs.write(f, 0, os.urandom(rng.randrange(1, 64) * BS))
    for step in range(300):
        f, g = rng.sample(files, 2)
        size = fs.getattr(f).size
        op = rng.random()
        if op < 0.35 and size:
            o = rng.randrange(0, size // BS + 1) * BS
            fs.clone_range(f, o, g, rng.randrange(0, 64) * BS, rng.randrange(1, 32) * BS)
        elif op < 0.6:
            fs.write(f, rng.randrange(0, 64 * BS), os.urandom(rng.randrange(1, 3 * BS)))
        elif op < 0.75 and size:
            fs.fallocate(f, FALLOC_PUNCH_HOLE | FALLOC_KEEP_SIZE, rng.randrange(size),
                         rng.randrange(1, 8 * BS))
        elif op < 0.85:
            fs.setattr(f, size=rng.randrange(0, 70 * BS))
        elif op < 0.9:
            name = b"f%d" % files.index(f)
            fs.unlink(1, name)
            fs.forget(f, 1)
            files[files.index(f)] = fs.create(1, name, 0o644, 0, 0).ino
        assert fs.frames_match_tables(), f"seed {seed} step {step} op {op:.2f}"
        # every indexed block is shared, every shared data block indexed
        rc = fs.alloc.rc
        indexed = {p for p, _ino, _lb in fs.frames.blocks()}
        assert all(rc[p] > 1 for p in indexed)
    fs.close()
    fsck_clean(img)


def test_build_is_one_run_per_shared_extent():
    import numpy as np
    rc = np.zeros(100, np.uint32)
    rc[10:20] = 2                     # blocks 10..19 shared by inodes 5 and 6
    rc[20:30] = 1                     # 20..29 only inode 5's
    idx = FrameIndex.build(np.array([5, 6]), np.array([0, 100]), np.array([10, 10]),
                           np.array([20, 10]), rc)
    assert idx.runs(0, 100) == [(10, 10, 5, 0), (10, 10, 6, 100)]
    assert idx.aliases(25) == []
