#!/usr/bin/env python3
"""Corruption fuzzer for daxfs images ("Prove crash consistency" -> "Corrupt images").

One populated image is built in-process with the engine API (files of many sizes, multi-extent
and sparse files, directories, symlinks, hard links, xattrs, reflinked files, special files),
plus two images whose journal holds committed-but-not-checkpointed transactions:

    clean   populated, then closed (checkpointed; the log holds only stale transactions)
    live    `clean` opened again, more operations, the file copied while the engine is open
            (tables current, journal pending, clean flag 0)
    crash   `clean`'s tables + `live`'s journal, data and superblock: power lost before any table
            store of the new transactions reached the media; replay must redo them, and a torn
            transaction ends replay (the result is exactly a prefix state S_m)

Each case copies one base image and damages ONE metadata region (superblock, journal header/log,
inode, dirent, extent or refcount table) with 1-8 seeded bit/byte flips, sometimes a run of bytes,
mostly inside the used part (slots in use). Then:

  * fsck (in-process `daxfs.fsck.check`; a sample through the real `daxfs fsck`) must not raise,
    must exit in {0,1,4,8}, and must report the damage when a field it can check changed;
  * the engine (`FileSystem.open`) must refuse with a FormatError (one line) or open, and then
    walking the tree and reading everything may fail only with EIO; after an EIO the failsafe
    must be on (writes give EROFS/EIO) and the image must not change any more; undamaged files
    read their original content; a sample is mounted for real (`daxfs mount`, ls -R/cat in a
    child process, the daemon must survive);
  * `fsck --repair` must leave an image a second fsck passes (exit 0), that the engine serves
    without EIO, with every undamaged file unchanged (crash/journal cases: exactly S_m).

    scripts/fuzz_images.py --cases N [--seed S] [--jobs J] [--mounts M] [--cli-every K]
    scripts/fuzz_images.py --seed S --case I [--save-image PATH] [-v]      # replay one case

The LAST line is always `N images tried, T tracebacks, U not repaired` (T, U: images with at least
one such finding); the exit status is 1 when T or U is non-zero (with --strict also when damage went
unreported by fsck or the engine served inconsistent data). Every finding is listed above that
line, grouped by signature with its first case (seed, region, offsets, traceback); --json FILE
keeps them all.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import errno
import hashlib
import json
import logging
import multiprocessing
import os
import random
import re
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from daxfs import format as fmt  # noqa: E402
from daxfs import fsck  # noqa: E402
from daxfs import journal as jmod  # noqa: E402
from daxfs.errors import FsError  # noqa: E402
from daxfs.dirs import FIRST_COOKIE  # noqa: E402
from daxfs.fs import MAX_SYMLINK, FileSystem  # noqa: E402
from daxfs.mkfs import make_image  # noqa: E402

BS = fmt.BLOCK_SIZE
ROOT = fmt.ROOT_INO
IMAGE_BYTES = 16 << 20
READ_CHUNK = 128 << 10
READ_CAP = 8 << 20             # never read more than this of one (possibly damaged) file
CASE_TIMEOUT = 60              # seconds per case before it counts as a hang
MEM_LIMIT_GB = 2               # address-space limit of a worker process
SB_LEN = fmt.SUPERBLOCK_DTYPE.itemsize
SHM = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
DAXFS = os.path.join(os.path.dirname(sys.executable), "daxfs")
REGIONS = ("superblock", "journal", "inodes", "dirents", "extents", "refcounts")
S_IFMT = 0o170000

log = logging.getLogger("fuzz_images")


# =============================================================================== base images
def _data(rng: random.Random, n: int) -> bytes:
    return rng.randbytes(n)


def populate(fs: FileSystem, rng: random.Random) -> None:
    """A few dozen objects of every kind; some names deleted again so the tables have holes."""
    def mkdir(parent, name):
        return fs.mkdir(parent, name, 0o755, 1000, 1000).ino

    def mkfile(parent, name, size, mode=0o644, chunk=64 << 10):
        ino = fs.create(parent, name, mode, 1000, 1000).ino
        off = 0
        while off < size:
            n = min(chunk, size - off)
            fs.write(ino, off, _data(rng, n))
            off += n
        return ino

    docs = mkdir(ROOT, b"docs")
    deep = mkdir(docs, b"deep")
    deeper = mkdir(deep, b"deeper")
    src = mkdir(ROOT, b"src")
    mkdir(ROOT, b"empty-dir")
    media = mkdir(ROOT, b"media")
    sizes = [0, 1, 100, 4095, 4096, 4097, 8192, 12345, 40000, 65536, 100000, 250000]
    dirs = [ROOT, docs, deep, deeper, src, media]
    files = []
    for i, size in enumerate(sizes):
        files.append(mkfile(dirs[i % len(dirs)], b"file-%02d-%d" % (i, size), size,
                            mode=(0o644, 0o600, 0o755, 0o640)[i % 4]))
    files.append(mkfile(media, b"big.bin", (1 << 20) + 17))
    # multi-extent files: b is written from its last block down (each block its own extent,
    # whatever the allocator's placement), interleaved with appends to a
    a = fs.create(src, b"interleaved-a", 0o644, 1000, 1000).ino
    b = fs.create(src, b"interleaved-b", 0o644, 1000, 1000).ino
    for k in range(12):
        fs.write(a, k * BS, _data(rng, BS))
        fs.write(b, (11 - k) * BS, _data(rng, BS if k else 777))
    # sparse file: data, hole, data, hole, tail
    sp = fs.create(docs, b"sparse", 0o644, 1000, 1000).ino
    fs.write(sp, 0, _data(rng, 5000))
    fs.write(sp, 200 << 10, _data(rng, 3 * BS))
    fs.write(sp, 1 << 20, _data(rng, 123))
    # reflinks: whole-file clone, partial clone at another offset, clone then COW break
    big = files[-1]
    c1 = fs.create(media, b"big-clone", 0o644, 1000, 1000).ino
    fs.clone_range(big, 0, c1, 0, (1 << 20) + 17)
    c2 = fs.create(docs, b"partial-clone", 0o644, 1000, 1000).ino
    fs.write(c2, 0, _data(rng, 3 * BS))
    fs.clone_range(big, 16 * BS, c2, 2 * BS, 20 * BS)
    c3 = fs.create(deep, b"cow-clone", 0o644, 1000, 1000).ino
    fs.clone_range(a, 0, c3, 0, 12 * BS)
    fs.write(c3, 3 * BS + 10, _data(rng, 2 * BS))       # breaks sharing of blocks 3..5
    # symlinks: relative, absolute, dangling, long
    fs.symlink(ROOT, b"link-to-big", b"media/big.bin", 1000, 1000)
    fs.symlink(docs, b"up", b"../src", 1000, 1000)
    fs.symlink(deeper, b"dangling", b"/nonexistent/target", 1000, 1000)
    fs.symlink(src, b"long-link", b"x/" * 1500, 1000, 1000)
    # hard links
    fs.link(files[7], deeper, b"hardlink-7")
    fs.link(files[7], ROOT, b"hardlink-7b")
    fs.link(files[10], src, b"hardlink-10")
    # xattrs on files, a directory, a symlink
    fs.setxattr(files[3], b"user.color", b"blue")
    fs.setxattr(files[3], b"user.big", _data(rng, 1500))
    fs.setxattr(files[8], b"user.a", b"1")
    fs.setxattr(files[8], b"trusted.b", b"2")
    fs.setxattr(docs, b"user.dir", b"dir-attr")
    fs.setxattr(a, b"user.frag", b"yes")
    fs.setxattr(c1, b"user.clone", b"of big")
    # special files
    fs.mknod(src, b"fifo", stat.S_IFIFO | 0o644, 0, 1000, 1000)
    fs.mknod(src, b"chardev", stat.S_IFCHR | 0o600, os.makedev(1, 3), 1000, 1000)
    # holes in the tables: created and deleted again, plus a rename
    for k in range(4):
        t = mkfile(ROOT, b"tmp-%d" % k, 3000 * (k + 1))
        fs.setxattr(t, b"user.tmp", b"x")
    for k in (0, 2):
        fs.unlink(ROOT, b"tmp-%d" % k)
    fs.rename(ROOT, b"tmp-1", deep, b"renamed-tmp-1")
    fs.mkdir(media, b"sub", 0o700, 0, 0)


def live_ops(fs: FileSystem, rng: random.Random) -> None:
    """Operations after the checkpoint that never free or overwrite a block, so any prefix of
    them is a consistent state on its own (each one is one or a few transactions)."""
    docs = fs.lookup(ROOT, b"docs").ino
    media = fs.lookup(ROOT, b"media").ino
    big = fs.lookup(media, b"big.bin").ino
    new = fs.mkdir(ROOT, b"after-checkpoint", 0o755, 0, 0).ino
    n1 = fs.create(new, b"new-file", 0o644, 0, 0).ino
    fs.write(n1, 0, _data(rng, 3 * BS + 5))
    fs.write(n1, 3 * BS + 5, _data(rng, 2 * BS))            # append (grows the extent)
    fs.setxattr(n1, b"user.new", b"fresh")
    n2 = fs.create(docs, b"new-small", 0o600, 0, 0).ino
    fs.write(n2, 0, b"hello after the checkpoint\n")
    fs.symlink(new, b"new-link", b"new-file", 0, 0)
    fs.link(n1, docs, b"new-hardlink")
    n3 = fs.create(new, b"new-clone", 0o644, 0, 0).ino
    fs.clone_range(big, 0, n3, 0, 64 * BS)
    fs.rename(docs, b"new-small", new, b"moved-small")
    f0 = fs.lookup(ROOT, b"file-00-0").ino
    fs.write(f0, 0, _data(rng, 2 * BS + 1))                  # an empty file gets data
    fs.mkdir(new, b"new-sub", 0o755, 0, 0)


@dataclasses.dataclass
class Base:
    name: str
    data: bytes                        # the image
    g: fmt.Geometry
    state: dict                        # logical state as served (path -> tuple)
    ident: dict                        # path -> (ino, chain [(parent, name, ino), ...])
    log_used: int                      # bytes of the log worth damaging
    txn_spans: list                    # [(start, end)] log offsets of current transactions
    prefix_states: list | None = None  # crash base: state after m transactions, m = 0..k
    fsck_lines: tuple = ()             # problem lines of a plain fsck of the undamaged image
    fsck_exit: int = 0


def _scan_spans(data: bytes, g: fmt.Geometry) -> list[tuple[int, int]]:
    pm = _MemPM(bytearray(data))
    j = jmod.Journal(pm, g)
    spans, start = [], 0
    for _recs, end in j._scan():
        spans.append((start, end))
        start = end
    return spans


def _log_extent(data: bytes, g: fmt.Geometry) -> int:
    """Bytes from the log start to the last non-zero byte of the log."""
    lo = (g.journal_start + 1) * BS
    hi = (g.journal_start + g.journal_blocks) * BS
    nz = np.flatnonzero(np.frombuffer(data, np.uint8, hi - lo, lo))
    return int(nz[-1]) + 1 if nz.size else 0


def build_bases(workdir: str, seed: int) -> dict[str, Base]:
    rng = random.Random(f"daxfs-fuzz-content-{seed}")
    p = os.path.join(workdir, "base-clean.img")
    g = make_image(p, IMAGE_BYTES, force=True, inode_count=512)
    fs = FileSystem.open(p)
    populate(fs, rng)
    fs.close()
    clean = _read(p)
    # live: reopen, more operations, copy while the engine is open
    q = os.path.join(workdir, "base-live-work.img")
    _write(q, clean)
    fs = FileSystem.open(q)
    cps = fs.journal.checkpoints
    live_ops(fs, rng)
    assert fs.journal.checkpoints == cps, "the live phase must not checkpoint"
    fs._flush_times()
    live = _read(q)
    fs.pm.observer = None
    fs.close()
    os.unlink(q)
    # crash: tables as of the checkpoint, everything else as in live
    t0, t1 = g.inode_start * BS, g.data_start * BS
    crash = live[:t0] + clean[t0:t1] + live[t1:]
    bases = {}
    for name, data in (("clean", clean), ("live", live), ("crash", crash)):
        state, ident, events = state_of_image(data, workdir)
        if events:
            raise RuntimeError(f"base image {name} does not read back cleanly: {events[:3]}")
        spans = _scan_spans(data, g)
        b = Base(name, data, g, state, ident, _log_extent(data, g), spans)
        path = os.path.join(workdir, f"base-{name}.img")
        _write(path, data)
        rep = fsck.check(path)
        if not rep.clean:
            raise RuntimeError(f"base image {name} is not clean: {[str(x) for x in rep.problems]}")
        b.fsck_lines = tuple(sorted(x.line() for x in rep.problems))
        b.fsck_exit = rep.exit_code
        bases[name] = b
    # prefix states of the crash image: invalidate transaction m, replay the rest
    cb = bases["crash"]
    cb.prefix_states = []
    log_off = (g.journal_start + 1) * BS
    for m in range(len(cb.txn_spans) + 1):
        d = bytearray(crash)
        if m < len(cb.txn_spans):
            at = log_off + cb.txn_spans[m][0]
            d[at:at + 4] = b"\0\0\0\0"
        st, _ident, ev = state_of_image(bytes(d), workdir)
        assert not ev, ev
        cb.prefix_states.append(st)
    assert cb.prefix_states[-1] == bases["live"].state, "crash image replays to the live state"
    return bases


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


_CHUNK = 64 << 10


def _write(path: str, data) -> None:
    """Write an image file; all-zero 64 KiB chunks become holes (the images are mostly empty
    and this runs several times per case)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        mv = memoryview(data)
        n = len(mv)
        os.ftruncate(fd, n)
        key = n // _CHUNK
        a = np.frombuffer(mv[:key * _CHUNK], np.uint64).reshape(key, -1)
        nz = np.flatnonzero(a.any(axis=1)).tolist() + ([key] if n % _CHUNK else [])
        for c in nz:
            off = c * _CHUNK
            chunk = mv[off:off + _CHUNK]
            done = 0
            while done < len(chunk):
                done += os.pwrite(fd, chunk[done:], off + done)
    finally:
        os.close(fd)


