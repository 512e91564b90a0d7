"""Which files the C data plane may serve: the engine's side of daxfs/_dataplane.c.

The data plane's threads read /dev/fuse and answer READ of a *published* file, and WRITE
that overwrites in place blocks the file alone maps, without Python (see the essay at the top
of _dataplane.c). Everything else reaches Python through pyfuse3 as before.

Publishing. A file is handed over (`offer`) after Python served a read of it, or a write
that changed nothing but bytes and timestamps: its size, its mapped runs with the owned flag
(BufCache.owned_runs), and whether it may be overwritten in place (FileSystem.plane_map).
A write that allocates, COW-breaks or grows the file goes to Python, which commits; the
commit takes the file back, and the next read or pure overwrite hands it over again. Files
of more than MAX_RUNS runs stay in Python until they change.

Taking back (the MapWatcher protocol of txn.py). Every commit reports the inodes whose
record it writes or whose blocks it frees or shares; operations that read before they change
(clone, dedupe, truncate, fallocate) report theirs before they begin. `changed` revokes
them: the C side waits for requests using those maps and drops them, so no thread writes a
block that has become shared or reads one that was freed, and the write time it kept becomes
the inode's mtime/ctime (FileSystem.note_write_time). The kernel's FORGET revokes too, so maps
exist only for inodes the kernel holds. The failsafe revokes everything.

COW breaks (cowlog.py explains the protocol). With `enable_cow` the threads also break the
sharing of a block a one-block write lands in, from a pool of free blocks kept here, and log
each break in the image's COW ring; `settle` applies what they did to the engine. It runs at
every request Python serves (fuse_ops), before a file is published again, after a file is
taken back for a change (txn.Transactions.changing), and when C asks (its eventfd: records
piling up or the pool running low; `cow_task`). The pool is handed back when space runs short
(BlockAllocator.room, BufCache.extent_room and fit_write ask) and at unmount.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from . import format as fmt

if TYPE_CHECKING:
    from .fs import FileSystem

log = logging.getLogger(__name__)

MAX_RUNS = 1 << 20          # a file mapped in more runs is served by Python (publishing costs;
                            # a clone after a COW storm has a run per broken block)
# Publishing costs O(extents), or O(mapped blocks) once the image holds shared blocks (each
# block's owner count is looked at). A file that keeps changing (a clone under COW writes read
# in between) would pay that after every change; so a file is handed over again only after
# Python served it 1 + cost / PUBLISH_AMORTIZE times since it was taken back.
PUBLISH_AMORTIZE = 4096
POOL_BLOCKS = 4096          # the COW pool C breaks from (16 MiB), refilled below half: C must
                            # not run dry while Python applies a batch (~9 us a record);
                            # at most 1/64 of the data area
POOL_FLOOR = 4096           # blocks and extent records left to Python before the pool fills
                            # (at most 1/32 of the data area); below, Python breaks COW
DRAIN_AT = 512              # C asks for `settle` once this many breaks wait (or the ring's 1/4)


class DataPlane:
    """Implements txn.MapWatcher for the engine, and `offer`/`forgotten` for the adapter."""

    def __init__(self, fs: FileSystem, hook: ModuleType) -> None:
        self.fs = fs
        self.hook = hook                   # daxfs.fusehook
        self.published: set[int] = set()
        self.too_big: set[int] = set()     # not offered again until they change
        self.misses: dict[int, int] = {}   # served in Python since taken back (see offer)
        self.changes = 0                   # inodes reported changed, ever: a write that
                                           # changed none only overwrote (fuse_ops)
        self.cow_fd: int | None = None     # C's eventfd while it breaks COW (enable_cow)
        self.slots_kept: list[int] = []    # extent records kept for the pool's breaks
        blocks = fs.g.data_blocks
        self.pool_blocks = max(16, min(POOL_BLOCKS, blocks // 64))
        self.pool_floor = min(POOL_FLOOR, blocks // 32)
        fs.tx.watcher = self

    # -- txn.MapWatcher -------------------------------------------------------------------------
    def changed(self, inos: Iterable[int]) -> None:
        for ino in inos:
            self.changes += 1
            self.too_big.discard(ino)
            if ino in self.published:
                self.published.discard(ino)
                self._written(ino, self.hook.revoke(ino))

    def sync(self, ino: int) -> None:
        if ino in self.published:
            self._written(ino, self.hook.take_times(ino))

    def sync_all(self) -> None:
        for ino, t in self.hook.take_all_times():
            self._written(ino, t)

    def revoke_all(self) -> None:
        self.published.clear()
        if self.cow_fd is not None:
            self.hook.cow_disable()         # what it did stays in the ring: the next mount
        for ino, t in self.hook.revoke_all():
            self._written(ino, t)

    # -- COW breaks in C ------------------------------------------------------------------------
    def enable_cow(self) -> None:
        """Before mounting: let the threads break COW (a writable image they may write)."""
        cow = self.fs.cow
        self.cow_fd = self.hook.cow_configure(cow.ring_off, cow.slots, cow.applied, cow.applied,
                                              self.pool_blocks // 2,
                                              min(DRAIN_AT, cow.slots // 4))
        self.fs.alloc.reclaim_pool = self.reclaim
        self.fs.bufcache.reclaim_pool = self.reclaim
        self.refill()

    def settle(self) -> None:
        """Apply the breaks C did (cowlog.py); then top the pool up. Outside transactions."""
        if self.cow_fd is None:
            return
        raw = self.hook.cow_take()
        if not raw:
            return
        recs = np.frombuffer(raw, fmt.COW_RECORD_DTYPE)
        self._give_slots(2 * recs.size)
        self.refill()                       # first: C keeps breaking while this applies
        if self.fs.tx.writable:             # else they wait in the ring for the next mount
            self.fs.cow.apply(recs, pooled=True, committed=self._applied)   # refills per batch

    def _applied(self, seq: int) -> None:
        """After each transaction of `settle`: C may reuse those ring slots, and gets blocks
        again before it runs dry (it waits for them rather than hand writes to Python)."""
        self.hook.cow_applied(seq)
        self.refill()

    def refill(self) -> None:
        fs = self.fs
        have = self.hook.cow_status()["pool"]
        if have >= self.pool_blocks // 2 or not fs.tx.writable:
            return
        room = min(fs.alloc.available(), len(fs.inodes.extent_pool) // 2) - self.pool_floor
        n = min(self.pool_blocks - have, room)
        if n <= 0:
            return
        blocks = fs.alloc.pool_take(n)
        take = fs.inodes.extent_pool.take
        self.slots_kept += [take() for _ in range(2 * blocks.size)]
        self.hook.cow_pool_add(blocks)

    def reclaim(self) -> bool:
        """Space runs short: take the pool back from C (True if that freed anything)."""
        if self.cow_fd is None:
            return False
        blocks = np.frombuffer(self.hook.cow_pool_take(), np.uint64)
        self.fs.alloc.pool_return(blocks)
        self._give_slots(2 * blocks.size)
        return bool(blocks.size)

    def _give_slots(self, n: int) -> None:
        give = self.fs.inodes.extent_pool.give
        for _ in range(min(n, len(self.slots_kept))):
            give(self.slots_kept.pop())

    def shutdown(self) -> None:
        """At unmount, the threads stopped: apply the last breaks, hand the pool back."""
        if self.cow_fd is None:
            return
        self.hook.cow_disable()
        self.settle()
        self.reclaim()
        self._give_slots(len(self.slots_kept))

    async def cow_task(self) -> None:
        """Settle whenever C asks (its eventfd), for as long as the daemon serves."""
        import trio
        while self.cow_fd is not None:
            await trio.lowlevel.wait_readable(self.cow_fd)
            try:
                self.settle()
                self.refill()
            except Exception:               # the failsafe has the details; keep serving
                log.exception("applying the data plane's COW breaks failed")
                await trio.sleep(1)

    def _written(self, ino: int, t_ns: int) -> None:
        if t_ns:
            self.fs.note_write_time(ino, t_ns)

    # -- the adapter's calls --------------------------------------------------------------------
    def offer(self, ino: int) -> None:
        """Python just served a read or a pure overwrite of `ino`: let the data plane serve
        the next ones."""
        if ino in self.published or ino in self.too_big:
            return
        self.settle()                       # the map published must hold C's breaks
        node = self.fs.inodes.cached(ino)
        if node is None:
            return
        cost = node.extents.mapped if self.fs.alloc.shared else len(node.extents)
        misses = self.misses.get(ino, 0) + 1
        if misses <= cost // PUBLISH_AMORTIZE:
            self.misses[ino] = misses
            return
        self.misses.pop(ino, None)
        view = self.fs.plane_map(ino)
        if view is None:
            return
        size, writable, runs = view
        if runs.size > MAX_RUNS:
            self.too_big.add(ino)
            return
        self.hook.publish(ino, size, writable, runs)
        self.published.add(ino)

    def forgotten(self, ino: int) -> None:
        """A FORGET of `ino`: once the kernel holds no reference, no request can come for it
        until a lookup (which is served in Python) brings it back."""
        self.misses.pop(ino, None)
        if ino in self.published:
            node = self.fs.inodes.cached(ino)
            if node is None or node.lookups == 0:
                self.changed((ino,))
