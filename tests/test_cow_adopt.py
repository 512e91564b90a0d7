"""The C batch that applies the data plane's COW breaks (daxfs/_cowadopt.c via
BufCache.adopt_breaks) against the Python path it replaces (BufCache.adopt_break per record):
the same records on two copies of one image must leave the same extent maps, frame index,
refcounts, allocator counters and committed tables; and the C loop must hand every record that
is not its common case (a merge, a full leaf, a block the file no longer maps, a third owner)
back to Python without changing anything first."""
from __future__ import annotations

import os
import random
import shutil

import numpy as np
import pytest

import daxfs.bufcache as bufcache
from daxfs import format as fmt
from daxfs.fs import FileSystem

from enginetools import fsck_clean
from test_cow_break import _refcounts_match_maps

BS = 4096
NBLK = 3000


def _build(path: str, seed: int) -> tuple[int, int]:
    """orig (NBLK blocks, several extents), its clone, and a second clone of part of it (a
    third owner for those blocks); some blocks of the clone already broken."""
    rng = random.Random(seed)
    fs = FileSystem.open(path)
    a = fs.create(1, b"orig", 0o644, 0, 0).ino
    b = fs.create(1, b"clone", 0o644, 0, 0).ino
    c = fs.create(1, b"third", 0o644, 0, 0).ino
    for off in range(0, NBLK * BS, 64 * BS):                 # extents of varied lengths
        fs.write(a, off, os.urandom(64 * BS))
    fs.clone_range(a, 0, b, 0, NBLK * BS)
    fs.clone_range(a, 100 * BS, c, 0, 400 * BS)
    for l in rng.sample(range(NBLK), 50):
        fs.write(b, l * BS, os.urandom(BS))
    fs.close()
    return a, b


def _records(fs: FileSystem, ino: int, seed: int, n: int) -> np.ndarray:
    """n records as C writes them (pool blocks, the old block the file maps), mixed with the
    awkward cases: record 5 breaks block l + 1 into q + 1 and record 6 then block l into q
    (the extent after l continues q: a merge, Python's), record 9 names a stale old block."""
    rng = random.Random(seed)
    node = fs.inodes.get(ino)
    shared = [l for l in range(NBLK) if fs.alloc.count(node.extents.lookup(l)) > 1]
    ls = rng.sample(shared, n)
    run = rng.choice([l for l in shared if l + 1 in shared and l not in ls and l + 1 not in ls])
    ls[5:5] = [run + 1, run]
    pool = fs.alloc.pool_take(len(ls)).astype(np.int64)
    qs = pool.copy()
    qs[5], qs[6] = pool[6], pool[5]
    assert qs[5] == qs[6] + 1, "the pool's blocks are not consecutive here"
    recs = np.zeros(len(ls), fmt.COW_RECORD_DTYPE)
    for i, l in enumerate(ls):
        p = node.extents.lookup(l) + (1 if i == 9 else 0)
        recs[i] = (0, i, ino, l, int(qs[i]), p, 10**18 + i, 0)
    return recs


def _state(fs: FileSystem, ino: int) -> dict:
    node = fs.inodes.get(ino)
    g = fs.g
    return {
        "runs": node.extents.runs(), "count": len(node.extents), "mapped": node.extents.mapped,
        "leaves": [leaf.lblk.size for leaf in node.extents.leaves],
        "frames": fs.frames.blocks(), "rc": fs.alloc.rc.copy(),
        "counters": (fs.alloc.free, fs.alloc.refs, fs.alloc.shared, fs.alloc.pooled),
        "extents": bytes(g.table(fs.pm.mm, "extents").tobytes()),
        "refcounts": bytes(g.table(fs.pm.mm, "refcounts").tobytes()),
        "breaks": fs.bufcache.stats.cow_breaks, "mtime": node.mtime,
    }


def _apply(path: str, ino: int, seed: int, n: int, c_path: bool, monkeypatch) -> dict:
    with monkeypatch.context() as m:
        if not c_path:
            m.setattr(bufcache, "_fastmaps", None)
        fs = FileSystem.open(path)
        recs = _records(fs, ino, seed, n)
        fs.cow.apply(recs, pooled=True)
        assert fs.cow.mismatches == 1                     # the stale record, dropped
        assert fs.frames_match_tables() and _refcounts_match_maps(fs)
        st = _state(fs, ino)
        fs.close()
    fsck_clean(path)
    return st


@pytest.mark.skipif(bufcache._fastmaps is None, reason="the C extension is not built")
@pytest.mark.parametrize("seed,n", [(1, 40), (2, 600), (3, 1500)])
def test_c_batch_leaves_what_python_leaves(tmp_image, monkeypatch, seed, n):
    _a, b = _build(tmp_image, seed)
    twin = tmp_image + ".py"
    shutil.copyfile(tmp_image, twin)
    try:
        calls = []
        real = bufcache._fastmaps.cow_adopt

        def counted(*args):
            out = real(*args)
            calls.append(out[0])
            return out
        with monkeypatch.context() as m:
            m.setattr(bufcache._fastmaps, "cow_adopt", counted, raising=False)
            got = _apply(tmp_image, b, seed, n, True, monkeypatch)
        want = _apply(twin, b, seed, n, False, monkeypatch)
        for k in want:
            if isinstance(want[k], np.ndarray):
                assert np.array_equal(got[k], want[k]), k
            else:
                assert got[k] == want[k], k
        assert sum(calls) >= n * 0.8, "C applied few of the records: the test misses its target"
        assert len(calls) >= 3, "C did not hand the merge and the stale record to Python"
    finally:
        os.unlink(twin)
