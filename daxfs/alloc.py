"""Block allocator over the per-block reference count table, and free-slot pools for tables.

The refcount table is the single source of truth for space: a block is free iff its count is 0.
The engine works on an in-memory mirror (`rc`) and a transaction copies the changed slices into
the journal; the on-image table is only ever written by journal apply/replay.

Free-space search is numpy over the mirror from a moving cursor, so it is O(window) per call,
not O(image). Blocks freed by the transaction in progress are not reused before it commits:
a crash must never find a block that is still mapped by the old state overwritten with new data.
"""
from __future__ import annotations

import errno
from collections.abc import Callable

import numpy as np

from . import format as fmt
from .errors import FsError

_SCAN_WINDOW = 1 << 16
_ROOM = 256          # blocks of room to grow a file's new run is placed to have (1 MiB)


def _spread(ino: int) -> int:
    """64 well-mixed bits of an inode number (Fibonacci hashing): consecutive inodes land
    far apart, in a sequence that fills the space evenly."""
    return (ino * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF


def runs_of(idx: np.ndarray) -> list[tuple[int, int]]:
    """Sorted block numbers -> [(start, length)] of consecutive runs."""
    if idx.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [idx.size]))
    return [(int(idx[s]), int(e - s)) for s, e in zip(starts.tolist(), ends.tolist())]


def coverage(pblk: np.ndarray, length: np.ndarray, nb: int) -> np.ndarray:
    """How many of the runs [pblk, pblk+length) cover each block < nb (runs not wholly inside
    the image are ignored)."""
    pb = pblk.astype(np.uint64)
    ln = length.astype(np.uint64)
    nbu = np.uint64(nb)
    ok = (pb <= nbu) & (ln <= nbu - np.minimum(pb, nbu))
    p = pb[ok].astype(np.int64)
    e = p + ln[ok].astype(np.int64)
    d = np.bincount(p, minlength=nb + 1)[:nb + 1] - np.bincount(e, minlength=nb + 1)[:nb + 1]
    return np.cumsum(d)[:nb]


def implied_refcounts(pblk: np.ndarray, length: np.ndarray, inodes: np.ndarray,
                      nb: int) -> np.ndarray:
    """Per block, the references the tables hold: the extent runs given (the records in use)
    plus the xattr block of each inode in use; what the refcount table must say, below
    data_start aside. Runs or blocks outside the image are not counted."""
    cov = coverage(pblk, length, nb)
    xb = inodes["xattr_blk"][(inodes["mode"] != 0) & (inodes["xattr_blk"] != 0)]
    xb = xb[xb < np.uint64(nb)].astype(np.int64)
    return cov + np.bincount(xb, minlength=nb)[:nb]


