"""The racer's processes (racer.py): writers, the mutator, the cloner and the reader of a
phase, each logging what it did, with times, for the coordinator to check."""
from __future__ import annotations

import mmap
import os
import random
import time

from .racer_model import CHUNKS, SECTOR, Log, Mismatch, Timed, Write, diff
from .runner import FALLOC_MODE, fallocate


def _short(what: str, killed) -> Exception:
    """A short count: the daemon's death (after a kill) cuts a request short; else a failure."""
    return OSError(what) if killed is not None and killed.is_set() else Mismatch(what)


def _stopped(e: Exception, killed, log: Log, pending) -> bool:
    """An error after the coordinator killed the daemon ends a process quietly, with what it
    had in flight; any other error is the process's failure."""
    if not (killed is not None and killed.is_set() and isinstance(e, OSError)):
        return False
    if pending is not None:
        log.inflight.append(pending)
    return True


def _close_all(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:                 # after a kill, close's FLUSH fails; the fd is closed
            pass


def _aligned(n: int) -> memoryview:
    return memoryview(mmap.mmap(-1, max(n, mmap.PAGESIZE)))[:n]


def writer(mnt: str, files: dict, hot: str, i: int, k: int, ops: int, seed: int, killed,
           q) -> None:
    """Writes into the chunks it owns (c % k == i): whole chunks through O_DIRECT, parts of
    them through write(2), half of them into the phase's `hot` file (the one the cloner
    prefers); reads its own chunks back (nobody else changes them)."""
    rng = random.Random(seed)
    log = Log()
    names = sorted(files)
    buf = _aligned(max(CHUNKS))
    fds: dict = {}
    pending = None
    try:
        fds = {n: (os.open(f"{mnt}/{n}", os.O_RDWR),
                   os.open(f"{mnt}/{n}", os.O_RDWR | os.O_DIRECT)) for n in names}
        for _ in range(ops):
            pending = None
            n = hot if rng.random() < 0.5 else rng.choice(names)
            fm = files[n]
            owned = range(i, fm.nchunks, k)
            if not owned:
                continue
            c = rng.choice(owned)
            base = c * fm.chunk
            cur = fm.data[base:base + fm.chunk]
            r = rng.random()
            if r < 0.15:                                         # read back its own chunk
                if rng.random() < 0.5:
                    got = bytes(buf[:fm.chunk]) if os.preadv(fds[n][1], [buf[:fm.chunk]], base) \
                        == fm.chunk else b""
                else:
                    got = os.pread(fds[n][0], fm.chunk, base)
                if got != cur:
                    raise _short(f"writer {i}: {n} chunk {c} (offset {base}, {fm.chunk} B) "
                                 f"reads back wrong: {diff(got, bytes(cur))}", killed)
                continue
            direct = r < 0.55                                    # O_DIRECT, whole chunk
            if direct:
                off, new = 0, rng.randbytes(fm.chunk)
                buf[:fm.chunk] = new
            else:                                                # buffered, part of it
                off = rng.randrange(fm.chunk)
                new = rng.randbytes(rng.randint(1, fm.chunk - off))
            cur[off:off + len(new)] = new
            t0 = time.monotonic_ns()
            pending = Write(n, c, t0, -1, bytes(cur))
            if direct:
                done = os.pwritev(fds[n][1], [buf[:fm.chunk]], base)
            else:
                done = os.pwrite(fds[n][0], new, base + off)
            t1 = time.monotonic_ns()
            if done != len(new):
                raise _short(f"writer {i}: short write {done} of {len(new)} to {n} at "
                             f"{base + off}", killed)
            pending = None
            fm.data[base:base + fm.chunk] = cur
            log.writes.append(Write(n, c, t0, t1, bytes(cur)))
            if rng.random() < 0.02:
                os.fsync(fds[n][0])
    except Exception as e:                  # noqa: BLE001 - reported to the coordinator
        if not _stopped(e, killed, log, pending):
            log.error = f"{type(e).__name__}: {e}"
    _close_all(fd for pair in fds.values() for fd in pair)
    q.put((i, log))


def mutator(mnt: str, files: dict, hot: str, i: int, k: int, ops: int, seed: int, killed,
            q) -> None:
    """Owns the chunks c % k == i and changes them the ways that are not write(2), while the
    writers write the chunks around them (in the same blocks when chunks are small): punch a
    hole, zero a range, copy_file_range from another of its chunks (a reflink for whole
    blocks, a byte copy otherwise), in this file or another of the same chunk size."""
    rng = random.Random(seed)
    log = Log()
    names = sorted(files)
    fds: dict = {}
    pending = None
    try:
        fds = {n: os.open(f"{mnt}/{n}", os.O_RDWR) for n in names}
        for _ in range(ops):
            pending = None
            n = hot if rng.random() < 0.5 else rng.choice(names)
            fm = files[n]
            owned = range(i, fm.nchunks, k)
            if len(owned) < 2:
                continue
            c = rng.choice(owned)
            base = c * fm.chunk
            r = rng.random()
            t0 = time.monotonic_ns()
            if r < 0.15:
                got = os.pread(fds[n], fm.chunk, base)
                if got != fm.data[base:base + fm.chunk]:
                    raise _short(f"mutator: {n} chunk {c} (offset {base}, {fm.chunk} B) reads "
                                 f"back wrong: {diff(got, bytes(fm.data[base:base + fm.chunk]))}",
                                 killed)
                continue
            if r < 0.4:
                new = bytes(fm.chunk)
                pending = Write(n, c, t0, -1, new)
                fallocate(fds[n], FALLOC_MODE["punch"], base, fm.chunk)
            elif r < 0.6:
                new = bytes(fm.chunk)
                pending = Write(n, c, t0, -1, new)
                fallocate(fds[n], FALLOC_MODE["zerokeep"], base, fm.chunk)
            else:
                same = [g for g in names if files[g].chunk == fm.chunk and
                        len(range(i, files[g].nchunks, k)) > 1]
                g = rng.choice(same)
                c2 = rng.choice([x for x in range(i, files[g].nchunks, k) if g != n or x != c])
                new = bytes(files[g].data[c2 * fm.chunk:(c2 + 1) * fm.chunk])
                pending = Write(n, c, t0, -1, new)
                done = os.copy_file_range(fds[g], fds[n], fm.chunk, c2 * fm.chunk, base)
                if done != fm.chunk:
                    raise _short(f"mutator: copy_file_range {g}@{c2 * fm.chunk} -> {n}@{base}"
                                 f" copied {done} of {fm.chunk}", killed)
            t1 = time.monotonic_ns()
            pending = None
            fm.data[base:base + fm.chunk] = new
            log.writes.append(Write(n, c, t0, t1, new))
    except Exception as e:                  # noqa: BLE001
        if not _stopped(e, killed, log, pending):
            log.error = f"{type(e).__name__}: {e}"
    _close_all(fds.values())
    q.put(("mutator", log))


def cloner(mnt: str, names: list, hot: str, new: list, seed: int, done_ev, killed,
           q) -> None:
    """Clones whole files (copy_file_range, what cp does: the reflink path) into the files
    `new`, again and again while the writers write their sources, and reads each clone back
    at once (nobody else writes it) for the coordinator to check."""
    rng = random.Random(seed)
    log = Log()
    try:
        k = 0
        into = None
        while k < len(new) or (not done_ev.is_set() and k < 200):
            into = new[k % len(new)]
            k += 1
            src = hot if rng.random() < 0.5 else rng.choice(names)
            time.sleep(rng.random() * 0.01)
            with open(f"{mnt}/{src}", "rb") as s, open(f"{mnt}/{into}", "w+b") as d:
                size = os.fstat(s.fileno()).st_size
                t0 = time.monotonic_ns()
                done = 0
                while done < size:
                    m = os.copy_file_range(s.fileno(), d.fileno(), size - done, done, done)
                    if m <= 0:
                        break
                    done += m
                t1 = time.monotonic_ns()
                if done != size:
                    raise _short(f"cloner: copy_file_range {src} -> {into} stopped at "
                                 f"{done} of {size}", killed)
                data = os.pread(d.fileno(), size + 1, 0)
                if len(data) != size and killed.is_set():
                    raise OSError(f"cloner: reading {into} back after the kill")
            log.clones.append(Timed(src, t0, t1, data=data, into=into))
            into = None
        while k < len(new):                             # the new files it never got to
            log.inflight.append(new[k])
            k += 1
    except Exception as e:                  # noqa: BLE001
        if not _stopped(e, killed, log, into):
            log.error = f"{type(e).__name__}: {e}"
        log.inflight.extend(new[k:])
    q.put(("cloner", log))


def reader(mnt: str, files: dict, ops: int, seed: int, killed, q) -> None:
    """Reads random ranges of files being written (buffered and O_DIRECT)."""
    rng = random.Random(seed)
    log = Log()
    buf = _aligned(64 * 1024)
    names = sorted(files)
    fds: dict = {}
    try:
        fds = {n: (os.open(f"{mnt}/{n}", os.O_RDONLY),
                   os.open(f"{mnt}/{n}", os.O_RDONLY | os.O_DIRECT)) for n in names}
        for _ in range(ops):
            n = rng.choice(names)
            size = len(files[n].data)
            if rng.random() < 0.5:
                off = rng.randrange(size // SECTOR) * SECTOR
                ln = min(rng.randint(1, 128) * SECTOR, size - off)
                t0 = time.monotonic_ns()
                got = os.preadv(fds[n][1], [buf[:ln]], off)
                data = bytes(buf[:got])
            else:
                off = rng.randrange(size)
                ln = rng.randint(1, min(64 * 1024, size - off))
                t0 = time.monotonic_ns()
                data = os.pread(fds[n][0], ln, off)
            t1 = time.monotonic_ns()
            if len(data) != ln:
                raise _short(f"reader: short read of {n}: {len(data)} of {ln} at {off}", killed)
            log.reads.append(Timed(n, t0, t1, off=off, data=data))
    except Exception as e:                  # noqa: BLE001
        if not _stopped(e, killed, log, None):
            log.error = f"{type(e).__name__}: {e}"
    _close_all(fd for pair in fds.values() for fd in pair)
    q.put(("reader", log))
