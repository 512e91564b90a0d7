"""Per-inode extent maps: file block -> physical block, run-length, held as sorted numpy arrays.

Each extent is one record (slot) of the on-image extent table. An `ExtentMap` is the in-memory
index of one inode's records: four parallel arrays sorted by file block, so a lookup is a
binary search (O(log extents)) and a contiguous range maps to slices, never per-block objects.
Every entry is an *alias descriptor* in the sense of the design: (this inode, file index) ->
a physical block (the primary frame), which other inodes may alias at other indexes.

`remap` is the one mutation: replace the mapping of a file range by a physical run (or by a
hole) and report what the table must change. Neighbouring extents that continue each other
both logically and physically are merged, so sequential writes keep one extent.
"""
from __future__ import annotations

import bisect
import dataclasses

import numpy as np

HOLE = -1
_I64 = np.int64
_U32 = np.uint32     # lengths and record slots: 24 bytes per extent in all (the alias budget is 32)

try:                  # a leaf's splice in C (one call for the four arrays)
    from . import _fastmaps
    _fastmaps.setup(np.empty, np.dtype(_I64), np.dtype(_U32))
except ImportError:   # not built: numpy concatenates give the same leaf
    _fastmaps = None


@dataclasses.dataclass
class RemapResult:
    removed: list[tuple[int, int, int]]    # (pblk, n, lblk): physical runs no longer mapped here,
                                           #   and the file blocks that mapped them
    written: list[tuple[int, int, int, int]]  # records to store: (slot, lblk, pblk, length)
    freed_slots: list[int]                 # records to clear


class Leaf:
    """Up to LEAF extents in four parallel sorted arrays."""
    __slots__ = ("lblk", "pblk", "length", "slot")

    def __init__(self, lblk, pblk, length, slot):
        self.lblk, self.pblk, self.length, self.slot = lblk, pblk, length, slot


LEAF = 256       # extents per leaf: bounds the copying one remap does, whatever the file's size