class _MemPM:
    """Enough of PMem for daxfs.journal over a bytearray (analysis-side replay). `size` may
    exceed the buffer (only the metadata area is kept): stores past its end are dropped."""

    def __init__(self, data: bytearray, size: int | None = None):
        self.data = data
        self.buf = memoryview(data)
        self.size = len(data) if size is None else size
        self.readonly = False

    def store(self, off, data):
        n = len(data) if not isinstance(data, memoryview) else data.nbytes
        if off >= len(self.data):
            return
        self.buf[off:off + n] = bytes(data)[:len(self.data) - off]

    def persist(self, off, n):
        pass

    def fence(self):
        pass


# =============================================================================== logical state
@dataclasses.dataclass
class Event:
    path: str
    op: str
    kind: str          # "eio", "errno", "exception", "short", "outside"
    detail: str
    tb: str = ""


def _fs_call(events: list, path: str, op: str, fn, *args, **kw):
    """Call an engine method; FsError(EIO) -> 'eio' event, other FsError -> 'errno' event,
    anything else -> 'exception' (with its traceback). Returns (ok, value)."""
    try:
        return True, fn(*args, **kw)
    except FsError as e:
        kind = "eio" if e.errno == errno.EIO else "errno"
        events.append(Event(path, op, kind, f"{type(e).__name__}: {e}"))
    except _CaseTimeout:
        raise
    except Exception as e:          # noqa: BLE001
        events.append(Event(path, op, "exception", f"{type(e).__name__}: {e}",
                            traceback.format_exc()))
    return False, None


