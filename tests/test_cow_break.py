"""The one-block COW break fast path (FileData.write -> BufCache.break_block) and the C leaf
splices under it (daxfs/_fastmaps.c: extent_replace, frame_cut, journal_txn).

Random writes of whole and partial blocks, single- and multi-block, into three files that
share blocks at equal and shifted offsets (blocks with 2, 3 and 4 references, so both the
"last sharer leaves" and the "one alias of many leaves" cuts run) must keep: every file's
bytes equal to a model, the frame index equal to a rebuild, the refcounts equal to what the
extent maps imply, fsck clean, and all of it after a remount. The C helpers and their
Python fallbacks must build the very same image."""
from __future__ import annotations

import errno
import os
import random

import numpy as np
import pytest

from daxfs import alloc as alloc_mod
from daxfs import bufcache, extents, frames, journal
from daxfs.errors import FsError
from daxfs.fs import FileSystem

from enginetools import fsck_clean

BS = 4096
NBLK = 96


@pytest.fixture(params=["c", "python"])
def impl(request, monkeypatch):
    """Run with the C helpers, or with every module's Python fallback."""
    if request.param == "c":
        if extents._fastmaps is None:
            pytest.skip("daxfs._fastmaps not built")
    else:
        for mod in (extents, frames, journal, bufcache):
            monkeypatch.setattr(mod, "_fastmaps", None)
    return request.param


def _refcounts_match_maps(fs: FileSystem) -> bool:
    """The in-memory refcounts equal what the committed tables imply (extents + xattrs)."""
    g, mm = fs.g, fs.pm.mm
    ev = g.table(mm, "extents")
    used = ev[ev["ino"] != 0]
    implied = alloc_mod.implied_refcounts(used["pblk"], used["length"], fs.inodes.view,
                                          g.nblocks)
    ds = g.data_start
    return bool(np.array_equal(fs.alloc.rc[ds:].astype(np.int64), implied[ds:]))


