#!/usr/bin/env python3
"""In-process cost of a COW break vs an unshared overwrite (issue 12: the COW storm).

Builds an engine on a tmpfs image, writes a file of --mib MiB, clones it (fs.clone_range, one
reflink), then times --ops random block-aligned 4 KiB writes into the clone (each one breaks
a shared block: allocate, store, remap, decref, frame-index cut, commit) and the same number
into the original at the blocks the clone broke away from (now the original's alone:
unshared in-place overwrites, the fast path). Prints µs per op of both and
their ratio. No FUSE: this is the engine's own cost per request (the daemon adds ~25 µs).

    python scripts/cow_break.py [--mib 1024] [--ops 20000] [--profile cprofile|none]
        [--image /dev/shm/daxfs-cow.img] [--partial] [--count cow|own]
    valgrind --tool=callgrind --toggle-collect=starmap_next \
        python scripts/cow_break.py --mib 64 --ops 2000 --count cow     # Ir / 2000 per break

--partial writes 512 bytes at a random 512-aligned offset instead (a break that must copy the
old block). --profile cprofile prints the top functions of the COW phase by own time.
"""
from __future__ import annotations

import argparse
import collections
import itertools
import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from daxfs.fs import FileSystem  # noqa: E402
from daxfs.mkfs import make_image  # noqa: E402

BS = 4096


def setup(path: str, mib: int):
    """A fresh image holding `orig` of `mib` MiB and `clone`, its reflink."""
    nblocks = mib * 256
    make_image(path, (2 * mib + 64) << 20, force=True, inode_count=1024,
               extent_count=max(1 << 16, 4 * nblocks))
    fs = FileSystem.open(path)
    orig = fs.create(1, b"orig", 0o644, 0, 0).ino
    chunk = os.urandom(1 << 20)
    for off in range(0, mib << 20, 1 << 20):
        fs.write(orig, off, chunk)
    clone = fs.create(1, b"clone", 0o644, 0, 0).ino
    done = 0
    while done < mib << 20:
        done += fs.clone_range(orig, done, clone, done, (mib << 20) - done)
    # as the daemon does after mounting: the data area's pages mapped ahead of use, so a
    # break's fresh block takes no page fault (≈ 3.5 µs, the kernel's, not the engine's)
    data = fs.g.data_start * BS
    if fs.pm.prefault(data, fs.pm.size - data):
        fs.pm._prefault_thread.join()
    return fs, orig, clone


def offsets(n: int, nblocks: int, seed: int, partial: bool) -> list[int]:
    """n distinct random offsets (each block broken once, as a fresh clone sees them)."""
    rng = random.Random(seed)
    blocks = rng.sample(range(nblocks), n)
    if not partial:
        return [b * BS for b in blocks]
    return [b * BS + rng.randrange(8) * 512 for b in blocks]


def timed(fs, ino: int, offs: list[int], data: bytes, starmap: bool = False) -> float:
    """µs of CPU time per write (process time: less noisy than wall time on a shared VM).
    `starmap`: the loop runs inside itertools.starmap, so that callgrind's
    --toggle-collect=starmap_next counts this phase's instructions and nothing else."""
    w = fs.write
    t = time.process_time()
    if starmap:
        collections.deque(itertools.starmap(w, [(ino, off, data) for off in offs]), maxlen=0)
    else:
        for off in offs:
            w(ino, off, data)
    return (time.process_time() - t) / len(offs) * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--ops", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--image", default="/dev/shm/daxfs-cow-bench.img")
    ap.add_argument("--partial", action="store_true", help="512-byte writes (copying breaks)")
    ap.add_argument("--profile", choices=("none", "cprofile"), default="none")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--count", choices=("cow", "own"),
                    help="run that phase in itertools.starmap: instructions per op with "
                         "valgrind --tool=callgrind --toggle-collect=starmap_next (divide by --ops)")
    a = ap.parse_args()
    nblocks = a.mib * 256
    if a.ops > nblocks:
        ap.error("--ops exceeds the file's blocks")
    fs, orig, clone = setup(a.image, a.mib)
    try:
        data = os.urandom(512 if a.partial else BS)
        cow_offs = offsets(a.ops, nblocks, a.seed, a.partial)
        # the blocks the clone breaks away from are the original's alone afterwards
        own_offs = random.Random(a.seed + 1).sample(cow_offs, len(cow_offs))
        # warm-up on blocks not timed (first touches of code paths, allocator cursor)
        warm = offsets(min(2000, nblocks // 4), nblocks, a.seed + 2, a.partial)
        warm = [o for o in warm if o // BS not in {x // BS for x in cow_offs}][:500]
        breaks0 = fs.stats()["cow_breaks"]
        timed(fs, clone, warm, data)
        if a.profile == "cprofile":
            import cProfile
            import pstats
            pr = cProfile.Profile()
            pr.enable()
            cow = timed(fs, clone, cow_offs, data)
            pr.disable()
            pstats.Stats(pr).sort_stats("tottime").print_stats(a.top)
        else:
            cow = timed(fs, clone, cow_offs, data, a.count == "cow")
        broke = fs.stats()["cow_breaks"] - breaks0
        own = timed(fs, orig, own_offs, data, a.count == "own")
        print(f"{a.mib} MiB clone, {a.ops} random {len(data)}-byte writes, "
              f"{broke} COW breaks (incl. {len(warm)} warm-up)")
        print(f"COW break   {cow:8.2f} us/op")
        print(f"unshared    {own:8.2f} us/op")
        print(f"ratio       {own / cow:8.3f} (unshared cost / COW cost)")
    finally:
        fs.close()
        os.unlink(a.image)
    return 0


if __name__ == "__main__":
    sys.exit(main())