def walk_engine(fs: FileSystem, *, forget: bool = True, tables: "Tables | None" = None):
    """Walk the tree the way the FUSE adapter serves it (readdir + getattr per entry, lookup,
    open/read/release, readlink, listxattr/getxattr, forget). Returns (state, ident, events).
    state: path -> (type, mode, size, content sha256 | symlink target, xattrs, nlink).
    With `tables` (the image's tables after replay) served bytes are checked against them:
    names against the entries' namelen, reads against extents outside the data region."""
    extents_of = ExtentsOf(tables) if tables is not None else None
    state: dict[str, tuple] = {}
    ident: dict[str, tuple] = {}
    events: list[Event] = []
    seen: set[int] = set()
    stack = [(ROOT, "", [])]
    ok, a = _fs_call(events, "/", "getattr", fs.getattr, ROOT)
    if ok:
        xa = _xattrs(fs, events, "/", ROOT)
        state["/"] = ("d", a.mode, 0, None, xa, a.nlink)
        ident["/"] = (ROOT, [])
    while stack:
        dino, dpath, chain = stack.pop()
        if dino in seen:
            events.append(Event(dpath or "/", "walk", "errno", "a directory is served under two "
                                "names (directory hard link / cycle) without EIO"))
            continue
        seen.add(dino)
        ok, fh = _fs_call(events, dpath or "/", "opendir", fs.opendir, dino)
        if not ok:
            continue
        ok, entries = _fs_call(events, dpath or "/", "readdir", fs.readdir, fh, 0)
        fs.releasedir(fh)
        if not ok:
            continue
        for cookie, name, cino in entries:
            path = f"{dpath}/{name.decode('utf-8', 'backslashreplace')}"
            if tables is not None:
                want = tables.entry_name(cookie - FIRST_COOKIE)
                if want != bytes(name):
                    events.append(Event(path, "readdir", "name",
                                        f"entry {cookie - FIRST_COOKIE} served as {bytes(name)!r} but its "
                                        f"namelen ({len(want)}) says {want!r}"))
            # the adapter's readdir: getattr of each entry, skipped when it fails with FsError
            try:
                fs.getattr(cino)
            except FsError:
                continue
            except _CaseTimeout:
                raise
            except Exception as e:      # noqa: BLE001
                events.append(Event(path, "readdir-getattr", "exception",
                                    f"{type(e).__name__}: {e}", traceback.format_exc()))
                continue
            ok, a = _fs_call(events, path, "lookup", fs.lookup, dino, name)
            if not ok:
                continue
            cchain = chain + [(dino, name, a.ino)]
            t = stat.S_IFMT(a.mode)
            xa = _xattrs(fs, events, path, a.ino)
            if t == stat.S_IFDIR:
                state[path] = ("d", a.mode, 0, None, xa, a.nlink)
                stack.append((a.ino, path, cchain))
            elif t == stat.S_IFREG:
                content = _read_file(fs, events, path, a.ino, a.size, extents_of)
                state[path] = ("f", a.mode, a.size, content, xa, a.nlink)
            elif t == stat.S_IFLNK:
                ok, target = _fs_call(events, path, "readlink", fs.readlink, a.ino)
                if ok and len(target) != a.size:
                    events.append(Event(path, "readlink", "short",
                                        f"readlink gave {len(target)} bytes, size {a.size}"))
                elif ok and not 0 < a.size <= MAX_SYMLINK:
                    events.append(Event(path, "readlink", "bad-symlink",
                                        f"symlink of size {a.size} served (valid: 1..{MAX_SYMLINK})"))
                state[path] = ("l", a.mode, a.size, bytes(target) if ok else None, xa, a.nlink)
                if extents_of is not None:
                    _outside(events, path, a.ino, extents_of, ok, a.size)
            else:
                state[path] = ("o%o" % t, a.mode, 0, None, xa, a.nlink)
            ident[path] = (a.ino, cchain)
            if forget:          # the kernel drops its reference sooner or later
                _fs_call(events, path, "forget", fs.forget, a.ino, 1)
    return state, ident, events


def _xattrs(fs, events, path, ino):
    ok, names = _fs_call(events, path, "listxattr", fs.listxattr, ino)
    if not ok:
        return None
    out = []
    for n in sorted(names):
        ok, v = _fs_call(events, path, "getxattr", fs.getxattr, ino, n)
        out.append((bytes(n), hashlib.sha256(v).hexdigest()[:16] if ok else None))
    return tuple(out)


def _read_file(fs, events, path, ino, size, extents_of):
    ok, _ = _fs_call(events, path, "open", fs.open_file, ino)
    if not ok:
        return None
    h = hashlib.sha256()
    good = True
    try:
        off = 0
        end = min(size, READ_CAP)
        while off < end:
            n = min(READ_CHUNK, end - off)
            ok, data = _fs_call(events, path, "read", fs.read, ino, off, n)
            if not ok:
                good = False
                break
            if len(data) != n:
                events.append(Event(path, "read", "short", f"read({off}, {n}) returned "
                                    f"{len(data)} bytes, file size {size}"))
                good = False
                break
            h.update(data)
            off += n
    finally:
        _fs_call(events, path, "release", fs.release_file, ino)
    if extents_of is not None:
        _outside(events, path, ino, extents_of, good, size)
    return h.hexdigest() if good else None


def _outside(events, path, ino, extents_of, served, size):
    """A read that succeeded although an extent inside the file's size points outside the
    data region: the engine served bytes that are not file data."""
    if not served:
        return
    for lblk, pblk, length in extents_of(ino):
        if lblk * BS >= min(size, READ_CAP):
            continue
        if not extents_of.ok(pblk, length):
            events.append(Event(path, "read", "outside",
                                f"extent (file block {lblk}, block {pblk}, length {length}) is "
                                "outside the data region but the read returned data, not EIO"))
            return


def state_of_image(data: bytes, workdir: str):
    """Logical state of an image (opened read-only: the journal replays privately)."""
    p = os.path.join(workdir, f"state-{os.getpid()}.img")
    _write(p, data)
    try:
        fs = FileSystem.open(p, readonly=True)
        try:
            return walk_engine(fs, forget=False)
        finally:
            fs.close()
    finally:
        os.unlink(p)


# =============================================================================== damage
@dataclasses.dataclass
class Case:
    index: int
    seed: int
    base: str
    region: str
    where: str                 # "used" / "anywhere" / "header" / "log" / "struct" / "padding"
    flips: list                # [(offset, old byte, new byte)] (only bytes that changed)
    desc: str                  # human readable


_INODE_FIELDS = [(n, fmt.INODE_DTYPE.fields[n][1], fmt.INODE_DTYPE.fields[n][0].itemsize, w)
                 for n, w in (("mode", 3), ("uid", .5), ("gid", .5), ("nlink", 2), ("size", 2),
                              ("atime", .3), ("mtime", .3), ("ctime", .3), ("btime", .3),
                              ("generation", .5), ("flags", 2), ("xattr_blk", 2), ("rdev", .5),
                              ("reserved", .5))]
_DIRENT_FIELDS = [("parent", 0, 4, 2), ("ino", 4, 4, 2), ("namelen", 8, 1, 1)]
_EXTENT_FIELDS = [(n, fmt.EXTENT_DTYPE.fields[n][1], fmt.EXTENT_DTYPE.fields[n][0].itemsize, w)
                  for n, w in (("ino", 1), ("length", 1), ("lblk", 1), ("pblk", 1))]


def case_seed(seed: int, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:8], "little")