def _workload(path: str, seed: int) -> tuple[dict[int, bytearray], dict[int, int]]:
    """Clone a file twice (one clone shifted by 3 blocks), then break sharing at random;
    checks every invariant along the way. Returns the model and the COW-break count."""
    rng = random.Random(seed)
    fs = FileSystem.open(path)
    a = fs.create(1, b"a", 0o644, 0, 0).ino
    b = fs.create(1, b"b", 0o644, 0, 0).ino
    c = fs.create(1, b"c", 0o644, 0, 0).ino
    model = {a: bytearray(os.urandom(NBLK * BS))}
    fs.write(a, 0, bytes(model[a]))
    fs.clone_range(a, 0, b, 0, NBLK * BS)
    model[b] = bytearray(model[a])
    fs.clone_range(a, 0, c, 3 * BS, (NBLK - 3) * BS)     # another diagonal: 3-4 refs
    model[c] = bytearray(3 * BS) + model[a][:(NBLK - 3) * BS]
    fs.write(c, 0, bytes(3 * BS))                      # c's first blocks exist, unshared
    assert fs.stats()["shared_blocks"] == NBLK
    files = [a, b, c]
    breaks0 = fs.stats()["cow_breaks"]
    for step in range(400):
        f = rng.choice(files)
        size = len(model[f])
        kind = rng.random()
        if kind < 0.5:                                 # a whole block
            off, n = rng.randrange(size // BS) * BS, BS
        elif kind < 0.85:                              # part of one block
            blk = rng.randrange(size // BS)
            o = rng.randrange(BS)
            off, n = blk * BS + o, rng.randrange(1, BS - o + 1)
        else:                                          # across blocks (the general path)
            off = rng.randrange(size - 1)
            n = rng.randrange(1, min(3 * BS, size - off) + 1)
        data = os.urandom(n)
        assert fs.write(f, off, data) == n
        model[f][off:off + n] = data
        if step % 25 == 0 or step == 399:
            for g in files:
                assert fs.read(g, 0, len(model[g]) + 1) == bytes(model[g]), (step, g)
            assert fs.frames_match_tables(), step
            assert all(fs.alloc.rc[p] > 1 for p, _i, _l in fs.frames.blocks())
            assert _refcounts_match_maps(fs), step
    broke = fs.stats()["cow_breaks"] - breaks0
    fs.close()
    return model, {"breaks": broke}


@pytest.mark.parametrize("seed", [1, 2])
def test_random_cow_breaks_keep_data_refcounts_and_index(tmp_image, impl, seed):
    model, info = _workload(tmp_image, seed)
    assert info["breaks"] > 150, "the workload hardly broke sharing"
    fsck_clean(tmp_image)
    fs = FileSystem.open(tmp_image)                    # remount: the index is rebuilt
    for ino, want in model.items():
        assert fs.read(ino, 0, len(want) + 1) == bytes(want)
    assert fs.frames_match_tables() and _refcounts_match_maps(fs)
    fs.close()


def test_c_helpers_and_fallbacks_build_the_same_image(tmp_image, monkeypatch):
    if extents._fastmaps is None:
        pytest.skip("daxfs._fastmaps not built")
    import shutil
    other = tmp_image + ".py"
    shutil.copyfile(tmp_image, other)
    try:
        # timestamps differ between the runs: compare maps, refcounts and the index instead
        def state(path):
            fs = FileSystem.open(path, readonly=True)
            out = ({ino: fs.inodes.get(ino).extents.runs() for ino in (2, 3, 4)},
                   fs.alloc.rc.tobytes(), fs.frames.blocks())
            fs.close()
            return out
        _workload(tmp_image, 7)
        for mod in (extents, frames, journal, bufcache):
            monkeypatch.setattr(mod, "_fastmaps", None)
        _workload(other, 7)
        assert state(tmp_image) == state(other)
    finally:
        os.unlink(other)


def test_cow_break_on_a_full_image_is_enospc_and_changes_nothing(tmp_image_small, impl):
    fs = FileSystem.open(tmp_image_small)
    a = fs.create(1, b"a", 0o644, 0, 0).ino
    fs.write(a, 0, b"a" * 4 * BS)
    b = fs.create(1, b"b", 0o644, 0, 0).ino
    fs.clone_range(a, 0, b, 0, 4 * BS)
    fill = fs.create(1, b"fill", 0o644, 0, 0).ino
    off = 0
    while True:                                        # take every free block
        try:
            off += fs.write(fill, off, bytes(1 << 20))
        except FsError as e:
            assert e.errno == errno.ENOSPC
            break
    assert fs.alloc.available() == 0
    for data, at in ((b"x" * BS, BS), (b"y" * 100, 2 * BS + 7)):   # whole, partial
        with pytest.raises(FsError) as e:
            fs.write(b, at, data)
        assert e.value.errno == errno.ENOSPC
    assert fs.tx.writable                              # no failsafe: nothing was changed
    assert fs.read(b, 0, 4 * BS) == b"a" * 4 * BS
    assert fs.frames_match_tables() and _refcounts_match_maps(fs)
    fs.unlink(1, b"fill")
    fs.forget(fill, 1)
    fs.write(b, BS, b"x" * BS)                         # room again: the break works
    assert fs.read(b, 0, 2 * BS) == b"a" * BS + b"x" * BS
    assert fs.read(a, 0, 2 * BS) == b"a" * 2 * BS
    fs.close()
    fsck_clean(tmp_image_small)


def test_many_breaks_split_and_empty_index_leaves(tmp_image, impl):
    """Enough breaks that frame-index leaves overflow (LEAF runs) and split, then every
    remaining shared block broken so that leaves empty out: the index equals a rebuild
    throughout and ends empty."""
    rng = random.Random(3)
    fs = FileSystem.open(tmp_image)
    a = fs.create(1, b"a", 0o644, 0, 0).ino
    nblk = 3000
    fs.write(a, 0, os.urandom(nblk * BS))
    b = fs.create(1, b"b", 0o644, 0, 0).ino
    fs.clone_range(a, 0, b, 0, nblk * BS)
    order = rng.sample(range(nblk), nblk)
    for i, blk in enumerate(order):
        fs.write(rng.choice([a, b]), blk * BS, os.urandom(BS))
        if i == 1200:
            assert len(fs.frames.pblk) > 1, "no leaf split"
        if i % 500 == 0:
            assert fs.frames_match_tables(), i
    assert len(fs.frames) == 0 and fs.stats()["shared_blocks"] == 0
    assert fs.frames_match_tables() and _refcounts_match_maps(fs)
    fs.close()
    fsck_clean(tmp_image)
