"""COW breaks done by the C data plane: the engine's side of the COW intent ring.

Why. A write into a block a file shares with another (a reflink clone) must break the
sharing: allocate, copy, remap, drop a reference, commit. In Python that is ~90 us per
request, six times an in-place write served in C, and the COW storm (random 4 KiB writes
into a fresh `cp`) ran at a sixth of the speed of the same writes into the original. The
data plane's threads (daxfs/_cowplane.c) therefore break one-block writes themselves, and
the engine catches up with them here, in batches.

The protocol (XFS's CoW fork has the same shape: stage the data, log the intent, remap later).
  - Python hands C a pool of free blocks (BlockAllocator.pool_take: counted 1 in memory so
    nothing else takes them, still free on the image) and keeps two extent records per pool
    block aside for the remaps to come.
  - C, for a WRITE into a shared block b of a published file: takes a pool block q, copies
    the old block and the new bytes into it, makes q durable, stores a checked ring record
    (ino, b, q, old block, time; format.py) and makes it durable, and only then replies.
    Its own copy of the file's map now reads and writes b at q (the overlay).
  - Python applies the records it takes from C (`apply`): per record the mapping half of a
    COW break (BufCache.adopt_break), and in the same transaction the applied sequence
    number, so the ring slots can be reused and no record is applied twice. The transaction
    is *quiet*: C's maps already say what it commits, so it takes none back. The records of
    this mount's pool go file by file through BufCache.adopt_breaks, which applies the
    common case in C (_cowadopt.c: ~9 us a record in all, against ~20 in Python, which
    held the COW storm at its pace) and hands every other record back to adopt_break.
  - After a crash, `recover` applies every checked record at or past the applied number: an
    acknowledged write is never lost. A record whose write was not acknowledged may or may
    not be there; a pool block no record names is free on the image anyway.

When Python applies. Python's own maps lag C's until then, so every request Python serves
first applies what C did (dataplane.DataPlane.settle at each entry), and an operation that
changes a file takes it back from C and applies again (txn.Transactions.changing) before it
reads the map. A record whose block no longer maps the old block when it is applied cannot
happen under those rules; it is counted (`mismatches`), logged and dropped, its block freed.

The failsafe. A read-only engine applies nothing: the records wait in the ring for the next
mount, as after a crash, and `strand` makes the reads Python serves see them meanwhile.
"""
from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from . import format as fmt
from .errors import FsError

if TYPE_CHECKING:
    from .fs import FileSystem

log = logging.getLogger(__name__)

# records per transaction: 2 extent records, 2 refcounts and up to one inode each, well
# inside the smallest journal's half (fmt.Geometry: 256 blocks)
BATCH = 256


def pending_records(pm, g: fmt.Geometry) -> np.ndarray:
    """The ring records of the image `pm` maps that are not applied yet, in sequence order
    (the mount's recovery, and fsck's note)."""
    ring_off, slots = g.cow_ring()
    applied = int.from_bytes(pm.read(g.cow_applied_offset, 8), "little")
    raw = bytes(pm.read(ring_off, slots * fmt.COW_RECORD_DTYPE.itemsize))
    return fmt.valid_cow_records(np.frombuffer(raw, fmt.COW_RECORD_DTYPE), applied)