def make_case(bases: dict[str, Base], seed: int, index: int) -> tuple[Case, bytes]:
    cs = case_seed(seed, index)
    rng = random.Random(cs)
    r = rng.random()
    base = "clean" if r < 0.6 else ("live" if r < 0.85 else "crash")
    b = bases[base]
    g = b.g
    region = "journal" if base == "crash" else rng.choice(REGIONS)
    img = bytearray(b.data)
    nflips = rng.randint(1, 8)
    one_record = rng.random() < 0.6
    anywhere = rng.random() < 0.15
    where = "anywhere" if anywhere else "used"

    if region == "superblock":
        if rng.random() < 0.85:
            where = "struct"
            pick = lambda: rng.randrange(SB_LEN)  # noqa: E731
        else:
            where = "padding"
            pick = lambda: rng.randrange(SB_LEN, BS)  # noqa: E731
    elif region == "journal":
        hdr = g.journal_start * BS
        log_off = hdr + BS
        used = b.log_used if base == "clean" else (b.txn_spans[-1][1] if b.txn_spans else 0)
        if rng.random() < 0.2:
            where = "header"
            field = rng.choice([(0, 8), (8, 16)])
            pick = lambda: hdr + rng.randrange(*field)  # noqa: E731
        elif anywhere or used == 0:
            where = "log-anywhere"
            pick = lambda: log_off + rng.randrange((g.journal_blocks - 1) * BS)  # noqa: E731
        else:
            where = "log"
            if b.txn_spans and rng.random() < 0.3:
                # one field of one transaction header: magic, nrec, body_len, crc, epoch, seq
                s, e = rng.choice(b.txn_spans)
                fo, fl = rng.choice([(0, 4), (4, 4), (8, 4), (12, 4), (16, 8), (24, 8)])
                where = f"txn-header+{fo}"
                pick = lambda: log_off + s + fo + rng.randrange(fl)  # noqa: E731
            elif one_record and b.txn_spans:
                s, e = rng.choice(b.txn_spans)
                pick = lambda: log_off + rng.randrange(s, e)  # noqa: E731
            else:
                pick = lambda: log_off + rng.randrange(used)  # noqa: E731
    else:
        off, length = g.region(region)
        if region == "inodes":
            rsz = fmt.INODE_DTYPE.itemsize
            v = np.frombuffer(b.data, fmt.INODE_DTYPE, g.inode_count, off)
            slots = np.flatnonzero(v["mode"] != 0)
            fields = _INODE_FIELDS
        elif region == "dirents":
            rsz = fmt.DIRENT_DTYPE.itemsize
            v = np.frombuffer(b.data, fmt.DIRENT_DTYPE, g.dirent_count, off)
            slots = np.flatnonzero(v["parent"] != 0)
            fields = None
        elif region == "extents":
            rsz = fmt.EXTENT_DTYPE.itemsize
            v = np.frombuffer(b.data, fmt.EXTENT_DTYPE, g.extent_count, off)
            slots = np.flatnonzero(v["ino"] != 0)
            fields = _EXTENT_FIELDS
        else:
            rsz = 4
            v = np.frombuffer(b.data, "<u4", g.nblocks, off)
            nz = np.flatnonzero(v[g.data_start:]) + g.data_start
            slots = nz if rng.random() < 0.7 else np.arange(int(nz[-1]) + 8)
            fields = None
        nslots = length // rsz
        if anywhere:
            slots = np.arange(nslots)
        rec_choice = [int(rng.choice(slots.tolist()))]

        def pick():
            slot = rec_choice[0] if one_record else int(rng.choice(slots.tolist()))
            base_off = off + slot * rsz
            if region == "dirents":
                nl = int(v["namelen"][slot]) or 1
                f = rng.choices(["parent", "ino", "namelen", "name", "pad"], [2, 2, 1, 2, .5])[0]
                if f == "name":
                    return base_off + 9 + rng.randrange(nl)
                if f == "pad":
                    return base_off + 9 + rng.randrange(255)
                o, s = {"parent": (0, 4), "ino": (4, 4), "namelen": (8, 1)}[f]
                return base_off + o + rng.randrange(s)
            if fields is None:
                return base_off + rng.randrange(rsz)
            _n, o, s, _w = rng.choices(fields, [f[3] for f in fields])[0]
            return base_off + o + rng.randrange(s)

    parts = []
    if where.startswith("txn-header") and rng.random() < 0.5:
        # nudge the field's value by a little (a count off by one, a near-miss sequence...)
        fo = int(where.split("+")[1])
        fl = 8 if fo >= 16 else 4
        at = log_off + s + fo
        val = int.from_bytes(img[at:at + fl], "little")
        new = (val + rng.choice([-3, -2, -1, 1, 2, 3])) % (1 << (8 * fl))
        img[at:at + fl] = new.to_bytes(fl, "little")
        parts.append(f"nudge {val}->{new} @{at}")
        nflips = 0
    for _ in range(nflips):
        at = pick()
        kind = rng.random()
        if kind < 0.6:
            bit = rng.randrange(8)
            img[at] ^= 1 << bit
            parts.append(f"bit {bit} @{at}")
        elif kind < 0.9:
            img[at] = rng.randrange(256)
            parts.append(f"byte @{at}")
        else:
            n = rng.randint(2, 32)
            # keep the run inside the region
            lo, hi = _region_bounds(g, region)
            at = max(lo, min(at, hi - n))
            fill = rng.choice(["random", "zero", "ff"])
            run = {"random": rng.randbytes(n), "zero": bytes(n), "ff": b"\xff" * n}[fill]
            img[at:at + n] = run
            parts.append(f"run {n}x{fill} @{at}")
    lo, hi = _region_bounds(g, region)
    orig = np.frombuffer(b.data, np.uint8, hi - lo, lo)
    new = np.frombuffer(img, np.uint8, hi - lo, lo)
    changed = np.flatnonzero(orig != new) + lo
    flips = [(int(o), int(b.data[o]), int(img[o])) for o in changed]
    desc = (f"case {index} (case seed {cs}): base {base}, region {region} ({where}), "
            + (f"{nflips} flip(s)" if nflips else "1 nudge")
            + f"{' in one record' if one_record and region in REGIONS[2:] else ''}: "
            + ", ".join(parts))
    return Case(index, cs, base, region, where, flips, desc), bytes(img)


def _region_bounds(g: fmt.Geometry, region: str) -> tuple[int, int]:
    if region == "superblock":
        return 0, BS
    if region == "journal":
        return g.journal_start * BS, (g.journal_start + g.journal_blocks) * BS
    off, length = g.region(region)
    return off, off + length


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


# =============================================================================== one case
class _CaseTimeout(BaseException):
    pass


def _on_alarm(signum, frame):  # noqa: ARG001
    raise _CaseTimeout()


@dataclasses.dataclass
class Finding:
    category: str      # traceback | not_repaired | mount | undetected | hang
    where: str         # fsck | repair | open | walk | write-after-eio | close | cli-... | mount
    summary: str       # the signature (no offsets)
    detail: str = ""
    tb: str = ""


@dataclasses.dataclass
class Result:
    case: Case
    fsck_exit: int | None = None
    repair_exit: int | None = None
    recheck_exit: int | None = None
    mount: str = ""
    findings: list = dataclasses.field(default_factory=list)
    notes: list = dataclasses.field(default_factory=list)
    seconds: float = 0.0


