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
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .fs import FileSystem

log = logging.getLogger(__name__)

MAX_RUNS = 1 << 16          # a file mapped in more runs is served by Python (publishing costs)
# Publishing costs O(extents), or O(mapped blocks) once the image holds shared blocks (each
# block's owner count is looked at). A file that keeps changing (a clone under COW writes read
# in between) would pay that after every change; so a file is handed over again only after
# Python served it 1 + cost / PUBLISH_AMORTIZE times since it was taken back.
PUBLISH_AMORTIZE = 4096


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
        for ino, t in self.hook.revoke_all():
            self._written(ino, t)

    def _written(self, ino: int, t_ns: int) -> None:
        if t_ns:
            self.fs.note_write_time(ino, t_ns)

    # -- the adapter's calls --------------------------------------------------------------------
    def offer(self, ino: int) -> None:
        """Python just served a read or a pure overwrite of `ino`: let the data plane serve
        the next ones."""
        if ino in self.published or ino in self.too_big:
            return
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
