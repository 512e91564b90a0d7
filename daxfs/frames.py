"""The frame index: shared physical blocks and their aliases, indexed by physical block.

This is the design's buffer cache indexed by physical location (../shared/seed/). A block
that one inode maps is that inode's alone and costs nothing here. When a clone (or dedupe)
makes a block shared, the index gets one *alias* per inode that maps it: (inode, file block)
pointing at the one primary frame, the block's bytes in the mapped image, which every alias
reads. A write to a shared block breaks the sharing for that inode (bufcache.py: allocate,
copy, remap) and drops its alias; when one reference is left, the last alias goes too and the
block is single-owned again.

Aliases are kept as runs (pblk, n, ino, lblk): blocks [pblk, pblk+n) are mapped by `ino` at
file blocks [lblk, lblk+n); a 1 GiB clone is one run per inode, not 262,144 entries. Runs
live in leaves of at most LEAF entries sorted by pblk (a one-level B+ tree of numpy arrays),
with each leaf's first pblk and largest run end in two arrays, so a lookup selects its
leaves with one vectorised comparison and a change rewrites one leaf. 24 bytes per run.

The index is derived state: built at mount from the extent and refcount tables in one
vectorised pass, changed in step with them by BufCache.remap/share, never persisted; fsck
and tests compare it with a rebuild (`matches_tables`). Nothing here awaits.
"""
from __future__ import annotations

import numpy as np

_I64, _U32 = np.int64, np.uint32
LEAF = 512

try:                  # the one-block cut in C (one call); cut_block's numpy loop otherwise
    from . import _fastmaps
    _fastmaps.setup(np.empty, np.dtype(_I64), np.dtype(_U32))
except ImportError:   # not built: the numpy path gives the same leaves
    _fastmaps = None