def _tb_summary(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    frames = [f for f in tb if "/daxfs/" in f.filename] or tb
    f = frames[-1] if frames else None
    where = f"{os.path.basename(f.filename)}:{f.lineno} in {f.name}" if f else "?"
    return f"{type(exc).__name__} at {where}"


def _ev_summary(ev: Event) -> str:
    if ev.tb:
        lines = [ln for ln in ev.tb.strip().splitlines()]
        files = [ln.strip() for ln in lines if ln.strip().startswith("File ") and "/daxfs/" in ln]
        last = files[-1] if files else ""
        m = re.search(r'File ".*/(daxfs/[^"]+)", line (\d+), in (\S+)', last)
        loc = f"{m.group(1)}:{m.group(2)} in {m.group(3)}" if m else "?"
        return f"{ev.detail.split(':')[0]} at {loc}"
    return ev.detail


def run_case(bases: dict[str, Base], seed: int, index: int, workdir: str, *,
             cli: bool = False, save: str | None = None, verbose: bool = False) -> Result:
    t0 = time.perf_counter()
    case, img = make_case(bases, seed, index)
    res = Result(case)
    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(CASE_TIMEOUT)
    dpath = os.path.join(workdir, f"case-{os.getpid()}-d.img")
    epath = os.path.join(workdir, f"case-{os.getpid()}-e.img")
    try:
        if save:
            _write(save, img)
        _run_case(bases, case, img, res, dpath, epath, cli, verbose)
    except _CaseTimeout:
        res.findings.append(Finding("hang", "case", f"case did not finish in {CASE_TIMEOUT}s"))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        for p in (dpath, epath):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
    res.seconds = time.perf_counter() - t0
    return res


def _run_case(bases, case: Case, img: bytes, res: Result, dpath: str, epath: str, cli: bool,
              verbose: bool) -> None:
    b = bases[case.base]
    g = b.g
    F = res.findings
    sb_broken = any(o < SB_LEN for o, _a, _b in case.flips)
    jhdr = g.journal_start * BS
    magic_broken = any(jhdr <= o < jhdr + 8 for o, _a, _b in case.flips)
    o_t = _base_tables(b)
    d_t = None if sb_broken else Tables(img, g)
    good_paths = set() if d_t is None else undamaged_paths(b, o_t, d_t)
    expect_state = None
    if case.base == "crash" and not sb_broken:
        # damage in the log of a crash image: replay must stop at the torn transaction, which
        # is checked below as an exact state; what fsck finds then is a valid prefix state
        expect_state = b.prefix_states[_expected_prefix(b, case)]
    if not case.flips:
        res.notes.append("no byte changed")

    # ---- 1. plain fsck (read-only) ------------------------------------------------------
    _write(dpath, img)
    rep = None
    if cli:
        p = _cli("fsck", dpath)
        res.fsck_exit = p.returncode
        _check_cli_output(F, "cli-fsck", p, allowed=(0, 4, 8))
    try:
        rep = fsck.check(dpath)
        code = rep.exit_code
    except fsck.FsckError as e:
        code = fsck.EXIT_OPERATIONAL
        if "\n" in str(e):
            F.append(Finding("traceback", "fsck", "FsckError message spans several lines", str(e)))
    except _CaseTimeout:
        raise
    except Exception as e:      # noqa: BLE001
        code = None
        F.append(Finding("traceback", "fsck", _tb_summary(e), f"{type(e).__name__}: {e}",
                         traceback.format_exc()))
    if cli:
        for cmd in (("info", dpath), ("stat", dpath)):
            p = _cli(*cmd)
            _check_cli_output(F, f"cli-{cmd[0]}", p, allowed=(0, 1))
            if p.returncode == 1 and len([ln for ln in p.stderr.splitlines() if ln.strip()]) != 1:
                F.append(Finding("traceback", f"cli-{cmd[0]}", f"{cmd[0]}: exit 1 without exactly "
                                 "one line", p.stderr[-500:]))
    if cli and code is not None and res.fsck_exit != code:
        F.append(Finding("traceback", "cli-fsck", "CLI fsck exit differs from in-process check",
                         f"cli {res.fsck_exit}, in-process {code}"))
    if not cli:
        res.fsck_exit = code
    if sb_broken:
        if code != fsck.EXIT_OPERATIONAL:
            F.append(Finding("undetected", "fsck", "superblock damage not refused (exit != 8)",
                             f"exit {code}"))
    elif rep is not None:
        why = must_detect(o_t, d_t) if expect_state is None else []
        if magic_broken:
            why.append("journal magic")
        lines = tuple(sorted(x.line() for x in rep.problems))
        detected = rep.exit_code != b.fsck_exit or lines != b.fsck_lines
        if why and not detected:
            F.append(Finding("undetected", "fsck", "fsck reports nothing for damaged " +
                             why[0].split(" ")[0] + " fields", "; ".join(why[:6])))
        if verbose:
            print(f"must detect: {why}\nfsck exit {rep.exit_code}:", *rep.problems, sep="\n  ")

    # ---- 2. the engine on a copy: open, walk, failsafe ----------------------------------
    _write(epath, img)
    _engine_check(b, case, epath, d_t, good_paths, expect_state, sb_broken, magic_broken, res,
                  verbose)

    # ---- 3. repair, then a second check, then the engine on the repaired image ----------
    rmsg = ""
    if cli:
        p = _cli("fsck", "--repair", dpath)
        rmsg = (p.stderr or p.stdout)[-500:]
        res.repair_exit = p.returncode
        _check_cli_output(F, "cli-repair", p, allowed=(0, 1, 4, 8))
        rcode = p.returncode
    else:
        try:
            rrep = fsck.check(dpath, repair=True)
            rcode = rrep.exit_code
            if verbose:
                print(f"repair exit {rcode}:", *rrep.problems, sep="\n  ")
        except fsck.FsckError as e:
            rcode = fsck.EXIT_OPERATIONAL
            rmsg = str(e)
        except _CaseTimeout:
            raise
        except Exception as e:      # noqa: BLE001
            rcode = None
            F.append(Finding("traceback", "repair", _tb_summary(e), f"{type(e).__name__}: {e}",
                             traceback.format_exc()))
        res.repair_exit = rcode
    if sb_broken:
        if rcode != fsck.EXIT_OPERATIONAL:
            F.append(Finding("not_repaired", "repair", "superblock damage: repair exit != 8",
                             f"exit {rcode}"))
        return                  # no backup superblock: refusing is the expected outcome
    if rcode is None:
        return
    if rcode not in (0, 1):
        F.append(Finding("not_repaired", "repair", f"fsck --repair exits {rcode}", rmsg))
    if cli:
        p = _cli("fsck", dpath)
        _check_cli_output(F, "cli-recheck", p, allowed=(0, 4, 8))
        res.recheck_exit = p.returncode
        again_lines = p.stdout.strip().splitlines()[:-1]
    else:
        try:
            again = fsck.check(dpath)
            res.recheck_exit = again.exit_code
            again_lines = [x.line() for x in again.problems if x.severity == fsck.ERROR]
        except fsck.FsckError as e:
            res.recheck_exit = fsck.EXIT_OPERATIONAL
            again_lines = [str(e)]
        except _CaseTimeout:
            raise
        except Exception as e:      # noqa: BLE001
            F.append(Finding("traceback", "recheck", _tb_summary(e), f"{type(e).__name__}: {e}",
                             traceback.format_exc()))
            return
    if res.recheck_exit != 0:
        F.append(Finding("not_repaired", "recheck", "second fsck after --repair is not clean",
                         f"exit {res.recheck_exit}: " + "; ".join(again_lines[:4])))
        return
    # the repaired image must open (read-write: recovery runs) and serve everything without
    # EIO, undamaged files intact
    try:
        fs = FileSystem.open(dpath)
    except _CaseTimeout:
        raise
    except Exception as e:      # noqa: BLE001
        F.append(Finding("not_repaired", "repaired-open", f"repaired image does not open: "
                         f"{type(e).__name__}", str(e), traceback.format_exc()))
        return
    try:
        with open(dpath, "rb") as f:
            meta = f.read(g.data_start * BS)
        state, _ident, events = walk_engine(fs, forget=False,
                                            tables=Tables(meta, g, g.nblocks * BS))
    finally:
        try:
            fs.close()
        except _CaseTimeout:
            raise
        except Exception as e:      # noqa: BLE001
            F.append(Finding("traceback", "repaired-close", _tb_summary(e),
                             f"{type(e).__name__}: {e}", traceback.format_exc()))
    for ev in events:
        cat = "traceback" if ev.kind == "exception" else "not_repaired"
        text = f"{ev.op}: {_ev_summary(ev)}" if ev.kind == "exception" else _ev_text(ev)
        F.append(Finding(cat, "repaired-walk", f"after repair: {text}",
                         f"{_clean_path(ev.path)}: {ev.detail[:300]}", ev.tb))
    _compare(F, "not_repaired", "repaired", b.state, state, good_paths, expect_state)


def _expected_prefix(b: Base, case: Case) -> int:
    """Crash base: how many transactions replay must apply given where the damage is."""
    g = b.g
    hdr = g.journal_start * BS
    log_off = hdr + BS
    first = min(o for o, _a, _b in case.flips) if case.flips else None
    if first is None:
        return len(b.txn_spans)
    if hdr <= first < hdr + 16:
        return 0                      # header: magic (log emptied by repair) or epoch (no match)
    for m, (s, e) in enumerate(b.txn_spans):
        if log_off + s <= first < log_off + e:
            return m
    return len(b.txn_spans)


def _compare(F, category, where, orig: dict, got: dict, good: set, exact: dict | None) -> None:
    if exact is not None:
        missing = sorted(set(exact) - set(got))
        extra = sorted(set(got) - set(exact) - {"/lost+found"})
        differ = sorted(p for p in set(exact) & set(got) if exact[p] != got[p])
        if missing or extra or differ:
            F.append(Finding(category, where, f"{where}: state is not the expected journal "
                             "prefix state", f"missing {missing[:4]}, extra {extra[:4]}, "
                             f"different {differ[:4]}"))
        return
    bad = []
    for p in sorted(good):
        o, n = orig.get(p), got.get(p)
        if n is None or o[:5] != n[:5]:
            bad.append(p)
    if bad:
        o, n = orig.get(bad[0]), got.get(bad[0])
        F.append(Finding(category, where, f"{where}: undamaged file changed or missing",
                         f"{len(bad)} path(s), first {_clean_path(bad[0])}: {o} -> {n}"))


def _engine_check(b: Base, case: Case, epath: str, d_t, good_paths, expect_state, sb_broken,
                  magic_broken, res: Result, verbose: bool) -> None:
    F = res.findings
    try:
        fs = FileSystem.open(epath)
    except fmt.FormatError as e:
        res.mount = f"refused: {e}"
        if "\n" in str(e) or not str(e):
            F.append(Finding("mount", "open", "refusal is not one line", repr(str(e))))
        return
    except FsError as e:
        res.mount = f"refused (FsError): {e}"
        return
    except _CaseTimeout:
        raise
    except Exception as e:      # noqa: BLE001
        res.mount = f"crashed: {type(e).__name__}"
        F.append(Finding("traceback", "open", _tb_summary(e), f"{type(e).__name__}: {e}",
                         traceback.format_exc()))
        return
    res.mount = "opened"
    if sb_broken:
        F.append(Finding("mount", "open", "engine opened an image whose superblock is damaged"))
    if magic_broken:
        F.append(Finding("mount", "open", "engine opened an image whose journal magic is damaged"))
    try:
        failed_at_open = fs.failed
        state, _ident, events = walk_engine(fs, forget=True, tables=d_t)
        eio = [ev for ev in events if ev.kind == "eio"]
        for ev in events:
            if ev.kind == "exception":
                F.append(Finding("traceback", "walk", f"{ev.op}: {_ev_summary(ev)}",
                                 f"{_clean_path(ev.path)}: {ev.detail[:300]}", ev.tb))
            elif ev.kind != "eio":
                F.append(Finding("mount", "walk", _ev_text(ev),
                                 f"{_clean_path(ev.path)}: {ev.detail[:300]}"))
        if eio and not fs.failed:
            # (then every later write is accepted too: reported once, here)
            ev = eio[0]
            F.append(Finding("mount", "walk", f"EIO from {ev.op} but the failsafe is not on "
                             "(writes still accepted)", f"{_clean_path(ev.path)}: {ev.detail}"))
        _compare(F, "mount", "mount", b.state, state, good_paths, expect_state)
        # a second walk (after the forgets) must see the same thing
        state2, _i2, events2 = walk_engine(fs, forget=True, tables=d_t)
        if state2 != state or [(e.path, e.op, e.kind) for e in events2] != \
                [(e.path, e.op, e.kind) for e in events]:
            diff = sorted(p for p in set(state) | set(state2) if state.get(p) != state2.get(p))
            gone = [p for p in diff if p not in state2 and state[p][5] == 0]
            if gone:
                F.append(Finding("mount", "walk", "a named inode with (corrupt) nlink 0 is "
                                 "reclaimed when the kernel forgets it: file destroyed while only "
                                 "reading", f"paths {[_clean_path(p) for p in gone[:5]]}"))
            else:
                F.append(Finding("mount", "walk", "second walk differs from the first (the engine "
                                 "changed the tree while only reading)",
                                 f"paths {[_clean_path(p) for p in diff[:5]]}"))
        if not eio and not fs.failed:
            _smoke_writes(fs, F)
            if not fs.failed:
                # writing must not have touched any other file (a corrupt refcount of 0 on a
                # block in use hands that block out again)
                state3, _i3, _e3 = walk_engine(fs, forget=True)
                changed = sorted(p for p in state2 if p in state3 and state2[p][0] == "f"
                                 and state2[p][3] != state3[p][3])
                if changed:
                    F.append(Finding("mount", "smoke", "writing a new file changed the data of "
                                     "existing files (allocator reused blocks in use)",
                                     f"{len(changed)} file(s), first {_clean_path(changed[0])}"))
        if fs.failed:
            # the failsafe is on: every write is refused and the image does not change any more
            res.notes.append(f"failsafe: {fs.failed}")
            snap = hashlib.sha256(fs.pm.buf).hexdigest()
            for what, outcome in _writes_after_failsafe(fs, state):
                if outcome == "ok":
                    F.append(Finding("mount", "write-after-eio", f"{what} succeeded after "
                                     "the failsafe triggered"))
                elif outcome.startswith("exception"):
                    F.append(Finding("traceback", "write-after-eio", f"{what}: {outcome}"))
            _close(fs, F)
            if hashlib.sha256(_read(epath)).hexdigest() != snap:
                F.append(Finding("mount", "write-after-eio", "the image changed after the "
                                 "failsafe triggered"))
        else:
            _close(fs, F)
        if verbose:
            print(f"engine: failed={fs.failed!r} at_open={failed_at_open!r} events="
                  f"{[(e.path, e.op, e.kind, e.detail) for e in events][:10]}")
    except _CaseTimeout:
        raise
    except Exception as e:      # noqa: BLE001
        F.append(Finding("traceback", "engine", _tb_summary(e), f"{type(e).__name__}: {e}",
                         traceback.format_exc()))
        try:
            fs.close()
        except Exception:       # noqa: BLE001
            pass


_KIND_TEXT = {
    "short": "returned fewer bytes than the file size says (extent beyond the image?)",
    "outside": "served bytes of an extent outside the data region instead of EIO",
    "name": "served name differs from the entry's name[:namelen] (engine ignores namelen)",
    "bad-symlink": "served a symlink whose size is invalid instead of EIO",
}


def _ev_text(ev: Event) -> str:
    return f"{ev.op}: " + _KIND_TEXT.get(ev.kind, _generic(ev.detail))


def _clean_path(path: str) -> str:
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in path)[:200]


