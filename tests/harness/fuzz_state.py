"""Image fuzzer, the logical state of an image as the engine serves it: a walk through the
engine API the way the FUSE adapter calls it, recording every error as an event."""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import stat
import traceback

from daxfs.dirs import FIRST_COOKIE
from daxfs.errors import FsError
from daxfs.fs import MAX_SYMLINK, FileSystem

from .fuzz_common import BS, READ_CHUNK, ROOT, _CaseTimeout, _write
from .fuzz_tables import ExtentsOf, Tables
from .fuzz_walk import READ_CAP


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
        ok, entries = _fs_call(events, dpath or "/", "readdir", _names, fs, fh)
        fs.releasedir(fh)
        if not ok:
            continue
        for slot, name, cino in entries:
            path = f"{dpath}/{name.decode('utf-8', 'backslashreplace')}"
            if tables is not None:
                want = tables.entry_name(slot)
                if want != bytes(name):
                    events.append(Event(path, "readdir", "name",
                                        f"entry {slot} served as {bytes(name)!r} but its "
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


def _names(fs: FileSystem, fh: int) -> list[tuple[int, bytes, int]]:
    """Every name of an open directory as (dirent slot, name, ino): readdir page by page, as
    the adapter calls it, without `.` and `..` (cookies 1 and 2; a name's cookie is its slot
    + FIRST_COOKIE)."""
    out, start = [], 0
    while batch := fs.readdir(fh, start):
        out += [(c - FIRST_COOKIE, n, i) for c, n, i in batch if c >= FIRST_COOKIE]
        start = batch[-1][0]
    return out


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
