"""Offline consistency check and repair of a daxfs image (the engine of `daxfs fsck`).

The check is a pipeline of small named checks (s3ql style), run in order over one shared
`Context`: superblock, journal, inodes, dirents, orphans, tree, links, extents, xattrs,
refcounts. Each is a function of the context that reports `Problem` records (check name,
object, message, repairable, severity) and is vectorized with numpy: no Python loop runs per
block, extent, inode or entry of a healthy image, only per problem found.

Working model: the context holds *copies* of the tables (the inode table, the used dirent and
extent records), never edits the mapping, and every check applies its repair to those copies
straight away. So a later check sees the image as the earlier repairs leave it, and a plain
check reports exactly what `--repair` would do. With `--repair` the copies are compared with the
image at the end and only records that differ are written back (undamaged files are never
touched), the refcount table gets the recomputed counts, the image is msync'ed, and a fresh check
of the result must come out clean.

Before anything is checked, an image that was not cleanly unmounted (superblock `clean` == 0) or
whose journal holds committed transactions is replayed: into the file with --repair, else into a
private copy-on-write mapping (MAP_PRIVATE), so a plain check never writes the image.

Exit codes (`main_check`) follow fsck(8): 0 no errors, 1 errors corrected (or the image was
otherwise modified: journal replayed, orphans reclaimed), 4 errors left uncorrected, 8
operational error (cannot open / lock / not a usable daxfs image).
"""
from __future__ import annotations

import dataclasses
import errno
import fcntl
import logging
import mmap
import os
import stat
import sys
import time
from typing import Callable

import numpy as np

from . import format as fmt
from .alloc import coverage as _coverage
from .pmem import PMem

log = logging.getLogger(__name__)

BS = fmt.BLOCK_SIZE
S_IFMT = 0o170000
ROOT = fmt.ROOT_INO
ERROR, INFO = "error", "info"
EXIT_OK, EXIT_CORRECTED, EXIT_UNCORRECTED, EXIT_OPERATIONAL = 0, 1, 4, 8

TYPE_NAMES = {stat.S_IFREG: "regular file", stat.S_IFDIR: "directory", stat.S_IFLNK: "symlink",
              stat.S_IFCHR: "character device", stat.S_IFBLK: "block device",
              stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket"}
_VALID_TYPES = np.array(sorted(TYPE_NAMES), np.uint32)
_KNOWN_FLAGS = fmt.IFLAG_ORPHAN | fmt.IFLAG_TRIM
MAX_LBLK = 1 << 52          # file blocks addressable by a u64 byte size
LOST_FOUND = b"lost+found"
_DIRENT_NAME_OFF = fmt.DIRENT_DTYPE.fields["name"][1]
_DIRENT_LEN_OFF = fmt.DIRENT_DTYPE.fields["namelen"][1]


# ------------------------------------------------------------------------------------ results
@dataclasses.dataclass
class Problem:
    check: str            # name of the check that found it
    obj: str              # what is affected: "inode 12", "entry 7", "blocks 300-310", ...
    message: str          # what is wrong
    repairable: bool
    action: str | None = None   # what --repair does about it
    severity: str = ERROR  # ERROR, or INFO for expected leftovers of a crash (orphans, journal)
    repaired: bool = False

    def line(self) -> str:
        text = f"{self.severity}: {self.check}: {self.obj}: {self.message}"
        if self.repaired:
            return f"{text}: {self.action} [repaired]" if self.action else f"{text} [repaired]"
        if self.repairable:
            return f"{text} [repairable: {self.action}]" if self.action else text
        return f"{text} [NOT repairable]" if self.severity == ERROR else text

    __str__ = line


@dataclasses.dataclass
class FsckReport:
    path: str
    problems: list[Problem]
    counts: dict[str, int]
    clean: bool             # no error is left in the image (after repair, if --repair)
    repaired: bool          # the image file was modified
    seconds: float = 0.0

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == ERROR]

    @property
    def exit_code(self) -> int:
        if not self.clean:
            return EXIT_UNCORRECTED
        return EXIT_CORRECTED if self.repaired else EXIT_OK

    def summary(self) -> str:
        c = self.counts
        errs = self.errors
        fixed = sum(p.repaired for p in errs)
        notes = len(self.problems) - len(errs)
        state = ("clean" if not errs else "clean after repair") if self.clean else "NOT CLEAN"
        if self.clean and self.repaired and not errs:
            state = "clean (modified)"
        return (f"{self.path}: {c.get('inodes', 0)} inodes ({c.get('directories', 0)} directories), "
                f"{c.get('dirents', 0)} entries, {c.get('extents', 0)} extents, "
                f"{c.get('data_used', 0)}/{c.get('data_blocks', 0)} data blocks used; "
                f"{len(errs)} errors ({fixed} repaired), {notes} notes; {state} "
                f"[{self.seconds:.2f}s]")


class FsckError(Exception):
    """The image cannot be checked at all; str() is the one line shown to the user."""


# ------------------------------------------------------------------------------------ mapping
class _Mapping(PMem):
    """A PMem-like mapping over an fd we own: MAP_SHARED (repair: stores reach the file) or
    MAP_PRIVATE (plain check: journal replay lands in a private copy-on-write copy)."""

    def __init__(self, path: str, fd: int, size: int, shared: bool):   # noqa: D401 (no super)
        self.path = path
        self.fd = fd
        self.size = size
        self.shared = shared
        self.readonly = False
        self.dax = False
        self.volatile = False           # always msync: repairs must reach the file
        self._libpmem = None
        flags = mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE
        self.mm = mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.buf = memoryview(self.mm)
        self.u8 = np.frombuffer(self.mm, dtype=np.uint8)

    def persist(self, offset: int, length: int) -> None:
        if self.shared:
            super().persist(offset, length)

    def close(self) -> None:       # the fd belongs to check()
        if self.mm is not None:
            self.unmap(flush=self.shared)


@dataclasses.dataclass
class JournalState:
    magic_ok: bool
    epoch: int
    pending: int | None = None      # committed transactions found before replay (None: unknown)
    replayed: int = 0
    ran_replay: bool = False        # Journal.replay() ran (it checkpoints: the header changed)
    unavailable: str | None = None  # daxfs.journal could not be imported
    error: str | None = None        # replay failed


def _read_journal_header(mem: _Mapping, g: fmt.Geometry) -> tuple[bool, int]:
    h = np.frombuffer(mem.mm, fmt.JOURNAL_HEADER_DTYPE, 1, g.journal_start * BS)[0]
    return bytes(h["magic"]) == fmt.JOURNAL_MAGIC, int(h["epoch"])