def _close(fs: FileSystem, F: list) -> None:
    try:
        fs.close()
    except _CaseTimeout:
        raise
    except Exception as e:      # noqa: BLE001
        F.append(Finding("traceback", "close", "close: " + _tb_summary(e),
                         f"{type(e).__name__}: {e}", traceback.format_exc()))
        try:
            fs.pm.close()
        except Exception:       # noqa: BLE001
            pass


def _generic(detail: str) -> str:
    return re.sub(r"\d+", "N", re.sub(r"0x[0-9a-fA-F]+", "0xN", detail))[:100]


def _writes_after_failsafe(fs: FileSystem, state: dict) -> list[tuple[str, str]]:
    some_file = None
    for path, v in state.items():
        if v[0] == "f":
            some_file = path
            break
    attempts = [("create", lambda: fs.create(ROOT, b"fuzz-after-eio", 0o644, 0, 0)),
                ("mkdir", lambda: fs.mkdir(ROOT, b"fuzz-dir-after-eio", 0o755, 0, 0)),
                ("setxattr", lambda: fs.setxattr(ROOT, b"user.fuzz", b"1"))]
    if some_file is not None:
        parts = some_file.strip("/").split("/")

        def write_existing():
            ino = ROOT
            for p in parts:
                ino = fs.lookup(ino, p.encode("utf-8", "surrogateescape")).ino
            fs.write(ino, 0, b"overwrite after failsafe")
        attempts.append(("write", write_existing))
    out = []
    for what, fn in attempts:
        try:
            fn()
            out.append((what, "ok"))
        except FsError as e:
            out.append((what, "refused" if e.errno in (errno.EROFS, errno.EIO) else f"errno {e}"))
        except _CaseTimeout:
            raise
        except Exception as e:      # noqa: BLE001
            out.append((what, f"exception {_tb_summary(e)}: {e}"))
    return out


_SMOKE = b"".join(b"smoke %08d\n" % i for i in range(40000))      # 600 KB: ~150 blocks


def _smoke_writes(fs: FileSystem, F: list) -> None:
    """The engine served everything: it must also take a little write work without crashing
    (FsError, e.g. ENOSPC or a failsafe, is fine; a Python exception is not)."""
    data = _SMOKE
    steps = [("create", lambda: fs.create(ROOT, b"fuzz-smoke", 0o644, 0, 0).ino)]
    ino = None
    try:
        ino = steps[0][1]()
        fs.write(ino, 0, data)
        fs.setxattr(ino, b"user.smoke", b"1")
        back = fs.read(ino, 0, len(data))
        if bytes(back) != data and not fs.failed:
            F.append(Finding("mount", "smoke", "a file written on the damaged image reads back "
                             "differently"))
        fs.unlink(ROOT, b"fuzz-smoke")
        fs.forget(ino, 1)
    except FsError:
        pass
    except _CaseTimeout:
        raise
    except Exception as e:      # noqa: BLE001
        F.append(Finding("traceback", "smoke-write", _tb_summary(e), f"{type(e).__name__}: {e}",
                         traceback.format_exc()))


