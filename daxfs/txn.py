"""Typed transactions: what one operation changes in the tables, and how it commits.

Every layer that changes metadata records into the one `Transaction` passed down to it,
by table (inode, dirent, extent, xattr block) instead of by raw image offset; the table
layout (where record i of each table lies) is known here, from the geometry, and nowhere
above. Refcount changes need no call: the allocator marks the ranges it changed and they
join the commit.

Commit order (the redo-log contract of journal.py): first the data blocks the transaction
wrote into fresh blocks are persisted and fenced (so a remap never becomes durable before
the bytes it points at), then the journal commits all records at once, and only then are
the tables updated in place. A crash shows the operation entirely or not at all.

`Transactions.open()` wraps one operation: validation comes before it, so an FsError raised
inside after something was recorded means memory and image may disagree. The engine then
turns read-only (failsafe) rather than writing more; running out of space must therefore be
settled before a transaction opens (see BufCache.reserve). Nothing in here awaits: under trio
one transaction is atomic with respect to every other request served in Python.

Requests served outside Python (the C data plane, dataplane.py) read and overwrite in place
the blocks of the inodes they were handed; the `MapWatcher` hears of every inode whose
mapping, size, mode or block sharing a commit changes, before the commit is durable and
before any block it freed can be reused, and takes those inodes back.
"""
from __future__ import annotations

import contextlib
import errno
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Iterable, Protocol

from . import format as fmt
from .errors import CorruptionError, FsError

if TYPE_CHECKING:
    from .alloc import BlockAllocator
    from .inodes import Inode
    from .journal import Journal
    from .pmem import PMem

log = logging.getLogger(__name__)

# what a write takes: bytes, a memoryview (the C hook passes libfuse's buffer), or any buffer
Buffer = bytes | bytearray | memoryview

# dirty timestamps of pure overwrites ride along with the next commit, at most this many
TIMES_PER_COMMIT = 512


class MapWatcher(Protocol):
    """Serves file data from its own copies of inode maps (the C data plane, dataplane.py)."""

    def changed(self, inos: Iterable[int]) -> None:
        """These inodes' mapping, size, mode or block sharing change (or changed, at a
        commit): stop serving them from the old copy before returning."""

    def sync(self, ino: int) -> None:
        """Hand over the timestamps of writes served for `ino` (FileSystem.note_write_time)."""

    def sync_all(self) -> None:
        """`sync` for every inode."""

    def revoke_all(self) -> None:
        """Serve nothing any more (the failsafe)."""

    def settle(self) -> None:
        """Apply the COW breaks done outside Python so far (cowlog.py); outside transactions."""


class Transaction:
    """The records of one operation, keyed by table slot (a later record of a slot wins)."""

    __slots__ = ("_g", "writes", "nodes", "data", "touched", "quiet")

    def __init__(self, g: fmt.Geometry) -> None:
        self._g = g
        self.writes: dict[int, bytes] = {}       # image offset -> record bytes
        self.nodes: dict[int, Inode] = {}        # inodes to store (packed at commit)
        self.data: list[tuple[int, int]] = []    # fresh data ranges to persist first
        self.touched: set[int] = set()           # inodes changed without a record of their own
        self.quiet = False                       # records what the data plane did (cowlog.py):
                                                 # its maps are up to date, take none back

    def inode(self, node: Inode) -> None:
        self.nodes[node.ino] = node

    def dirent(self, slot: int, record: bytes) -> None:
        self.writes[self._g.record_offset("dirents", slot)] = record

    def extent(self, slot: int, record: bytes) -> None:
        self.writes[self._g.record_offset("extents", slot)] = record

    def free_inode(self, ino: int, record: bytes) -> None:
        self.nodes.pop(ino, None)
        self.touched.add(ino)
        self.writes[self._g.record_offset("inodes", ino)] = record

    def xattr_block(self, blk: int, block: bytes) -> None:
        """A whole xattr block, journaled (xattrs are metadata, unlike file data)."""
        self.writes[blk * fmt.BLOCK_SIZE] = block

    def sharing(self, ino: int) -> None:
        """`ino`'s blocks gain an owner (a clone's source): no longer writable in place."""
        self.touched.add(ino)

    def cow_applied(self, seq: int) -> None:
        """Ring records below `seq` are applied (format.py, COW intent ring)."""
        self.writes[self._g.cow_applied_offset] = seq.to_bytes(8, "little")

    def persist_data(self, off: int, length: int) -> None:
        """Bytes stored outside the journal that must be durable before the commit."""
        self.data.append((off, length))

    @property
    def empty(self) -> bool:
        return not (self.writes or self.nodes)