def _journal_phase(mem: _Mapping, sb, g: fmt.Geometry, replay: bool) -> JournalState:
    """Replay committed transactions when needed (into whatever `mem` maps)."""
    magic_ok, epoch = _read_journal_header(mem, g)
    js = JournalState(magic_ok, epoch)
    if not replay or not magic_ok or epoch == 0:
        return js
    try:
        from . import journal as jmod
    except Exception as e:          # noqa: BLE001 (a half-written module must not stop fsck)
        js.unavailable = f"{type(e).__name__}: {e}"
        log.warning("daxfs.journal is unavailable (%s): journal replay skipped", js.unavailable)
        return js
    try:
        j = jmod.Journal(mem, g)
        js.pending = int(j.pending())
        if int(sb["clean"]) != 1 or js.pending:
            js.ran_replay = True
            js.replayed = int(j.replay())
            if int(j.pending()):
                js.error = "committed transactions remain after replay"
    except Exception as e:          # noqa: BLE001
        js.error = f"{type(e).__name__}: {e}"
    return js


# ------------------------------------------------------------------------------------ context
class Context:
    """Shared state of one check run: geometry, mapped tables, working copies, problems."""

    def __init__(self, mem: _Mapping, sb, g: fmt.Geometry, *, repair: bool, journal: JournalState,
                 file_size: int, in_use: bool = False):
        self.mem, self.sb, self.g, self.repair = mem, sb, g, repair
        self.journal = journal
        self.file_size = file_size
        self.in_use = in_use
        self.problems: list[Problem] = []
        self.check_name = "-"
        self.now = time.time_ns()
        mm = mem.mm
        self.v_inodes = np.frombuffer(mm, fmt.INODE_DTYPE, g.inode_count, g.region("inodes")[0])
        self.v_dirents = np.frombuffer(mm, fmt.DIRENT_DTYPE, g.dirent_count, g.region("dirents")[0])
        self.v_extents = np.frombuffer(mm, fmt.EXTENT_DTYPE, g.extent_count, g.region("extents")[0])
        self.v_refcounts = np.frombuffer(mm, "<u4", g.nblocks, g.region("refcounts")[0])
        # working copies
        self.inodes = self.v_inodes.copy()
        self.dslot = np.flatnonzero(self.v_dirents["parent"] != 0)
        self.dirents = self.v_dirents[self.dslot]
        self.dalive = np.ones(self.dslot.size, bool)
        self.dnew = np.zeros(self.dslot.size, bool)
        self._dbuf = (self.dirents, self.dslot, self.dalive, self.dnew)   # add_dirent grows these
        self.eslot = np.flatnonzero(self.v_extents["ino"] != 0)
        self.extents = self.v_extents[self.eslot]
        self.ealive = np.ones(self.eslot.size, bool)
        # repair plan for things outside the copies
        self.fix_journal_header = False
        self.mark_clean = False
        self.refcount_fix: tuple[np.ndarray, np.ndarray] | None = None
        self.counts: dict[str, int] = {}
        self.lost_found: int | None = None
        self._free_dslots: np.ndarray | None = None
        self._free_dpos = 0
        self._names: dict[int, set[bytes]] = {}

    # -- reporting -------------------------------------------------------------------------------
    def problem(self, obj: str, message: str, action: str | None = None, *,
                repairable: bool | None = None, severity: str = ERROR) -> Problem:
        if repairable is None:
            repairable = action is not None
        p = Problem(self.check_name, obj, message, repairable, action, severity)
        self.problems.append(p)
        return p

    # -- inodes ----------------------------------------------------------------------------------
    @property
    def n_inodes(self) -> int:
        return self.g.inode_count

    def ftype(self) -> np.ndarray:
        return self.inodes["mode"] & S_IFMT

    def used(self) -> np.ndarray:
        return self.inodes["mode"] != 0

    def isdir(self) -> np.ndarray:
        return self.ftype() == stat.S_IFDIR

    def free_inode(self, ino: int) -> None:
        """Free a slot the way the engine does: all zero but the generation."""
        gen = int(self.inodes["generation"][ino])
        self.inodes[ino] = np.zeros(1, fmt.INODE_DTYPE)[0]
        self.inodes["generation"][ino] = gen

    def type_name(self, ino: int) -> str:
        if not 0 < ino < self.n_inodes:
            return "out of range"
        mode = int(self.inodes["mode"][ino])
        if mode == 0:
            return "free inode"
        return TYPE_NAMES.get(mode & S_IFMT, f"invalid mode 0o{mode:o}")

    # -- dirents ---------------------------------------------------------------------------------
    def alive_d(self) -> np.ndarray:
        return np.flatnonzero(self.dalive)

    def drows(self) -> np.ndarray:
        return self.dirents.view(np.uint8).reshape(-1, fmt.DIRENT_DTYPE.itemsize)

    def dname(self, i: int) -> bytes:
        r = self.drows()[i]
        n = int(r[_DIRENT_LEN_OFF])
        return r[_DIRENT_NAME_OFF:_DIRENT_NAME_OFF + n].tobytes()

    def set_dname(self, i: int, name: bytes) -> None:
        r = self.drows()[i]
        r[_DIRENT_LEN_OFF] = len(name)
        r[_DIRENT_NAME_OFF:] = 0
        r[_DIRENT_NAME_OFF:_DIRENT_NAME_OFF + len(name)] = np.frombuffer(name, np.uint8)

    def dentry(self, i: int) -> str:
        return f"entry {int(self.dslot[i])}"

    def names_in(self, parent: int) -> set[bytes]:
        s = self._names.get(parent)
        if s is None:
            idx = np.flatnonzero(self.dalive & (self.dirents["parent"] == parent))
            s = self._names[parent] = {self.dname(int(i)) for i in idx}
        return s

    def unique_name(self, parent: int, base: bytes) -> bytes:
        names = self.names_in(parent)
        name, k = base[:fmt.MAX_NAME], 1
        while name in names:
            suffix = b"~%d" % k
            name = base[:fmt.MAX_NAME - len(suffix)] + suffix
            k += 1
        names.add(name)
        return name

    def add_dirent(self, parent: int, ino: int, name: bytes) -> int | None:
        if self._free_dslots is None:
            self._free_dslots = np.flatnonzero(self.v_dirents["parent"] == 0)
        if self._free_dpos >= self._free_dslots.size:
            return None
        slot = int(self._free_dslots[self._free_dpos])
        self._free_dpos += 1
        k = self.dirents.size
        if k == self._dbuf[0].size:              # grow the buffers geometrically
            cap = max(64, 2 * k)
            bufs = []
            for arr in (self.dirents, self.dslot, self.dalive, self.dnew):
                nb = np.zeros(cap, arr.dtype)
                nb[:k] = arr
                bufs.append(nb)
            self._dbuf = tuple(bufs)
        d, sl, al, nw = self._dbuf
        rec = d[k:k + 1]
        rec["parent"], rec["ino"], rec["namelen"], rec["name"] = parent, ino, len(name), name
        sl[k], al[k], nw[k] = slot, True, True
        self.dirents, self.dslot, self.dalive, self.dnew = d[:k + 1], sl[:k + 1], al[:k + 1], nw[:k + 1]
        self.names_in(parent).add(name)
        return k

    def ensure_lost_found(self) -> int | None:
        """The /lost+found directory inode, created (in the working copy) when missing."""
        if self.lost_found is not None:
            return self.lost_found
        d = self.dirents
        for i in np.flatnonzero(self.dalive & (d["parent"] == ROOT)):
            if self.dname(int(i)) == LOST_FOUND:
                t = int(d["ino"][i])
                if self.isdir()[t]:
                    self.lost_found = t
                    return t
        free = np.flatnonzero(self.inodes["mode"][ROOT + 1:] == 0)
        if free.size == 0:
            return None
        ino = int(free[0]) + ROOT + 1
        name = self.unique_name(ROOT, LOST_FOUND)
        if self.add_dirent(ROOT, ino, name) is None:
            self.names_in(ROOT).discard(name)
            return None
        gen = (int(self.inodes["generation"][ino]) + 1) & 0xFFFFFFFF
        self.free_inode(ino)
        r = self.inodes[ino:ino + 1]
        r["mode"] = stat.S_IFDIR | 0o700
        r["nlink"] = 2
        for f in ("atime", "mtime", "ctime", "btime"):
            r[f] = self.now
        r["generation"] = gen
        self.inodes["nlink"][ROOT] += 1
        self.lost_found = ino
        self.problem("/" + name.decode(), "missing, needed for reconnected files",
                     f"created as inode {ino}", severity=INFO)
        return ino

    def reconnect(self, ino: int, entry: int | None = None) -> bool:
        """Link `ino` into /lost+found as '#<ino>' (moving dirent `entry` if given)."""
        lf = self.ensure_lost_found()
        if lf is None:
            return False
        name = self.unique_name(lf, b"#%d" % ino)
        is_dir = int(self.inodes["mode"][ino]) & S_IFMT == stat.S_IFDIR
        if entry is not None:
            old = int(self.dirents["parent"][entry])
            if is_dir and self.inodes["nlink"][old] > 0:
                self.inodes["nlink"][old] -= 1
            self.dirents["parent"][entry] = lf
            self.set_dname(entry, name)
        elif self.add_dirent(lf, ino, name) is None:
            return False
        if is_dir:
            self.inodes["nlink"][lf] += 1
        return True

    # -- extents ---------------------------------------------------------------------------------
    def alive_e(self) -> np.ndarray:
        return np.flatnonzero(self.ealive)

    def coverage(self) -> np.ndarray:
        """Per block of the image: how many live extent blocks map it (int64)."""
        a = self.alive_e()
        return _coverage(self.extents["pblk"][a], self.extents["length"][a], self.g.nblocks)

    def expected_refcounts(self, original: bool = False) -> np.ndarray:
        """Refcounts implied by the working copies, or (`original`) by the tables as found
        (records that cannot be counted, being out of range, left out)."""
        g = self.g
        nb = g.nblocks
        if original:
            e = self.v_extents[self.eslot]
            cov = _coverage(e["pblk"], e["length"], nb)
            used = self.v_inodes["mode"] != 0
            xb = self.v_inodes["xattr_blk"]
        else:
            cov = self.coverage()
            used = self.used()
            xb = self.inodes["xattr_blk"]
        xb = xb[used & (xb != 0) & (xb < np.uint64(nb))].astype(np.int64)
        cov += np.bincount(xb, minlength=nb)[:nb]
        cov[:g.data_start] = fmt.REFCOUNT_RESERVED
        return cov