# =============================================================================== CLI / mount
def _cli(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([DAXFS, *map(str, args)], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return subprocess.CompletedProcess(e.cmd, 124, e.stdout or "", (e.stderr or "") +
                                           "\n[fuzz: timed out]")


def _check_cli_output(F: list, where: str, p: subprocess.CompletedProcess, allowed) -> None:
    err = p.stderr or ""
    if "Traceback" in err or "internal error" in err:
        F.append(Finding("traceback", where, f"{where}: "
                         + ("traceback on stderr" if "Traceback" in err else
                            _generic(err.strip().splitlines()[-1])), err[-2000:]))
    elif p.returncode not in allowed:
        F.append(Finding("traceback", where, f"{where}: exit {p.returncode}", err[-500:]))
    elif p.returncode == 8:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        if len(lines) != 1:
            F.append(Finding("traceback", where, f"{where}: exit 8 without exactly one line",
                             err[-500:]))


def mount_sample(bases, seed: int, index: int, workdir: str, timeout: float = 60) -> Result:
    """Mount the damaged image of one case for real; walk it in a child process."""
    from daxfs import daemon
    case, img = make_case(bases, seed, index)
    res = Result(case)
    b = bases[case.base]
    F = res.findings
    mpath = os.path.join(workdir, f"mount-{index}.img")
    mnt = tempfile.mkdtemp(prefix=f"daxfs-fuzz-mnt-{index}-")
    logp = os.path.join(workdir, f"mount-{index}.log")
    _write(mpath, img)
    try:
        p = _cli("mount", mpath, mnt, "-o", f"log={logp}", timeout=timeout)
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        if p.returncode != 0:
            res.mount = "refused: " + (lines[-1] if lines else "")
            if "Traceback" in p.stderr or "unexpected failure" in p.stderr or \
                    "internal error" in p.stderr:
                F.append(Finding("traceback", "cli-mount", "mount: " + _generic(
                    lines[-1] if lines else "?"), p.stderr[-2000:] + _log_tail(logp)))
            elif p.returncode != 1 or len(lines) != 1 or not lines[0].startswith("daxfs:"):
                F.append(Finding("mount", "cli-mount", "refusal is not one 'daxfs:' line",
                                 f"exit {p.returncode}: {p.stderr[-500:]}"))
            return res
        res.mount = "mounted"
        pid = daemon.lock_holder(mpath)
        w = subprocess.run([sys.executable, os.path.abspath(__file__), "--walk-mount", mnt],
                           capture_output=True, text=True, timeout=timeout)
        try:
            walked = json.loads(w.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            F.append(Finding("mount", "mount-walk", "walker failed", w.stderr[-1000:]))
            walked = None
        if walked is not None:
            for path, op, err in walked["errors"]:
                if op == "short-read":
                    F.append(Finding("mount", "mount-walk", "cat reads fewer bytes than st_size "
                                     "(short read, no error)", _clean_path(path)))
                elif err != errno.EIO:
                    F.append(Finding("mount", "mount-walk", f"{op}: {errno.errorcode.get(err, err)}"
                                     " (not EIO)", path))
            if walked["eio"] and walked["write_after"] not in (errno.EROFS, errno.EIO):
                F.append(Finding("mount", "mount-write", "write after EIO did not fail with "
                                 f"EROFS/EIO ({walked['write_after']})"))
            d_t = Tables(img, b.g) if not any(o < SB_LEN for o, _a, _b in case.flips) else None
            if d_t is not None:
                good = undamaged_paths(b, _base_tables(b), d_t)
                got = {k: tuple(v) if v is not None else None for k, v in walked["state"].items()}
                bad = [q for q in sorted(good) if q in b.state and b.state[q][0] == "f"
                       and (got.get(q) is None or got[q][1] != b.state[q][3])]
                if bad:
                    F.append(Finding("mount", "mount-walk", "undamaged file reads differently on "
                                     "the mount", f"{len(bad)} path(s), first {bad[0]}"))
        alive = pid is not None and _alive(pid)
        if not alive:
            F.append(Finding("traceback", "mount", "the daemon died while serving",
                             _log_tail(logp)))
        u = _cli("umount", mnt, timeout=timeout)
        if "Traceback" in u.stderr or "internal error" in u.stderr:
            F.append(Finding("traceback", "cli-umount", "umount: traceback", u.stderr[-1500:]))
        for ln in _log_problems(logp):
            F.append(Finding("traceback", "daemon", "daemon log: " + _generic(
                re.sub(r"^.*? (ERROR|WARNING|CRITICAL) ", "", ln)), ln, _log_tail(logp)))
    except subprocess.TimeoutExpired as e:
        F.append(Finding("hang", "mount", f"timed out: {e.cmd[:3]}", _log_tail(logp)))
    finally:
        _force_cleanup(mpath, mnt)
        try:
            os.rmdir(mnt)
        except OSError:
            pass
        for q in (mpath,):
            try:
                os.unlink(q)
            except FileNotFoundError:
                pass
    return res


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _log_tail(path: str, n: int = 40) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def _log_problems(path: str) -> list[str]:
    """Daemon log lines that mean a Python exception escaped the engine (the adapter turns
    them into EIO, or the failsafe caught something that is not a CorruptionError)."""
    out = []
    try:
        with open(path, errors="replace") as f:
            for ln in f:
                if "unexpected error in" in ln or "FUSE main loop failed" in ln or \
                        "daemon failed" in ln or "closing the filesystem failed" in ln:
                    out.append(ln.strip())
                m = re.search(r"failsafe\): (\w+)\(", ln)
                if m and m.group(1) not in ("CorruptionError", "FsError"):
                    out.append(ln.strip())
    except OSError:
        pass
    return out


def _force_cleanup(image: str, mnt: str) -> None:
    from daxfs import daemon
    if daemon.find_mount(os.path.realpath(mnt)) is not None:
        subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True, timeout=30)
    if not os.path.exists(image):
        return
    pid = daemon.lock_holder(image)
    if pid and pid != os.getpid():
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and daemon.is_locked(image):
            time.sleep(0.05)
        if daemon.is_locked(image):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def walk_mount(root: str) -> dict:
    """ls -R + cat + readlink + xattrs of a mounted tree (child process). Errors recorded."""
    errors, state = [], {}
    eio = False

    def err(path, op, e):
        nonlocal eio
        errors.append((path, op, e.errno))
        eio = eio or e.errno == errno.EIO

    def rec(d, rel):
        try:
            names = sorted(os.listdir(d))
        except OSError as e:
            err(rel or "/", "listdir", e)
            return
        for n in names:
            p = os.path.join(d, n)
            r = f"{rel}/{n}"
            try:
                st = os.lstat(p)
            except OSError as e:
                err(r, "lstat", e)
                continue
            try:
                for x in os.listxattr(p, follow_symlinks=False):
                    os.getxattr(p, x, follow_symlinks=False)
            except OSError as e:
                err(r, "xattr", e)
            if stat.S_ISDIR(st.st_mode):
                state[r] = ["d", None]
                rec(p, r)
            elif stat.S_ISREG(st.st_mode):
                h = hashlib.sha256()
                try:
                    with open(p, "rb") as f:
                        left = min(st.st_size, READ_CAP)
                        while left > 0:
                            chunk = f.read(min(left, 1 << 20))
                            if not chunk:
                                break
                            h.update(chunk)
                            left -= len(chunk)
                    if left > 0:
                        errors.append((r, "short-read", 0))
                    state[r] = ["f", h.hexdigest()]
                except OSError as e:
                    err(r, "read", e)
                    state[r] = ["f", None]
            elif stat.S_ISLNK(st.st_mode):
                try:
                    state[r] = ["l", os.readlink(p)]
                except OSError as e:
                    err(r, "readlink", e)
    rec(root, "")
    write_after = 0
    if eio:
        try:
            with open(os.path.join(root, "fuzz-after-eio"), "w") as f:
                f.write("x")
        except OSError as e:
            write_after = e.errno
    return {"errors": errors, "state": state, "eio": eio, "write_after": write_after}


# =============================================================================== driver
_BASES: dict[str, Base] | None = None
_WORKDIR = ""


def _vm_size() -> int:
    try:
        with open("/proc/self/status") as f:
            for ln in f:
                if ln.startswith("VmSize:"):
                    return int(ln.split()[1]) << 10
    except (OSError, ValueError):
        pass
    return 0


def _worker_init(limit_gb: float) -> None:
    _quiet_logging()
    if limit_gb:
        # headroom above what the (forked) worker already maps
        lim = _vm_size() + int(limit_gb * (1 << 30))
        try:
            resource.setrlimit(resource.RLIMIT_AS, (lim, resource.RLIM_INFINITY))
        except (ValueError, OSError):
            pass


def _worker(args):
    seed, index, cli = args
    res = run_case(_BASES, seed, index, _WORKDIR, cli=cli)
    return res


def _quiet_logging() -> None:
    lg = logging.getLogger("daxfs")
    lg.setLevel(logging.CRITICAL + 1)
    lg.propagate = False


def run(cases: int, seed: int, *, jobs: int = 1, mounts: int = 0, cli_every: int = 0,
        workdir: str | None = None, progress: bool = False, first: int = 0) -> dict:
    """Run cases [first, first+cases); returns a summary dict (also used by the tests)."""
    global _BASES, _WORKDIR
    _quiet_logging()
    own = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="daxfs-fuzz-", dir=SHM)
    t0 = time.perf_counter()
    try:
        bases = build_bases(workdir, seed)
        _BASES, _WORKDIR = bases, workdir
        t_build = time.perf_counter() - t0
        todo = [(seed, i, bool(cli_every) and i % cli_every == 0)
                for i in range(first, first + cases)]
        results: list[Result] = []
        t1 = time.perf_counter()
        # always in worker processes: a damaged size can make the engine allocate gigabytes,
        # so each worker runs under an address-space limit (MemoryError instead of the OOM killer)
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(max(1, jobs), initializer=_worker_init, initargs=(MEM_LIMIT_GB,),
                      maxtasksperchild=200) as pool:
            for k, r in enumerate(pool.imap_unordered(_worker, todo, chunksize=4)):
                results.append(r)
                if progress and (k + 1) % 100 == 0:
                    _progress(results, t1)
        t_cases = time.perf_counter() - t1
        results.sort(key=lambda r: r.case.index)
        mres = []
        for i in pick_mount_samples(results, mounts):
            mres.append(mount_sample(bases, seed, i, workdir))
        return summarize(results, mres, seed, t_build, t_cases, time.perf_counter() - t0)
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)