class CowLog:
    def __init__(self, fs: FileSystem) -> None:
        self.fs = fs
        self.ring_off, self.slots = fs.g.cow_ring()
        self.applied = int.from_bytes(
            fs.pm.read(fs.g.cow_applied_offset, 8), "little")   # records below are applied
        self.mismatches = 0
        self.applied_records = 0
        self.stranded: dict[int, dict[int, int]] = {}  # failsafe: ino -> {file block: block}
        self._stranding = False

    def pending(self) -> np.ndarray:
        """The ring records not applied yet, in sequence order."""
        return pending_records(self.fs.pm, self.fs.g)

    def recover(self) -> int:
        """At mount, after the journal's replay: apply the records a crash left. A read-only
        mount applies them to its private mapping, as the replay does."""
        recs = self.pending()
        if not recs.size:
            return 0
        tx = self.fs.tx
        readonly, tx.readonly = tx.readonly, False
        try:
            self.apply(recs, pooled=False)
        finally:
            tx.readonly = readonly
        log.info("COW ring: applied %d break(s) done by the data plane before the crash "
                 "(%d dropped)", recs.size, self.mismatches)
        return int(recs.size)

    def strand(self) -> None:
        """The failsafe (Transactions.fail, after it revoked every map, so C breaks no more):
        no transaction will apply the ring's records before the next mount, yet a read Python
        serves of a block C broke must show what C wrote there, not the shared block Python's
        own map still names. Remember, per file block, where each pending record moved it;
        `patch` applies that to reads. Records Python's map already holds (a batch the failing
        transaction had applied in memory) or no longer matches are left out."""
        if self._stranding:                 # a corrupt map met below fails again: once is enough
            return
        self._stranding = True
        try:
            moved: dict[int, dict[int, int]] = {}
            for _magic, _seq, ino, lblk, q, p, _mtime, _check in self.pending().tolist():
                try:                                # the checks `apply` makes, in seq order
                    why = self._target(ino, lblk, q, p, True)[2]
                except FsError:
                    continue
                if not why:
                    moved.setdefault(ino, {})[lblk] = q
            self.stranded = moved
        finally:
            self._stranding = False
        if self.stranded:
            log.warning("failsafe: %d COW break(s) of the data plane stay in the ring until the "
                        "next mount applies them; reads see them meanwhile",
                        sum(map(len, self.stranded.values())))

    def patch(self, ino: int, off: int, data: bytes | memoryview) -> bytes | memoryview:
        """`data`, read by Python's maps from offset `off` of `ino`, with the blocks of
        stranded breaks (see `strand`) read from where C moved them."""
        blocks = self.stranded.get(ino)
        end = off + len(data)
        if not blocks or end == off:
            return data
        out = None
        for lblk in range(off // fmt.BLOCK_SIZE, (end - 1) // fmt.BLOCK_SIZE + 1):
            q = blocks.get(lblk)
            if q is None:
                continue
            s, e = max(off, lblk * fmt.BLOCK_SIZE), min(end, (lblk + 1) * fmt.BLOCK_SIZE)
            out = bytearray(data) if out is None else out
            out[s - off:e - off] = self.fs.pm.read(q * fmt.BLOCK_SIZE + s - lblk * fmt.BLOCK_SIZE,
                                                   e - s)
        return data if out is None else bytes(out)

    def apply(self, recs: np.ndarray, pooled: bool,
              committed: Callable[[int], None] | None = None) -> None:
        """Apply `recs` (COW_RECORD_DTYPE, in seq order), BATCH per transaction. `pooled`:
        their blocks come from the pool of this mount (else: free blocks on the image, named
        by records of an earlier one). `committed(applied)` after each transaction (the data
        plane reuses those ring slots at once). FsError ENOSPC, before any change to a batch,
        when the extent table cannot take its records."""
        for i in range(0, recs.size, BATCH):
            batch = recs[i:i + BATCH]
            self.fs.bufcache.extent_room(2 * batch.size)
            with self.fs.tx.open() as t:
                t.quiet = True
                if pooled:
                    self._apply_by_file(t, batch)
                else:
                    for r in batch.tolist():
                        self._apply_one(t, r, pooled)
                self.applied = max(self.applied, int(batch["seq"][-1]) + 1)
                t.cow_applied(self.applied)
            if committed is not None:
                committed(self.applied)

    def _apply_by_file(self, t, batch: np.ndarray) -> None:
        """The records of a batch of this mount's pool, file by file (records of different
        files are independent; one file's stay in order): C applies the common case
        (BufCache.adopt_breaks), _apply_one the others and every record it stops at."""
        g, fs = self.fs.g, self.fs
        ok = ((batch["new_pblk"] >= g.data_start) & (batch["new_pblk"] < g.nblocks) &
              (batch["old_pblk"] >= g.data_start) & (batch["old_pblk"] < g.nblocks))
        for ino in np.unique(batch["ino"]).tolist():
            sel = batch["ino"] == ino
            mine = batch[sel]
            node = fs.inodes.cached(ino)
            if node is None or not node.is_reg or not ok[sel].all():
                for r in mine.tolist():                 # the checks and messages of _target
                    self._apply_one(t, r, True)
                continue
            ls, qs, ps = (mine[f].astype(np.int64) for f in ("lblk", "new_pblk", "old_pblk"))
            i = 0
            while i < mine.size:
                done = fs.bufcache.adopt_breaks(t, node, ls[i:], qs[i:], ps[i:])
                self.applied_records += done
                i += done
                if i < mine.size:
                    self._apply_one(t, mine[i].tolist(), True)
                    i += 1
            mtime = int(mine["mtime"].max())
            if mtime > node.mtime:
                node.mtime = node.ctime = mtime
            t.inode(node)

    def _apply_one(self, t, r: tuple, pooled: bool) -> None:
        _magic, seq, ino, lblk, q, p, mtime, _check = r
        fs = self.fs
        node, at, why = self._target(ino, lblk, q, p, pooled)
        if why:
            self.mismatches += 1
            log.error("COW ring record %d (inode %d, block %d -> %d) dropped: %s",
                      seq, ino, lblk, q, why)
            if pooled:
                fs.alloc.pool_return(np.array([q], np.uint64))
            return
        if pooled:
            fs.alloc.pool_used(q)
        else:
            fs.alloc.claim(q)
        fs.bufcache.adopt_break(t, node, lblk, at, q)
        if mtime > node.mtime:
            node.mtime = node.ctime = mtime
        t.inode(node)
        self.applied_records += 1

    def _target(self, ino: int, lblk: int, q: int, p: int, pooled: bool):
        """(inode, its extent position of lblk, '') for record (ino, lblk: p -> q), or
        (None, None, why it cannot be applied)."""
        fs, g = self.fs, self.fs.g
        if not (g.data_start <= q < g.nblocks and g.data_start <= p < g.nblocks):
            return None, None, "block outside the data area"
        if not pooled and fs.alloc.count(q):
            return None, None, "its new block is in use"
        node = fs.inodes.cached(ino)
        if node is None:
            try:
                node = fs.inodes.get(ino)
            except FsError as e:
                if e.errno == errno.ENOENT:
                    return None, None, "no such inode"
                raise
        if not node.is_reg:
            return None, None, "not a regular file"
        at = node.extents.find(lblk)
        if at is None or at[2] != p:
            return None, None, "the file no longer maps the old block there"
        return node, at, ""