def _fmt_name(name: bytes) -> str:
    return repr(name.decode("utf-8", "backslashreplace"))


def _groups(keys: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """[(key, positions)] for the distinct values of `keys` (positions in original order)."""
    if keys.size == 0:
        return []
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    cut = np.flatnonzero(sk[1:] != sk[:-1]) + 1
    starts = np.concatenate(([0], cut))
    ends = np.concatenate((cut, [sk.size]))
    return [(int(sk[s]), order[s:e]) for s, e in zip(starts.tolist(), ends.tolist())]


# ------------------------------------------------------------------------------------ checks
CHECKS: list[tuple[str, Callable[[Context], None]]] = []


def check_step(name: str):
    def deco(fn):
        CHECKS.append((name, fn))
        return fn
    return deco


@check_step("superblock")
def check_superblock(ctx: Context) -> None:
    """The superblock itself parsed (else nothing runs); here: file size, clean flag, use."""
    g, sb = ctx.g, ctx.sb
    extra = ctx.file_size - g.nblocks * BS
    if extra > 0:
        ctx.problem("image", f"file has {extra} bytes past the {g.nblocks} blocks of the "
                    "filesystem (ignored)", repairable=False, severity=INFO)
    clean = int(sb["clean"])
    if clean not in (0, 1):
        ctx.problem("clean flag", f"invalid value {clean}", "set to 1")
        ctx.mark_clean = True
    elif clean == 0:
        ctx.problem("clean flag", "not cleanly unmounted (crash, or mounted right now)",
                    "marked clean", severity=INFO)
        ctx.mark_clean = True
    if ctx.in_use:
        ctx.problem("image", "locked by another process (mounted?): checked a snapshot, "
                    "results may be inconsistent", repairable=False, severity=INFO)


@check_step("journal")
def check_journal(ctx: Context) -> None:
    """Journal header (magic, epoch) and the outcome of replay."""
    js = ctx.journal
    if not js.magic_ok or js.epoch == 0:
        what = "bad magic" if not js.magic_ok else "epoch 0"
        ctx.problem("header", f"{what}: the journal cannot be replayed",
                    "header reset, log emptied (committed transactions in it are lost)")
        ctx.fix_journal_header = True
        return
    if js.unavailable:
        ctx.problem("log", f"not replayed: daxfs.journal unavailable ({js.unavailable})",
                    repairable=False, severity=INFO)
    if js.error:
        ctx.problem("log", f"replay failed: {js.error}", repairable=False)
    elif js.ran_replay and ctx.repair:
        ctx.problem("log", f"{js.replayed} committed transaction(s) pending",
                    "replayed into the image", severity=INFO)
    elif js.ran_replay:
        ctx.problem("log", f"{js.replayed} committed transaction(s) pending (checked a "
                    "replayed private copy)", "replay into the image", severity=INFO)


@check_step("inodes")
def check_inodes(ctx: Context) -> None:
    """Inode records: reserved inode 0, root a directory, valid file type, a size the type
    allows (symlink 1..4095 bytes), known flags."""
    ino = ctx.inodes
    mode = ino["mode"]
    if mode[0] != 0:
        ctx.problem("inode 0", f"reserved inode is in use (mode 0o{int(mode[0]):o})", "freed")
        ctx.free_inode(0)
    if mode[ROOT] & S_IFMT != stat.S_IFDIR:
        old = int(mode[ROOT])
        ctx.problem(f"inode {ROOT}", f"root is not a directory (mode 0o{old:o})",
                    "made a directory")
        r = ino[ROOT:ROOT + 1]
        r["mode"] = stat.S_IFDIR | ((old & 0o7777) if old else 0o755)
        r["size"] = 0
        r["flags"] = 0
        if r["nlink"][0] < 2:
            r["nlink"] = 2
    ft = mode & S_IFMT
    bad = np.flatnonzero((mode != 0) & ~np.isin(ft, _VALID_TYPES))
    for i in bad.tolist():
        ctx.problem(f"inode {i}", f"invalid file type (mode 0o{int(mode[i]):o})", "inode freed")
        ctx.free_inode(i)
    size = ino["size"]
    badlen = np.flatnonzero((ft == stat.S_IFLNK) & ((size == 0) | (size >= BS)))
    badlen = np.union1d(badlen, np.flatnonzero((ft == stat.S_IFREG) & (size >= np.uint64(1 << 52))))
    for i in badlen.tolist():
        ctx.problem(f"inode {i}", f"impossible size {int(size[i])} for its type "
                    f"(mode 0o{int(mode[i]):o})", "inode freed")
        ctx.free_inode(i)
    fl = ino["flags"]
    unknown = np.flatnonzero((mode != 0) & ((fl & ~np.uint32(_KNOWN_FLAGS)) != 0))
    for i in unknown.tolist():
        ctx.problem(f"inode {i}", f"unknown flag bits 0x{int(fl[i]) & ~_KNOWN_FLAGS:x}", "cleared")
        fl[i] &= _KNOWN_FLAGS


@check_step("dirents")
def check_dirents(ctx: Context) -> None:
    """Each entry: parent a directory, target a used inode (never root), a valid name, and
    names unique within a directory."""
    n = ctx.n_inodes
    d = ctx.dirents
    a = ctx.alive_d()
    if a.size == 0:
        return
    mode = ctx.inodes["mode"]
    isdir = ctx.isdir()
    p = d["parent"][a].astype(np.int64)
    t = d["ino"][a].astype(np.int64)
    p_in = p < n
    p_ok = p_in.copy()
    p_ok[p_in] = isdir[p[p_in]]
    t_ok = (t < n) & (t != 0) & (t != ROOT)
    t_ok[t_ok] = mode[t[t_ok]] != 0
    for k in np.flatnonzero(~p_ok | ~t_ok).tolist():
        i = int(a[k])
        pi, ti = int(p[k]), int(t[k])
        name = _fmt_name(ctx.dname(i))
        if not p_ok[k]:
            why = f"parent is not a directory ({ctx.type_name(pi)})"
        elif ti == ROOT:
            why = "names the root directory"
        else:
            why = f"target is not a valid inode ({ctx.type_name(ti)})"
        ctx.problem(ctx.dentry(i), f"{name} in directory {pi} -> {ti}: {why}", "entry removed")
        ctx.dalive[i] = False
    # names: 1..255 bytes, no '/' and no NUL
    a = ctx.alive_d()
    badname, hashes = _scan_names(ctx.drows(), a)
    for k in np.flatnonzero(badname).tolist():
        i = int(a[k])
        old = ctx.dname(i)
        parent = int(d["parent"][i])
        new = old.replace(b"/", b"_").replace(b"\0", b"_") if old else b"#%d" % int(d["ino"][i])
        new = ctx.unique_name(parent, new)
        ctx.problem(ctx.dentry(i), f"invalid name {_fmt_name(old)} in directory {parent}",
                    f"renamed to {_fmt_name(new)}")
        ctx.set_dname(i, new)
    # duplicates: same parent and name (sorted by parent, length, name hash; then compared)
    for _round in range(4):
        if _round or badname.any():
            a = ctx.alive_d()
            hashes = _scan_names(ctx.drows(), a)[1]
        if a.size < 2:
            return
        par = d["parent"][a]
        nl = ctx.drows()[a, _DIRENT_LEN_OFF]
        order = np.lexsort((hashes, nl, par))
        sp, sn, sh = par[order], nl[order], hashes[order]
        same = (sp[1:] == sp[:-1]) & (sn[1:] == sn[:-1]) & (sh[1:] == sh[:-1])
        if not same.any():
            return
        starts = np.flatnonzero(np.concatenate(([True], ~same)))
        dup_pos = np.flatnonzero(same) + 1
        first_pos = starts[np.searchsorted(starts, dup_pos, "right") - 1]
        found = False
        for dp, fp in zip(dup_pos.tolist(), first_pos.tolist()):
            i, keep = int(a[order[dp]]), int(a[order[fp]])
            name = ctx.dname(i)
            if name != ctx.dname(keep):
                continue                            # a hash collision, not a duplicate
            found = True
            parent = int(d["parent"][i])
            ti, tk = int(d["ino"][i]), int(d["ino"][keep])
            if ti == tk:
                ctx.problem(ctx.dentry(i), f"duplicate of {ctx.dentry(keep)} ({_fmt_name(name)} in "
                            f"directory {parent} -> {ti})", "entry removed")
                ctx.dalive[i] = False
            else:
                new = ctx.unique_name(parent, name)
                ctx.problem(ctx.dentry(i), f"name {_fmt_name(name)} in directory {parent} -> {ti} "
                            f"is also used by {ctx.dentry(keep)} -> {tk}",
                            f"renamed to {_fmt_name(new)}")
                ctx.set_dname(i, new)
        if not found:
            return


def _scan_names(rows: np.ndarray, a: np.ndarray, chunk: int = 1 << 16):
    """For dirent rows `a`: (invalid name?, 64-bit FNV-1a hash of the name), in chunks and
    only over the columns up to the longest name, so memory stays small."""
    bad = np.zeros(a.size, bool)
    hashes = np.empty(a.size, np.uint64)
    cols = np.arange(fmt.MAX_NAME)
    prime = np.uint64(0x100000001B3)
    for s in range(0, a.size, chunk):
        idx = a[s:s + chunk]
        nl = rows[idx, _DIRENT_LEN_OFF].astype(np.int64)
        m = int(nl.max()) if nl.size else 0
        nm = rows[idx, _DIRENT_NAME_OFF:_DIRENT_NAME_OFF + m]
        inside = cols[None, :m] < nl[:, None]
        bad[s:s + chunk] = (nl == 0) | (((nm == 0) | (nm == 0x2F)) & inside).any(axis=1)
        h = np.full(idx.size, 0xCBF29CE484222325, np.uint64)
        for j in range(m):
            h ^= np.where(inside[:, j], nm[:, j], 0).astype(np.uint64)
            h *= prime
        hashes[s:s + chunk] = h
    return bad, hashes


@check_step("orphans")
def check_orphans(ctx: Context) -> None:
    """IFLAG_ORPHAN inodes (unlinked while open): reclaimed (inode, extents) when unnamed."""
    fl = ctx.inodes["flags"]
    orph = np.flatnonzero(ctx.used() & ((fl & fmt.IFLAG_ORPHAN) != 0))
    if orph.size == 0:
        return
    a = ctx.alive_d()
    n = ctx.n_inodes
    links = np.bincount(ctx.dirents["ino"][a], minlength=n)
    children = np.bincount(ctx.dirents["parent"][a], minlength=n)
    reclaim = []
    for i in orph.tolist():
        if i == ROOT or links[i] or children[i]:
            what = "root" if i == ROOT else f"{links[i]} name(s), {children[i]} child entries"
            ctx.problem(f"inode {i}", f"orphan flag set on a linked inode ({what})", "flag cleared")
            fl[i] &= ~np.uint32(fmt.IFLAG_ORPHAN)
            continue
        nlink = int(ctx.inodes["nlink"][i])
        msg = (f"orphan {ctx.type_name(i)} (unlinked while open, size {int(ctx.inodes['size'][i])})"
               f"{'' if nlink == 0 else f' with nlink {nlink}'}")
        ctx.problem(f"inode {i}", msg, "reclaimed (inode and blocks freed)",
                    severity=INFO if nlink == 0 else ERROR)
        reclaim.append(i)
    if reclaim:
        r = np.array(reclaim, np.int64)
        ctx.ealive &= ~np.isin(ctx.extents["ino"], r)
        for i in reclaim:
            ctx.free_inode(i)


@check_step("tree")
def check_tree(ctx: Context) -> None:
    """Directories: exactly one name each (root none), all reachable from root, no cycles;
    unreachable ones are reconnected into /lost+found as '#<ino>'."""
    n = ctx.n_inodes
    d = ctx.dirents
    isdir = ctx.isdir()
    a = ctx.alive_d()
    t = d["ino"][a].astype(np.int64)
    p = d["parent"][a].astype(np.int64)
    tdir = isdir[t]
    # directories with several names (hard links to a directory)
    cnt = np.bincount(t[tdir], minlength=n)
    if (cnt > 1).any():
        for dino, pos in _groups(t[tdir]):
            if pos.size < 2:
                continue
            ents = a[tdir][pos]
            keep = next((int(e) for e in ents if int(d["parent"][e]) != dino), int(ents[0]))
            for e in ents.tolist():
                if e != keep:
                    par = int(d["parent"][e])
                    ctx.problem(ctx.dentry(e), f"extra name {_fmt_name(ctx.dname(e))} in directory "
                                f"{par} of directory {dino} (a directory has one name; keeping "
                                f"{ctx.dentry(keep)})", "entry removed")
                    ctx.dalive[e] = False
        a = ctx.alive_d()
        t = d["ino"][a].astype(np.int64)
        p = d["parent"][a].astype(np.int64)
        tdir = isdir[t]
    par = np.zeros(n, np.int64)
    par[t[tdir]] = p[tdir]
    par[ROOT] = ROOT
    entry_of = np.full(n, -1, np.int64)
    entry_of[t[tdir]] = a[tdir]
    anc = par
    for _ in range(int(n).bit_length() + 1):
        nxt = anc[anc]
        if np.array_equal(nxt, anc):
            break
        anc = nxt
    lost = np.flatnonzero(isdir & (anc != ROOT))
    if lost.size == 0:
        return
    # components of the unreachable part: walk up each chain once
    par_l = par.tolist()
    comp: dict[int, int] = {}
    tops: list[tuple[int, list[int] | None]] = []   # (top directory, cycle members or None)
    for s in lost.tolist():
        if s in comp:
            continue
        path: list[int] = []
        where: dict[int, int] = {}
        x = s
        while True:
            if x in comp:
                cid = comp[x]
                break
            if x in where:                      # a cycle: break it at its smallest member
                cyc = path[where[x]:]
                cid = len(tops)
                tops.append((min(cyc), cyc))
                break
            where[x] = len(path)
            path.append(x)
            up = par_l[x]
            if up == 0:
                cid = len(tops)
                tops.append((x, None))
                break
            x = up
        for y in path:
            comp[y] = cid
    sizes = np.bincount(np.fromiter(comp.values(), np.int64, len(comp)), minlength=len(tops))
    for cid, (top, cyc) in enumerate(tops):
        size = int(sizes[cid])
        extra = f" ({size} directories cut off)" if size > 1 else ""
        ent = int(entry_of[top])
        if cyc is not None:
            chain = " -> ".join(str(c) for c in cyc + cyc[:1])
            what = f"directory cycle {chain} is unreachable from root{extra}"
        else:
            what = f"directory is not named by any entry{extra}"
        prob = ctx.problem(f"inode {top}", what, f"moved to /lost+found as #{top}")
        if not ctx.reconnect(top, ent if ent >= 0 else None):
            _cannot_reconnect(prob)


def _cannot_reconnect(p: Problem) -> None:
    p.message += " (cannot reconnect: no free inode or entry for /lost+found)"
    p.action, p.repairable = None, False


@check_step("links")
def check_links(ctx: Context) -> None:
    """Link counts: a directory has 2 + subdirectories, anything else its number of names;
    files named by no entry are reconnected into /lost+found."""
    n = ctx.n_inodes
    used, isdir = ctx.used(), ctx.isdir()
    fl = ctx.inodes["flags"]
    orphan = used & ((fl & fmt.IFLAG_ORPHAN) != 0)   # left in place by a plain check

    def counts():
        a = ctx.alive_d()
        t = ctx.dirents["ino"][a].astype(np.int64)
        p = ctx.dirents["parent"][a].astype(np.int64)
        return (np.bincount(t, minlength=n)[:n], np.bincount(p[isdir[t]], minlength=n)[:n])

    links, subdirs = counts()
    unattached = np.flatnonzero(used & ~isdir & ~orphan & (links == 0))
    for i in unattached.tolist():
        prob = ctx.problem(f"inode {i}", f"{ctx.type_name(i)} (size {int(ctx.inodes['size'][i])}) "
                           "is not named by any entry", f"moved to /lost+found as #{i}")
        if not ctx.reconnect(i):
            _cannot_reconnect(prob)
    if unattached.size:
        isdir = ctx.isdir()
        used = ctx.used()
        links, subdirs = counts()
    expect = np.where(isdir, 2 + subdirs, links)
    nlink = ctx.inodes["nlink"]
    bad = np.flatnonzero(used & ~orphan & (nlink != expect))
    for i in bad.tolist():
        why = f"2 + {int(subdirs[i])} subdirectories" if isdir[i] else f"{int(links[i])} names"
        ctx.problem(f"inode {i}", f"{ctx.type_name(i)} has nlink {int(nlink[i])}, expected "
                    f"{int(expect[i])} ({why})", "fixed")
        nlink[i] = expect[i]


@check_step("extents")
def check_extents(ctx: Context) -> None:
    """Extents: owner a regular file or symlink, inside the data region, no overlap within
    a file (later ones are cut), none wholly past EOF but a regular file's preallocation."""
    g, n = ctx.g, ctx.n_inodes
    e = ctx.extents
    mode = ctx.inodes["mode"]
    a = ctx.alive_e()
    if a.size:
        owner = e["ino"][a].astype(np.int64)
        inr = owner < n
        ft = np.zeros(a.size, np.uint32)
        ft[inr] = mode[owner[inr]] & S_IFMT
        bad = ~((ft == stat.S_IFREG) | (ft == stat.S_IFLNK))
        for o, pos in _groups(owner[bad]):
            ctx.problem(f"inode {o}", f"{pos.size} extent(s) owned by {ctx.type_name(o)} "
                        "(only regular files and symlinks own blocks)", "extents removed")
        ctx.ealive[a[bad]] = False
        a = a[~bad]
    if a.size:
        ln = e["length"][a].astype(np.uint64)
        lb, pb = e["lblk"][a], e["pblk"][a]
        nb, ds, ml = np.uint64(g.nblocks), np.uint64(g.data_start), np.uint64(MAX_LBLK)
        oob = ((ln == 0) | (pb < ds) | (pb > nb) | (ln > nb - np.minimum(pb, nb))
               | (lb > ml) | (ln > ml - np.minimum(lb, ml)))
        owner = e["ino"][a].astype(np.int64)
        for o, pos in _groups(owner[oob]):
            k = int(a[oob][pos[0]])
            ctx.problem(f"inode {o}", f"{pos.size} extent(s) empty or outside the data region "
                        f"[{g.data_start}, {g.nblocks}) (first: slot {int(ctx.eslot[k])}, file "
                        f"block {int(e['lblk'][k])}, block {int(e['pblk'][k])}, length "
                        f"{int(e['length'][k])})", "extents removed")
        ctx.ealive[a[oob]] = False
    _check_overlaps(ctx)
    _check_past_eof(ctx)


def _check_overlaps(ctx: Context) -> None:
    e = ctx.extents
    a = ctx.alive_e()
    owner = e["ino"][a].astype(np.int64)
    multi = np.bincount(owner, minlength=ctx.n_inodes)[owner] > 1
    a, owner = a[multi], owner[multi]
    if a.size < 2:
        return
    lb = e["lblk"][a].astype(np.int64)
    order = np.lexsort((lb, owner))
    a, owner, lb = a[order], owner[order], lb[order]
    end = lb + e["length"][a].astype(np.int64)
    # segmented inclusive prefix max of `end` per owner (Hillis-Steele scan)
    m = end.copy()
    shift = 1
    while shift < a.size:
        same = owner[shift:] == owner[:-shift]
        nm = m.copy()
        np.maximum(m[shift:], np.where(same, m[:-shift], 0), out=nm[shift:])
        m = nm
        shift <<= 1
    prev = np.full(a.size, -1, np.int64)
    prev[1:] = np.where(owner[1:] == owner[:-1], m[:-1], -1)
    ov = np.flatnonzero(lb < prev)
    if ov.size == 0:
        return
    for o, pos in _groups(owner[ov]):
        k = ov[pos]
        cut = int(np.count_nonzero(end[k] > prev[k]))
        ctx.problem(f"inode {o}", f"{k.size} extent(s) overlap earlier ones in the file (first at "
                    f"file block {int(lb[k[0]])})", f"{cut} cut, {k.size - cut} removed")
    rows, delta = a[ov], (prev[ov] - lb[ov])
    keep = end[ov] > prev[ov]
    ctx.ealive[rows[~keep]] = False
    r, dl = rows[keep], delta[keep]
    e["lblk"][r] += dl.astype(np.uint64)
    e["pblk"][r] += dl.astype(np.uint64)
    e["length"][r] -= dl.astype(np.uint32)


def _check_past_eof(ctx: Context) -> None:
    e = ctx.extents
    fl = ctx.inodes["flags"]
    a = ctx.alive_e()
    owner = e["ino"][a].astype(np.int64)
    size = ctx.inodes["size"][owner]
    eof = (size >> np.uint64(12)) + ((size & np.uint64(BS - 1)) != 0).astype(np.uint64)
    lb = e["lblk"][a]
    end = lb + e["length"][a].astype(np.uint64)
    trim_o = (fl[owner] & fmt.IFLAG_TRIM) != 0
    is_reg = (ctx.inodes["mode"][owner] & 0o170000) == stat.S_IFREG
    # a regular file may own zero-filled blocks past EOF (fallocate KEEP_SIZE): only a
    # symlink's, or those of a file whose truncate was interrupted, must go
    wholly = (lb >= eof) & (trim_o | ~is_reg)
    straddle = trim_o & ~wholly & (end > eof)        # finishing a trim also cuts at EOF
    trimming = np.flatnonzero(ctx.used() & ((fl & fmt.IFLAG_TRIM) != 0))
    if not wholly.any() and not trimming.size:
        return
    past_by = {o: pos for o, pos in _groups(owner[wholly])}
    for o, pos in past_by.items():
        if fl[o] & fmt.IFLAG_TRIM:
            continue
        k = a[wholly][pos[0]]
        ctx.problem(f"inode {o}", f"{pos.size} extent(s) wholly past EOF (size "
                    f"{int(ctx.inodes['size'][o])}; first at file block {int(e['lblk'][k])})",
                    "extents removed")
    for o in trimming.tolist():
        np_ = past_by.get(o)
        k = 0 if np_ is None else np_.size
        ctx.problem(f"inode {o}", f"interrupted truncate (trim pending, {k} extent(s) wholly "
                    "past EOF)", "finished: blocks past EOF freed, flag cleared", severity=INFO)
        fl[o] &= ~np.uint32(fmt.IFLAG_TRIM)
    ctx.ealive[a[wholly]] = False
    rows = a[straddle]
    e["length"][rows] = (eof[straddle] - lb[straddle]).astype(np.uint32)


@check_step("xattrs")
def check_xattrs(ctx: Context) -> None:
    """xattr blocks: inside the data region, a valid layout, owned by one inode and not
    mapped by any extent; a bad one is detached (its xattrs are lost)."""
    g = ctx.g
    xb = ctx.inodes["xattr_blk"]
    has = np.flatnonzero(ctx.used() & (xb != 0))
    if has.size == 0:
        return
    blk = xb[has]
    oob = (blk < np.uint64(g.data_start)) | (blk >= np.uint64(g.nblocks))
    for i in has[oob].tolist():
        ctx.problem(f"inode {i}", f"xattr block {int(xb[i])} is outside the data region",
                    "xattrs dropped")
        xb[i] = 0
    has = has[~oob]
    if has.size == 0:
        return
    ok = _xattr_layout_ok(ctx.mem.u8, xb[has].astype(np.int64))
    for i in has[~ok].tolist():
        ctx.problem(f"inode {i}", f"xattr block {int(xb[i])} is malformed", "xattrs dropped")
        xb[i] = 0
    has = has[ok]
    blk = xb[has].astype(np.int64)
    for b, pos in _groups(blk):
        if pos.size > 1:
            inos = has[pos]
            for i in inos[1:].tolist():
                ctx.problem(f"inode {i}", f"xattr block {b} is also the xattr block of inode "
                            f"{int(inos[0])}", "xattrs dropped")
                xb[i] = 0
    has = np.flatnonzero(ctx.used() & (xb != 0))
    if has.size:
        cov = ctx.coverage()
        clash = cov[xb[has].astype(np.int64)] > 0
        for i in has[clash].tolist():
            ctx.problem(f"inode {i}", f"xattr block {int(xb[i])} is also mapped as file data",
                        "xattrs dropped")
            xb[i] = 0


def _xattr_layout_ok(u8: np.ndarray, blocks: np.ndarray) -> np.ndarray:
    """Vectorized form of xattrs.decode's validation: u16 count, then per entry u8 name_len
    (>= 1), u16 value_len, name, value, all inside the block."""
    base = blocks * BS
    cnt = u8[base].astype(np.int64) | (u8[base + 1].astype(np.int64) << 8)
    ok = cnt * 4 <= BS - 2                     # an entry takes at least 4 bytes
    pos = np.full(blocks.size, 2, np.int64)
    left = np.where(ok, cnt, 0)
    act = np.flatnonzero(left > 0)
    while act.size:
        p = pos[act]
        fits = p + 3 <= BS
        ok[act[~fits]] = False
        act, p = act[fits], p[fits]
        at = base[act] + p
        nl = u8[at].astype(np.int64)
        vl = u8[at + 1].astype(np.int64) | (u8[at + 2].astype(np.int64) << 8)
        end = p + 3 + nl + vl
        good = (nl > 0) & (end <= BS)
        ok[act[~good]] = False
        act = act[good]
        pos[act] = end[good]
        left[act] -= 1
        act = act[left[act] > 0]
    return ok


@check_step("refcounts")
def check_refcounts(ctx: Context) -> None:
    """refcount[b] == extent blocks mapping b + 1 if b is an xattr block (data region);
    REFCOUNT_RESERVED below data_start. Repair rewrites the table from the maps."""
    g = ctx.g
    exp = ctx.expected_refcounts()
    act = ctx.v_refcounts.astype(np.int64)
    diff = np.flatnonzero(act != exp)
    ctx.counts["data_used"] = int(np.count_nonzero(exp[g.data_start:]))
    if diff.size == 0:
        return
    ctx.refcount_fix = (diff, exp[diff].astype(np.uint32))
    # counts that matched the tables as found change only because of repairs reported above
    old = ctx.expected_refcounts(original=True)
    follow = act[diff] == old[diff]
    if follow.any():
        k = int(np.count_nonzero(follow))
        freed = int(np.count_nonzero(follow & (exp[diff] == 0)))
        ctx.problem(f"{k} blocks", "refcounts follow the repairs above "
                    f"({freed} blocks become free)", "recomputed", severity=INFO)
        diff = diff[~follow]
        if diff.size == 0:
            return
    ea, ee = act[diff], exp[diff]
    res = fmt.REFCOUNT_RESERVED
    cat = np.where(diff < g.data_start, 0,
                   np.where(ee == 0, 1, np.where(ea == res, 2, np.where(ea > ee, 3, 4))))
    brk = np.flatnonzero((np.diff(diff) != 1) | (cat[1:] != cat[:-1])) + 1
    starts = np.concatenate(([0], brk)).tolist()
    ends = np.concatenate((brk, [diff.size])).tolist()
    label = {0: "metadata block not marked reserved",
             1: "leaked (allocated but mapped by nothing)",
             2: "in use but marked reserved",
             3: "count too high (leak)",
             4: "count too low (a block in use could be reallocated)"}
    for s, en in zip(starts, ends):
        b0, b1 = int(diff[s]), int(diff[en - 1])
        where = f"block {b0}" if b0 == b1 else f"blocks {b0}-{b1}"
        counts = f"refcount {int(ea[s])}, expected {int(ee[s])}"
        if en - s > 1:
            counts = f"{en - s} blocks, first: " + counts
        ctx.problem(where, f"{label[int(cat[s])]} ({counts})", "recomputed")


# ------------------------------------------------------------------------------------ running
def _run_checks(ctx: Context) -> None:
    for name, fn in CHECKS:
        ctx.check_name = name
        fn(ctx)
    used = ctx.used()
    used[0] = False
    ft = ctx.ftype()
    ctx.counts.update(
        inodes=int(np.count_nonzero(used)),
        directories=int(np.count_nonzero(used & (ft == stat.S_IFDIR))),
        files=int(np.count_nonzero(used & (ft == stat.S_IFREG))),
        symlinks=int(np.count_nonzero(used & (ft == stat.S_IFLNK))),
        dirents=int(np.count_nonzero(ctx.dalive)),
        extents=int(np.count_nonzero(ctx.ealive)),
        data_blocks=ctx.g.data_blocks,
    )


def _changed_rows(work: np.ndarray, disk: np.ndarray) -> np.ndarray:
    """Indexes where two equal-length record arrays differ in any byte."""
    if work.size == 0:
        return np.empty(0, np.int64)
    isz = work.dtype.itemsize
    w = np.ascontiguousarray(work).view(np.uint8).reshape(-1, isz)
    d = np.ascontiguousarray(disk).view(np.uint8).reshape(-1, isz)
    return np.flatnonzero((w != d).any(axis=1))


def _write_back(ctx: Context) -> bool:
    """Store every difference between the working copies and the image; True if any."""
    g, mem = ctx.g, ctx.mem
    wrote = False
    ch = _changed_rows(ctx.inodes, ctx.v_inodes)
    if ch.size:
        ctx.v_inodes[ch] = ctx.inodes[ch]
        wrote = True
    for work, slot, alive, new, view in (
            (ctx.dirents, ctx.dslot, ctx.dalive, ctx.dnew, ctx.v_dirents),
            (ctx.extents, ctx.eslot, ctx.ealive, None, ctx.v_extents)):
        old = np.ones(slot.size, bool) if new is None else ~new
        gone = slot[old & ~alive]
        if gone.size:
            view[gone] = np.zeros(1, view.dtype)[0]
            wrote = True
        keep = np.flatnonzero(old & alive)
        ch = keep[_changed_rows(work[keep], view[slot[keep]])]
        if ch.size:
            view[slot[ch]] = work[ch]
            wrote = True
        if new is not None:
            add = np.flatnonzero(new & alive)
            if add.size:
                view[slot[add]] = work[add]
                wrote = True
    if ctx.refcount_fix is not None:
        idx, val = ctx.refcount_fix
        ctx.v_refcounts[idx] = val
        wrote = True
    if ctx.fix_journal_header:
        off = g.journal_start * BS
        _, epoch = _read_journal_header(mem, g)
        hdr = np.zeros(1, fmt.JOURNAL_HEADER_DTYPE)
        hdr["magic"] = fmt.JOURNAL_MAGIC
        hdr["epoch"] = max(1, (epoch + 1) & 0xFFFFFFFFFFFFFFFF)
        mem.zero(off + BS, 64)          # replay stops at the first bad transaction header
        mem.store(off, hdr.tobytes())
        wrote = True
    mem.mm.flush()
    if ctx.mark_clean or (wrote and int(ctx.sb["clean"]) != 1):
        sb = ctx.sb.copy()
        sb["clean"] = 1
        sb["checksum"] = fmt.superblock_checksum(sb)
        mem.store(0, sb.tobytes())
        mem.mm.flush(0, mmap.PAGESIZE)
        ctx.sb = sb
        wrote = True
    return wrote


def _open(path: str, repair: bool) -> tuple[int, os.stat_result, bool]:
    try:
        fd = os.open(path, (os.O_RDWR if repair else os.O_RDONLY) | os.O_CLOEXEC)
    except OSError as e:
        raise FsckError(f"{path}: cannot open: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FsckError(f"{path}: not a regular file")
        in_use = False
        try:
            if repair:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            else:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise FsckError(f"{path}: cannot lock: {e.strerror}") from None
            if repair:
                raise FsckError(f"{path} is in use (mounted?): refusing to repair; unmount it "
                                "first") from None
            in_use = True
        return fd, st, in_use
    except BaseException:
        os.close(fd)
        raise


def check(path: str, repair: bool = False) -> FsckReport:
    """Check the image at `path` (and repair it when `repair`). Raises FsckError (one-line
    reason) when the image cannot be checked at all."""
    t0 = time.perf_counter()
    fd, st, in_use = _open(path, repair)
    mem = None
    try:
        try:
            raw = os.pread(fd, BS, 0)
        except OSError as e:
            raise FsckError(f"{path}: cannot read: {e.strerror}") from None
        try:
            sb, g = fmt.parse_superblock(raw, st.st_size)
        except fmt.FormatError as e:
            raise FsckError(f"{path}: {e}") from None
        sb = sb.copy()
        try:
            mem = _Mapping(path, fd, st.st_size, shared=repair)
        except (OSError, ValueError) as e:
            raise FsckError(f"{path}: cannot map: {e}") from None
        needs_replay = int(sb["clean"]) != 1
        js = _journal_phase(mem, sb, g, replay=True)
        if repair and (js.unavailable or js.error) and needs_replay:
            raise FsckError(f"{path}: the journal must be replayed before repair, but "
                            f"{'replay failed: ' + js.error if js.error else 'daxfs.journal is unavailable'}")
        ctx = Context(mem, sb, g, repair=repair, journal=js, file_size=st.st_size, in_use=in_use)
        _run_checks(ctx)
        problems = ctx.problems
        modified = False
        counts = ctx.counts
        if not repair:
            clean = not any(p.severity == ERROR for p in problems)
        else:
            modified = _write_back(ctx) or js.ran_replay
            for p in problems:
                p.repaired = p.repairable
            magic_ok, epoch = _read_journal_header(mem, g)
            again = Context(mem, ctx.sb, g, repair=False, journal=JournalState(magic_ok, epoch),
                            file_size=st.st_size)
            _run_checks(again)
            left = [p for p in again.problems if p.severity == ERROR]
            for p in left:
                p.check = "after repair: " + p.check
            problems = problems + left
            clean = not left and not any(p.severity == ERROR and not p.repairable
                                         for p in ctx.problems)
            counts = again.counts
            del again
        del ctx
        return FsckReport(path, problems, counts, clean, modified, time.perf_counter() - t0)
    finally:
        if mem is not None:
            mem.close()
        os.close(fd)


def main_check(path: str, repair: bool = False) -> int:
    """`daxfs fsck`: one line per problem and a summary on stdout; fsck(8) exit codes."""
    try:
        rep = check(path, repair)
    except FsckError as e:
        print(f"cannot check: {e}", file=sys.stderr)
        return EXIT_OPERATIONAL
    except MemoryError:
        print(f"cannot check: {path}: out of memory", file=sys.stderr)
        return EXIT_OPERATIONAL
    except Exception as e:      # noqa: BLE001 - never a traceback for any image content
        log.debug("fsck internal error", exc_info=True)
        print(f"cannot check: {path}: internal error ({type(e).__name__}: {e})", file=sys.stderr)
        return EXIT_OPERATIONAL
    out = sys.stdout
    for p in rep.problems:
        print(p.line(), file=out)
    print(rep.summary(), file=out)
    return rep.exit_code


def main(argv: list[str] | None = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m daxfs.fsck",
                                 description="Check (and repair) an unmounted daxfs image.")
    ap.add_argument("image")
    ap.add_argument("--repair", "-r", action="store_true", help="fix what can be fixed")
    a = ap.parse_args(argv)
    return main_check(a.image, a.repair)


if __name__ == "__main__":
    sys.exit(main())
