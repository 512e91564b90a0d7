"""In-process crash-state exploration of the engine (no FUSE): record, rebuild, recover, judge.

1. Record. A workload (a list of operations) runs on a copy of a small pre-populated template
   image through `RecordingPMem`, which logs every store (image offset + the bytes *after* the
   store), every persist(range) and every fence, each labelled with the index of the operation
   in progress. Operation 0 is the mount, the last one the unmount (`close`). After each
   operation the logical state of the live engine is captured (`extract`): these are the
   reference states S_0..S_n+2 that crash images are judged against.

2. Rebuild. A crash image is the template's bytes plus a set of 4 KiB page versions derived
   from the log. Two crash models:
   - kill (SIGKILL / exception): every store so far survives, in program order -> one image
     after *every* store (all stores of all journal commits included, no sampling), plus one at
     the end of each operation.
   - power (power loss / OS crash): a store is durable once a persist covering its page and then
     a fence happened (durable content = the page as it was at the persist). At every fence
     (just before and just after it) and at the end of each operation, each in-flight page
     (current content != durable content) may independently hold its durable, its persisted-
     but-unfenced or its current version: all combinations when <= 16, else none, all, every
     single page, every page but one, and >= 20 seeded random combinations.
   Images are written into ONE scratch file with os.pwrite of only the pages that differ from
   what the file holds (the pages the previous state wrote and the pages its recovery stored).

   Plus crashes during recovery: the image a power loss leaves at the end of a sequence's last
   op (journal committed, nothing applied in place durable) is itself mounted under recording,
   and every kill/power crash point of that recovery (replay, checkpoint, orphan reclaim,
   unmount) is checked against the state its clean recovery shows.

3. Recover and judge. fsck of the crash image as found (fsck replays into a private mapping;
   must be clean), FileSystem.open (journal replay, orphan reclaim, trim), extract the logical
   state, close, fsck again (must be clean), then the oracle:
   - the logical state (every path -> type+mode, size, nlink, hard-link group, xattrs, content
     digest; symlink target) must equal S_before or S_after of the interrupted operation (at the
     end of an operation: S_after only), so every operation is atomic and every completed one
     is durable;
   - power model only, file *contents*: an overwrite of an existing block is not durable before
     fsync (README durability contract), so each 4 KiB page of a file may show any version the
     page had since the last fsync/unmount, *as long as the block stayed the same physical
     block*. Versions are masked to the file size at every step (bytes cut off by a truncate
     stay zero, so stale data resurfacing after truncate+grow is caught); a page that moved to
     a newly allocated block (hole fill, COW break) must show exactly its new contents (new
     blocks are persisted before the transaction that maps them); a page that became shared by
     a clone may show any version allowed for the source page. For S_before, pages the
     interrupted write/clone/punch overwrote in place may also show their new bytes.
   Metadata is never relaxed: it must equal S_before or S_after exactly in both models.

Prefix-closed exploration: crash points inside operation k of a sequence are skipped when the
sequence's first k operations were already explored as a sequence of their own (the log up to
there is identical), so longer sequences only add new states. Crash points that produce the
same image within one sequence are checked once (against every point's expectations); fsck
verdicts are memoized by a digest of the image bytes (fsck is a pure function of them); every
counted state is mounted, read and judged.

Engine bugs found so far are listed in KNOWN_ISSUES so that output can separate them from new
ones. Not modelled: stores torn inside one store() call (kill), sub-page (cache-line, DAX)
persistence granularity, intermediate page versions between two fences, timestamps.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import itertools
import json
import os
import random
import stat
import time
from typing import Callable, Iterable, Iterator

from . import format as fmt
from . import fs as fsmod
from .errors import FsError
from .fs import FileSystem
from .mkfs import make_image
from .pmem import PMem

BS = fmt.BLOCK_SIZE
PAGE = 4096
ZERO_PAGE = bytes(PAGE)
HOLE = -1
IMAGE_SIZE = 8 << 20

# ------------------------------------------------------------------------------ recording


class RecordingPMem(PMem):
    """PMem that logs ('S', op, offset, bytes_after) / ('P', op, offset, length) / ('F', op)."""

    def __init__(self, path: str, log: list, op_ref: list):
        super().__init__(path)
        self.log = log
        self.op_ref = op_ref          # [current op index], shared with the workload runner
        self.observer = self._observe

    def _observe(self, kind: str, offset: int, length: int) -> None:
        op = self.op_ref[0]
        if kind == "store":
            self.log.append(("S", op, offset, bytes(self.buf[offset:offset + length])))
        elif kind == "persist":
            self.log.append(("P", op, offset, length))
        else:
            self.log.append(("F", op, 0, 0))

    def close(self) -> None:
        # PMem.close msyncs the whole mapping without going through persist(): log it as one
        if self.mm is not None and not self.readonly:
            self.log.append(("P", self.op_ref[0], 0, self.size))
            self.log.append(("F", self.op_ref[0], 0, 0))
        self.observer = None
        super().close()


def open_recording(path: str, log: list, op_ref: list) -> FileSystem:
    """FileSystem.open, but over a RecordingPMem (the mount itself is recorded)."""
    return FileSystem.open(path, make_pmem=lambda p: RecordingPMem(p, log, op_ref))


class _PageCollector:
    """Class-level PMem observer used while a crash image is recovered: which pages changed."""

    def __init__(self):
        self.pages: set[int] = set()

    def __call__(self, kind: str, offset: int, length: int) -> None:
        if kind == "store" and length > 0:
            self.pages.update(range(offset // PAGE, (offset + length - 1) // PAGE + 1))


# ------------------------------------------------------------------------------ logical state


@dataclasses.dataclass
class State:
    meta: dict          # path -> (mode, size, nlink, link group, xattrs, symlink target)
    sha: dict           # path -> content digest (regular files)
    data: dict          # path -> content bytes (regular files)
    fid: dict           # path -> (ino, generation)                      [live states only]
    pblk: dict          # fid -> tuple of physical block per file block   [live states only]

    def same(self, other: "State") -> bool:
        return self.meta == other.meta and self.sha == other.sha


class ExtractError(Exception):
    pass


def extract(fs: FileSystem, live: bool = False) -> State:
    """The logical state of a mounted engine, read through its in-memory indexes (no stores,
    no lookup counts). `live` also records file ids and block maps (for the power oracle)."""
    meta: dict = {}
    sha: dict = {}
    data: dict = {}
    fid: dict = {}
    pblk: dict = {}
    first_path: dict[int, bytes] = {}
    pending: list[tuple[bytes, int]] = []     # (path, ino) of non-directories, for link groups
    stack = [(b"/", fmt.ROOT_INO)]
    seen_dirs = {fmt.ROOT_INO}
    while stack:
        dpath, d = stack.pop()
        node = fs.inodes.get(d)
        meta[dpath] = (node.mode, 0, node.nlink, None, _xattr_tuple(fs, node), None)
        if live:
            fid[dpath] = (d, node.generation)
        for name, (ino, _slot) in sorted(fs.dirs.entries(d).items()):
            path = (dpath if dpath == b"/" else dpath + b"/") + name
            node = fs.inodes.get(ino)
            if node.is_dir:
                if ino in seen_dirs:
                    raise ExtractError(f"directory inode {ino} reachable twice ({path!r})")
                seen_dirs.add(ino)
                stack.append((path, ino))
                continue
            if ino not in first_path or path < first_path[ino]:
                first_path[ino] = path
            pending.append((path, ino))
    for path, ino in pending:
        node = fs.inodes.get(ino)
        target = None
        if stat.S_ISLNK(node.mode):
            target = fs.readlink(ino)
        elif node.is_reg:
            content = fs.read(ino, 0, node.size)
            if len(content) != node.size:
                raise ExtractError(f"{path!r}: read {len(content)} of {node.size} bytes")
            data[path] = content
            sha[path] = hashlib.blake2b(content, digest_size=16).digest()
        meta[path] = (node.mode, node.size, node.nlink, first_path[ino], _xattr_tuple(fs, node),
                      target)
        if live:
            f = (ino, node.generation)
            fid[path] = f
            if node.is_reg and f not in pblk:
                nb = max(-(-node.size // BS), node.extents.end_block())
                blocks = []
                for _l, n, p in node.extents.segments(0, nb):
                    blocks.extend([HOLE] * n if p < 0 else range(p, p + n))
                pblk[f] = tuple(blocks)
    return State(meta, sha, data, fid, pblk)


def _xattr_tuple(fs: FileSystem, node) -> tuple:
    return tuple(sorted(fs._xattrs(node).items()))


def diff_states(got: State, want: State, limit: int = 6) -> str:
    out = []
    for path in sorted(set(got.meta) | set(want.meta)):
        g, w = got.meta.get(path), want.meta.get(path)
        if g != w:
            out.append(f"{path.decode(errors='replace')}: got {_fmt_meta(g)} want {_fmt_meta(w)}")
        elif got.sha.get(path) != want.sha.get(path):
            out.append(f"{path.decode(errors='replace')}: content differs "
                       f"({_content_diff(got.data.get(path, b''), want.data.get(path, b''))})")
        if len(out) >= limit:
            out.append("...")
            break
    return "; ".join(out) or "(no difference)"


def _fmt_meta(m) -> str:
    if m is None:
        return "absent"
    mode, size, nlink, group, xattrs, target = m
    s = f"mode={mode:o} size={size} nlink={nlink}"
    if group is not None:
        s += f" group={group.decode(errors='replace')}"
    if xattrs:
        s += " xattrs={" + ",".join(f"{k.decode()}:{len(v)}B" for k, v in xattrs) + "}"
    if target is not None:
        s += f" -> {target!r}"
    return s


def _content_diff(a: bytes, b: bytes) -> str:
    n = min(len(a), len(b))
    bad = [p for p in range(-(-max(len(a), len(b)) // PAGE))
           if a[p * PAGE:(p + 1) * PAGE] != b[p * PAGE:(p + 1) * PAGE]]
    first = next((i for i in range(n) if a[i] != b[i]), n)
    return f"pages {bad}, first differing byte {first}"


# ------------------------------------------------------------------------------ page versions


def page_of(content: bytes, p: int) -> bytes:
    b = content[p * PAGE:(p + 1) * PAGE]
    return b if len(b) == PAGE else b + bytes(PAGE - len(b))


def mask(v: bytes, size: int, p: int) -> bytes:
    """The page as the file shows it at `size`: bytes at or past EOF read as zeros."""
    lo = p * PAGE
    if size >= lo + PAGE:
        return v
    if size <= lo:
        return ZERO_PAGE
    return v[:size - lo] + bytes(lo + PAGE - size)


DATA_OPS = {"write", "clone", "punch", "falloc"}
SYNC_OPS = {"fsync", "remount", "close"}      # everything is durable when these return


def allowed_versions(prev: State, cur: State, prev_allowed: dict, op: tuple) -> tuple[dict, dict, dict]:
    """Page versions each file may show after a power loss, for `cur` (the state after `op`)
    and for `prev` as seen during `op` (prev's versions + in-place overwrites `op` made).
    Returns (allowed_after, allowed_before_during_op, in-place pages of op): the first two map
    fid -> list of sets of page bytes, the last fid -> {page: new bytes masked to old size}."""
    after: dict = {}
    kind = op[0]
    alias: dict[int, list] = {}
    for f, blocks in prev.pblk.items():
        for p, b in enumerate(blocks):
            if b != HOLE:
                alias.setdefault(b, []).append((f, p))
    prev_size = {prev.fid[path]: prev.meta[path][1] for path in prev.data}
    prev_data = {prev.fid[path]: c for path, c in prev.data.items()}
    before = {f: list(v) for f, v in prev_allowed.items()}
    inplace: dict = {}          # fid -> {page: new version masked to the old size}
    seen = set()
    for path, content in cur.data.items():
        f = cur.fid[path]
        if f in seen:
            continue
        seen.add(f)
        size = cur.meta[path][1]
        blocks = cur.pblk[f]
        old_blocks = prev.pblk.get(f, ())
        old_allowed = prev_allowed.get(f, [])
        pages = []
        for p in range(-(-size // PAGE)):
            now = page_of(content, p)
            b = blocks[p] if p < len(blocks) else HOLE
            if kind in SYNC_OPS:
                pages.append({now})
                continue
            if b == HOLE:
                pages.append({now})
                continue
            ob = old_blocks[p] if p < len(old_blocks) else None
            if ob == b:
                olds = old_allowed[p] if p < len(old_allowed) else {ZERO_PAGE}
                s = {mask(v, size, p) for v in olds}
                s.add(now)
                pages.append(s)
                if kind in DATA_OPS and f in prev_size and p < -(-prev_size[f] // PAGE):
                    # the interrupted op may have overwritten this page in place already
                    psize = prev_size[f]
                    if mask(now, psize, p) != mask(page_of(prev_data[f], p), psize, p):
                        before[f] = list(before.get(f, []))
                        while len(before[f]) <= p:
                            before[f].append({ZERO_PAGE})
                        before[f][p] = set(before[f][p]) | {mask(now, psize, p)}
                        inplace.setdefault(f, {})[p] = mask(now, psize, p)
            elif b in alias:
                s = {now}
                for g, q in alias[b]:
                    ga = prev_allowed.get(g, [])
                    if q < len(ga):
                        s.update(mask(v, size, p) for v in ga[q])
                pages.append(s)
            else:       # a block new in this operation: persisted before it was mapped
                pages.append({now})
        after[f] = pages
    return after, before, inplace


def kill_before(prev: State, inplace: dict) -> dict | None:
    """Kill model, S_before of an interrupted data op: file data is not journaled (README), so
    each page the op overwrites in place may already show its new bytes; nothing else."""
    if not inplace:
        return None
    out = {}
    for path, content in prev.data.items():
        f = prev.fid[path]
        pages = [{page_of(content, p)} for p in range(-(-len(content) // PAGE))]
        for p, v in inplace.get(f, {}).items():
            if p < len(pages):
                pages[p].add(v)
        out[f] = pages
    return out


def initial_allowed(s: State) -> dict:
    out = {}
    for path, content in s.data.items():
        f = s.fid[path]
        out[f] = [{page_of(content, p)} for p in range(-(-len(content) // PAGE))]
    return out


# ------------------------------------------------------------------------------ workloads


def payload(seed: int, n: int) -> bytes:
    return random.Random(seed * 7919 + n).randbytes(n)


def _b(path: str) -> bytes:
    return path.encode()


class Workload:
    """Runs operations (JSON-friendly tuples) on a live engine, resolving paths itself."""

    def __init__(self, fs: FileSystem):
        self.fs = fs
        self.open_inos: list[int] = []

    def resolve(self, path: str) -> int:
        ino = fmt.ROOT_INO
        for part in _b(path).strip(b"/").split(b"/"):
            if not part:
                continue
            nxt = self.fs.dirs.lookup(ino, part)
            if nxt is None:
                raise FsError(errno.ENOENT)
            ino = nxt
        return ino

    def split(self, path: str) -> tuple[int, bytes]:
        head, _, name = path.rpartition("/")
        return self.resolve(head or "/"), name.encode()

    def apply(self, op: tuple) -> int:
        """Run one operation; returns 0 or the errno it failed with."""
        try:
            self._apply(op)
            return 0
        except FsError as e:
            return e.errno

    def _apply(self, op: tuple) -> None:
        fs = self.fs
        kind, args = op[0], op[1:]
        if kind in ("create", "mkdir", "symlink"):
            parent, name = self.split(args[0])
            if kind == "create":
                a = fs.create(parent, name, 0o644, 0, 0)
            elif kind == "mkdir":
                a = fs.mkdir(parent, name, 0o755, 0, 0)
            else:
                a = fs.symlink(parent, name, _b(args[1]), 0, 0)
            fs.forget(a.ino, 1)
        elif kind == "write":
            path, off, n, seed = args
            fs.write(self.resolve(path), off, payload(seed, n))
        elif kind == "truncate":
            fs.setattr(self.resolve(args[0]), size=args[1])
        elif kind == "chmod":
            fs.setattr(self.resolve(args[0]), mode=args[1])
        elif kind == "clone":
            src, soff, dst, doff, n = args
            fs.clone_range(self.resolve(src), soff, self.resolve(dst), doff, n)
        elif kind == "punch":
            path, off, n = args
            fs.fallocate(self.resolve(path), 0x01 | 0x02, off, n)
        elif kind == "falloc":
            path, off, n, keep = args
            fs.fallocate(self.resolve(path), 0x01 if keep else 0, off, n)
        elif kind == "unlink":
            parent, name = self.split(args[0])
            fs.unlink(parent, name)
        elif kind == "unlink_open":        # unlink while open: an orphan until close / mount
            ino = self.resolve(args[0])
            parent, name = self.split(args[0])
            fs.open_file(ino)
            self.open_inos.append(ino)
            fs.unlink(parent, name)
        elif kind == "rmdir":
            parent, name = self.split(args[0])
            fs.rmdir(parent, name)
        elif kind == "rename":
            src, dst, flags = args
            op_, on = self.split(src)
            np_, nn = self.split(dst)
            fs.rename(op_, on, np_, nn, flags)
        elif kind == "link":
            ino = self.resolve(args[0])
            parent, name = self.split(args[1])
            a = fs.link(ino, parent, name)
            fs.forget(a.ino, 1)
        elif kind == "setxattr":
            path, name, n, seed = args
            fs.setxattr(self.resolve(path), _b(name), payload(seed, n))
        elif kind == "removexattr":
            fs.removexattr(self.resolve(args[0]), _b(args[1]))
        elif kind == "fsync":
            fs.fsync(self.resolve(args[0]))
        elif kind == "checkpoint":         # what Journal.commit does when the log is full
            fs.journal.checkpoint()
        else:
            raise ValueError(f"unknown operation {op!r}")


# The pre-populated template: a few files, one pair sharing blocks, a hard link, a symlink,
# xattrs, a fragmented file and one with stale bytes past EOF (written, then truncated).
A_SIZE = 14436


def build_template(path: str, size: int = IMAGE_SIZE) -> None:
    make_image(path, size, force=True)
    fs = FileSystem.open(path)
    w = Workload(fs)
    for op in [
        ("mkdir", "/D"), ("mkdir", "/M"),
        ("create", "/A"), ("write", "/A", 0, A_SIZE, 100),
        ("setxattr", "/A", "user.a", 5, 101),
        ("create", "/B"), ("clone", "/A", 0, "/B", 0, 2 * BS), ("write", "/B", 2 * BS, 1000, 102),
        ("create", "/C"), ("write", "/C", 0, 100, 103), ("link", "/C", "/D/C2"),
        ("create", "/D/E"), ("write", "/D/E", 0, 5000, 104),
        ("symlink", "/S", "A"),
        ("create", "/T"), ("write", "/T", 0, 2 * BS, 105), ("truncate", "/T", 5000),
        ("create", "/Z"),
        ("create", "/X"), ("write", "/X", 0, BS, 106),
        ("setxattr", "/X", "user.a", 10, 107), ("setxattr", "/X", "user.b", 200, 108),
        ("create", "/F"), ("create", "/G"),
        ("write", "/F", 0, BS, 109), ("write", "/G", 0, BS, 110), ("write", "/F", BS, BS, 111),
    ]:
        err = w.apply(op)
        if err:
            raise RuntimeError(f"template: {op} failed: {errno.errorcode[err]}")
    fs.close()


CATALOG: list[tuple] = [
    ("create", "/N"),
    ("mkdir", "/N"),
    ("symlink", "/N", "D/E"),
    ("write", "/A", 2 * BS, BS, 1),          # aligned overwrite of an owned block (in place)
    ("write", "/A", 9000, 100, 2),           # unaligned overwrite in place
    ("write", "/A", 14000, 6000, 3),         # extending: in place up to EOF, then a new block
    ("write", "/A", 40000, 100, 4),          # past EOF, leaving a hole
    ("write", "/A", 100, 200, 5),            # into a shared block: COW break
    ("write", "/A", 4000, 5000, 6),          # spans shared and owned blocks
    ("write", "/B", 0, BS, 7),               # a whole shared block, from the other sharer
    ("write", "/F", 4000, 200, 8),           # spans two non-contiguous extents
    ("write", "/Z", 0, 10000, 9),            # fill an empty file
    ("write", "/T", 6000, 100, 10),          # extend over stale bytes past EOF
    ("truncate", "/A", 5000),                # shrink into a shared block
    ("truncate", "/A", 0),
    ("truncate", "/A", 30000),               # grow
    ("truncate", "/T", 2 * BS),              # grow over stale bytes past EOF
    ("truncate", "/B", BS),                  # shrink a sharer
    ("clone", "/A", 0, "/Z", 0, A_SIZE),     # whole file incl. EOF block
    ("clone", "/A", BS, "/C", 2 * BS, 2 * BS),   # past the destination's EOF
    ("clone", "/A", 0, "/A", 5 * BS, 2 * BS),    # within one file
    ("clone", "/A", 100, "/Z", 0, 5000),     # unaligned: a copy
    ("unlink", "/B"),                        # a sharer
    ("unlink", "/A"),                        # a sharer with an xattr block
    ("unlink", "/C"),                        # one of two links
    ("unlink_open", "/X"),                   # orphan with an xattr block
    ("rmdir", "/M"),
    ("rename", "/C", "/N", 0),
    ("rename", "/C", "/D/N", 0),
    ("rename", "/A", "/B", 0),               # over an existing file (its sharer)
    ("rename", "/Z", "/A", 0),               # over a file with xattrs
    ("rename", "/A", "/D", 2),               # exchange file <-> directory
    ("rename", "/A", "/D/E", 2),             # exchange across directories
    ("rename", "/M", "/D/M", 0),             # directory move
    ("rename", "/D", "/M", 0),               # directory over an empty directory
    ("rename", "/C", "/Z", 1),               # NOREPLACE onto an existing name (fails)
    ("link", "/A", "/N"),
    ("link", "/C", "/D/N"),
    ("setxattr", "/A", "user.new", 20, 11),
    ("setxattr", "/Z", "user.k", 100, 12),   # first xattr: allocates the block
    ("setxattr", "/X", "user.a", 3000, 13),
    ("removexattr", "/X", "user.b"),
    ("removexattr", "/A", "user.a"),         # last one: frees the block
    ("chmod", "/A", 0o600),
    ("fsync", "/A"),
    ("remount",),
    ("checkpoint",),                         # the log-full checkpoint of Journal.commit
    ("punch", "/A", 2 * BS, BS),
    ("falloc", "/A", 4 * BS, 2 * BS, 0),
    ("falloc", "/Z", 0, 2 * BS, 1),
]

_RAND_NAMES = ["/A", "/B", "/C", "/Z", "/N", "/D/E", "/D/N", "/M/P", "/r1", "/r2"]


def random_op(w: Workload, rng: random.Random) -> tuple:
    """A random operation, mostly on names that exist (so it does something)."""
    fs = w.fs
    files, dirs = [], ["/"]
    stack = [("", fmt.ROOT_INO)]
    while stack:
        dpath, d = stack.pop()
        for name, (ino, _s) in fs.dirs.entries(d).items():
            p = f"{dpath}/{name.decode()}"
            node = fs.inodes.get(ino)
            if node.is_dir:
                dirs.append(p)
                stack.append((p, ino))
            elif node.is_reg:
                files.append((p, node.size))
    names = _RAND_NAMES + [p for p, _s in files]
    f, fsize = rng.choice(files) if files else ("/A", 0)
    kind = rng.choices(
        ["write", "truncate", "clone", "create", "mkdir", "unlink", "rename", "link",
         "setxattr", "removexattr", "fsync", "punch", "falloc", "chmod", "symlink", "rmdir",
         "remount", "unlink_open"],
        [10, 4, 4, 2, 1, 2, 3, 2, 2, 1, 2, 1, 1, 1, 1, 1, 1, 1])[0]
    if kind == "write":
        off = rng.choice([0, rng.randrange(0, 6 * BS), fsize, max(0, fsize - 50),
                          rng.randrange(0, 8) * BS])
        n = rng.choice([1, 100, BS, 2 * BS, rng.randrange(1, 3 * BS)])
        return ("write", f, off, n, rng.randrange(1 << 20))
    if kind == "truncate":
        return ("truncate", f, rng.choice([0, rng.randrange(0, fsize + 1), fsize + rng.randrange(
            1, 2 * BS), rng.randrange(0, 6) * BS]))
    if kind == "clone":
        s, ssize = rng.choice(files) if files else ("/A", 0)
        aligned = rng.random() < 0.8
        soff = rng.randrange(0, max(1, ssize // BS + 1)) * BS if aligned else rng.randrange(0, max(1, ssize))
        doff = rng.randrange(0, 6) * BS if aligned else rng.randrange(0, 6 * BS)
        return ("clone", s, soff, f, doff, rng.choice([BS, 2 * BS, ssize, rng.randrange(1, 4 * BS)]) or 1)
    if kind in ("create", "mkdir", "symlink"):
        d = rng.choice(dirs)
        name = (d.rstrip("/") + "/" + rng.choice(["n1", "n2", "n3"]))
        return ("symlink", name, "A") if kind == "symlink" else (kind, name)
    if kind in ("unlink", "unlink_open"):
        return (kind, f)
    if kind == "rmdir":
        return ("rmdir", rng.choice(dirs[1:] or ["/M"]))
    if kind == "rename":
        src = rng.choice(names + dirs[1:])
        dst = rng.choice(names + dirs[1:] + ["/q1", "/D/q2"])
        return ("rename", src, dst, rng.choice([0, 0, 0, 1, 2]))
    if kind == "link":
        return ("link", f, rng.choice(names + ["/l1", "/D/l2"]))
    if kind == "setxattr":
        return ("setxattr", f, rng.choice(["user.a", "user.b", "user.c"]),
                rng.choice([0, 10, 500, 2000]), rng.randrange(1 << 20))
    if kind == "removexattr":
        return ("removexattr", f, rng.choice(["user.a", "user.b"]))
    if kind == "fsync":
        return ("fsync", f)
    if kind == "punch":
        return ("punch", f, rng.randrange(0, 6) * BS + rng.choice([0, 0, 100]), rng.choice([BS, 2 * BS, 300]))
    if kind == "falloc":
        return ("falloc", f, rng.randrange(0, 8) * BS, rng.choice([BS, 3 * BS]), rng.randrange(2))
    if kind == "chmod":
        return ("chmod", f, rng.choice([0o600, 0o755]))
    return ("remount",)


# ------------------------------------------------------------------------------ one run


@dataclasses.dataclass
class Recording:
    ops: list            # full op list: ("mount",), workload ops..., ("close",)
    results: list        # errno per op (0 = success)
    events: list         # ('S'|'P'|'F', op index, offset, bytes|length)
    states: list         # states[k] = logical state before op k; states[len(ops)] = after all
    allowed: list | None      # power oracle: allowed[k] page versions for states[k]
    allowed_pre: list | None  # allowed_pre[k]: versions for states[k] while op k runs
    problems: list       # failures of the reference run itself (no crash involved)
    killed_pre: list | None = None   # kill model: versions for states[k] while op k runs


class ReferenceError_(Exception):
    """The workload itself (no crash) misbehaved: the engine failed or lost state."""


def record(base: bytes, work_path: str, ops: list | None, template_state: State,
           rng: random.Random | None = None, n_random: int = 0, want_allowed: bool = True,
           work_dirty: set | None = None) -> Recording:
    """Run mount + ops (or n_random random ops drawn from rng) + close on a copy of the
    template (`base`), logging every store/persist/fence and the logical state after each op.
    `work_dirty`: pages in which `work_path` differs from `base` (None: rewrite it whole);
    the set is updated to what this run leaves behind."""
    _restore(work_path, base, work_dirty)
    log: list = []
    op_ref = [0]
    full_ops: list = [("mount",)]
    results = [0]
    problems = []
    try:
        fs = open_recording(work_path, log, op_ref)
        states = [template_state, extract(fs, live=True)]
        w = Workload(fs)
        workload = list(ops) if ops is not None else [None] * n_random
        for k, op in enumerate(workload, 1):
            op_ref[0] = k
            if op is None:
                op = random_op(w, rng)
            op = tuple(op)
            full_ops.append(op)
            if op[0] == "remount":
                fs.close()
                fs = open_recording(work_path, log, op_ref)
                w = Workload(fs)
                results.append(0)
            else:
                results.append(w.apply(op))
            if fs.failed:
                raise ReferenceError_(f"engine went read-only during {op}: {fs.failed}")
            states.append(extract(fs, live=True))
        op_ref[0] = len(full_ops)
        full_ops.append(("close",))
        results.append(0)
        fs.close()
        states.append(states[-1])
    except ReferenceError_ as e:
        e.ops = full_ops[1:]
        raise
    except Exception as e:
        err = ReferenceError_(f"reference run raised {type(e).__name__}: {e}")
        err.ops = full_ops[1:]
        raise err from e
    finally:
        if work_dirty is not None:
            for kind, _k, off, x in log:
                if kind == "S" and x:
                    work_dirty.update(range(off // PAGE, (off + len(x) - 1) // PAGE + 1))
    # the reference run itself: a clean remount must show the final state
    fs = FileSystem.open(work_path, readonly=True)
    try:
        final = extract(fs)
    finally:
        fs.close()
    if not final.same(states[-1]):
        problems.append(f"after a clean unmount the image differs from the engine's state: "
                        f"{diff_states(final, states[-1])}")
    allowed = [initial_allowed(states[0])]
    allowed_pre, killed_pre = [], []
    for k, op in enumerate(full_ops):
        a, b, inplace = allowed_versions(states[k], states[k + 1], allowed[k], op)
        allowed.append(a)
        allowed_pre.append(b)
        killed_pre.append(kill_before(states[k], inplace) if op[0] in DATA_OPS else None)
    if not want_allowed:
        allowed = allowed_pre = None
    return Recording(full_ops, results, log, states, allowed, allowed_pre, problems, killed_pre)


def _restore(path: str, base: bytes, dirty: set | None) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        if dirty is None or os.fstat(fd).st_size != len(base):
            os.ftruncate(fd, len(base))
            os.pwrite(fd, base, 0)
        else:
            for p in dirty:
                os.pwrite(fd, base[p * PAGE:(p + 1) * PAGE], p * PAGE)
            dirty.clear()
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------ crash states


@dataclasses.dataclass
class Expect:
    """One crash point producing an image: which reference states it may show."""
    point: tuple          # replayable description of the crash point
    op: int               # index of the interrupted op (len(ops) at the very end)
    cands: tuple          # ((state index, allowed kind: None|'pre'|'post'), ...)


class PageImage:
    """Page versions over a base image, with interning so equal pages are one object."""

    def __init__(self, base: bytes):
        self.base = base
        self.intern: dict[bytes, bytes] = {}

    def base_page(self, p: int) -> bytes:
        return self.base[p * PAGE:(p + 1) * PAGE]

    def apply_store(self, cur: dict, off: int, data: bytes) -> None:
        end = off + len(data)
        for p in range(off // PAGE, (end - 1) // PAGE + 1):
            lo = p * PAGE
            old = cur.get(p)
            if old is None:
                old = self.base_page(p)
            a, b = max(off, lo), min(end, lo + PAGE)
            if a == lo and b == lo + PAGE:
                new = data[a - off:b - off]
            else:
                new = old[:a - lo] + data[a - off:b - off] + old[b - lo:]
            new = self.intern.setdefault(new, new)
            if new == self.base_page(p):
                cur.pop(p, None)
            else:
                cur[p] = new


def kill_states(rec: Recording, img: PageImage, skip_ops: set = frozenset()) -> Iterator[tuple[dict, Expect]]:
    """Daemon killed: an image after every store, and at the end of every op."""
    cur: dict = {}
    nops = len(rec.ops)
    last_op = 0
    if 0 not in skip_ops:
        yield dict(cur), Expect(("kill", -1), 0, ((0, None),))
    for i, (kind, k, off, payload_) in enumerate(rec.events):
        while last_op < k:          # ops [last_op, k) are complete
            if last_op not in skip_ops:
                yield dict(cur), Expect(("kill-end", last_op), last_op, ((last_op + 1, None),))
            last_op += 1
        if kind != "S":
            continue
        img.apply_store(cur, off, payload_)
        if k not in skip_ops:
            yield dict(cur), Expect(("kill", i), k, ((k, "kpre"), (k + 1, None)))
    while last_op < nops:
        if last_op not in skip_ops:
            yield dict(cur), Expect(("kill-end", last_op), last_op, ((last_op + 1, None),))
        last_op += 1


def kill_image(rec: Recording, img: PageImage, point: tuple) -> dict:
    cur: dict = {}
    kind, x = point
    for i, (ek, k, off, payload_) in enumerate(rec.events):
        if kind == "kill" and i > x or kind == "kill-end" and k > x:
            break
        if ek == "S":
            img.apply_store(cur, off, payload_)
    return cur


class PowerTracker:
    """Durable / persisted-unfenced / current version of every page touched so far."""

    def __init__(self, img: PageImage):
        self.img = img
        self.cur: dict = {}          # page -> bytes (absent: base)
        self.durable: dict = {}      # page -> bytes (absent: base)
        self.pending: dict = {}      # page -> bytes at the last persist since the last fence
        self.touched: set = set()

    def event(self, kind: str, off: int, x) -> None:
        if kind == "S":
            self.img.apply_store(self.cur, off, x)
            self.touched.update(range(off // PAGE, (off + len(x) - 1) // PAGE + 1))
        elif kind == "P":
            if x <= 0:
                return
            lo, hi = off // PAGE, (off + x - 1) // PAGE
            for p in self.touched:
                if lo <= p <= hi:
                    self.pending[p] = self.cur.get(p)
        else:
            for p, v in self.pending.items():
                if v is None:
                    self.durable.pop(p, None)
                else:
                    self.durable[p] = v
            self.pending.clear()

    def units(self, with_pending: bool) -> list[tuple[int, list]]:
        """In-flight pages and their possible versions (index 0 = durable)."""
        out = []
        for p in sorted(self.touched):
            d, c = self.durable.get(p), self.cur.get(p)
            opts = [d]
            if with_pending and p in self.pending:
                v = self.pending[p]
                if v is not d and v != d and v != c:
                    opts.append(v)
            if c is not d and c != d:
                opts.append(c)
            if len(opts) > 1:
                out.append((p, opts))
        return out

    def image(self, units: list, choice: Iterable[int]) -> dict:
        img = dict(self.durable)
        for (p, opts), c in zip(units, choice):
            v = opts[c]
            if v is None:
                img.pop(p, None)
            else:
                img[p] = v
        return img


def choices(units: list, rng: random.Random, n_random: int) -> list[tuple]:
    """Combinations of versions to try for the in-flight units."""
    sizes = [len(o) for _p, o in units]
    total = 1
    for s in sizes:
        total *= s
        if total > 16:
            break
    if total <= 16:
        return list(itertools.product(*[range(s) for s in sizes]))
    n = len(units)
    out = {tuple([0] * n), tuple(s - 1 for s in sizes)}
    if n <= 24:
        for i in range(n):
            one = [0] * n
            one[i] = sizes[i] - 1
            out.add(tuple(one))
            allbut = [s - 1 for s in sizes]
            allbut[i] = 0
            out.add(tuple(allbut))
    for _ in range(n_random):
        out.add(tuple(rng.randrange(s) for s in sizes))
    return sorted(out)


def power_states(rec: Recording, img: PageImage, rng: random.Random, n_random: int = 20,
                 skip_ops: set = frozenset()) -> Iterator[tuple[dict, Expect]]:
    """Power loss: at each fence (before and after) and at the end of each op, every
    combination (or a sample) of in-flight page versions."""
    t = PowerTracker(img)
    nops = len(rec.ops)
    last_op = 0

    def emit(point_kind, idx, k, cands, with_pending):
        units = t.units(with_pending)
        for ch in choices(units, rng, n_random):
            landed = {p: c for (p, _o), c in zip(units, ch) if c}
            yield t.image(units, ch), Expect((point_kind, idx, landed), k, cands)

    for i, (kind, k, off, x) in enumerate(rec.events):
        while last_op < k:
            if last_op not in skip_ops:
                yield from emit("power-end", last_op, last_op, ((last_op + 1, "post"),), True)
            last_op += 1
        if kind == "F" and k not in skip_ops:
            cands = ((k, "pre"), (k + 1, "post"))
            yield from emit("power-before-fence", i, k, cands, True)
            t.event(kind, off, x)
            yield from emit("power-after-fence", i, k, cands, False)
            continue
        t.event(kind, off, x)
    while last_op < nops:
        if last_op not in skip_ops:
            yield from emit("power-end", last_op, last_op, ((last_op + 1, "post"),), True)
        last_op += 1


def power_image(rec: Recording, img: PageImage, point: tuple) -> dict:
    kind, idx, landed = point
    t = PowerTracker(img)
    for i, (ek, k, off, x) in enumerate(rec.events):
        if kind == "power-end" and k > idx:
            break
        if kind != "power-end" and i == idx:
            if kind == "power-after-fence":
                t.event(ek, off, x)
            break
        t.event(ek, off, x)
    units = t.units(kind != "power-after-fence")
    landed = {int(p): c for p, c in landed.items()}
    return t.image(units, [landed.get(p, 0) for p, _o in units])


# ------------------------------------------------------------------------------ checking


@dataclasses.dataclass
class Observed:
    state: State | None
    error: str | None            # mount / recovery / extraction / fsck failure


class Scratch:
    """One scratch image file; crash images are written as page diffs from the base."""

    def __init__(self, path: str, base: bytes):
        self.path = path
        self.base = base
        with open(path, "wb") as f:
            f.write(base)
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self.held: dict = {}           # page -> bytes it holds (None: unknown, restore it)
        self.pages_written = 0

    def close(self) -> None:
        os.close(self.fd)

    def load(self, image: dict) -> None:
        fd, base, held = self.fd, self.base, self.held
        for p in [p for p in held if p not in image]:
            os.pwrite(fd, base[p * PAGE:(p + 1) * PAGE], p * PAGE)
            del held[p]
            self.pages_written += 1
        for p, v in image.items():
            h = held.get(p, base)
            if h is not v:
                os.pwrite(fd, v, p * PAGE)
                held[p] = v
                self.pages_written += 1

    def dirty(self, pages: Iterable[int]) -> None:
        for p in pages:
            self.held[p] = None

    def digest(self) -> bytes:
        """Digest of the file's current bytes (only pages that may differ from base are read)."""
        h = hashlib.blake2b(digest_size=20)
        for p in sorted(self.held):
            v = self.held[p]
            if v is None:
                v = os.pread(self.fd, PAGE, p * PAGE)
                if v == self.base[p * PAGE:(p + 1) * PAGE]:
                    continue
            h.update(p.to_bytes(8, "little"))
            h.update(v)
        return h.digest()

    def verify(self) -> None:
        """Debug: the file must equal base + held pages exactly."""
        with open(self.path, "rb") as f:
            data = f.read()
        for p in range(len(self.base) // PAGE):
            want = self.held.get(p, self.base[p * PAGE:(p + 1) * PAGE])
            if want is not None and data[p * PAGE:(p + 1) * PAGE] != want:
                raise AssertionError(f"scratch page {p} is not what the tracker thinks")


class FsckCache:
    """fsck of an image is a pure function of its bytes: remember verdicts by digest."""

    def __init__(self, limit: int = 500_000):
        self.seen: dict[bytes, str | None] = {}
        self.limit = limit
        self.runs = 0
        self.hits = 0

    def check(self, scratch: Scratch, what: str) -> str | None:
        try:
            from . import fsck
        except ImportError:      # no fsck module: mount + full walk (extract) is the check
            return None
        key = scratch.digest()
        if key in self.seen:
            self.hits += 1
            return self.seen[key]
        self.runs += 1
        try:
            rep = fsck.check(scratch.path)
            err = None if rep.clean else f"{what}: " + "; ".join(p.line() for p in rep.errors)
        except Exception as e:    # noqa: BLE001
            err = f"{what} raised {type(e).__name__}: {e}"
        if len(self.seen) >= self.limit:
            self.seen.clear()
        self.seen[key] = err
        return err


def recover_and_check(scratch: Scratch, raw_fsck: bool = True,
                      cache: FsckCache | None = None) -> Observed:
    """Mount the crash image in the scratch file (recovery), read its logical state, unmount,
    fsck. Every page recovery stores is noted so the next image restores it."""
    cache = cache or FsckCache(0)
    errs = []
    if raw_fsck:
        # fsck of the crash image as found (it replays the journal into a private mapping)
        err = cache.check(scratch, "fsck of the raw crash image")
        if err:
            errs.append(err)
    col = _PageCollector()
    saved = PMem.observer
    PMem.observer = col
    state = None
    try:
        try:
            fs = FileSystem.open(scratch.path)
        except Exception as e:     # noqa: BLE001
            return Observed(None, "; ".join(errs + [f"mount failed: {type(e).__name__}: {e}"]))
        try:
            if fs.failed:
                errs.append(f"recovery turned the engine read-only: {fs.failed}")
            state = extract(fs)
        except Exception as e:     # noqa: BLE001
            errs.append(f"reading the recovered tree failed: {type(e).__name__}: {e}")
        finally:
            fs.close()
    finally:
        PMem.observer = saved
        scratch.dirty(col.pages)
    err = cache.check(scratch, "fsck after recovery")
    if err:
        errs.append(err)
    return Observed(state, "; ".join(errs) or None)


@dataclasses.dataclass
class Verdict:
    message: str
    kinds: frozenset = frozenset()     # what differs for the closest candidate
    k: int = -1                        # that candidate's state index
    path: bytes | None = None          # content failures: the file and first bad byte
    offset: int = -1
    page: bytes | None = None          # the bad page as found, and the versions allowed there
    versions: frozenset = frozenset()


def diff_kinds(got: State, want: State) -> tuple[frozenset, int]:
    kinds = set()
    n = 0
    for path in set(got.meta) | set(want.meta):
        g, w = got.meta.get(path), want.meta.get(path)
        if g != w:
            n += 1
            if g is None or w is None:
                kinds.add("namespace")
                continue
            if g[1] != w[1]:
                kinds.add("size")
            if g[4] != w[4]:
                kinds.add("xattrs")
            if (g[0], g[2], g[3], g[5]) != (w[0], w[2], w[3], w[5]):
                kinds.add("attrs")
        elif got.sha.get(path) != want.sha.get(path):
            n += 1
            kinds.add("content")
    return frozenset(kinds), n


def judge(obs: State, rec: Recording, cands: tuple) -> Verdict | None:
    """None if `obs` is an acceptable crash outcome for any candidate, else a Verdict."""
    why = []
    best = None
    for k, variant in cands:
        want = rec.states[k]
        kinds, n = diff_kinds(obs, want)
        if not kinds:
            return None
        label = f"S{k}" + (f" ({variant})" if variant and variant != "kpre" else "")
        v = Verdict(f"{label}: {diff_states(obs, want)}", kinds, k)
        if "content" in kinds:
            allowed = None
            if variant == "kpre":
                allowed = rec.killed_pre[k] if rec.killed_pre else None
            elif variant is not None and rec.allowed is not None:
                allowed = rec.allowed[k] if variant == "post" else rec.allowed_pre[k]
            bad = _content_ok(obs, want, allowed)
            n_meta = sum(1 for p in set(obs.meta) | set(want.meta) if obs.meta.get(p) != want.meta.get(p))
            n = n_meta + len(bad)
            if not bad:               # only contents differ, and only in allowed ways
                kinds = kinds - {"content"}
                v.kinds = kinds
                if not kinds:
                    return None
            else:
                if kinds == {"content"}:
                    v.message = f"{label}: " + "; ".join(b[0] for b in bad[:3])
                v.path, v.offset, v.page, v.versions = bad[0][1:]
        why.append(v.message)
        rank = (kinds != {"content"}, n, len(kinds))     # same metadata first
        if best is None or rank < best[0]:
            best = (rank, v)
    v = best[1]
    v.message = " | ".join(why)
    return v


def _content_ok(obs: State, want: State, allowed: dict | None) -> list:
    """[(message, path, first differing byte)] for every file whose metadata matches but whose
    contents are not allowed by `allowed` (None: must be exact)."""
    out = []
    for path, h in want.sha.items():
        if obs.sha.get(path) == h or obs.meta.get(path) != want.meta[path]:
            continue
        content = obs.data[path]
        w = want.data[path]
        al = allowed.get(want.fid[path], []) if allowed is not None else None
        for p in range(-(-len(content) // PAGE)):
            pg, wp = page_of(content, p), page_of(w, p)
            if pg == wp or al is not None and p < len(al) and pg in al[p]:
                continue
            kind = "zeros" if pg == ZERO_PAGE else "data"
            first = p * PAGE + next((i for i in range(PAGE) if pg[i] != wp[i]), 0)
            versions = frozenset(al[p]) if al is not None and p < len(al) else frozenset()
            out.append((f"{path.decode()}: page {p} holds {kind} the file never had there since "
                        f"its last sync point (first byte differing from the expected state: "
                        f"{first})", path, first, pg, versions | {wp}))
            break
    return out


# ------------------------------------------------------------------------------ known issues
# Engine bugs this harness found, so that exploration output and the CI test can tell them
# from new ones. Each predicate looks at a Failure; remove an entry when its bug is fixed (the
# strict-xfail tests in tests/test_crash_states.py start passing then).

# Fixed since (regression tests in tests/test_crash_states.py): "stale-tail" (zero_tail did not
# persist the zeroed EOF tail before the growing commit), "xattr-checkpoint" (a checkpoint did
# not persist journaled xattr blocks in the data region), "clone-size-first" (clone_range
# committed dst's new size before the shared blocks), "punch-multi-txn" (an unaligned
# PUNCH_HOLE/ZERO_RANGE ran as head write, unmap and tail write: three transactions).
# "torn-write" is now the documented contract (README: file data is not journaled) and the
# kill oracle accepts it.

def _k_clone_chunked(f, kind) -> bool:
    return kind in ("size", "content") and f.interrupted[0] == "clone" and f.chunked


KNOWN_ISSUES = [
    ("clone-chunked", "with small TXN_BLOCKS (--txn-blocks) a clone spans several 'chunk' "
                      "transactions and can end shorter after a crash (documented for clones "
                      "over 16 MiB)", _k_clone_chunked),
]


def known_issue(f) -> str | None:
    """The known issue(s) that explain every difference of a failure, or None."""
    if not f.kinds:          # mount / read / fsck errors: never a known issue
        return None
    names = []
    for kind in sorted(f.kinds):
        hit = [name for name, _d, pred in KNOWN_ISSUES if pred(f, kind)]
        if not hit:
            return None
        names.extend(n for n in hit[:1] if n not in names)
    return "+".join(sorted(names))


# ------------------------------------------------------------------------------ exploration


@dataclasses.dataclass
class Failure:
    model: str
    ops: list
    point: tuple
    interrupted: tuple
    message: str
    kinds: frozenset = frozenset()
    stale: bool = False              # the bad bytes lie past an old EOF (truncated-away data)
    phase: str = "workload"          # or "recovery": a crash while recovering a crash image
    chunked: bool = False            # explored with a small fs.TXN_BLOCKS

    @property
    def known(self) -> str | None:
        return known_issue(self)

    @property
    def signature(self) -> str:
        what = ",".join(sorted(self.kinds)) or ("fsck/mount" if "fsck" in self.message or
                                                  "mount" in self.message else "error")
        return f"{self.model} {self.phase} during {self.interrupted[0]}: {what}"

    def trace(self) -> str:
        return json.dumps({"model": self.model, "ops": self.ops, "point": _jsonable(self.point)})

    def text(self) -> str:
        k = self.known
        tag = f" [known issue: {k}]" if k else ""
        where = "at the end of" if self.point and str(self.point[0]).endswith("-end") else "during"
        return (f"FAIL [{self.model}{'/recovery' if self.phase == 'recovery' else ''}]{tag} "
                f"ops={self.ops} crash point={_jsonable(self.point)} ({where} {self.interrupted}): "
                f"{self.message}\n  replay: {self.trace()}")


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): v for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


@dataclasses.dataclass
class Stats:
    states: dict = dataclasses.field(default_factory=lambda: {"kill": 0, "power": 0})
    failed: dict = dataclasses.field(default_factory=lambda: {"kill": 0, "power": 0})
    points: dict = dataclasses.field(default_factory=lambda: {"kill": 0, "power": 0})
    recovery_states: dict = dataclasses.field(default_factory=lambda: {"kill": 0, "power": 0})
    by_issue: dict = dataclasses.field(default_factory=dict)
    sequences: int = 0
    record_s: float = 0.0
    check_s: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.states.values())

    @property
    def total_failed(self) -> int:
        return sum(self.failed.values())

    @property
    def unknown_failed(self) -> int:
        return self.total_failed - sum(n for k, n in self.by_issue.items() if k is not None)


class Explorer:
    """Runs sequences, builds their crash images in one scratch file and judges them."""

    def __init__(self, workdir: str, seed: int = 0, models: tuple = ("kill", "power"),
                 n_random_subsets: int = 20, raw_fsck: bool = True, image_size: int = IMAGE_SIZE,
                 on_failure: Callable[[Failure], None] | None = None, verify_every: int = 0,
                 save_failures: str | None = None, recovery_crashes: bool = True,
                 txn_blocks: int | None = None):
        """`txn_blocks`: run the engine with this fs.TXN_BLOCKS (blocks per transaction of a
        big truncate / unlink / clone / punch), so small files take the multi-transaction
        paths (IFLAG_TRIM, chunked reclaim) that otherwise need images of many MiB."""
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        tag = f"{os.getpid()}-{id(self):x}"
        self.template_path = os.path.join(workdir, f"cs-template-{tag}.img")
        self.work_path = os.path.join(workdir, f"cs-work-{tag}.img")
        self.scratch_path = os.path.join(workdir, f"cs-scratch-{tag}.img")
        build_template(self.template_path, image_size)
        with open(self.template_path, "rb") as f:
            self.base = f.read()
        fs = FileSystem.open(self.template_path, readonly=True)
        try:
            self.template_state = extract(fs, live=True)
        finally:
            fs.close()
        self.scratch = Scratch(self.scratch_path, self.base)
        self.fsck_cache = FsckCache()
        self.work_dirty: set | None = None
        self.seed = seed
        self.models = models
        self.n_random_subsets = n_random_subsets
        self.raw_fsck = raw_fsck
        self.recovery_crashes = recovery_crashes
        self.txn_blocks = txn_blocks
        self.stats = Stats()
        self.failures: list[Failure] = []
        self.on_failure = on_failure
        self.explored: set = set()          # op sequences whose last op's crash points were done
        self.verify_every = verify_every
        self.save_failures = save_failures
        self._n = 0
        self._deadline = None
        self._max_states = None

    def close(self) -> None:
        self.scratch.close()
        for p in (self.template_path, self.work_path, self.scratch_path):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass

    def out_of_budget(self) -> bool:
        return (self._deadline is not None and time.perf_counter() > self._deadline) or \
            (self._max_states is not None and self.stats.total >= self._max_states)

    def set_budget(self, deadline: float | None, max_states: int | None) -> None:
        self._deadline, self._max_states = deadline, max_states

    @contextlib.contextmanager
    def _engine_params(self):
        saved = fsmod.TXN_BLOCKS
        if self.txn_blocks:
            fsmod.TXN_BLOCKS = self.txn_blocks
        try:
            yield
        finally:
            fsmod.TXN_BLOCKS = saved

    # -- one sequence ----------------------------------------------------------------------------
    def run_sequence(self, ops: list | None = None, *, n_random: int = 0, rng_seed: int = 0,
                     prefix_closed: bool = True) -> Recording | None:
        with self._engine_params():
            return self._run_sequence(ops, n_random, rng_seed, prefix_closed)

    def _run_sequence(self, ops, n_random, rng_seed, prefix_closed) -> Recording | None:
        t0 = time.perf_counter()
        rng = random.Random(rng_seed)
        try:
            rec = self._record(ops, rng, n_random)
        except ReferenceError_ as e:
            self._fail(Failure("reference", _jsonable(getattr(e, "ops", ops)), ("none",),
                               ("none",), str(e)), None)
            return None
        self.stats.record_s += time.perf_counter() - t0
        self.stats.sequences += 1
        work = [tuple(o) for o in rec.ops[1:-1]]
        for msg in rec.problems:
            self._fail(Failure("reference", _jsonable(work), ("none",), ("none",), msg), None)
        skip: set = set()
        if prefix_closed:
            if () in self.explored:
                skip.add(0)
            for k in range(1, len(work) + 1):
                if tuple(work[:k]) in self.explored:
                    skip.add(k)
            self.explored.add(())
            for k in range(1, len(work) + 1):
                self.explored.add(tuple(work[:k]))
        img = PageImage(self.base)
        for model in self.models:
            if model == "kill":
                gen = kill_states(rec, img, skip)
            else:
                gen = power_states(rec, img, random.Random(f"{self.seed}/{rng_seed}/{work}"),
                                   self.n_random_subsets, skip)
            self._check_all(model, rec, gen, work, None)
        if self.recovery_crashes and len(work) not in skip:
            self._recovery_crashes(rec, img, work)
        return rec

    def _record(self, ops, rng, n_random) -> Recording:
        if self.work_dirty is None:
            self.work_dirty = set()
            _restore(self.work_path, self.base, None)
        try:
            return record(self.base, self.work_path, ops, self.template_state, rng=rng,
                          n_random=n_random, want_allowed="power" in self.models,
                          work_dirty=self.work_dirty)
        except ReferenceError_:
            self.work_dirty = None
            raise

    def _recovery_crashes(self, rec: Recording, img: PageImage, work: list) -> None:
        """Crash while recovering the image a power loss leaves at the end of the last op
        (journal committed, nothing applied in place durable): recovery must converge."""
        start = power_image(rec, img, ("power-end", len(work), {}))
        rrec, rbase = self._record_recovery(start)
        if rrec is None:
            return
        rimg = PageImage(rbase)
        for model in self.models:
            if model == "kill":
                gen = kill_states(rrec, rimg)
            else:
                gen = power_states(rrec, rimg, random.Random(f"{self.seed}/rec/{work}"),
                                   self.n_random_subsets)
            merged = (({**start, **pages}, exp) for pages, exp in gen)
            self._check_all(model, rrec, merged, work, start)

    def _record_recovery(self, start: dict):
        _restore(self.work_path, self.base, self.work_dirty)
        fd = os.open(self.work_path, os.O_RDWR | os.O_CLOEXEC)
        try:
            for p, v in start.items():
                os.pwrite(fd, v, p * PAGE)
                self.work_dirty.add(p)
        finally:
            os.close(fd)
        base = bytearray(self.base)
        for p, v in start.items():
            base[p * PAGE:(p + 1) * PAGE] = v
        log: list = []
        op_ref = [0]
        try:
            fs = open_recording(self.work_path, log, op_ref)
            try:
                r = extract(fs)
            finally:
                op_ref[0] = 1
                fs.close()
        except Exception:          # noqa: BLE001 (the plain check of this image reports it)
            return None, None
        finally:
            for kind, _k, off, x in log:
                if kind == "S" and x:
                    self.work_dirty.update(range(off // PAGE, (off + len(x) - 1) // PAGE + 1))
        rrec = Recording([("recover",), ("close",)], [0, 0], log, [r, r, r], None, None, [])
        return rrec, bytes(base)

    def _check_all(self, model: str, rec: Recording, gen, work: list, recovery_of) -> None:
        # group crash points by image: each distinct image is recovered and checked once
        by_image: dict = {}
        for image, exp in gen:
            self.stats.points[model] += 1
            key = tuple(sorted((p, id(v)) for p, v in image.items()))
            slot = by_image.get(key)
            if slot is None:
                by_image[key] = (image, [exp])
            elif all(e.cands != exp.cands for e in slot[1]):
                slot[1].append(exp)
        t0 = time.perf_counter()
        phase = "workload" if recovery_of is None else "recovery"
        for image, exps in by_image.values():
            if self.out_of_budget():
                break
            self.scratch.load(image)
            obs = recover_and_check(self.scratch, self.raw_fsck, self.fsck_cache)
            self._n += 1
            if self.verify_every and self._n % self.verify_every == 0:
                self.scratch.verify()
            self.stats.states[model] += 1
            if recovery_of is not None:
                self.stats.recovery_states[model] += 1
            for exp in exps:
                if obs.error is not None:
                    v = Verdict(obs.error)
                else:
                    v = judge(obs.state, rec, exp.cands)
                if v is None:
                    continue
                point = exp.point if recovery_of is None else ("recovery",) + tuple(exp.point)
                f = Failure(model, _jsonable(work), point, rec.ops[exp.op], v.message, v.kinds,
                            phase=phase, chunked=bool(self.txn_blocks))
                if v.path is not None and v.k >= 0 and recovery_of is None:
                    f.stale = _beyond_old_eof(rec, v)
                self.stats.failed[model] += 1
                if self.save_failures:
                    self._save_image(image, f)
                self._fail(f, f.known)
                break
        self.stats.check_s += time.perf_counter() - t0

    def _save_image(self, image: dict, f: Failure) -> None:
        os.makedirs(self.save_failures, exist_ok=True)
        path = os.path.join(self.save_failures, f"crash-{len(self.failures):04d}.img")
        data = bytearray(self.base)
        for p, v in image.items():
            data[p * PAGE:(p + 1) * PAGE] = v
        with open(path, "wb") as fh:
            fh.write(data)
        f.message += f" [image saved: {path}]"

    def _fail(self, f: Failure, issue: str | None) -> None:
        self.failures.append(f)
        self.stats.by_issue[issue] = self.stats.by_issue.get(issue, 0) + 1
        if self.on_failure:
            self.on_failure(f)

    # -- replay one crash state ------------------------------------------------------------------
    def replay(self, model: str, ops: list, point: list, save: str | None = None) -> tuple[Observed, Verdict | None]:
        """Rebuild one crash state from a failure's trace and judge it again."""
        with self._engine_params():
            return self._replay(model, ops, point, save)

    def _replay(self, model, ops, point, save):
        rec = self._record(ops, random.Random(0), 0)
        img = PageImage(self.base)
        point = tuple(point)
        start = None
        if point[0] == "recovery":
            start = power_image(rec, img, ("power-end", len(rec.ops) - 2, {}))
            rec, rbase = self._record_recovery(start)
            img = PageImage(rbase)
            point = tuple(point[1:])
        if model == "kill":
            image = kill_image(rec, img, point)
            k = _point_op(rec, point)
            cands = ((k + 1, None),) if point[0] == "kill-end" else ((k, "kpre"), (k + 1, None))
        else:
            image = power_image(rec, img, point)
            k = _point_op(rec, point)
            cands = ((k + 1, "post"),) if point[0] == "power-end" else ((k, "pre"), (k + 1, "post"))
        if start is not None:
            image = {**start, **image}
        if save:
            data = bytearray(self.base)
            for p, v in image.items():
                data[p * PAGE:(p + 1) * PAGE] = v
            with open(save, "wb") as fh:
                fh.write(data)
        self.scratch.load(image)
        obs = recover_and_check(self.scratch, self.raw_fsck)
        v = Verdict(obs.error) if obs.error else judge(obs.state, rec, cands)
        return obs, v


def _beyond_old_eof(rec: Recording, v: Verdict) -> bool:
    """Is the bad page an acceptable version up to an old EOF of this file (its smallest size
    so far), differing only past it, i.e. showing bytes a truncate once cut off?"""
    want = rec.states[v.k]
    f = want.fid.get(v.path)
    sizes = [s.meta[p][1] for s in rec.states[:v.k + 1] for p, g in s.fid.items()
             if g == f and p in s.data]
    if not sizes or v.page is None:
        return False
    lo = v.offset // PAGE * PAGE
    cut = min(sizes) - lo
    if not 0 <= cut < PAGE:
        return False
    return any(v.page[:cut] == x[:cut] for x in v.versions) and v.page[cut:] != bytes(PAGE - cut)


def _point_op(rec: Recording, point: tuple) -> int:
    kind = point[0]
    if kind in ("kill-end", "power-end"):
        return int(point[1])
    idx = int(point[1])
    return 0 if idx < 0 else rec.events[idx][1]


def catalog_sequences(length: int) -> Iterator[list]:
    for combo in itertools.product(CATALOG, repeat=length):
        yield [tuple(o) for o in combo]