def pick_mount_samples(results: list[Result], n: int) -> list[int]:
    """Cases worth a real mount: a refused one, ones whose engine check found something (one
    per distinct finding), then evenly spaced ones."""
    if n <= 0 or not results:
        return []
    picks: list[int] = []

    def add(i):
        if i not in picks and len(picks) < n:
            picks.append(i)
    refused = [r.case.index for r in results if r.mount.startswith("refused")]
    if refused:
        add(refused[0])
    seen = set()
    for r in results:
        for f in r.findings:
            if f.where in ("walk", "engine", "write-after-eio", "open") and f.summary not in seen:
                seen.add(f.summary)
                add(r.case.index)
    step = max(1, len(results) // n)
    for r in results[::step]:
        add(r.case.index)
    return picks


def _progress(results, t1):
    n = len(results)
    T = sum(any(f.category in ("traceback", "hang") for f in r.findings) for r in results)
    U = sum(any(f.category == "not_repaired" for f in r.findings) for r in results)
    print(f"  ... {n} cases, {time.perf_counter() - t1:.0f}s, {T} with tracebacks, "
          f"{U} not repaired", file=sys.stderr, flush=True)


def summarize(results: list[Result], mres: list[Result], seed: int, t_build, t_cases, t_all):
    allr = results + mres
    cats = collections.Counter()
    for r in allr:
        for c in {f.category for f in r.findings}:
            cats[c] += 1
    bugs: dict[tuple, dict] = {}
    for r in allr:
        for f in r.findings:
            key = (f.category, f.where if f.where.startswith(("cli", "mount", "daemon")) else "",
                   f.summary)
            bug = bugs.get(key)
            if bug is None:
                bug = bugs[key] = {"category": f.category, "where": f.where, "summary": f.summary,
                                   "count": 0, "cases": [], "regions": collections.Counter(),
                                   "first": {"case": r.case.index, "case_seed": r.case.seed,
                                             "base": r.case.base, "region": r.case.region,
                                             "desc": r.case.desc, "flips": r.case.flips[:16],
                                             "detail": f.detail, "traceback": f.tb}}
            if r.case.index in bug["cases"]:
                continue
            bug["count"] += 1
            bug["cases"].append(r.case.index)
            bug["regions"][f"{r.case.base}/{r.case.region}"] += 1
    by_region = collections.Counter(f"{r.case.base}/{r.case.region}" for r in results)
    outcomes = collections.Counter(r.mount.split(":")[0] for r in results)
    return {
        "seed": seed, "cases": len(results), "mount_samples": len(mres),
        "tracebacks": len({r.case.index for r in allr
                           if any(f.category in ("traceback", "hang") for f in r.findings)}),
        "not_repaired": len({r.case.index for r in allr
                             if any(f.category == "not_repaired" for f in r.findings)}),
        "undetected": cats["undetected"], "mount_inconsistent": cats["mount"],
        "hangs": cats["hang"],
        "failsafe": sum(any(n.startswith("failsafe") for n in r.notes) for r in results),
        "by_region": dict(by_region), "engine_outcomes": dict(outcomes),
        "fsck_exits": dict(collections.Counter(str(r.fsck_exit) for r in results)),
        "repair_exits": dict(collections.Counter(str(r.repair_exit) for r in results)),
        "seconds": {"build": round(t_build, 2), "cases": round(t_cases, 2),
                    "total": round(t_all, 2)},
        "bugs": sorted(bugs.values(), key=lambda x: (-x["count"])),
        "failing_cases": sorted({r.case.index for r in allr if r.findings}),
        "per_case": {r.case.index: sorted({f.category for f in r.findings}) for r in results
                     if r.findings},
        "per_mount": {r.case.index: sorted({f.category for f in r.findings}) for r in mres
                      if r.findings},
    }


def print_summary(s: dict, verbose: bool = False) -> None:
    print(f"seed {s['seed']}: {s['cases']} cases in {s['seconds']['cases']:.1f}s "
          f"(bases built in {s['seconds']['build']:.1f}s), {s['mount_samples']} real mounts")
    print("regions:", ", ".join(f"{k} {v}" for k, v in sorted(s["by_region"].items())))
    print("engine open:", ", ".join(f"{k} {v}" for k, v in sorted(s["engine_outcomes"].items())),
          "| fsck exits:", s["fsck_exits"], "| repair exits:", s["repair_exits"])
    print(f"findings: {s['tracebacks']} cases with tracebacks/hangs, {s['not_repaired']} not "
          f"repaired, {s['undetected']} damage not reported by fsck, {s['mount_inconsistent']} "
          f"inconsistent engine/mount behaviour; the failsafe triggered in {s['failsafe']} cases")
    for k, bug in enumerate(s["bugs"], 1):
        f = bug["first"]
        print(f"\n[{k}] {bug['category']} ({bug['where']}): {bug['summary']} -- {bug['count']} "
              f"case(s): {bug['cases'][:12]}; regions {dict(bug['regions'])}")
        print(f"    first: {f['desc']}")
        if f["detail"]:
            print("    detail:", f["detail"][:600].replace("\n", "\n    "))
        if f["traceback"] and (verbose or k <= 40):
            tb = f["traceback"].strip().splitlines()
            print("    " + "\n    ".join(tb[-12:]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--first", type=int, default=0, help="index of the first case")
    ap.add_argument("--jobs", type=int, default=max(1, min(os.cpu_count() or 1, 8)))
    ap.add_argument("--mounts", type=int, default=None,
                    help="real `daxfs mount` samples (default: 5 when /dev/fuse exists, as root)")
    ap.add_argument("--cli-every", type=int, default=25,
                    help="every K-th case runs fsck through the real CLI (0: never)")
    ap.add_argument("--case", type=int, help="run only this case, verbosely")
    ap.add_argument("--save-image", help="with --case: write the damaged image here")
    ap.add_argument("--json", help="write the full summary (bugs with tracebacks) here")
    ap.add_argument("--strict", action="store_true",
                    help="exit 1 on any finding (undetected damage, inconsistent serving), not "
                         "only on tracebacks and unrepaired images")
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--walk-mount", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.walk_mount:
        print(json.dumps(walk_mount(a.walk_mount)))
        return 0
    if a.case is not None:
        _quiet_logging()
        workdir = tempfile.mkdtemp(prefix="daxfs-fuzz-", dir=SHM)
        try:
            bases = build_bases(workdir, a.seed)
            soft, hard = resource.getrlimit(resource.RLIMIT_AS)
            try:        # as in the workers: a damaged size must end in MemoryError, not OOM
                resource.setrlimit(resource.RLIMIT_AS, (_vm_size() + (MEM_LIMIT_GB << 30), hard))
            except (ValueError, OSError):
                pass
            try:
                r = run_case(bases, a.seed, a.case, workdir, cli=True, save=a.save_image,
                             verbose=True)
            finally:
                resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
            print(r.case.desc)
            print(f"flips: {r.case.flips}")
            print(f"fsck {r.fsck_exit}, engine {r.mount}, repair {r.repair_exit}, "
                  f"recheck {r.recheck_exit}, {r.seconds:.2f}s")
            for f in r.findings:
                print(f"FINDING {f.category} {f.where}: {f.summary}\n  {f.detail}")
                if f.tb:
                    print("  " + f.tb.replace("\n", "\n  "))
            if a.mounts:
                m = mount_sample(bases, a.seed, a.case, workdir)
                print(f"real mount: {m.mount}")
                for f in m.findings:
                    print(f"FINDING {f.category} {f.where}: {f.summary}\n  {f.detail}\n{f.tb}")
                r.findings += m.findings
            T = int(any(f.category in ("traceback", "hang") for f in r.findings))
            U = int(any(f.category == "not_repaired" for f in r.findings))
            print(f"1 images tried, {T} tracebacks, {U} not repaired")
            return 1 if T or U else 0
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    mounts = a.mounts
    if mounts is None:
        mounts = 5 if os.geteuid() == 0 and os.path.exists("/dev/fuse") and \
            shutil.which("fusermount3") else 0
    try:
        s = run(a.cases, a.seed, jobs=a.jobs, mounts=mounts, cli_every=a.cli_every,
                progress=True, first=a.first)
    except Exception:       # noqa: BLE001 - the fuzzer itself failed: still end with the line
        traceback.print_exc()
        print("0 images tried, 1 tracebacks, 0 not repaired")
        return 1
    print_summary(s, a.verbose)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(s, f, indent=1, default=str)
    bad = s["tracebacks"] or s["not_repaired"] or \
        (a.strict and (s["undetected"] or s["mount_inconsistent"]))
    print(f"{s['cases']} images tried, {s['tracebacks']} tracebacks, "
          f"{s['not_repaired']} not repaired")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