class ExtentMap:
    """Sorted extents cut into leaves of at most LEAF entries (a one-level B+ tree): lookups
    are two binary searches, and a remap rewrites only the leaves it touches, so a COW break
    in a file of a million extents copies a few KiB, not the whole map."""

    __slots__ = ("leaves", "firsts", "mapped", "count")

    def __init__(self, lblk=None, pblk=None, length=None, slot=None):
        self.leaves: list[Leaf] = []
        self.firsts: list[int] = []          # first file block of each leaf
        self.mapped = 0
        self.count = 0
        if lblk is not None and len(lblk):
            self._replace(0, 0, np.asarray(lblk, _I64), np.asarray(pblk, _I64),
                          np.asarray(length, _U32), np.asarray(slot, _U32))
            self.mapped = int(np.asarray(length, _I64).sum())

    def __len__(self) -> int:
        return self.count

    def end_block(self) -> int:
        """One past the last mapped file block (0 when empty)."""
        if not self.leaves:
            return 0
        last = self.leaves[-1]
        return int(last.lblk[-1] + last.length[-1])

    def _leaf_of(self, lblk: int) -> int:
        i = bisect.bisect_right(self.firsts, lblk) - 1
        return i if i > 0 else 0

    def _replace(self, i: int, j: int, lb, pb, ln, sl) -> None:
        """Replace leaves [i, j) by the given sorted extents, cut into leaves of equal size
        (an over-full leaf splits in halves, each with room to grow: frames.py does the same)."""
        step = -(-lb.size // -(-lb.size // LEAF)) if lb.size else 1
        new = [Leaf(lb[k:k + step], pb[k:k + step], ln[k:k + step], sl[k:k + step])
               for k in range(0, lb.size, step)]
        self.count += lb.size - sum(leaf.lblk.size for leaf in self.leaves[i:j])
        self.leaves[i:j] = new
        self.firsts[i:j] = [int(leaf.lblk[0]) for leaf in new]

    # -- lookups ---------------------------------------------------------------------------------
    def segments(self, l0: int, l1: int) -> list[tuple[int, int, int]]:
        """Cover [l0, l1) with (lblk, count, pblk or HOLE) segments in file order."""
        out: list[tuple[int, int, int]] = []
        if l0 >= l1:
            return out
        pos = l0
        li = self._leaf_of(l0)
        while li < len(self.leaves) and self.firsts[li] < l1:
            leaf = self.leaves[li]
            lb = leaf.lblk
            i = int(np.searchsorted(lb, pos, "right")) - 1
            if i < 0 or lb[i] + leaf.length[i] <= pos:
                i += 1
            j = int(np.searchsorted(lb, l1, "left"))
            if i < j:
                for s, p, n in zip(lb[i:j].tolist(), leaf.pblk[i:j].tolist(),
                                   leaf.length[i:j].tolist()):
                    if s > pos:
                        out.append((pos, s - pos, HOLE))
                        pos = s
                    e = min(s + n, l1)
                    out.append((pos, e - pos, p + (pos - s)))
                    pos = e
            li += 1
        if pos < l1:
            out.append((pos, l1 - pos, HOLE))
        return out

    def lookup(self, lblk: int) -> int:
        if not self.leaves:
            return HOLE
        leaf = self.leaves[self._leaf_of(lblk)]
        i = int(leaf.lblk.searchsorted(lblk, "right")) - 1
        if i >= 0:
            s = int(leaf.lblk[i])
            if lblk < s + int(leaf.length[i]):
                return int(leaf.pblk[i]) + lblk - s
        return HOLE

    def find(self, lblk: int) -> tuple[int, int, int] | None:
        """(leaf, index, physical block) of the extent mapping file block lblk; None in a
        hole. The position is valid until the map changes (remap(..., at=) takes it)."""
        if not self.leaves:
            return None
        li = self._leaf_of(lblk)
        leaf = self.leaves[li]
        i = int(leaf.lblk.searchsorted(lblk, "right")) - 1
        if i >= 0:
            s = int(leaf.lblk[i])
            if lblk < s + int(leaf.length[i]):
                return li, i, int(leaf.pblk[i]) + lblk - s
        return None

    def goal_at(self, at: tuple[int, int, int], lblk: int) -> int:
        """goal(lblk) for the block `at` (find(lblk)) points at, searching only when lblk
        begins its extent (inside it, the block before is in the same extent)."""
        li, i, p = at
        return p if int(self.leaves[li].lblk[i]) < lblk else self.goal(lblk)

    def goal(self, lblk: int) -> int:
        """The physical block that would continue file block lblk - 1 contiguously: where to
        allocate for `lblk`; 0 (no goal) when lblk is 0 or lblk - 1 is a hole."""
        p = self.lookup(lblk - 1) if lblk > 0 else HOLE
        return 0 if p == HOLE else p + 1

    def runs(self) -> list[tuple[int, int, int]]:
        return [r for leaf in self.leaves for r in
                zip(leaf.lblk.tolist(), leaf.pblk.tolist(), leaf.length.tolist())]

    # -- mutation --------------------------------------------------------------------------------
    def remap(self, l0: int, n: int, p0: int, take_slot,
              at: tuple[int, int, int] | None = None) -> RemapResult:
        """Map [l0, l0+n) to [p0, p0+n) (p0 == HOLE: unmap). `take_slot()` gives a free record.
        `at`: find(l0), if the caller has it (spares the search)."""
        if self.leaves:
            res = self._split_inside(l0, n, p0, take_slot, at) if p0 != HOLE else None
            if res is None:
                res = self._remap_leaf(l0, n, p0, take_slot)
            if res is not None:
                return res
        l1 = l0 + n
        # the leaves holding extents that touch or adjoin [l0, l1) (adjoining ones may merge)
        i = self._leaf_of(l0 - 1) if l0 > 0 else 0
        j = max(i + 1, bisect.bisect_right(self.firsts, l1)) if self.leaves else 0
        if self.leaves:
            lv = self.leaves[i:j]
            lb = np.concatenate([x.lblk for x in lv])
            pb = np.concatenate([x.pblk for x in lv])
            ln = np.concatenate([x.length for x in lv])
            sl = np.concatenate([x.slot for x in lv])
        else:
            lb = pb = np.empty(0, _I64)
            ln = sl = np.empty(0, _U32)
        a, b = _touching(lb, ln, l0, l1)
        res = _remap_entries(list(zip(lb[a:b].tolist(), pb[a:b].tolist(), ln[a:b].tolist(),
                                      sl[a:b].tolist())), l0, n, p0, take_slot)
        self._replace(i, j, *_splice(lb, pb, ln, sl, a, b, res.written))
        self.mapped += (n if p0 != HOLE else 0) - sum(r[1] for r in res.removed)
        return res

    def _split_inside(self, l0: int, n: int, p0: int, take_slot,
                      at: tuple[int, int, int] | None) -> RemapResult | None:
        """The COW break's case, without _remap_entries' generality: [l0, l0+n) lies inside
        one extent, which becomes up to three pieces (head, the new run, tail). Nothing can
        merge: the new run cannot continue the old pieces physically, their blocks being
        still allocated; a following extent that starts right at l0+n stays as it is unless
        the new run continues it (then the general path merges them). None when the case
        does not apply."""
        if at is None:
            li = self._leaf_of(l0)
            a = int(self.leaves[li].lblk.searchsorted(l0, "right")) - 1
            if a < 0:
                return None
        else:
            li, a = at[0], at[1]
        leaf = self.leaves[li]
        lb = leaf.lblk
        s = int(lb[a])
        e = s + int(leaf.length[a])
        l1 = l0 + n
        if not (s <= l0 and l1 <= e):
            return None
        if e == l1 and p0 != HOLE:           # a next extent at l1 may continue the new run
            if a + 1 < lb.size:
                if int(lb[a + 1]) == l1 and int(leaf.pblk[a + 1]) == p0 + n:
                    return None
            elif li + 1 < len(self.leaves) and self.firsts[li + 1] == l1:
                return None                  # in the next leaf: the general path decides
        p, slot = int(leaf.pblk[a]), int(leaf.slot[a])
        written = [(slot, s, p, l0 - s)] if s < l0 else []
        written.append((take_slot() if written else slot, l0, p0, n))
        if l1 < e:
            written.append((take_slot(), l1, p + l1 - s, e - l1))
        nlb, npb, nln, nsl = _splice(lb, leaf.pblk, leaf.length, leaf.slot, a, a + 1, written)
        if nlb.size > LEAF:
            self._replace(li, li + 1, nlb, npb, nln, nsl)
        else:
            self.leaves[li] = Leaf(nlb, npb, nln, nsl)
            self.firsts[li] = int(nlb[0])
            self.count += len(written) - 1
        return RemapResult([(p + l0 - s, n, l0)], written, [])

    def _remap_leaf(self, l0: int, n: int, p0: int, take_slot) -> RemapResult | None:
        """remap when every extent it touches or adjoins lies in one leaf (the COW break's
        case): scalars over those few extents and one splice of that leaf, instead of
        concatenating leaves. None when the range reaches into the next leaf."""
        li = self._leaf_of(l0)
        if li + 1 < len(self.leaves) and self.firsts[li + 1] <= l0 + n:
            return None
        leaf = self.leaves[li]
        lb, pb, ln, sl = leaf.lblk, leaf.pblk, leaf.length, leaf.slot
        a, b = _touching(lb, ln, l0, l0 + n)
        res = _remap_entries([(int(lb[k]), int(pb[k]), int(ln[k]), int(sl[k]))
                              for k in range(a, b)], l0, n, p0, take_slot)
        nlb, npb, nln, nsl = _splice(lb, pb, ln, sl, a, b, res.written)
        if 0 < nlb.size <= LEAF:
            self.leaves[li] = Leaf(nlb, npb, nln, nsl)
            self.firsts[li] = int(nlb[0])
            self.count += nlb.size - lb.size
        else:
            self._replace(li, li + 1, nlb, npb, nln, nsl)
        self.mapped += (n if p0 != HOLE else 0) - sum(r[1] for r in res.removed)
        return res


def _touching(lb, ln, l0: int, l1: int) -> tuple[int, int]:
    """Indexes [a, b) of the sorted extents that overlap [l0, l1), or end at l0 (when l0 is
    not mapped) or start at l1: the ones a remap rewrites or may merge with."""
    a = int(lb.searchsorted(l0, "right")) - 1
    if a < 0 or int(lb[a]) + int(ln[a]) < l0:
        a += 1
    return a, int(lb.searchsorted(l1, "right"))


def _remap_entries(ents: list[tuple[int, int, int, int]], l0: int, n: int, p0: int,
                   take_slot) -> RemapResult:
    """remap on the extents (lblk, pblk, length, slot) that `_touching` found: what is left
    of them around [l0, l0+n), the new run, neighbours that continue each other merged; the
    old slots are reused in order, more are taken, the rest freed. `written` holds the new
    entries in file order."""
    l1 = l0 + n
    removed: list[tuple[int, int, int]] = []
    pieces: list[list[int]] = []          # [lblk, pblk, length]
    for s, p, m, _slot in ents:
        e = s + m
        if s < l0:
            pieces.append([s, p, min(e, l0) - s])
        ov0, ov1 = max(s, l0), min(e, l1)
        if ov0 < ov1:
            removed.append((p + ov0 - s, ov1 - ov0, ov0))
        if e > l1:
            pieces.append([max(s, l1), p + max(s, l1) - s, e - max(s, l1)])
    if p0 != HOLE:
        pieces.append([l0, p0, n])
        pieces.sort()
    merged: list[list[int]] = []
    for pc in pieces:
        if merged and merged[-1][0] + merged[-1][2] == pc[0] and merged[-1][1] + merged[-1][2] == pc[1]:
            merged[-1][2] += pc[2]
        else:
            merged.append(pc)
    old_slots = [e[3] for e in ents]
    new_slots = [old_slots[k] if k < len(old_slots) else take_slot() for k in range(len(merged))]
    written = [(s, pc[0], pc[1], pc[2]) for s, pc in zip(new_slots, merged)]
    return RemapResult(removed, written, old_slots[len(merged):])


def _splice(lb, pb, ln, sl, a: int, b: int, written):
    """The four arrays with entries [a, b) replaced by `written` (slot, lblk, pblk, length)."""
    if _fastmaps is not None:
        return _fastmaps.extent_replace(lb, pb, ln, sl, a, b, written)
    m = np.array([w[1:] for w in written], _I64).reshape(-1, 3)
    return (np.concatenate((lb[:a], m[:, 0], lb[b:])), np.concatenate((pb[:a], m[:, 1], pb[b:])),
            np.concatenate((ln[:a], m[:, 2].astype(_U32), ln[b:])),
            np.concatenate((sl[:a], np.array([w[0] for w in written], _U32), sl[b:])))