class Transactions:
    """Opens and commits transactions; holds the failsafe state and the lazy timestamps."""

    def __init__(self, pm: PMem, g: fmt.Geometry, journal: Journal, alloc: BlockAllocator,
                 readonly: bool) -> None:
        self.pm, self.g, self.journal, self.alloc = pm, g, journal, alloc
        self.readonly = readonly
        self.failed: str | None = None
        self.dirty_times: dict[int, Inode] = {}  # overwritten files: timestamps not yet stored
        self._rc_base = g.region("refcounts")[0]
        self.watcher: MapWatcher | None = None
        self.on_fail: Callable[[], None] | None = None   # after the failsafe's revoke_all

    def changing(self, *inos: int) -> None:
        """Before an operation that reads and then changes these inodes' data or mapping
        (clone, dedupe, truncate, fallocate): requests served outside Python stop using
        them now, not only at the commit, and the COW breaks they did are applied first."""
        if self.watcher is not None:
            self.watcher.changed(inos)
            self.watcher.settle()

    def sync_times(self, ino: int) -> None:
        if self.watcher is not None:
            self.watcher.sync(ino)

    def note_times(self, node: Inode) -> None:
        """`node` changed only in its timestamps: they ride along with a later commit."""
        self.dirty_times[node.ino] = node

    def drop_times(self, ino: int) -> None:
        self.dirty_times.pop(ino, None)

    @property
    def writable(self) -> bool:
        return not (self.readonly or self.failed)

    @contextlib.contextmanager
    def open(self) -> Iterator[Transaction]:
        if self.readonly:
            raise FsError(errno.EROFS)
        if self.failed:
            raise FsError(errno.EROFS, f"read-only after an internal error: {self.failed}")
        t = Transaction(self.g)
        try:
            yield t
        except FsError as e:
            if not t.empty or self.alloc.changed or isinstance(e, CorruptionError):
                self.fail(e)
            raise
        except BaseException as e:
            self.fail(e)
            raise
        self._commit(t)

    def fail(self, e: BaseException) -> None:
        """Enter the failsafe: read-only until remount (corruption or an engine bug)."""
        if isinstance(e, CorruptionError):
            log.error("corrupt metadata, daxfs is now read-only (failsafe; run daxfs fsck): %s",
                      e.args[1])
        else:
            log.error("internal error, daxfs is now read-only (failsafe): %r", e, exc_info=e)
        self.failed = repr(e)
        if self.watcher is not None:
            self.watcher.revoke_all()
        if self.on_fail is not None:
            try:                            # never hide the failure that brought us here
                self.on_fail()
            except Exception:
                log.exception("the failsafe's own step failed")

    def _commit(self, t: Transaction) -> None:
        if self.watcher is not None and not t.quiet:
            # before the lazy timestamps join: those inodes' maps did not change
            self.watcher.changed([*t.nodes, *t.touched])
        writes = self.alloc.take_dirty(self._rc_base)
        if self.dirty_times and len(self.dirty_times) < TIMES_PER_COMMIT:
            t.nodes.update(self.dirty_times)
            self.dirty_times.clear()
        at = self.g.record_offset
        writes += [(at("inodes", ino), node.pack()) for ino, node in t.nodes.items()]
        writes += t.writes.items()
        if t.data:
            for off, length in t.data:
                self.pm.persist(off, length)
            self.pm.fence()
        self.journal.commit(writes)

    def flush_times(self) -> None:
        """Store the lazily kept timestamps of overwritten files (fsync, unmount)."""
        if self.watcher is not None:
            self.watcher.sync_all()
        while self.dirty_times and self.writable:
            batch = dict(list(self.dirty_times.items())[:TIMES_PER_COMMIT])
            for ino in batch:
                del self.dirty_times[ino]
            with self.open() as t:
                t.nodes.update(batch)