class FrameIndex:
    __slots__ = ("pblk", "n", "ino", "lblk", "first", "maxend")

    def __init__(self):
        self.pblk: list[np.ndarray] = []      # per leaf, sorted by pblk
        self.n: list[np.ndarray] = []
        self.ino: list[np.ndarray] = []
        self.lblk: list[np.ndarray] = []
        self.first = np.empty(0, _I64)        # first pblk of each leaf
        self.maxend = np.empty(0, _I64)       # largest pblk + n in each leaf

    # -- building ------------------------------------------------------------------------------
    @classmethod
    def build(cls, ext_ino, ext_lblk, ext_pblk, ext_len, rc: np.ndarray) -> "FrameIndex":
        """From the extent records in use and the refcounts: the runs of every extent that
        lie on blocks with more than one reference. Vectorised: one repeat over the blocks of
        the extents that touch a shared block, one cut into runs."""
        idx = cls()
        shared = rc > 1
        if not shared.any() or not len(ext_pblk):
            return idx
        pb = np.asarray(ext_pblk, _I64)
        ln = np.asarray(ext_len, _I64)
        # extents touching a shared block: prefix sums of the shared mask
        cum = np.concatenate(([0], np.cumsum(shared, dtype=_I64)))
        ok = (pb >= 0) & (pb + ln <= rc.size)
        touch = np.zeros(pb.size, bool)
        touch[ok] = cum[(pb + ln)[ok]] > cum[pb[ok]]
        if not touch.any():
            return idx
        pb, ln = pb[touch], ln[touch]
        ino = np.asarray(ext_ino, _I64)[touch]
        lb = np.asarray(ext_lblk, _I64)[touch]
        # one entry per block of those extents, kept where the block is shared
        e = np.repeat(np.arange(pb.size), ln)
        off = np.arange(e.size) - np.repeat(np.cumsum(ln) - ln, ln)
        blk = pb[e] + off
        keep = shared[blk]
        e, off, blk = e[keep], off[keep], blk[keep]
        # runs: consecutive blocks of one extent
        cut = np.flatnonzero((np.diff(e) != 0) | (np.diff(off) != 1)) + 1
        starts = np.concatenate(([0], cut))
        lens = np.diff(np.concatenate((starts, [e.size])))
        r_pb, r_e, r_off = blk[starts], e[starts], off[starts]
        order = np.lexsort((ino[r_e], r_pb))
        idx._set_all(r_pb[order], lens[order].astype(_U32), ino[r_e][order].astype(_U32),
                     (lb[r_e] + r_off)[order])
        return idx

    def _set_all(self, pb, n, ino, lb) -> None:
        self.pblk, self.n, self.ino, self.lblk = [], [], [], []
        for k in range(0, pb.size, LEAF):
            self.pblk.append(pb[k:k + LEAF].copy())
            self.n.append(n[k:k + LEAF].copy())
            self.ino.append(ino[k:k + LEAF].copy())
            self.lblk.append(lb[k:k + LEAF].copy())
        self._summaries()

    def _summaries(self) -> None:
        self.first = np.array([p[0] for p in self.pblk], _I64)
        self.maxend = np.array([int((p + n).max()) for p, n in zip(self.pblk, self.n)], _I64)

    # -- queries -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return sum(p.size for p in self.pblk)

    def nbytes(self) -> int:
        return sum(p.nbytes + n.nbytes + i.nbytes + lb.nbytes
                   for p, n, i, lb in zip(self.pblk, self.n, self.ino, self.lblk))

    def _leaves(self, a: int, b: int) -> np.ndarray:
        return np.flatnonzero((self.first < b) & (self.maxend > a))

    def runs(self, a: int, b: int) -> list[tuple[int, int, int, int]]:
        """Alias runs (pblk, n, ino, lblk) that overlap physical blocks [a, b), clipped."""
        out = []
        for li in self._leaves(a, b).tolist():
            p, n, i, lb = self.pblk[li], self.n[li], self.ino[li], self.lblk[li]
            hit = np.flatnonzero((p < b) & (p + n > a))
            for k in hit.tolist():
                s, e = max(a, int(p[k])), min(b, int(p[k] + n[k]))
                out.append((s, e - s, int(i[k]), int(lb[k]) + s - int(p[k])))
        return sorted(out)

    def aliases(self, pblk: int) -> list[tuple[int, int]]:
        """(inode, file block) of every alias of physical block `pblk` ([] if unshared)."""
        return sorted((ino, lb) for _p, _n, ino, lb in self.runs(pblk, pblk + 1))

    # -- changes -------------------------------------------------------------------------------
    def add(self, ino: int, lblk: int, pblk: int, n: int) -> None:
        """`ino` maps shared blocks [pblk, pblk+n) at file blocks [lblk, lblk+n)."""
        if n <= 0:
            return
        li = int(np.searchsorted(self.first, pblk, "right")) - 1 if self.first.size else -1
        if li < 0:
            if not self.pblk:
                self.pblk, self.n = [np.array([pblk], _I64)], [np.array([n], _U32)]
                self.ino, self.lblk = [np.array([ino], _U32)], [np.array([lblk], _I64)]
                self._summaries()
                return
            li = 0
        p = self.pblk[li]
        k = int(np.searchsorted(p, pblk, "right"))
        self._replace(li, np.insert(p, k, pblk), np.insert(self.n[li], k, n),
                      np.insert(self.ino[li], k, ino), np.insert(self.lblk[li], k, lblk))

    def add_many(self, runs: list[tuple[int, int, int, int]]) -> None:
        """add() for many runs (ino, lblk, pblk, n) at once: each leaf they land in is
        merged and re-sorted once (a clone of a fragmented file adds thousands)."""
        runs = [r for r in runs if r[3] > 0]
        if len(runs) < 4:
            for r in runs:
                self.add(*r)
            return
        a = np.array(runs, _I64)
        a = a[np.argsort(a[:, 2], kind="stable")]
        if not self.pblk:
            self._set_all(a[:, 2], a[:, 3].astype(_U32), a[:, 0].astype(_U32), a[:, 1])
            return
        leaf = np.maximum(np.searchsorted(self.first, a[:, 2], "right") - 1, 0)
        bounds = np.flatnonzero(np.diff(leaf)) + 1
        groups = np.split(np.arange(len(a)), bounds)
        for g in reversed(groups):                 # from the last leaf: indexes stay valid
            li = int(leaf[g[0]])
            pp = np.concatenate((self.pblk[li], a[g, 2]))
            order = np.argsort(pp, kind="stable")
            self._replace(li, pp[order],
                          np.concatenate((self.n[li], a[g, 3].astype(_U32)))[order],
                          np.concatenate((self.ino[li], a[g, 0].astype(_U32)))[order],
                          np.concatenate((self.lblk[li], a[g, 1]))[order])

    def remove(self, ino: int, pblk: int, n: int, lblk: int) -> None:
        """`ino` no longer maps blocks [pblk, pblk+n) at file blocks [lblk, lblk+n): cut them
        out of that run (one inode may map a block at several file blocks)."""
        self._cut(pblk, pblk + n, ino, lblk - pblk)

    def remove_all(self, pblk: int, n: int) -> None:
        """Blocks [pblk, pblk+n) are no longer shared: drop every alias of them."""
        self._cut(pblk, pblk + n, None)

    def _cut(self, a: int, b: int, ino: int | None, diag: int = 0) -> None:
        if b == a + 1:
            self.cut_block(a, ino, diag)
            return
        for li in reversed(self._leaves(a, b).tolist()):
            p, n, i, lb = self.pblk[li], self.n[li], self.ino[li], self.lblk[li]
            end = p + n
            hit = (p < b) & (end > a)
            if ino is not None:                  # that inode's run on that diagonal
                hit &= (i == ino) & (lb - p == diag)
            h = np.flatnonzero(hit)
            if not h.size:
                continue
            if h.size == 1:                      # the COW break's case: one run, scalars
                self._cut_one(li, int(h[0]), a, b)
                continue
            # what is left of each hit run: a piece before a and a piece from b, computed
            # with scalars (a block has few aliases), merged back in one sort
            pieces = []
            for k in h.tolist():
                s, e, l0 = int(p[k]), int(end[k]), int(lb[k])
                if s < a:
                    pieces.append((s, a - s, int(i[k]), l0))
                if e > b:
                    pieces.append((b, e - b, int(i[k]), l0 + b - s))
            keep = ~hit
            add = np.array(pieces, _I64).reshape(-1, 4)
            pp = np.concatenate((p[keep], add[:, 0]))
            order = np.argsort(pp, kind="stable")
            self._replace(li, pp[order],
                          np.concatenate((n[keep], add[:, 1].astype(_U32)))[order],
                          np.concatenate((i[keep], add[:, 2].astype(_U32)))[order],
                          np.concatenate((lb[keep], add[:, 3]))[order], cut=True)

    def cut_block(self, a: int, ino: int | None = None, diag: int = 0) -> None:
        """remove_all(a, 1) (ino None), or remove(ino, a, 1, a + diag): the COW break's
        case, every break cuts one block out of one run, or out of all its runs when one
        owner is left. One C call for the whole cut (else scalars and one splice per array
        in each leaf holding the block) instead of the general merge: heads ([s, a)) shrink in place, runs starting
        at `a` are dropped, and the tails ([a+1, e)) are inserted where pblk a+1 sorts, in
        the same leaf. Bounds stay valid: a head ends earlier, a tail ends where its run did."""
        if _fastmaps is not None:
            if self.first.size != len(self.pblk):
                self._summaries()
            for li, arrays in _fastmaps.frame_cut(self.pblk, self.n, self.ino, self.lblk,
                                                  self.first, self.maxend, a,
                                                  -1 if ino is None else ino, diag, LEAF):
                self._replace(li, *arrays, cut=True)     # emptied or over-full (C: in place)
            return
        first = self.first
        li0 = int(first.searchsorted(a, "right")) - 1 if first.size else -1
        if li0 < 0:
            return
        # leaves up to li0 whose runs may reach a (a long run can start leaves before it)
        lis = [li0] if li0 == 0 or self.maxend[li0 - 1] <= a else \
            np.flatnonzero(self.maxend[:li0 + 1] > a).tolist()
        for li in reversed(lis):
            p, n = self.pblk[li], self.n[li]
            j = int(p.searchsorted(a, "right"))          # runs starting at or before a
            if not j:
                continue
            h = np.flatnonzero(p[:j] + n[:j] > a).tolist() if j > 1 else \
                ([0] if int(p[0]) + int(n[0]) > a else [])
            if not h:
                continue
            i, lb = self.ino[li], self.lblk[li]
            drop: list[int] = []
            tails: list[tuple[int, int, int]] = []       # (n, ino, lblk) of pieces at a+1
            for k in h:
                s, e, l0 = int(p[k]), int(p[k]) + int(n[k]), int(lb[k])
                if ino is not None and (int(i[k]) != ino or l0 - s != diag):
                    continue
                if e > a + 1:
                    tails.append((e - a - 1, int(i[k]), l0 + a + 1 - s))
                if s < a:
                    n[k] = a - s
                else:
                    drop.append(k)
            if not drop and not tails:
                continue
            # entries before jt sort before a+1; every dropped one (pblk a) is among them
            jt = j if tails and j < p.size and int(p[j]) > a + 1 else \
                int(p.searchsorted(a + 1, "left"))
            tp = [a + 1] * len(tails)
            tn = [t[0] for t in tails]
            ti = [t[1] for t in tails]
            tl = [t[2] for t in tails]
            self._put(li, _splice(p, drop, jt, tp, _I64), _splice(n, drop, jt, tn, _U32),
                      _splice(i, drop, jt, ti, _U32), _splice(lb, drop, jt, tl, _I64))

    def _put(self, li: int, p, n, i, lb) -> None:
        """_replace after a cut, without its generality when the leaf stays one leaf."""
        if 0 < p.size <= LEAF and self.first.size == len(self.pblk):
            self.pblk[li], self.n[li], self.ino[li], self.lblk[li] = p, n, i, lb
            self.first[li] = int(p[0])
        else:
            self._replace(li, p, n, i, lb, cut=True)

    def _cut_one(self, li: int, k: int, a: int, b: int) -> None:
        """Cut blocks [a, b) out of run k of leaf li: a piece before a keeps its place, a
        piece from b goes to its sorted position (one concatenate per array)."""
        p, n, i, lb = self.pblk[li], self.n[li], self.ino[li], self.lblk[li]
        s, e, l0 = int(p[k]), int(p[k]) + int(n[k]), int(lb[k])
        j = int(p.searchsorted(b, "right")) if e > b else k + 1
        head = [(s, a - s, l0)] if s < a else []
        tail = [(b, e - b, l0 + b - s)] if e > b else []

        def splice(arr, col, dtype):
            h = np.array([x[col] for x in head], dtype)
            t = np.array([x[col] for x in tail], dtype)
            return np.concatenate((arr[:k], h, arr[k + 1:j], t, arr[j:]))
        ino = np.full(len(head) + len(tail), i[k], _U32)
        ni = np.concatenate((i[:k], ino[:len(head)], i[k + 1:j], ino[len(head):], i[j:]))
        self._replace(li, splice(p, 0, _I64), splice(n, 1, _U32), ni, splice(lb, 2, _I64),
                      cut=True)

    def _replace(self, li: int, p, n, i, lb, cut: bool = False) -> None:
        """Leaf li becomes these (sorted) runs: dropped if empty, split if over LEAF. After
        a `cut` the leaf's largest end can only have shrunk: the old one stays a valid bound
        for pruning lookups, and is not recomputed."""
        step = -(-p.size // -(-p.size // LEAF)) if p.size else 1      # balanced halves
        parts = [(p[k:k + step], n[k:k + step], i[k:k + step], lb[k:k + step])
                 for k in range(0, p.size, step)]
        self.pblk[li:li + 1] = [x[0] for x in parts]
        self.n[li:li + 1] = [x[1] for x in parts]
        self.ino[li:li + 1] = [x[2] for x in parts]
        self.lblk[li:li + 1] = [x[3] for x in parts]
        if len(parts) == 1 and self.first.size == len(self.pblk):
            self.first[li] = int(p[0])
            if not cut:
                self.maxend[li] = int((p + n).max())
        else:
            self._summaries()

    # -- checking ------------------------------------------------------------------------------
    def blocks(self) -> list[tuple[int, int, int]]:
        """Sorted (pblk, ino, lblk) of every alias, block by block (tests; small images)."""
        out = []
        for p, n, i, lb in zip(self.pblk, self.n, self.ino, self.lblk):
            for s, k, ino, l0 in zip(p.tolist(), n.tolist(), i.tolist(), lb.tolist()):
                out += [(s + d, ino, l0 + d) for d in range(k)]
        return sorted(out)


def _splice(arr: np.ndarray, drop: list[int], at: int, vals: list[int], dtype) -> np.ndarray:
    """`arr` without the entries at the sorted indexes `drop` (all < at), with `vals`
    inserted before index `at`: one concatenate."""
    if not drop:
        return np.concatenate((arr[:at], np.array(vals, dtype), arr[at:]))
    parts, prev = [], 0
    for k in drop:
        parts.append(arr[prev:k])
        prev = k + 1
    parts += [arr[prev:at], np.array(vals, dtype), arr[at:]]
    return np.concatenate(parts)
