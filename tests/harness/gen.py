"""Random operations for the exerciser, as plain tuples of concrete arguments (data by seed), so
that a recorded list replays exactly. Known defects can be steered around with `avoid`."""
from __future__ import annotations

import random

from .model import BS

MiB = 1 << 20
NFILES = 3

# op tuples:
#   ("read", f, off, n)                ("write", f, off, n, seed, flip)
#   ("append", f, n, seed)             ("trunc", f, size)
#   ("mread", f, off, n)               ("mwrite", f, off, n, seed)
#   ("mseek", f, off, n, seed)         store through a mapping, SEEK_DATA while dirty, msync
#   ("falloc", f, kind, off, n)        kind: punch zero zerokeep alloc allockeep
#   ("copy", fin, off_in, fout, off_out, n)
#   ("seek", f, whence, off)           whence: "data" | "hole"
#   ("reopen", f, drop_all)            close, open, fadvise DONTNEED (+ drop_caches), compare all
#   ("dread", f, off, n)               ("dwrite", f, off, n, seed)      O_DIRECT
#   ("otrunc", f)                      open(O_TRUNC)
#   ("efbig", f, kind)                 kind: trunc write falloc, far past the largest file
#   ("remount",)                       umount, fsck, mount, compare every file

FALLOC_KINDS = ("punch", "zero", "zerokeep", "alloc", "allockeep")

# the defects known today (issue 9) and how the generator steers around each
AVOIDABLE = {
    "otrunc": "open(O_TRUNC) of an existing file is ignored: no otrunc ops",
    "punch1": "PUNCH_HOLE/ZERO_RANGE over exactly one block boundary with no whole block keeps "
              "data: no such ranges",
    "mmapenospc": "mmap stores lost when space runs out: no mmap stores when free space is low",
    "erofs": "ENOSPC turns the fs read-only: on EROFS remount and take the files as the new model",
    "seekdirty": "SEEK_DATA ignores dirty mmap pages: no mseek ops",
    "efbigwrite": "with -o writeback a write(2) far past the largest file lands in the page cache "
                  "and fails only at writeback (a documented limit of that mode): no such "
                  "writes (implied by --mount-opts writeback)",
    "copyenospc": "copy_file_range fails with ENOSPC after storing part of the range and "
                  "growing the file (found by this exerciser): no copies when space is low",
}