class BlockAllocator:
    def __init__(self, table: np.ndarray, g: fmt.Geometry):
        self.g = g
        self.rc = np.array(table, dtype=np.uint32)        # mirror, owned by the engine
        self.free = int(np.count_nonzero(self.rc[g.data_start:] == 0))
        # running totals for `daxfs stat`: blocks with refcount > 1, sum of data refcounts
        self.shared = int(np.count_nonzero(self.rc[g.data_start:] > 1))
        self.refs = int(self.rc[g.data_start:].sum(dtype=np.int64))
        self.cursor = g.data_start
        self.dirty: list[tuple[int, int]] = []             # (start, end) ranges since last commit
        self.quarantine: list[tuple[int, int]] = []        # freed by the open transaction
        self.pooled = 0                                    # blocks in the C COW pool
        self.reclaim_pool: Callable[[], bool] | None = None   # DataPlane.reclaim

    def undercounted(self, implied: np.ndarray) -> np.ndarray:
        """Data blocks whose count is below the references the tables hold: trusting such a
        count would hand out (or write in place into) a block another file still maps."""
        ds = self.g.data_start
        return np.flatnonzero(self.rc[ds:].astype(np.int64) < implied[ds:]) + ds

    # -- queries ---------------------------------------------------------------------------------
    def count(self, pblk: int) -> int:
        return int(self.rc[pblk])

    def any_shared(self, pblk: int, n: int) -> bool:
        return bool((self.rc[pblk:pblk + n] > 1).any())

    def shared_count(self, pblk: int, n: int) -> int:
        """How many blocks of the run have more than one reference."""
        if n == 1:
            return int(self.rc[pblk] > 1)
        return int(np.count_nonzero(self.rc[pblk:pblk + n] > 1))

    def shared_mask(self, pblk: int, n: int) -> np.ndarray:
        """Per block of the run: True where it has more than one reference."""
        return self.rc[pblk:pblk + n] > 1

    def counts(self) -> np.ndarray:
        """The reference counts of every block, read-only (indexes built from them)."""
        v = self.rc.view()
        v.flags.writeable = False
        return v

    def single_mask(self, pblk: int, n: int) -> np.ndarray:
        """Per block of the run: does exactly one reference hold it?"""
        return self.rc[pblk:pblk + n] == 1

    def max_count(self, pblk: int, n: int) -> int:
        return int(self.rc[pblk:pblk + n].max()) if n else 0

    # -- allocation ------------------------------------------------------------------------------
    def home(self, ino: int) -> int:
        """Where inode `ino` starts looking for space when its goal is taken: spread over the
        data area by a multiplicative hash, so files written side by side (eight writers, one
        cursor) each stay contiguous instead of taking every eighth block; fragmentation is
        what uses up extent records."""
        g = self.g
        return g.data_start + (_spread(ino) * (g.nblocks - g.data_start) >> 64)

    def plan(self, n: int, goal: int = 0, home: int = 0) -> list[tuple[int, int]]:
        """The runs `alloc` would hand out, without taking them (so a caller can count the
        extent records they need before its transaction starts)."""
        if n <= 0:
            return []
        if not self.room(n):
            raise FsError(errno.ENOSPC)
        if self._fits(goal, n):
            return [(goal, n)]
        if home and goal:
            # the file ran into another one (its next block is taken): move it to a free run
            # with room to grow, first right at its home (one slice test), else the next one
            # a scan finds; new files and holes without a goal pack densely at the cursor
            want = max(n, _ROOM)
            start = self.home(home) // _ROOM * _ROOM
            if not self._fits(start, want):
                start = self._free_run(start, want, _spread(home))
            if start is not None:
                return [(start, n)]
        if self._fits(self.cursor, n):
            return [(self.cursor, n)]
        return self._search(n)

    def alloc(self, n: int, goal: int = 0, home: int = 0) -> list[tuple[int, int]]:
        """Allocate n blocks (count 0 -> 1), preferring one run starting at `goal`, then a run
        at the home of inode `home` (if given), then the shared cursor."""
        return self.take(self.plan(n, goal, home))

    def alloc_one(self, goal: int = 0) -> int:
        """alloc(1, goal)[0][0] (no home), with scalar tests for the goal and the cursor
        before the general search: the one-block COW break's allocation."""
        g, rc, quarantine = self.g, self.rc, self.quarantine
        for s in (goal, self.cursor):
            if g.data_start <= s < g.nblocks and not rc[s] and \
                    not (quarantine and self._in_quarantine(s, 1)):
                if self.free <= (self._quarantined() if quarantine else 0):
                    break                    # let plan() say ENOSPC
                rc[s] = 1
                self.dirty.append((s, s + 1))
                self.free -= 1
                self.refs += 1
                self.cursor = s + 1
                return s
        return self.alloc(1, goal)[0][0]

    def take(self, runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Allocate the runs `plan` gave (nothing may have allocated since)."""
        if not runs:
            return runs
        n = sum(ln for _s, ln in runs)
        for s, ln in runs:
            self.rc[s:s + ln] = 1
            self.dirty.append((s, s + ln))
        self.free -= n
        self.refs += n
        last_s, last_n = runs[-1]
        self.cursor = last_s + last_n
        return runs

    def _fits(self, start: int, n: int) -> bool:
        g = self.g
        if not (g.data_start <= start and start + n <= g.nblocks):
            return False
        busy = self.rc[start] if n == 1 else self.rc[start:start + n].any()
        return not busy and not self._in_quarantine(start, n)

    def _free_run(self, start: int, want: int, pick: int) -> int | None:
        """A block that begins `want` free blocks: in the first free run at or after `start`
        (within one scan window, wrapping to the data area's start once) that is long enough,
        at one of its `want`-aligned offsets chosen by `pick`, so that files meeting in one
        large run spread over it instead of taking turns block by block. None if none."""
        g = self.g
        for lo in (start, g.data_start):
            hi = min(g.nblocks, lo + max(_SCAN_WINDOW, 2 * want))
            free = np.concatenate(([False], self.rc[lo:hi] == 0, [False]))
            edges = np.flatnonzero(free[1:] != free[:-1])      # run starts, ends alternate
            starts, ends = edges[0::2], edges[1::2]
            ok = np.flatnonzero(ends - starts >= want)
            for i in ok.tolist():
                slots = int(ends[i] - starts[i]) // want
                s = int(starts[i]) + lo + (pick % slots) * want
                if not self._in_quarantine(s, want):
                    return s
        return None

    def _search(self, n: int) -> list[tuple[int, int]]:
        g = self.g
        found: list[np.ndarray] = []
        need = n
        start = self.cursor if g.data_start <= self.cursor < g.nblocks else g.data_start
        for lo, hi in ((start, g.nblocks), (g.data_start, start)):
            pos = lo
            while need > 0 and pos < hi:
                end = min(hi, pos + max(_SCAN_WINDOW, need))
                z = np.flatnonzero(self.rc[pos:end] == 0) + pos
                for q0, q1 in self.quarantine:
                    z = z[(z < q0) | (z >= q1)]
                if z.size:
                    take = z[:need]
                    found.append(take)
                    need -= take.size
                pos = end
        if need > 0:      # the free count said yes: only quarantine can make this happen
            raise FsError(errno.ENOSPC)
        return runs_of(np.sort(np.concatenate(found)))

    def available(self) -> int:
        """Blocks this transaction can still allocate (the C COW pool's are not: see room)."""
        return self.free - self._quarantined()

    def room(self, n: int) -> bool:
        """Can n blocks be allocated? If only with the C COW pool's unused blocks, they come
        back first (dataplane.DataPlane.reclaim): the pool never causes an ENOSPC."""
        if n > self.available() and self.pooled and self.reclaim_pool is not None:
            self.reclaim_pool()
        return n <= self.available()

    def _quarantined(self) -> int:
        q = self.quarantine
        return sum(q1 - q0 for q0, q1 in q) if q else 0     # empty between transactions

    def _in_quarantine(self, s: int, n: int) -> bool:
        return any(q0 < s + n and s < q1 for q0, q1 in self.quarantine)

    # -- the C data plane's COW pool (dataplane.py, cowlog.py) ---------------------------------------
    # Blocks handed to C for the COW breaks it does itself are counted 1 here, so that nothing
    # else allocates them, but not on the image: until a ring record maps one, a crash leaves
    # it free. `pooled` of them are in C's hands (statfs counts them free).
    def pool_take(self, n: int) -> np.ndarray:
        """Up to n free blocks for the pool (fewer when short of space; between transactions)."""
        n = min(n, self.available())
        if n <= 0:
            return np.empty(0, np.uint64)
        runs = self.plan(n)
        for s, ln in runs:
            self.rc[s:s + ln] = 1
        self.free -= n
        self.refs += n
        self.pooled += n
        return np.concatenate([np.arange(s, s + ln, dtype=np.uint64) for s, ln in runs])

    def pool_return(self, blocks: np.ndarray) -> None:
        """Blocks the pool gives back unused: free again."""
        if not blocks.size:
            return
        self.rc[blocks.astype(np.int64)] = 0
        self.free += int(blocks.size)
        self.refs -= int(blocks.size)
        self.pooled -= int(blocks.size)

    def pool_used(self, pblk: int) -> None:
        """A pool block that a COW break mapped: its count of 1 joins the transaction."""
        self.dirty.append((pblk, pblk + 1))
        self.pooled -= 1

    def pool_breaks(self, used: int, refs: int, shared: int, freed: int) -> None:
        """The counters after _cowadopt.c applied `used` COW breaks from the pool: it did
        pool_used and decref on `rc`, `dirty` and `quarantine` itself, and reports the
        changes to the totals (refs, shared and free, as decref counts them)."""
        self.pooled -= used
        self.refs += refs
        self.shared += shared
        self.free += freed

    def claim(self, pblk: int) -> None:
        """A block free on the image that a ring record from before a crash maps (recovery):
        count 1 from now on, in the transaction."""
        if self.rc[pblk]:
            raise FsError(errno.EEXIST, f"block {pblk} of a COW record is in use")
        self.rc[pblk] = 1
        self.dirty.append((pblk, pblk + 1))
        self.free -= 1
        self.refs += 1

    # -- reference counting ----------------------------------------------------------------------
    def incref(self, pblk: int, n: int) -> None:
        seg = self.rc[pblk:pblk + n]
        if (seg >= fmt.MAX_REFCOUNT).any():
            raise FsError(errno.EMLINK, "block reference count limit reached")
        self.shared += int(np.count_nonzero(seg == 1))
        self.refs += n
        seg += 1
        self.dirty.append((pblk, pblk + n))

    def decref(self, pblk: int, n: int) -> int:
        """Drop one reference from each block of the run; returns how many became free."""
        self.dirty.append((pblk, pblk + n))
        self.refs -= n
        if n == 1:                              # the COW break's case: skip the array work
            left = int(self.rc[pblk]) - 1
            self.rc[pblk] = left
            if left == 1:
                self.shared -= 1
            if left:
                return 0
            self.quarantine.append((pblk, pblk + 1))
            self.free += 1
            return 1
        seg = self.rc[pblk:pblk + n]
        self.shared -= int(np.count_nonzero(seg == 2))
        seg -= 1
        freed = np.flatnonzero(seg == 0)
        if freed.size:
            for s, ln in runs_of(freed + pblk):
                self.quarantine.append((s, s + ln))
            self.free += int(freed.size)
        return int(freed.size)

    # -- transaction hand-off --------------------------------------------------------------------
    @property
    def changed(self) -> bool:
        """Refcounts changed since the last take_dirty (i.e. by the open transaction)."""
        return bool(self.dirty)

    def take_dirty(self, table_offset: int) -> list[tuple[int, bytes]]:
        """Journal records for every refcount range changed since the last call."""
        dirty = self.dirty
        if len(dirty) <= 2:                 # one block allocated and one released (COW)
            self.quarantine.clear()
            if not dirty:
                return []
            rc = self.rc
            if len(dirty) == 1 or dirty[0][1] < dirty[1][0] or dirty[1][1] < dirty[0][0]:
                out = [(table_offset + s * 4, rc[s:e].tobytes()) for s, e in sorted(dirty)]
                dirty.clear()
                return out
        spans = sorted(self.dirty)
        merged = [list(spans[0])]
        for s, e in spans[1:]:
            if s <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], e)
            else:
                merged.append([s, e])
        self.dirty.clear()
        self.quarantine.clear()
        return [(table_offset + s * 4, self.rc[s:e].tobytes()) for s, e in merged]


class SlotPool:
    """Free record slots of a table (inodes, dirents, extents): a numpy stack of indexes."""

    def __init__(self, free_slots: np.ndarray, what: str, err: int = errno.ENOSPC):
        # lowest indexes on top, so tables fill from the front
        self.arr = np.ascontiguousarray(free_slots[::-1], dtype=np.int64)
        self.top = self.arr.size
        self.what = what
        self.err = err

    def __len__(self) -> int:
        return self.top

    def take(self) -> int:
        if self.top == 0:
            raise FsError(self.err, f"no free {self.what}")
        self.top -= 1
        return int(self.arr[self.top])

    def give(self, slot: int) -> None:
        if self.top == self.arr.size:
            self.arr = np.concatenate((self.arr, np.empty(max(64, self.arr.size), np.int64)))
        self.arr[self.top] = slot
        self.top += 1
