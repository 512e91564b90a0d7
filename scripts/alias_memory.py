#!/usr/bin/env python3
"""Memory per alias descriptor and lookup cost, at 1,000,000 aliases (issue: reflink/aliases).

Worst case on purpose: every alias is its own extent. A 4096-block source file is written one
block at a time in random file order, so file index -> physical block is a random permutation
(4096 extents of one block); it is then cloned 256 times -> 1,048,576 aliases in 1,048,576
extents. After a remount the extent maps of all 257 files are loaded and the daemon-side memory
they hold is summed: array buffers, numpy headers, leaf objects and lists. Lookups of index ->
frame are timed on a 1-extent map and on a 1M-extent map of one file to show O(log extents).

Usage: python scripts/alias_memory.py [--image /dev/shm/daxfs-alias.img]
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from daxfs.extents import ExtentMap  # noqa: E402
from daxfs.fs import FileSystem  # noqa: E402
from daxfs.mkfs import make_image  # noqa: E402

BS = 4096
SRC_BLOCKS = 4096
CLONES = 256


def build(path: str) -> None:
    make_image(path, 256 << 20, force=True, inode_count=4096, extent_count=1 << 21)
    fs = FileSystem.open(path)
    src = fs.create(1, b"src", 0o644, 0, 0).ino
    order = list(range(SRC_BLOCKS))
    random.Random(7).shuffle(order)
    for i in order:
        fs.write(src, i * BS, i.to_bytes(8, "little") * (BS // 8))
    for k in range(CLONES):
        dst = fs.create(1, b"clone%03d" % k, 0o644, 0, 0).ino
        fs.clone_range(src, 0, dst, 0, SRC_BLOCKS * BS)
    fs.close()


def map_bytes(em: ExtentMap) -> int:
    """Everything one extent map holds: the four arrays' buffers, their numpy headers, the
    leaf objects and the leaf/first lists."""
    total = sys.getsizeof(em) + sys.getsizeof(em.leaves) + sys.getsizeof(em.firsts)
    total += sum(sys.getsizeof(f) for f in em.firsts)
    for leaf in em.leaves:
        arrays = (leaf.lblk, leaf.pblk, leaf.length, leaf.slot)
        total += sys.getsizeof(leaf) + sum(a.nbytes + sys.getsizeof(a) for a in arrays)
    return total


def lookup_ns(em: ExtentMap, nblocks: int, n: int = 200_000) -> float:
    rng = random.Random(1)
    idx = [rng.randrange(nblocks) for _ in range(n)]
    t = time.perf_counter()
    for i in idx:
        em.lookup(i)
    return (time.perf_counter() - t) / n * 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", default="/dev/shm/daxfs-alias-bench.img")
    a = ap.parse_args()
    build(a.image)
    t = time.perf_counter()
    fs = FileSystem.open(a.image, readonly=True)
    mount_s = time.perf_counter() - t
    try:
        fi = fs.frames
        fi_aliases = sum(int(n.astype(np.int64).sum()) for n in fi.n)
        print(f"frame index: {len(fi):,} alias runs for {fi_aliases:,} aliases of "
              f"{fs.stats()['shared_blocks']:,} shared blocks, {fi.nbytes():,} bytes = "
              f"{fi.nbytes() / fi_aliases:.1f} bytes per alias (worst case: every alias its own "
              f"run); mount {mount_s:.2f} s")
        inos = [fs.lookup(1, b"src").ino] + [fs.lookup(1, b"clone%03d" % k).ino for k in range(CLONES)]
        maps = [fs.inodes.get(i).extents for i in inos]
        used = sum(map_bytes(m) for m in maps)
        aliases = sum(m.mapped for m in maps)
        extents = sum(len(m) for m in maps)
        one = ExtentMap([0], [1000], [SRC_BLOCKS], [0])
        big = ExtentMap(list(range(1_000_000)), list(range(1_000_000)), [1] * 1_000_000,
                        list(range(1_000_000)))
        print(f"aliases: {aliases:,} in {extents:,} extents of {len(maps)} files")
        print(f"extent-map memory: {used:,} bytes = {used / aliases:.1f} bytes per alias descriptor")
        print(f"lookup index->frame: {lookup_ns(one, SRC_BLOCKS):.0f} ns on 1 extent, "
              f"{lookup_ns(big, 1_000_000):.0f} ns on 1,000,000 extents (binary search)")
        st = fs.stats()
        print(f"shared blocks {st['shared_blocks']:,}, bytes saved {st['bytes_saved']:,}")
    finally:
        fs.close()
        os.unlink(a.image)
    contiguous(a.image)
    return 0


def contiguous(path: str, blocks: int = 1 << 20) -> None:
    """1M shared blocks the common way: a 4 GiB file (fallocate) and one clone of it."""
    make_image(path, (2 * blocks + 65536) * BS, force=True, extent_count=1 << 16)
    fs = FileSystem.open(path)
    src = fs.create(1, b"src", 0o644, 0, 0).ino
    fs.fallocate(src, 0, 0, blocks * BS)
    dst = fs.create(1, b"dst", 0o644, 0, 0).ino
    done = 0
    while done < blocks * BS:
        done += fs.clone_range(src, done, dst, done, blocks * BS - done)
    fs.close()
    t = time.perf_counter()
    fs = FileSystem.open(path, readonly=True)
    mount_s = time.perf_counter() - t
    try:
        fi = fs.frames
        print(f"{fs.stats()['shared_blocks']:,} shared blocks in {len(fi)} alias runs "
              f"({fi.nbytes()} bytes); mount {mount_s:.2f} s")
    finally:
        fs.close()
        os.unlink(path)


if __name__ == "__main__":
    sys.exit(main())
