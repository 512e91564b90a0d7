"""Image fuzzer, analysis of an image's tables (after journal replay, as fsck and the engine see
them): which paths damage left untouched, and which changes fsck must report."""
from __future__ import annotations

import collections
import stat
from typing import TYPE_CHECKING

import numpy as np

from daxfs import format as fmt
from daxfs import fsck
from daxfs import journal as jmod

from .fuzz_common import BS, ROOT, S_IFMT, _MemPM

if TYPE_CHECKING:
    from .fuzz_bases import Base


# =============================================================================== analysis
class Tables:
    """The tables of an image after journal replay (what fsck and the engine work on)."""

    def __init__(self, data: bytes, g: fmt.Geometry, size: int | None = None):
        d = bytearray(memoryview(data)[:g.data_start * BS])
        pm = _MemPM(d, len(data) if size is None else size)
        j = jmod.Journal(pm, g)
        self.journal_ok = j.header_ok()
        if self.journal_ok:
            j.replay()
        self.g = g
        raw = bytes(d)
        self.inodes = np.frombuffer(raw, fmt.INODE_DTYPE, g.inode_count, g.region("inodes")[0])
        self.dirents = np.frombuffer(raw, fmt.DIRENT_DTYPE, g.dirent_count, g.region("dirents")[0])
        self.extents = np.frombuffer(raw, fmt.EXTENT_DTYPE, g.extent_count, g.region("extents")[0])
        self.refcounts = np.frombuffer(raw, "<u4", g.nblocks, g.region("refcounts")[0])
        self._ext = None
        self._names = None

    def extents_of(self, ino: int) -> list[tuple[int, int, int]]:
        if self._ext is None:
            self._ext = collections.defaultdict(list)
            e = self.extents
            for i in np.flatnonzero(e["ino"] != 0).tolist():
                self._ext[int(e["ino"][i])].append((int(e["lblk"][i]), int(e["pblk"][i]),
                                                    int(e["length"][i])))
            for v in self._ext.values():
                v.sort()
        return self._ext.get(ino, [])

    def names(self) -> dict:
        """(parent, name) -> sorted [(slot, ino)] of live entries; ino -> set of slots."""
        if self._names is None:
            by_name = collections.defaultdict(list)
            by_ino = collections.defaultdict(set)
            d = self.dirents
            rows = d.view(np.uint8).reshape(-1, fmt.DIRENT_DTYPE.itemsize)
            for i in np.flatnonzero(d["parent"] != 0).tolist():
                # the name is exactly namelen bytes (numpy's S255 would drop trailing NULs)
                name = rows[i, 9:9 + int(d["namelen"][i])].tobytes()
                by_name[(int(d["parent"][i]), name)].append((i, int(d["ino"][i])))
                by_ino[int(d["ino"][i])].add(i)
            self._names = (by_name, by_ino)
        return self._names

    def entry_name(self, slot: int) -> bytes:
        rows = self.dirents.view(np.uint8).reshape(-1, fmt.DIRENT_DTYPE.itemsize)
        return rows[slot, 9:9 + int(self.dirents["namelen"][slot])].tobytes()

    def data_ok(self, pblk: int, length: int) -> bool:
        return length > 0 and self.g.data_start <= pblk and pblk + length <= self.g.nblocks


_TABLES_CACHE: dict = {}


def _base_tables(b: Base) -> "Tables":
    t = _TABLES_CACHE.get(id(b.data))
    if t is None:
        t = _TABLES_CACHE[id(b.data)] = Tables(b.data, b.g)
    return t


class ExtentsOf:
    def __init__(self, t: Tables):
        self.t = t

    def __call__(self, ino):
        return self.t.extents_of(ino)

    def ok(self, pblk, length):
        return self.t.data_ok(pblk, length)


_FILE_FIELDS = ("mode", "nlink", "size", "flags", "xattr_blk")


_DIR_FIELDS = ("mode", "flags")


