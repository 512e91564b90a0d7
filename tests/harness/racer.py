"""The racer: concurrent writers, cloners and readers on one real mount, checked against a model.

Why. The data-path exerciser (exerciser.py) is one process: it never has two requests in the
daemon at once, so it cannot see a race between the C data plane's threads (in-place writes,
COW breaks into the pool, the overlay) and Python (reflinks that take a file back, the batch
that applies C's breaks). The racer makes exactly those races, and checks every byte anyway.

How the outcome stays checkable. Every file is cut into chunks (512 B .. 8 KiB, one size per
file) and, with K writers, writer i owns chunk c when c % (K + 1) == i, in every file; the
last class belongs to the mutator, which punches, zeroes and copy_file_range's into its chunks
while the writers write theirs. So a chunk has one owner, and its contents at the end of a
phase are known exactly. Chunks smaller than a block put several owners into the same block
at once: concurrent COW breaks of one shared block, which must not lose each other's bytes. What is not determined, and is checked by time windows
(time.monotonic_ns, one clock for all processes):
  - a clone (copy_file_range of a whole file, the reflink path) taken while writers write its
    source: each 512-byte sector of the clone must hold the sector as some version of its chunk
    held it while the clone ran: the version before a write that ended before the clone began
    is no longer valid; a write that began after the clone ended cannot show;
  - a read racing writers: the same rule per sector, over the read's window (Linux does not
    make a read atomic against a write, so sectors may come from different versions; a sector
    that mixes versions byte by byte is counted as torn, not failed, for reads only).

A run is phases. In each, K writer processes, the mutator, one cloner and one reader start
together; then the coordinator checks the clones and reads against the owners' logs, adopts
what it checked as the model of the new clones, reads every file back whole against the
model, and changes the set of files: deletes some, punches a hole, truncates, sometimes remounts (with fsck in
between). At the end: fsck, and no traceback in the daemon's log.

    python -m tests.harness.racer --seed S [--phases N] [--ops N] [--writers K]
        [--mount-opts OPTS] [--keep]

Prints one line per phase and a summary (with how many COW breaks the C data plane did); exit
status 1 and the first disagreement (file, offset, what was found, what was possible) on
failure. Timing decides the interleaving, so a seed does not replay a failure exactly: the
report says what raced with what instead of a shrunk program.
"""
from __future__ import annotations

import argparse
import ctypes
import mmap
import multiprocessing as mp
import os
import random
import sys
import time
from dataclasses import dataclass, field

from .kill_mount import fsck_crashed, kill9, lazy_umount
from .mountctl import Mount

SECTOR = 512
CHUNKS = (512, 1024, 2048, 4096, 8192)


class Mismatch(Exception):
    pass


def _short(what: str, killed) -> Exception:
    """A short count: the daemon's death (after a kill) cuts a request short; else a failure."""
    return OSError(what) if killed is not None and killed.is_set() else Mismatch(what)


@dataclass
class FileModel:
    chunk: int                      # chunk size in bytes: ownership unit
    data: bytearray

    @property
    def nchunks(self) -> int:
        return len(self.data) // self.chunk


@dataclass
class Write:
    name: str
    chunk: int                      # chunk index
    t0: int
    t1: int                         # -1: in flight when the daemon was killed
    after: bytes                    # the whole chunk once this write is done


@dataclass
class Timed:                        # a clone (name: its source; into: the new file) or a read
    name: str
    t0: int
    t1: int
    off: int = 0
    data: bytes = b""
    into: str = ""


@dataclass
class Log:
    writes: list = field(default_factory=list)
    clones: list = field(default_factory=list)
    reads: list = field(default_factory=list)
    inflight: list = field(default_factory=list)    # Writes, or names a clone was going into
    error: str = ""


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


# -- the processes of a phase ---------------------------------------------------------------------

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
                                 f"reads back wrong: {_diff(got, bytes(cur))}", killed)
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
                                 f"back wrong: {_diff(got, bytes(fm.data[base:base + fm.chunk]))}",
                                 killed)
                continue
            if r < 0.4:
                new = bytes(fm.chunk)
                pending = Write(n, c, t0, -1, new)
                _fallocate(fds[n], FALLOC_PUNCH, base, fm.chunk)
            elif r < 0.6:
                new = bytes(fm.chunk)
                pending = Write(n, c, t0, -1, new)
                _fallocate(fds[n], FALLOC_ZERO, base, fm.chunk)
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


# -- checking -------------------------------------------------------------------------------------

def _diff(got: bytes, want: bytes) -> str:
    if len(got) != len(want):
        return f"{len(got)} bytes instead of {len(want)}"
    i = next(j for j in range(len(got)) if got[j] != want[j])
    return f"first difference at byte {i}: {got[i:i + 8].hex()} instead of {want[i:i + 8].hex()}"


