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

import dataclasses
import struct

import numpy as np

from . import format as fmt

EXTENT_REC = struct.Struct("<IIQQ")
assert EXTENT_REC.size == fmt.EXTENT_DTYPE.itemsize
HOLE = -1
_I64 = np.int64


@dataclasses.dataclass
class RemapResult:
    removed: list[tuple[int, int]]         # physical runs (pblk, n) no longer mapped here
    written: list[tuple[int, int, int, int]]  # records to store: (slot, lblk, pblk, length)
    freed_slots: list[int]                 # records to clear


class ExtentMap:
    __slots__ = ("lblk", "pblk", "length", "slot", "mapped")

    def __init__(self, lblk=None, pblk=None, length=None, slot=None):
        e = np.empty(0, _I64)
        self.lblk = e if lblk is None else np.asarray(lblk, _I64)
        self.pblk = e if pblk is None else np.asarray(pblk, _I64)
        self.length = e if length is None else np.asarray(length, _I64)
        self.slot = e if slot is None else np.asarray(slot, _I64)
        self.mapped = int(self.length.sum())

    def __len__(self) -> int:
        return int(self.lblk.size)

    def end_block(self) -> int:
        """One past the last mapped file block (0 when empty)."""
        if not self.lblk.size:
            return 0
        return int(self.lblk[-1] + self.length[-1])

    # -- lookups ---------------------------------------------------------------------------------
    def segments(self, l0: int, l1: int) -> list[tuple[int, int, int]]:
        """Cover [l0, l1) with (lblk, count, pblk or HOLE) segments in file order."""
        out: list[tuple[int, int, int]] = []
        if l0 >= l1:
            return out
        lb = self.lblk
        i = int(np.searchsorted(lb, l0, "right")) - 1
        if i < 0 or lb[i] + self.length[i] <= l0:
            i += 1
        j = int(np.searchsorted(lb, l1, "left"))
        pos = l0
        if i < j:
            for s, p, n in zip(lb[i:j].tolist(), self.pblk[i:j].tolist(), self.length[i:j].tolist()):
                if s > pos:
                    out.append((pos, s - pos, HOLE))
                    pos = s
                e = min(s + n, l1)
                out.append((pos, e - pos, p + (pos - s)))
                pos = e
        if pos < l1:
            out.append((pos, l1 - pos, HOLE))
        return out

    def lookup(self, lblk: int) -> int:
        i = int(np.searchsorted(self.lblk, lblk, "right")) - 1
        if i >= 0 and lblk < self.lblk[i] + self.length[i]:
            return int(self.pblk[i] + (lblk - self.lblk[i]))
        return HOLE

    def runs(self) -> list[tuple[int, int, int]]:
        return list(zip(self.lblk.tolist(), self.pblk.tolist(), self.length.tolist()))

    # -- mutation --------------------------------------------------------------------------------
    def remap(self, l0: int, n: int, p0: int, take_slot) -> RemapResult:
        """Map [l0, l0+n) to [p0, p0+n) (p0 == HOLE: unmap). `take_slot()` gives a free record."""
        lb, pb, ln, sl = self.lblk, self.pblk, self.length, self.slot
        l1 = l0 + n
        # window [a, b) of extents touching or adjacent to [l0, l1), for merging
        a = int(np.searchsorted(lb, l0, "right")) - 1
        if a < 0 or lb[a] + ln[a] < l0:
            a += 1
        b = int(np.searchsorted(lb, l1, "right"))
        removed: list[tuple[int, int]] = []
        pieces: list[list[int]] = []          # [lblk, pblk, length]
        for k in range(a, b):
            s, p, m = int(lb[k]), int(pb[k]), int(ln[k])
            e = s + m
            if s < l0:
                pieces.append([s, p, min(e, l0) - s])
            ov0, ov1 = max(s, l0), min(e, l1)
            if ov0 < ov1:
                removed.append((p + ov0 - s, ov1 - ov0))
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
        new_slots = [old_slots[i] if i < len(old_slots) else take_slot() for i in range(len(merged))]
        freed = old_slots[len(merged):]
        m = np.array(merged, _I64).reshape(-1, 3)
        self.lblk = np.concatenate((lb[:a], m[:, 0], lb[b:]))
        self.pblk = np.concatenate((pb[:a], m[:, 1], pb[b:]))
        self.length = np.concatenate((ln[:a], m[:, 2], ln[b:]))
        self.slot = np.concatenate((sl[:a], np.array(new_slots, _I64), sl[b:]))
        self.mapped += (n if p0 != HOLE else 0) - sum(r[1] for r in removed)
        written = [(s, pc[0], pc[1], pc[2]) for s, pc in zip(new_slots, merged)]
        return RemapResult(removed, written, freed)


def pack_extent(ino: int, lblk: int, pblk: int, length: int) -> bytes:
    return EXTENT_REC.pack(ino, length, lblk, pblk)


FREE_EXTENT = bytes(fmt.EXTENT_DTYPE.itemsize)
