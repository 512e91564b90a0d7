"""The image as fsck sees it: the journal phase (replay before
anything is checked) and the `Context` of one run (working copies of the tables, problems)."""
from __future__ import annotations

import dataclasses
import logging
import stat
import time

import numpy as np

from .. import format as fmt
from ..alloc import coverage as _coverage, implied_refcounts
from ..cowlog import pending_records
from ..journal import Journal
from ..pmem import PMem
from .report import ERROR, INFO, TYPE_NAMES, Problem

log = logging.getLogger("daxfs.fsck")

BS = fmt.BLOCK_SIZE
S_IFMT = fmt.S_IFMT_BITS          # stat.S_IFMT as a mask, for numpy arrays of modes
ROOT = fmt.ROOT_INO
LOST_FOUND = b"lost+found"
DIRENT_NAME_OFF = fmt.DIRENT_DTYPE.fields["name"][1]       # byte offsets in a dirent record
DIRENT_LEN_OFF = fmt.DIRENT_DTYPE.fields["namelen"][1]


# ------------------------------------------------------------------------------------ journal
@dataclasses.dataclass
class JournalState:
    magic_ok: bool
    epoch: int
    pending: int | None = None      # committed transactions found before replay (None: unknown)
    replayed: int = 0
    ran_replay: bool = False        # Journal.replay() ran (it checkpoints: the header changed)
    error: str | None = None        # replay failed
    cow_pending: int = 0            # COW ring records the next mount applies (cowlog.py)


def read_journal_header(mem: PMem, g: fmt.Geometry) -> tuple[bool, int]:
    """(magic ok, epoch) of the journal header in the mapping."""
    return fmt.unpack_journal_header(
        mem.read(g.journal_start * BS, fmt.JOURNAL_HEADER_DTYPE.itemsize))


def journal_phase(mem: PMem, sb, g: fmt.Geometry, replay: bool) -> JournalState:
    """Replay committed transactions when needed (into whatever `mem` maps: the file when
    repairing, a private copy-on-write mapping for a plain check)."""
    magic_ok, epoch = read_journal_header(mem, g)
    js = JournalState(magic_ok, epoch)
    js.cow_pending = int(pending_records(mem, g).size)
    if not replay or not magic_ok or epoch == 0:
        return js
    try:
        j = Journal(mem, g)
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

    def __init__(self, mem: PMem, sb, g: fmt.Geometry, *, repair: bool, journal: JournalState,
                 file_size: int, in_use: bool = False):
        self.mem, self.sb, self.g, self.repair = mem, sb, g, repair
        self.journal = journal
        self.file_size = file_size
        self.in_use = in_use
        self.problems: list[Problem] = []
        self.check_name = "-"
        self.now = time.time_ns()
        mm = mem.mm
        self.v_inodes = g.table(mm, "inodes")
        self.v_dirents = g.table(mm, "dirents")
        self.v_extents = g.table(mm, "extents")
        self.v_refcounts = g.table(mm, "refcounts")
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
        n = int(r[DIRENT_LEN_OFF])
        return r[DIRENT_NAME_OFF:DIRENT_NAME_OFF + n].tobytes()

    def set_dname(self, i: int, name: bytes) -> None:
        r = self.drows()[i]
        r[DIRENT_LEN_OFF] = len(name)
        r[DIRENT_NAME_OFF:] = 0
        r[DIRENT_NAME_OFF:DIRENT_NAME_OFF + len(name)] = np.frombuffer(name, np.uint8)

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
        if original:
            e = self.v_extents[self.eslot]
            cov = implied_refcounts(e["pblk"], e["length"], self.v_inodes, self.g.nblocks)
        else:
            a = self.alive_e()
            cov = implied_refcounts(self.extents["pblk"][a], self.extents["length"][a],
                                    self.inodes, self.g.nblocks)
        cov[:self.g.data_start] = fmt.REFCOUNT_RESERVED
        return cov