class Versions:
    """The versions each chunk went through in a phase: (valid from, valid until, bytes), where
    `from` is when the write that made it began and `until` when the next write ended."""

    def __init__(self, start: dict, writes: list):
        self.start = start                              # name -> FileModel at phase start
        self.hist: dict = {}
        for w in writes:                                # each chunk's writes: one writer, in order
            self.hist.setdefault((w.name, w.chunk), []).append(w)

    def possible(self, name: str, c: int, t0: int, t1: int) -> list[bytes]:
        fm = self.start[name]
        ws = self.hist.get((name, c), [])
        out = []
        prev = bytes(fm.data[c * fm.chunk:(c + 1) * fm.chunk])
        began = -1
        for w in ws + [None]:
            until = w.t1 if w else None
            if began < t1 and (until is None or until > t0):
                out.append(prev)
            if w:
                prev, began = w.after, w.t0
        return out


def check_range(v: Versions, name: str, off: int, data: bytes, t0: int, t1: int,
                what: str, tolerate_tear: bool) -> int:
    """Every sector of `data` (file `name` at `off`) as some version held it in [t0, t1];
    returns how many sectors were torn (mixed versions byte by byte; readers only)."""
    fm = v.start[name]
    torn = 0
    pos = off
    end = off + len(data)
    while pos < end:
        c = pos // fm.chunk
        s_end = min(end, (pos // SECTOR + 1) * SECTOR, (c + 1) * fm.chunk)
        got = data[pos - off:s_end - off]
        lo, hi = pos - c * fm.chunk, s_end - c * fm.chunk
        cands = [x[lo:hi] for x in v.possible(name, c, t0, t1)]
        if got not in cands:
            if tolerate_tear and all(any(x[j] == got[j] for x in cands) for j in range(len(got))):
                torn += 1
            else:
                raise Mismatch(
                    f"{what}: {name} bytes [{pos}, {s_end}) (chunk {c} of {fm.chunk} B) hold "
                    f"{got[:8].hex()}.. which no version of that chunk held during "
                    f"[{t0}, {t1}] ns; {len(cands)} possible: "
                    f"{', '.join(x[:8].hex() for x in cands)}")
        pos = s_end
    return torn


# -- the coordinator ------------------------------------------------------------------------------

class Racer:
    def __init__(self, a):
        self.a = a
        self.rng = random.Random(a.seed)
        self.m = Mount("256M", tag="racer", options=a.mount_opts)
        self.files: dict[str, FileModel] = {}
        self.serial = 0
        self.stats = {"writes": 0, "clones": 0, "reads": 0, "torn": 0, "remounts": 0,
                      "overlaps": 0, "kills": 0, "inflight": 0, "landed": 0}

    def new_name(self) -> str:
        self.serial += 1
        return f"f{self.serial}"

    def create(self, name: str, size_chunks: int, chunk: int) -> None:
        data = bytearray(self.rng.randbytes(size_chunks * chunk))
        with open(f"{self.m.mnt}/{name}", "wb") as f:
            f.write(data)
        self.files[name] = FileModel(chunk, data)

    def verify_all(self, when: str) -> None:
        for n, fm in sorted(self.files.items()):
            with open(f"{self.m.mnt}/{n}", "rb") as f:
                got = f.read()
            if got != bytes(fm.data):
                raise Mismatch(f"{when}: {n} ({fm.chunk} B chunks) differs from the model: "
                               f"{_diff(got, bytes(fm.data))}")

    def phase(self, p: int) -> None:
        a = self.a
        ctx = mp.get_context("fork")
        q = ctx.Queue()
        names = sorted(self.files)
        new = [self.new_name() for _ in range(self.rng.randint(1, 3))]
        hot = self.rng.choice(names)
        k = a.writers + 1                               # chunk classes: the writers', the mutator's
        killed = ctx.Event()
        kill = self.rng.random() < a.kill_rate
        procs = [ctx.Process(target=writer, args=(str(self.m.mnt), self.files, hot, i, k,
                                                  a.ops, self.rng.getrandbits(32), killed, q))
                 for i in range(a.writers)]
        procs.append(ctx.Process(target=mutator, args=(str(self.m.mnt), self.files, hot,
                                                       a.writers, k, a.ops // 4,
                                                       self.rng.getrandbits(32), killed, q)))
        done_ev = ctx.Event()
        procs.append(ctx.Process(target=cloner, args=(str(self.m.mnt), names, hot, new,
                                                      self.rng.getrandbits(32), done_ev, killed,
                                                      q)))
        procs.append(ctx.Process(target=reader, args=(str(self.m.mnt), self.files, a.ops // 2,
                                                      self.rng.getrandbits(32), killed, q)))
        for pr in procs:
            pr.start()
        if kill:                                        # kill -9 the daemon in the middle
            time.sleep(self.rng.uniform(0.02, 0.3))
            killed.set()
            kill9(self.m.image, self.m.mnt)
        logs = {}
        deadline = time.monotonic() + 600
        while len(logs) < len(procs):
            who, log = q.get(timeout=max(1.0, deadline - time.monotonic()))
            logs[who] = log
            if all(i in logs for i in [*range(a.writers), "mutator"]):
                done_ev.set()
        for pr in procs:
            pr.join(60)
        for who, log in logs.items():
            if log.error:
                raise Mismatch(f"phase {p}, {who}: {log.error}")
        writes = [w for i in [*range(a.writers), "mutator"] for w in logs[i].writes]
        v = Versions(self.files, writes)
        for c in logs["cloner"].clones:                 # each clone: a snapshot in its window
            src = self.files[c.name]
            if len(c.data) != len(src.data):
                raise Mismatch(f"phase {p}: clone {c.into} of {c.name} has {len(c.data)} "
                               f"bytes, not {len(src.data)}")
            check_range(v, c.name, 0, c.data, c.t0, c.t1, f"phase {p}, clone {c.into} of "
                        f"{c.name}", tolerate_tear=False)
            self.stats["clones"] += 1
            self.stats["overlaps"] += sum(w.name == c.name and w.t0 < c.t1 and w.t1 > c.t0
                                          for w in writes)
        for r in logs["reader"].reads:
            self.stats["torn"] += check_range(v, r.name, r.off, r.data, r.t0, r.t1,
                                              f"phase {p}, read", tolerate_tear=True)
        self.stats["reads"] += len(logs["reader"].reads)
        self.stats["writes"] += len(writes)
        for w in writes:                                # the end of the phase: each chunk's last
            fm = self.files[w.name]
            fm.data[w.chunk * fm.chunk:(w.chunk + 1) * fm.chunk] = w.after
        if self.a.inject and p == 0 and writes:         # proof that a lost write is caught
            w = max(writes, key=lambda w: w.t1)
            fm = self.files[w.name]
            fm.data[w.chunk * fm.chunk] ^= 0xFF
        for c in logs["cloner"].clones:                 # each new file: its last clone
            self.files[c.into] = FileModel(self.files[c.name].chunk, bytearray(c.data))
        if kill:
            self.recover(p, logs)
        self.verify_all(f"after phase {p}")
        self.reshape(p)

    def recover(self, p: int, logs: dict) -> None:
        """After a kill -9: fsck (no error), mount again; then every acknowledged write must be
        there (write-through: the durability contract), and each chunk something was writing
        when the daemon died must hold, byte by byte, its old or its new contents; the model
        takes what it found there. A new file whose clone was in flight is dropped."""
        lazy_umount(self.m.mnt)
        self.m.mounted = False
        fsck_crashed(self.m.image)
        self.m.mount()
        self.stats["kills"] += 1
        for into in logs["cloner"].inflight:
            self.files.pop(into, None)
            try:
                os.unlink(f"{self.m.mnt}/{into}")
            except FileNotFoundError:
                pass
        for who, log in logs.items():
            for w in log.inflight if who != "cloner" else ():
                fm = self.files[w.name]
                lo, hi = w.chunk * fm.chunk, (w.chunk + 1) * fm.chunk
                old = bytes(fm.data[lo:hi])
                with open(f"{self.m.mnt}/{w.name}", "rb") as f:
                    got = os.pread(f.fileno(), fm.chunk, lo)
                if any(g != o and g != n for g, o, n in zip(got, old, w.after)) or \
                        len(got) != len(old):
                    raise Mismatch(f"phase {p}, after kill -9: {w.name} chunk {w.chunk} "
                                   f"({fm.chunk} B), in flight from {who}, holds bytes that are "
                                   f"neither its old nor its new contents: {_diff(got, old)}")
                fm.data[lo:hi] = got
                self.stats["inflight"] += 1
                self.stats["landed"] += got == w.after and got != old

    def reshape(self, p: int) -> None:
        """Between phases: drop files, punch, truncate, remount; the model follows."""
        rng = self.rng
        while len(self.files) > self.a.max_files:
            n = rng.choice(sorted(self.files))
            os.unlink(f"{self.m.mnt}/{n}")
            del self.files[n]
        n = rng.choice(sorted(self.files))
        fm = self.files[n]
        r = rng.random()
        if r < 0.3:                                     # punch a chunk-aligned hole
            c0 = rng.randrange(fm.nchunks)
            c1 = min(fm.nchunks, c0 + rng.randint(1, 16))
            fd = os.open(f"{self.m.mnt}/{n}", os.O_RDWR)
            try:
                _fallocate(fd, FALLOC_PUNCH, c0 * fm.chunk, (c1 - c0) * fm.chunk)
            finally:
                os.close(fd)
            fm.data[c0 * fm.chunk:c1 * fm.chunk] = bytes((c1 - c0) * fm.chunk)
        elif r < 0.5:                                   # truncate to a chunk boundary
            nc = max(8, fm.nchunks + rng.randint(-fm.nchunks // 2, fm.nchunks // 2))
            os.truncate(f"{self.m.mnt}/{n}", nc * fm.chunk)
            del fm.data[nc * fm.chunk:]
            fm.data.extend(bytes(nc * fm.chunk - len(fm.data)))
        if rng.random() < self.a.remount_rate:
            self.m.umount()
            bad = self.m.fsck()
            if bad:
                raise Mismatch(f"fsck after phase {p}: {bad}")
            self.m.mount()
            self.stats["remounts"] += 1
        self.verify_all(f"after reshaping, phase {p}")

    def run(self) -> int:
        a = self.a
        self.m.mount()
        try:
            first = self.new_name()
            self.create(first, self.rng.randint(256, 1024), 4096)
            for _ in range(a.start_files - 1):
                n = self.new_name()
                if self.rng.random() < 0.5:             # a clone: shared from the start
                    src = self.rng.choice(sorted(self.files))
                    if os.system(f"cp {self.m.mnt}/{src} {self.m.mnt}/{n}"):
                        raise Mismatch(f"cp {src} {n} failed")
                    data = self.files[src].data
                    chunk = self.rng.choice([c for c in CHUNKS if len(data) % c == 0])
                    self.files[n] = FileModel(chunk, bytearray(data))
                else:
                    self.create(n, self.rng.randint(64, 512), self.rng.choice(CHUNKS))
            for p in range(a.phases):
                t = time.monotonic()
                self.phase(p)
                print(f"phase {p}: {len(self.files)} files, {self.stats['writes']} writes, "
                      f"{self.stats['clones']} clones, {self.stats['reads']} reads so far "
                      f"({time.monotonic() - t:.1f} s)", flush=True)
            self.m.umount()
            bad = self.m.fsck()
            if bad:
                raise Mismatch(f"fsck at the end: {bad}")
            tb = self.m.new_tracebacks()
            if tb:
                raise Mismatch(f"traceback in the daemon log:\n{tb}")
        except Mismatch as e:
            print(f"FAILED (seed {a.seed}): {e}", flush=True)
            tb = self.m.new_tracebacks()
            if tb:
                print(f"daemon log:\n{tb[-4000:]}")
            return 1
        finally:
            if not a.keep:
                self.m.destroy()
        s = self.stats
        print(f"racer: seed {a.seed}, {a.phases} phases, {a.writers} writers: {s['writes']} writes, "
              f"{s['clones']} clones racing {s['overlaps']} writes, {s['reads']} racing reads ({s['torn']} sectors "
              f"torn), {s['remounts']} remounts, {s['kills']} kill -9 ({s['inflight']} chunks in "
              f"flight, {s['landed']} of them found new); C data plane: {self.m.served['c_writes']} "
              f"writes, {self.m.served['c_cow_breaks']} COW breaks, {self.m.served['c_reads']} "
              f"reads; 0 mismatches")
        return 0


FALLOC_PUNCH = 0x01 | 0x02               # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
FALLOC_ZERO = 0x01 | 0x10                # FALLOC_FL_KEEP_SIZE | FALLOC_FL_ZERO_RANGE
_libc = ctypes.CDLL(None, use_errno=True)


def _fallocate(fd: int, mode: int, off: int, ln: int) -> None:
    if _libc.fallocate(fd, mode, ctypes.c_long(off), ctypes.c_long(ln)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m tests.harness.racer",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--phases", type=int, default=8)
    p.add_argument("--ops", type=int, default=400, help="operations per writer per phase")
    p.add_argument("--writers", type=int, default=3)
    p.add_argument("--start-files", type=int, default=4)
    p.add_argument("--max-files", type=int, default=8)
    p.add_argument("--remount-rate", type=float, default=0.25)
    p.add_argument("--mount-opts", default="", help="extra -o options, e.g. uring")
    p.add_argument("--kill-rate", type=float, default=0.0,
                   help="share of phases in which the daemon is killed (kill -9) mid-way; not "
                        "with writeback, whose contract keeps only flushed data")
    p.add_argument("--keep", action="store_true", help="keep the image and mount on exit")
    p.add_argument("--inject", action="store_true",
                   help="self-test: the model loses one byte of the last write of phase 0, "
                        "which the run must report")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse(argv)
    if a.kill_rate and "writeback" in a.mount_opts:
        print("racer: --kill-rate needs a write-through mode (not -o writeback)", file=sys.stderr)
        return 2
    return Racer(a).run()


if __name__ == "__main__":
    sys.exit(main())
