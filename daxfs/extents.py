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

try:                  # the COW break's three-way split in C (one call for the four arrays)
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


class _Leaf:
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
        self.leaves: list[_Leaf] = []
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
        return max(0, bisect.bisect_right(self.firsts, lblk) - 1)

    def _replace(self, i: int, j: int, lb, pb, ln, sl) -> None:
        """Replace leaves [i, j) by the given sorted extents, cut into leaves."""
        new = [_Leaf(lb[k:k + LEAF], pb[k:k + LEAF], ln[k:k + LEAF], sl[k:k + LEAF])
               for k in range(0, lb.size, LEAF)]
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
        i = int(np.searchsorted(leaf.lblk, lblk, "right")) - 1
        if i >= 0 and lblk < leaf.lblk[i] + leaf.length[i]:
            return int(leaf.pblk[i] + (lblk - leaf.lblk[i]))
        return HOLE

    def goal(self, lblk: int) -> int:
        """The physical block that would continue file block lblk - 1 contiguously: where to
        allocate for `lblk`; 0 (no goal) when lblk is 0 or lblk - 1 is a hole."""
        p = self.lookup(lblk - 1) if lblk > 0 else HOLE
        return 0 if p == HOLE else p + 1

    def runs(self) -> list[tuple[int, int, int]]:
        return [r for leaf in self.leaves for r in
                zip(leaf.lblk.tolist(), leaf.pblk.tolist(), leaf.length.tolist())]

    # -- mutation --------------------------------------------------------------------------------
    def remap(self, l0: int, n: int, p0: int, take_slot) -> RemapResult:
        """Map [l0, l0+n) to [p0, p0+n) (p0 == HOLE: unmap). `take_slot()` gives a free record."""
        if p0 != HOLE and self.leaves:
            res = self._split_inside(l0, n, p0, take_slot)
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
        res, lb, pb, ln, sl = _remap_flat(lb, pb, ln, sl, l0, n, p0, take_slot)
        self._replace(i, j, lb, pb, ln, sl)
        self.mapped += (n if p0 != HOLE else 0) - sum(r[1] for r in res.removed)
        return res


    def _split_inside(self, l0: int, n: int, p0: int, take_slot) -> RemapResult | None:
        """The COW break's common case, without the general merge: [l0, l0+n) lies strictly
        inside one extent, so it splits in three. Nothing can merge: the new run cannot
        continue the old pieces physically, their blocks being still allocated. None when
        the case does not apply."""
        li = self._leaf_of(l0)
        leaf = self.leaves[li]
        lb = leaf.lblk
        a = int(lb.searchsorted(l0, "right")) - 1
        if a < 0:
            return None
        s = int(lb[a])
        e = s + int(leaf.length[a])
        l1 = l0 + n
        if not (s < l0 and l1 < e):
            return None
        p = int(leaf.pblk[a])
        s1, s2 = take_slot(), take_slot()
        if _fastmaps is not None:
            nlb, npb, nln, nsl = _fastmaps.extent_split(lb, leaf.pblk, leaf.length, leaf.slot,
                                                        a, l0, n, p0, s1, s2)
        else:
            k = a + 1
            nlb = np.concatenate((lb[:k], np.array((l0, l1), _I64), lb[k:]))
            npb = np.concatenate((leaf.pblk[:k], np.array((p0, p + l1 - s), _I64),
                                  leaf.pblk[k:]))
            nln = np.concatenate((leaf.length[:k], np.array((n, e - l1), _U32), leaf.length[k:]))
            nln[a] = l0 - s
            nsl = np.concatenate((leaf.slot[:k], np.array((s1, s2), _U32), leaf.slot[k:]))
        if nlb.size > LEAF:
            self._replace(li, li + 1, nlb, npb, nln, nsl)
        else:
            self.leaves[li] = _Leaf(nlb, npb, nln, nsl)
            self.count += 2
        return RemapResult([(p + l0 - s, n, l0)],
                           [(int(leaf.slot[a]), s, p, l0 - s), (s1, l0, p0, n),
                            (s2, l1, p + l1 - s, e - l1)], [])


def _remap_flat(lb, pb, ln, sl, l0: int, n: int, p0: int, take_slot):
    """remap on one sorted run of extents; returns (result, new arrays)."""
    l1 = l0 + n
    a = int(np.searchsorted(lb, l0, "right")) - 1
    if a < 0 or lb[a] + ln[a] < l0:
        a += 1
    b = int(np.searchsorted(lb, l1, "right"))
    removed: list[tuple[int, int, int]] = []
    pieces: list[list[int]] = []          # [lblk, pblk, length]
    for s, p, m in zip(lb[a:b].tolist(), pb[a:b].tolist(), ln[a:b].tolist()):
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
    old_slots = sl[a:b].tolist()
    new_slots = [old_slots[k] if k < len(old_slots) else take_slot() for k in range(len(merged))]
    freed = old_slots[len(merged):]
    m = np.array(merged, _I64).reshape(-1, 3)
    out = (np.concatenate((lb[:a], m[:, 0], lb[b:])), np.concatenate((pb[:a], m[:, 1], pb[b:])),
           np.concatenate((ln[:a], m[:, 2].astype(_U32), ln[b:])),
           np.concatenate((sl[:a], np.array(new_slots, _U32), sl[b:])))
    written = [(s, pc[0], pc[1], pc[2]) for s, pc in zip(new_slots, merged)]
    return (RemapResult(removed, written, freed), *out)