def undamaged_paths(base: Base, o: Tables, d: Tables) -> set[str]:
    """Paths whose whole footprint is identical in the damaged image (after replay): the inode
    records of the file and its directories, the entries on the path (and no other entry with
    the same parent and name, no extra name for a directory on it), the file's extents and its
    xattr block (owned by no one else)."""
    obn, obi = o.names()
    dbn, dbi = d.names()
    out = set()
    for path, (ino, chain) in base.ident.items():
        if any(dbn.get((parent, name)) != obn.get((parent, name)) for parent, name, _x in chain):
            continue
        objs = [(ROOT, _DIR_FIELDS)] + [(x, _DIR_FIELDS) for _p, _n, x in chain[:-1]] + \
            [(ino, _FILE_FIELDS)]
        if any(o.inodes[x][f] != d.inodes[x][f] for x, fields in objs for f in fields):
            continue
        if any(dbi.get(x) != obi.get(x) for x, _f in objs[:-1]):
            continue
        if stat.S_ISDIR(int(o.inodes[ino]["mode"])) and dbi.get(ino) != obi.get(ino):
            continue
        if o.extents_of(ino) != d.extents_of(ino):
            continue
        xb = int(o.inodes[ino]["xattr_blk"])
        if xb:
            users = np.flatnonzero((d.inodes["xattr_blk"] == xb) & (d.inodes["mode"] != 0))
            if users.tolist() != [ino]:
                continue
            e = d.extents[d.extents["ino"] != 0]
            pb = e["pblk"].astype(np.int64)
            if ((pb <= xb) & (xb < pb + e["length"].astype(np.int64))).any():
                continue
        out.add(path)
    return out


def must_detect(o: Tables, d: Tables) -> list[str]:
    """Changes (after replay) that fsck must report, as short descriptions ([] = none)."""
    why = []
    oi, di = o.inodes, d.inodes
    ch = (oi.view(np.uint8).reshape(-1, 128) != di.view(np.uint8).reshape(-1, 128)).any(1)
    for i in np.flatnonzero(ch).tolist():
        om, dm = int(oi["mode"][i]), int(di["mode"][i])
        if dm == 0:
            if om != 0:
                why.append(f"inode {i} freed")
            continue
        if om == 0:
            why.append(f"free inode {i} got mode 0o{dm:o}")
            continue
        for f in ("nlink", "flags", "xattr_blk"):
            if oi[i][f] != di[i][f]:
                why.append(f"inode {i} {f} {int(oi[i][f])} -> {int(di[i][f])}")
        ot, dt = om & S_IFMT, dm & S_IFMT
        if ot != dt:
            has_ext = bool(o.extents_of(i))
            if dt not in fsck.TYPE_NAMES or (ot == stat.S_IFDIR) != (dt == stat.S_IFDIR) or \
                    (has_ext and dt not in (stat.S_IFREG, stat.S_IFLNK)):
                why.append(f"inode {i} type 0o{ot:o} -> 0o{dt:o}")
    od, dd = o.dirents, d.dirents
    ch = (od.view(np.uint8).reshape(-1, 264) != dd.view(np.uint8).reshape(-1, 264)).any(1)
    for i in np.flatnonzero(ch).tolist():
        op_, dp = int(od["parent"][i]), int(dd["parent"][i])
        if (op_ == 0) != (dp == 0):
            why.append(f"entry {i} {'freed' if dp == 0 else 'appeared'}")
            continue
        if dp == 0:
            continue
        if od["ino"][i] != dd["ino"][i]:
            why.append(f"entry {i} ino {int(od['ino'][i])} -> {int(dd['ino'][i])}")
        if op_ != dp:
            t = int(dd["ino"][i])
            tdir = 0 < t < d.g.inode_count and stat.S_ISDIR(int(di["mode"][t]))
            pdir = 0 < dp < d.g.inode_count and stat.S_ISDIR(int(di["mode"][dp]))
            if tdir or not pdir:
                why.append(f"entry {i} parent {op_} -> {dp}")
        n = int(dd["namelen"][i])
        name = bytes(dd[i:i + 1].view(np.uint8)[9:9 + n])
        if n == 0 or b"\0" in name or b"/" in name:
            why.append(f"entry {i} name invalid")
    oe, de = o.extents, d.extents
    ch = (oe.view(np.uint8).reshape(-1, 24) != de.view(np.uint8).reshape(-1, 24)).any(1)
    for i in np.flatnonzero(ch).tolist():
        oo, do = int(oe["ino"][i]), int(de["ino"][i])
        if (oo == 0) != (do == 0):
            why.append(f"extent {i} {'freed' if do == 0 else 'appeared'}")
        elif do and (oe["pblk"][i] != de["pblk"][i] or oe["length"][i] != de["length"][i]):
            why.append(f"extent {i} pblk/length ({int(oe['pblk'][i])}, {int(oe['length'][i])}) "
                       f"-> ({int(de['pblk'][i])}, {int(de['length'][i])})")
    rc = np.flatnonzero(o.refcounts != d.refcounts)
    if rc.size:
        why.append(f"{rc.size} refcount(s), first block {int(rc[0])}: "
                   f"{int(o.refcounts[rc[0]])} -> {int(d.refcounts[rc[0]])}")
    return why