class Generator:
    def __init__(self, seed: int, mode: str, avoid: set[str], remount_rate: float,
                 dropcache_rate: float, inject_at: int | None = None):
        self.rng = random.Random(seed)
        self.mode = mode
        self.avoid = avoid
        self.remount_rate = remount_rate
        self.dropcache_rate = dropcache_rate
        self.inject_at = inject_at
        self.count = 0
        self.maxsize = 6 * MiB if mode == "normal" else 8 * MiB
        w = dict(read=12, write=16, append=3, trunc=6, mread=6, mwrite=7, mseek=1, falloc=12,
                 copy=9, seek=8, reopen=2, dread=4, dwrite=4, otrunc=1, efbig=0.3)
        if mode == "full":
            w.update(write=24, falloc=14, copy=12, dwrite=6)
        if "otrunc" in avoid:
            del w["otrunc"]
        if "seekdirty" in avoid:
            del w["mseek"]
        self.names = list(w)
        self.weights = list(w.values())

    # ---- argument choices
    def off(self, size: int) -> int:
        r, k = self.rng.random(), self.rng
        limit = max(size, 1)
        if r < 0.25:
            o = k.randrange(0, limit + BS)
        elif r < 0.5:
            o = k.randrange(0, limit // BS + 2) * BS + k.choice((0, 0, 1, -1, 7, -13, 2048))
        elif r < 0.65:
            o = k.randrange(0, self.maxsize // MiB + 1) * MiB + k.choice((0, -1, 1, -BS, BS, -5))
        elif r < 0.85:
            o = size + k.randrange(-2 * BS, 2 * BS)
        else:
            o = k.randrange(0, self.maxsize)
        return max(0, min(o, self.maxsize))

    def length(self, big: bool = True) -> int:
        r, k = self.rng.random(), self.rng
        if r < 0.2:
            return k.randint(1, 16)
        if r < 0.45:
            return k.randint(1, 2 * BS)
        if r < 0.65:
            return k.randint(1, 16) * BS + k.choice((0, 0, 1, -1, 100))
        if r < 0.9 or not big:
            return k.randint(1, 256 << 10)
        return k.randint(MiB, 2 * MiB + 2 * BS)

    def wlen(self, off: int) -> int:
        return max(1, min(self.length(), self.maxsize + 2 * MiB - off))

    def seed(self) -> int:
        return self.rng.randrange(1 << 31)

    def zero_ok(self, off: int, end: int) -> bool:
        """--avoid punch1: the range crosses exactly one block boundary and holds no whole
        block (as the engine clips it: to EOF with KEEP_SIZE)."""
        if end <= off:
            return True
        a, b = -(-off // BS) * BS, end // BS * BS
        return not (a == b and off % BS and end % BS)

    # ---- one op
    def next(self, sizes: list[int], free_blocks) -> tuple:
        self.count += 1
        k = self.rng
        if self.remount_rate and k.random() < self.remount_rate:
            return ("remount",)
        while True:
            op = self._pick(sizes, free_blocks)
            if op is not None:
                break
        if self.inject_at is not None and op[0] == "write" and self.count >= self.inject_at:
            self.inject_at = None
            op = op[:-1] + (True,)
        return op

    def _pick(self, sizes, free_blocks):
        k = self.rng
        name = k.choices(self.names, self.weights)[0]
        f = k.randrange(NFILES)
        size = sizes[f]
        if name == "read":
            return ("read", f, self.off(size), self.length())
        if name == "write":
            o = self.off(size)
            if self.mode == "full" and k.random() < 0.4:
                o = min(size, self.maxsize)                 # mostly fill: extend the file
            elif size >= BS and k.random() < 0.3:
                # inside one block of the file: what the data plane breaks COW of itself
                o = k.randrange(size // BS) * BS + k.choice((0, 0, k.randrange(BS)))
                return ("write", f, o, k.randint(1, BS - o % BS), self.seed(), False)
            return ("write", f, o, self.wlen(o), self.seed(), False)
        if name == "append":
            if size > self.maxsize:
                return None
            return ("append", f, self.length(), self.seed())
        if name == "trunc":
            r = k.random()
            if r < 0.4:
                s = k.randrange(0, size + 1)
            elif r < 0.6:
                s = k.randrange(0, size // BS + 2) * BS
            else:
                s = self.off(size)
            return ("trunc", f, s)
        if name in ("mread", "mwrite", "mseek"):
            if size == 0:
                return None
            o = k.randrange(0, size) if k.random() < 0.7 else self.off(size) % size
            n = min(self.length(big=False), size - o)
            if name == "mread":
                return ("mread", f, o, n)
            if self.mode == "full" and "mmapenospc" in self.avoid:
                pages = (o + n - 1) // BS - o // BS + 1
                if free_blocks() < 2 * pages + 64:
                    return None
            return (name, f, o, n, self.seed())
        if name == "falloc":
            kind = k.choice(FALLOC_KINDS)
            if self.mode == "full" and k.random() < 0.4:    # mostly fill: allocate the holes
                kind = k.choice(("alloc", "allockeep"))
                o, n = k.randrange(0, max(size, 1)) // BS * BS, max(size, BS) + k.randrange(BS)
                return ("falloc", f, kind, o, n)
            o = self.off(size)
            n = self.length()
            if k.random() < 0.3:                   # a small range across one block boundary
                o = max(BS, o // BS * BS) - k.randint(1, BS - 1)
                n = k.randint(2, BS)
            if "punch1" in self.avoid and kind in ("punch", "zero", "zerokeep"):
                end = min(o + n, size) if kind != "zero" else o + n
                if not self.zero_ok(o, end):
                    return None
            return ("falloc", f, kind, o, n)
        if name == "copy" and k.random() < 0.25 and size:
            # a whole-file reflink into another file (cp): all its blocks shared
            g = (f + k.randrange(1, NFILES)) % NFILES
            if self.mode == "full" and "copyenospc" in self.avoid \
                    and free_blocks() < size // BS + 64:
                return None
            return ("copy", f, 0, g, 0, size)
        if name == "copy":
            g = k.randrange(NFILES)
            src = sizes[f]
            oi = self.off(src)
            if k.random() < 0.5:                             # same offset within the block
                oo = self.off(sizes[g]) // BS * BS + oi % BS
            else:
                oo = self.off(sizes[g])
            n = self.length()
            if f == g and oi < oo + n and oo < oi + n:        # within a file: no overlap
                if k.random() < 0.5 and oi >= 1:
                    n = min(n, abs(oo - oi)) if oo != oi else 0
                else:
                    oo = oi + n + k.choice((0, 1, BS, BS + 3))
                if n <= 0:
                    return None
            if self.mode == "full" and "copyenospc" in self.avoid \
                    and free_blocks() < n // BS + 64:
                return None
            oo = min(oo, self.maxsize + MiB)
            if f == g and oi < oo + n and oo < oi + n:        # the clamp made them overlap:
                return None                                   # EINVAL, as the kernel says
            return ("copy", f, oi, g, oo, n)
        if name == "seek":
            o = self.off(size) if k.random() < 0.8 else k.randrange(0, size + 2)
            return ("seek", f, k.choice(("data", "hole")), o)
        if name == "reopen":
            return ("reopen", f, bool(self.dropcache_rate and k.random() < self.dropcache_rate))
        if name in ("dread", "dwrite"):
            o = k.randrange(0, (size + 3 * BS) // BS + 1) * BS
            if k.random() < 0.2:
                o = k.randrange(0, self.maxsize // MiB + 1) * MiB
            n = k.randint(1, 64 if k.random() < 0.9 else 2 * 256 + 3) * BS
            if name == "dread":
                return ("dread", f, o, n)
            return ("dwrite", f, o, n, self.seed())
        if name == "otrunc":
            return ("otrunc", f)
        if name == "efbig":
            kinds = ("trunc", "falloc") if "efbigwrite" in self.avoid else ("trunc", "write", "falloc")
            return ("efbig", f, k.choice(kinds))
        raise AssertionError(name)
