"""Directories: one dirent record per name in the on-image dirent table, indexed in memory by a
dict per directory, so a lookup is O(1) whatever the directory size.

Built once at mount from the table (one numpy pass, then one dict insert per name). `readdir`
cookies are dirent slot numbers + FIRST_COOKIE (1 and 2 are `.` and `..`): stable while an
entry exists, so a listing resumed after concurrent changes never repeats or skips surviving
entries. Each directory keeps its slots sorted, so a listing is served from its cookie with no
per-handle copy (a 20,000-entry directory costs nothing per open handle).
"""
from __future__ import annotations

import bisect
import errno
import logging

import numpy as np

from . import format as fmt
from .alloc import SlotPool
from .errors import FsError

log = logging.getLogger(__name__)
FIRST_COOKIE = 3          # cookie of dirent slot 0; `.` is 1, `..` is 2


def check_name(name: bytes) -> None:
    if not name or b"/" in name or b"\0" in name:
        raise FsError(errno.EINVAL, "invalid file name")
    if len(name) > fmt.MAX_NAME:
        raise FsError(errno.ENAMETOOLONG)


class Directories:
    def __init__(self, view: np.ndarray):
        self.children: dict[int, dict[bytes, tuple[int, int]]] = {}  # dir -> name -> (ino, slot)
        self.order: dict[int, list[int]] = {}   # dir -> its dirent slots, sorted (readdir order)
        self.names: dict[int, bytes] = {}       # dirent slot -> name
        self.parent: dict[int, int] = {}        # directory inode -> its parent directory
        used = np.flatnonzero(view["parent"] != 0)
        recs = view[used]
        children = self.children
        for slot, parent, ino, name, nlen in zip(used.tolist(), recs["parent"].tolist(),
                                                 recs["ino"].tolist(), recs["name"].tolist(),
                                                 recs["namelen"].tolist()):
            if not 0 < nlen <= len(name):
                # numpy drops trailing NULs: a namelen past them means NULs inside the name
                log.warning("dirent %d in directory %d: corrupt name %r (namelen %d), not "
                            "served (run daxfs fsck)", slot, parent, name, nlen)
                continue
            name = name[:nlen]            # namelen is the truth; bytes after it are not the name
            d = children.get(parent)
            if d is None:
                d = children[parent] = {}
                self.order[parent] = []
            d[name] = (ino, slot)
            self.order[parent].append(slot)          # slots come in ascending order
            self.names[slot] = name
        self.pool = SlotPool(np.flatnonzero(view["parent"] == 0), "directory entries")

    def note_dir_parents(self, is_dir) -> None:
        """Fill `parent` for directories (`is_dir(ino)` tells which children are directories)."""
        for parent, entries in self.children.items():
            for name, (ino, slot) in list(entries.items()):
                if not is_dir(ino):
                    continue
                if ino in self.parent or ino == parent or ino == fmt.ROOT_INO:
                    # a second name for a directory (or itself): a loop, corrupt; serve one
                    log.warning("dirent %d: directory %d has a second name %r in %d, not "
                                "served (run daxfs fsck)", slot, ino, name, parent)
                    del entries[name]
                    self._unlist(parent, slot)
                    continue
                self.parent[ino] = parent

    # the parent of each directory ('..'): kept by the namespace as directories move
    def parent_of(self, d: int, default: int) -> int:
        return self.parent.get(d, default)

    def set_parent(self, d: int, parent: int) -> None:
        self.parent[d] = parent

    def drop_parent(self, d: int) -> None:
        self.parent.pop(d, None)

    def names_of(self, inos: set[int]) -> dict[int, tuple[int, bytes]]:
        """One (directory, name) for each of `inos` that has a name: a scan of every
        directory, for reports (`daxfs stat FILE`), not for request paths."""
        out: dict[int, tuple[int, bytes]] = {}
        for d, entries in self.children.items():
            for name, (ino, _slot) in entries.items():
                if ino in inos and ino not in out:
                    out[ino] = (d, name)
        return out

    def path(self, d: int, name: bytes, root: int) -> bytes:
        """The path of `name` in directory `d`, from the root (b"/a/b")."""
        parts = [name]
        seen = 0
        while d != root and seen < 4096:
            parent = self.parent.get(d)
            if parent is None:
                return b"?/" + b"/".join(reversed(parts))
            parts.append(self._name_in(parent, d))
            d, seen = parent, seen + 1
        return b"/" + b"/".join(reversed(parts))

    def _name_in(self, parent: int, d: int) -> bytes:
        for name, (ino, _slot) in self.children[parent].items():
            if ino == d:
                return name
        raise KeyError(d)

    def lookup(self, d: int, name: bytes) -> int | None:
        e = self.children.get(d)
        if e is None:
            return None
        hit = e.get(name)
        return None if hit is None else hit[0]

    def entries(self, d: int) -> dict[bytes, tuple[int, int]]:
        return self.children.get(d, {})

    def is_empty(self, d: int) -> bool:
        return not self.children.get(d)

    def _list(self, d: int, slot: int, name: bytes) -> None:
        bisect.insort(self.order.setdefault(d, []), slot)
        self.names[slot] = name

    def _unlist(self, d: int, slot: int) -> None:
        order = self.order[d]
        del order[bisect.bisect_left(order, slot)]
        if not order:
            del self.order[d]
        self.names.pop(slot, None)

    # mutations return (slot, record bytes) for the transaction to journal
    def add(self, d: int, name: bytes, ino: int) -> tuple[int, bytes]:
        slot = self.pool.take()
        self.children.setdefault(d, {})[name] = (ino, slot)
        self._list(d, slot, name)
        return slot, fmt.pack_dirent(d, ino, name)

    def remove(self, d: int, name: bytes) -> tuple[int, bytes]:
        e = self.children[d]
        _ino, slot = e.pop(name)
        if not e:
            del self.children[d]
        self._unlist(d, slot)
        self.pool.give(slot)
        return slot, fmt.FREE_DIRENT

    def move(self, d: int, name: bytes, nd: int, new_name: bytes) -> tuple[int, bytes]:
        """Rename to a name that does not exist yet, keeping the record slot: a rename needs
        no free directory entry (ext4's `mv a a2` works in a full directory table too)."""
        e = self.children[d]
        ino, slot = e.pop(name)
        if not e:
            del self.children[d]
        self._unlist(d, slot)
        self.children.setdefault(nd, {})[new_name] = (ino, slot)
        self._list(nd, slot, new_name)
        return slot, fmt.pack_dirent(nd, ino, new_name)

    def retarget(self, d: int, name: bytes, ino: int) -> tuple[int, bytes]:
        """Point an existing name at another inode (rename over, exchange)."""
        e = self.children[d]
        _old, slot = e[name]
        e[name] = (ino, slot)
        return slot, fmt.pack_dirent(d, ino, name)

    def listing(self, d: int, after: int = 0, limit: int | None = None
                ) -> list[tuple[int, bytes, int]]:
        """Up to `limit` entries (cookie, name, ino) with cookie > `after`, in cookie order
        (`.` and `..` not included)."""
        order = self.order.get(d)
        if not order:
            return []
        i = bisect.bisect_left(order, max(0, after - FIRST_COOKIE + 1))
        slots = order[i:] if limit is None else order[i:i + limit]
        names, entries = self.names, self.children[d]
        return [(slot + FIRST_COOKIE, names[slot], entries[names[slot]][0]) for slot in slots]
