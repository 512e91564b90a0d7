#!/usr/bin/env python3
"""kill -9 of the daxfs daemon at random moments of real workloads on a real mount, then recovery
and checks (issue "Prove crash consistency" -> real-process faults).

Scenarios (each kill point gets a fresh image, so any point replays on its own):

    cp       `cp -a` of a small tree into the mount, in a loop with `rm -r` of older copies
    fio      fio randwrite, bs=4k, psync into a pre-filled or sparse file: buffered, --fsync=N,
             --direct=1 or both; every block fio writes holds a pattern with its own offset
    mmap     a child maps a file MAP_SHARED, stores whole pages and msyncs some (one page or all)
    reflink  a child clones big files with `cp` (copy_file_range, daxfs's reflink), COW-breaks
             each clone with random pwrites (fsync now and then) and removes older clones

Every workload logs each operation BEFORE starting it, to a file outside the mount (fio: its
--write_iolog); the workloads are serial, so the last logged operation is the one in flight at
the kill and every earlier one completed. The kill moment is drawn from the point's seed, within
KILL_WINDOW seconds after the workload started. After the kill: the mount must go stale; it is
lazily unmounted; `daxfs fsck` of the crashed image must exit 0 (notes only: clean flag, pending
journal) and must not change it; `daxfs mount` replays the journal; then

  * the README's contract for a killed daemon: everything a completed request did is there --
    a completed write(2) (daxfs has no writeback cache), fsync, clone, unlink, `cp -a`; mmap
    stores only once msync'd. The operation in flight left old or new bytes (byte by byte: a
    torn in-place store), a prefix of a copy or clone, or a name present or absent;
  * the source of every reflink is byte-identical; the whole tree reads without error;
  * the filesystem works (write, fsync, clone, COW, delete) and, once everything is deleted,
    statvfs gives back every block and inode of the fresh image;
  * `daxfs umount` marks it clean, `daxfs fsck` exits 0, no daemon log has an ERROR/Traceback.

    scripts/kill_explore.py [--points 60] [--seed 1] [--scenario all|cp|fio|mmap|reflink]
                            [--workdir /dev/shm] [--keep DIR]

Point i runs scenario SCENARIOS[i % 4] (or --scenario) with seed SEED+i, so a failure replays
with `--scenario X --seed SEED+i --points 1` (same workload and kill delay; how far the workload
got by then depends on the machine). One line per point; the LAST line is always
`N kill points survived, M failed` (exit status 1 when M > 0). With --keep, a failed point
leaves its crashed image, workload log and daemon logs in DIR.

The helpers above the scenarios (daemon_pid, kill9, lazy_umount, fsck_crashed, ...) are shared
with tests/test_mount_crash.py and tests/test_mount_kill.py, which import this file.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import hashlib
import itertools
import json
import mmap
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from daxfs.daemon import find_mount, is_locked, lock_holder, mounts_of_image  # noqa: E402

BS = 4096
MiB = 1 << 20
DAXFS = Path(sys.executable).parent / "daxfs"
SCRIPT = Path(__file__).resolve()
SCENARIOS = ("cp", "fio", "mmap", "reflink")
KILL_WINDOW = (0.05, 2.5)      # seconds after the workload is ready
CLI_TIMEOUT = 120
CHILD_TIMEOUT = 30             # for a workload to notice its dead filesystem and exit
LOG_PROBLEMS = (" ERROR ", " CRITICAL ", "Traceback")


class CheckFailed(AssertionError):
    """A kill point broke the durability contract (or the harness could not run it)."""


def require(cond: object, msg: str) -> None:
    """`assert` that survives `python -O` and names the failure."""
    if not cond:
        raise CheckFailed(msg)


# ---------------------------------------------------------------------------------------------
# mount helpers (shared with the tests)

def cli(*args: object, check: bool = True,
        timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess:
    """Run `daxfs ARGS...`; with check=True a non-zero exit raises with its output."""
    cmd = [str(DAXFS), *map(str, args)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    require(not check or p.returncode == 0, f"{' '.join(cmd)} exited with {p.returncode}\n"
            f"--- stdout:\n{p.stdout}--- stderr:\n{p.stderr}")
    return p


def is_mounted(mnt: os.PathLike | str) -> bool:
    return find_mount(os.path.realpath(mnt)) is not None


def wait_unlocked(image: os.PathLike | str, timeout: float = 30.0) -> bool:
    """Wait until nobody holds the image's lock (its daemon has exited)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not os.path.exists(image) or not is_locked(str(image)):
            return True
        time.sleep(0.02)
    return False


def mount(image: os.PathLike | str, mnt: os.PathLike | str, log: os.PathLike | str) -> None:
    cli("mount", image, mnt, "-o", f"log={log}")
    require(is_mounted(mnt), f"daxfs mount returned 0 but {mnt} is not in /proc/mounts")


def umount(mnt: os.PathLike | str) -> None:
    cli("umount", mnt)
    require(not is_mounted(mnt), f"daxfs umount returned 0 but {mnt} is still mounted")


def check_fsck(image: os.PathLike | str) -> None:
    """`daxfs fsck IMAGE` must exit 0."""
    p = cli("fsck", image, check=False)
    require(p.returncode == 0, f"daxfs fsck {image} exited {p.returncode}\n"
            f"--- stdout:\n{p.stdout}--- stderr:\n{p.stderr}")


def _fd_targets(pid: int) -> set[str]:
    out = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in fds:
        try:
            out.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return out


def daemon_pid(image: os.PathLike | str) -> int:
    """Pid of the daemon serving `image`: the flock holder, which must have the image and
    /dev/fuse open (so we never signal anything else). Falls back to a /proc scan if
    /proc/locks names nobody."""
    image = os.path.realpath(image)
    pid = lock_holder(image)
    if pid is not None:
        fds = _fd_targets(pid)
        require(image in fds and "/dev/fuse" in fds,
                f"pid {pid} holds the lock of {image} but has open: {sorted(fds)}")
    else:
        hits = [int(p) for p in os.listdir("/proc") if p.isdigit()
                and {image, "/dev/fuse"} <= _fd_targets(int(p))]
        require(len(hits) == 1, f"daemon of {image}: candidates {hits}")
        pid = hits[0]
    require(pid != os.getpid(), "the daemon is this process")
    return pid


def wait_stale(mnt: os.PathLike | str, timeout: float = 10.0) -> None:
    """Wait until the dead mount answers ENOTCONN."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.stat(mnt)
        except OSError as e:
            if e.errno == errno.ENOTCONN:
                return
            raise
        require(time.monotonic() < deadline, f"{mnt} did not go stale after the daemon died")
        time.sleep(0.02)


def kill9(image: os.PathLike | str, mnt: os.PathLike | str) -> int:
    """SIGKILL the daemon of `image`; returns its pid once it is gone and `mnt` is stale."""
    pid = daemon_pid(image)
    os.kill(pid, signal.SIGKILL)
    require(wait_unlocked(image, 15), f"pid {pid} still holds {image} after SIGKILL")
    wait_stale(mnt)
    return pid


def lazy_umount(mnt: os.PathLike | str) -> None:
    p = subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, text=True,
                       timeout=30)
    require(p.returncode == 0, f"fusermount3 -uz {mnt}: {p.stderr}")
    require(not is_mounted(mnt), f"{mnt} still mounted after fusermount3 -uz")


def image_clean_flag(image: os.PathLike | str) -> bool:
    out = cli("info", image).stdout
    require("state:" in out, f"daxfs info printed no state:\n{out}")
    return "state:          clean" in out


def _same_bytes(path: os.PathLike | str, data: bytes) -> bool:
    view = memoryview(data)
    with open(path, "rb") as f:
        for off in range(0, max(len(data), 1), 16 * MiB):
            chunk = f.read(16 * MiB)
            if chunk != view[off:off + 16 * MiB]:
                return False
        return f.read(1) == b""


def fsck_crashed(image: os.PathLike | str) -> subprocess.CompletedProcess:
    """fsck of an image whose daemon was killed, before it is mounted again: the journal makes
    such an image consistent, so the check (which replays the journal into a private mapping and
    never writes) must find no error: exit 0 (pending replay and the clean flag are notes).
    The image bytes must be unchanged by a plain check."""
    before = Path(image).read_bytes()
    p = cli("fsck", image, check=False)
    require(p.returncode == 0, f"fsck of the crashed image: {p.returncode}\n{p.stdout}{p.stderr}")
    require("Traceback" not in p.stderr, f"fsck of the crashed image:\n{p.stderr}")
    require(_same_bytes(image, before), "a plain fsck modified the image")
    return p


def stop_daemon(image: os.PathLike | str, mnt: os.PathLike | str | None = None) -> None:
    """Best effort cleanup: lazily unmount `mnt` and every mount of `image`, then stop the
    image's daemon (the holder of ITS lock, i.e. one we started): SIGTERM, then SIGKILL."""
    targets = [str(mnt)] if mnt is not None else []
    if os.path.exists(image):
        targets += [e.target for e in mounts_of_image(str(image))]
    for t in dict.fromkeys(targets):
        if is_mounted(t):
            subprocess.run(["fusermount3", "-u", "-z", t], capture_output=True, timeout=30)
    pid = lock_holder(os.path.realpath(image)) if os.path.exists(image) else None
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not pid or pid == os.getpid():
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if wait_unlocked(image, 15 if sig == signal.SIGTERM else 5):
            return


def log_problems(log: os.PathLike | str) -> list[str]:
    """ERROR/CRITICAL/Traceback lines of a daemon log (a missing log has none)."""
    try:
        text = Path(log).read_text(errors="replace")
    except FileNotFoundError:
        return []
    return [ln for ln in text.splitlines() if any(p in ln for p in LOG_PROBLEMS)]


def fsync_path(path: os.PathLike | str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_fsync(path: os.PathLike | str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view[:256 * 1024])
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# trees and byte models (shared with the tests)

def make_small_tree(root: Path, rng: random.Random, dirs: int = 30, per_dir: int = 100) -> int:
    """Directories of small files, a symlink and a hard link each; returns the file count."""
    n = 0
    for d in range(dirs):
        (root / f"d{d:02}/sub").mkdir(parents=True)
        for i in range(per_dir):
            rel = f"d{d:02}/{'sub/' if i % 3 == 0 else ''}f{i:03}"
            (root / rel).write_bytes(rng.randbytes(rng.choice([0, 1, 100, 4095, 4097, 9000])))
            n += 1
        os.symlink(f"f{per_dir - 1:03}", root / f"d{d:02}/link")
        os.link(root / f"d{d:02}/f001", root / f"d{d:02}/hard")
    return n


def check_partial_copy(src: Path, dst: Path) -> tuple[int, int, int]:
    """Everything under `dst` (a copy interrupted by a crash) is listable and readable, exists in
    `src` with the same type, and each regular file holds a prefix of its source (the whole of it
    when the sizes match). Returns (complete files, partial files, directories)."""
    complete = partial = ndirs = 0

    def onerror(e):
        raise e

    for dirpath, dirnames, filenames in os.walk(dst, onerror=onerror):
        ndirs += 1
        rel_dir = os.path.relpath(dirpath, dst)
        require((src / rel_dir).is_dir(), f"{rel_dir}: a directory that the source does not have")
        for name in filenames + dirnames:
            d = Path(dirpath) / name
            s = src / rel_dir / name
            rel = os.path.relpath(d, dst)
            require(os.path.lexists(s), f"{rel}: a name the source does not have")
            ds, ss = os.lstat(d), os.lstat(s)
            require(stat.S_IFMT(ds.st_mode) == stat.S_IFMT(ss.st_mode), f"{rel}: type differs")
            if stat.S_ISLNK(ds.st_mode):
                require(os.readlink(d) == os.readlink(s), f"{rel}: symlink target differs")
            elif stat.S_ISREG(ds.st_mode):
                got, want = d.read_bytes(), s.read_bytes()
                require(len(got) == ds.st_size,
                        f"{rel}: read {len(got)} bytes, st_size {ds.st_size}")
                require(len(got) <= len(want), f"{rel}: longer than its source")
                require(got == want[:len(got)],
                        f"{rel}: {len(got)} of {len(want)} bytes, not a prefix of the source")
                if len(got) == len(want):
                    complete += 1
                else:
                    partial += 1
    return complete, partial, ndirs


def listing(root: Path) -> dict[str, tuple]:
    """Type, mode, size (files), link count (files), mtime and symlink target of every name."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [".", *dirnames, *filenames] if dirpath == str(root) else [*dirnames,
                                                                                *filenames]:
            p = os.path.normpath(os.path.join(dirpath, name))
            st = os.lstat(p)
            reg = stat.S_ISREG(st.st_mode)
            out[os.path.relpath(p, root)] = (
                stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_size if reg else None,
                st.st_nlink if reg else None, st.st_mtime_ns,
                os.readlink(p) if stat.S_ISLNK(st.st_mode) else None)
    return out


def blob(n: int, *key: object) -> bytes:
    """n deterministic pseudo-random bytes named by `key` (the checker recomputes them)."""
    return hashlib.shake_128(repr(key).encode()).digest(n)


def byte_mix_ok(got: bytes, candidates: list[bytes]) -> bool:
    """Every byte of `got` equals the same byte of one of `candidates`: what an interrupted
    in-place store may leave (file data is not journaled; a torn store mixes old and new)."""
    g = np.frombuffer(got, np.uint8)
    ok = np.zeros(len(g), bool)
    for c in candidates:
        if len(c) == len(got):
            ok |= np.frombuffer(c, np.uint8) == g
    return bool(ok.all())


def first_diff(a: bytes, b: bytes) -> int:
    """Offset of the first differing byte (or the shorter length)."""
    n = min(len(a), len(b))
    x = np.frombuffer(a, np.uint8, n) != np.frombuffer(b, np.uint8, n)
    return int(np.argmax(x)) if x.any() else n


def check_model(got: bytes, want: bytes, what: str,
                inflight: tuple[int, bytes, bytes] | None = None) -> bool:
    """`got` equals the byte model `want` (what every completed write left), except that the
    range of the write in flight, (offset, new bytes, old bytes), may hold old or new bytes,
    byte by byte. Returns True when that range is torn (a mix of both)."""
    require(len(got) == len(want), f"{what}: size {len(got)}, expected {len(want)}")
    if got == want:
        return False
    if inflight is not None:
        off, new, old = inflight
        end = off + len(new)
        if got[:off] == want[:off] and got[end:] == want[end:]:
            if got[off:end] in (new, old):
                return False
            require(byte_mix_ok(got[off:end], [new, old]),
                    f"{what}: bytes {off}..{end} (the write in flight) are neither old nor new")
            return True
    d = first_diff(got, want)
    raise CheckFailed(f"{what}: differs at byte {d} (block {d // BS}) from what completed "
                      f"before the kill")


# ---------------------------------------------------------------------------------------------
# workload children: `kill_explore.py --child KIND JSON` (each logs an operation before it)

class OpLog:
    """Append-only operation log outside the mount, one line per operation, each line written
    (line-buffered: one write(2)) BEFORE the operation starts."""

    def __init__(self, path: str):
        self.f = open(path, "w", buffering=1)

    def __call__(self, *fields: object) -> None:
        self.f.write(" ".join(map(str, fields)) + "\n")


def read_ops(path: Path) -> list[list[str]]:
    """The logged operations, without `ready` and the `x ...` line a failing child writes."""
    lines = path.read_text().splitlines()
    return [ln.split() for ln in lines if ln and ln.split()[0] not in ("ready", "x")]


def child_cp(p: dict) -> None:
    """Loop: `cp -a` the tree to copyN, then `rm -r` the copy before last."""
    log = OpLog(p["log"])
    log("ready")
    for n in range(1000):
        log("c", n)
        if subprocess.run(["cp", "-a", p["src"], f"{p['dst']}/copy{n}"]).returncode:
            log("x", "cp")
            return
        if n >= 2:
            log("r", n - 2)
            if subprocess.run(["rm", "-r", f"{p['dst']}/copy{n - 2}"]).returncode:
                log("x", "rm")
                return


def child_mmap(p: dict) -> None:
    """Whole-page stores in a MAP_SHARED mapping; msync of one page or of all of it."""
    log, rng, seed, npages = OpLog(p["log"]), random.Random(p["seed"]), p["seed"], p["npages"]
    fd = os.open(p["path"], os.O_RDWR)
    m = mmap.mmap(fd, npages * BS, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    log("ready")
    written: list[int] = []
    for v in itertools.count():
        pg = rng.randrange(npages)
        log("w", pg, v)
        m[pg * BS:(pg + 1) * BS] = blob(BS, "mmap", seed, pg, v)
        written.append(pg)
        r = rng.random()
        if r < 0.1:
            q = rng.choice(written[-8:])
            log("s", q)
            m.flush(q * BS, BS)             # msync(MS_SYNC) of one page
        elif r < 0.11:
            log("S")
            m.flush()


def _cow_range(rng: random.Random, size: int) -> tuple[int, int]:
    """A COW write: mostly one aligned block, sometimes a few bytes or a span of blocks."""
    r = rng.random()
    if r < 0.7:
        return rng.randrange(size // BS) * BS, BS
    n = rng.randint(1, 300) if r < 0.9 else rng.randint(BS, 4 * BS)
    return rng.randrange(size - n), n


def child_reflink(p: dict) -> None:
    """Loop: clone a source with cp (copy_file_range), COW-break the clone, drop old clones."""
    log, rng, seed = OpLog(p["log"]), random.Random(p["seed"]), p["seed"]
    srcs, sizes, cdir = p["srcs"], p["sizes"], p["clones"]
    log("ready")
    for k in range(100000):
        j = rng.randrange(len(srcs))
        log("c", k, j)
        if subprocess.run(["cp", srcs[j], f"{cdir}/c{k}"]).returncode:
            log("x", "cp")
            return
        fd = os.open(f"{cdir}/c{k}", os.O_WRONLY)
        for i in range(rng.randint(16, 400)):
            off, n = _cow_range(rng, sizes[j])
            log("w", k, i, off, n)
            done = os.pwrite(fd, blob(n, "cow", seed, k, i), off)
            if done < n:
                # the kernel sends a write that starts inside an uncached page as several
                # requests; when the daemon dies between them, write(2) returns what is done
                log("p", k, i, done)
                return
            if rng.random() < 0.2:
                log("f", k)
                os.fsync(fd)
        os.close(fd)
        if k >= 3:
            log("r", k - 3)
            os.unlink(f"{cdir}/c{k - 3}")


CHILDREN: dict[str, Callable[[dict], None]] = {"cp": child_cp, "mmap": child_mmap,
                                               "reflink": child_reflink}


def run_child(kind: str, params: str) -> int:
    """Entry point of a workload child: run until the filesystem goes away (then log `x`)."""
    p = json.loads(params)
    try:
        CHILDREN[kind](p)
    except OSError as e:
        with open(p["log"], "a") as f:
            f.write(f"x {errno.errorcode.get(e.errno, e.errno)}\n")
        return 1
    return 0


# ---------------------------------------------------------------------------------------------
# one kill point

@dataclasses.dataclass
class Point:
    """One kill point: its own directory (outside the mount), image, mountpoint and logs."""
    scenario: str
    seed: int
    dir: Path
    rng: random.Random
    state: dict = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    logs: list[Path] = dataclasses.field(default_factory=list)

    @property
    def image(self) -> Path:
        return self.dir / "daxfs.img"

    @property
    def mnt(self) -> Path:
        return self.dir / "mnt"

    @property
    def oplog(self) -> Path:
        return self.dir / "ops.log"

    def mount(self) -> None:
        """Mount with a fresh daemon log per mount (all are checked at the end)."""
        self.logs.append(self.dir / f"daemon{len(self.logs)}.log")
        mount(self.image, self.mnt, self.logs[-1])


def start_child(pt: Point, kind: str, **params: object) -> subprocess.Popen:
    """Start a workload child in its own session; returns once it logged `ready`."""
    params["log"] = str(pt.oplog)
    with open(pt.dir / "child.err", "wb") as err:
        proc = subprocess.Popen([sys.executable, str(SCRIPT), "--child", kind, json.dumps(params)],
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    deadline = time.monotonic() + 30
    while not (pt.oplog.exists() and pt.oplog.read_text().startswith("ready\n")):
        require(proc.poll() is None, f"{kind} workload died at start: {child_err(pt)}")
        require(time.monotonic() < deadline, f"{kind} workload not ready after 30 s")
        time.sleep(0.01)
    return proc


def child_err(pt: Point) -> str:
    try:
        return (pt.dir / "child.err").read_text(errors="replace")[-2000:]
    except FileNotFoundError:
        return ""


def end_child(proc: subprocess.Popen, timeout: float = CHILD_TIMEOUT) -> None:
    """Wait for a workload to exit (it gets ENOTCONN once the daemon is gone); if it does not,
    SIGKILL its session (itself and what it started, e.g. a cp), while it is still unreaped so
    the group id cannot name anybody else."""
    try:
        proc.wait(timeout)
        return
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


class Scenario:
    """prepare() on the fresh mount (all it writes is fsync'd) -> start() the workload ->
    the kill -> stop() -> check() on the remounted image."""
    name = ""
    image_size = "256M"

    def prepare(self, pt: Point) -> None:
        pass

    def start(self, pt: Point) -> subprocess.Popen:
        raise NotImplementedError

    def stop(self, pt: Point, proc: subprocess.Popen) -> None:
        end_child(proc)

    def check(self, pt: Point) -> None:
        raise NotImplementedError


class CpTree(Scenario):
    """(a) `cp -a` of a tree, looping, with `rm -r` of the copy before last."""
    name = "cp"

    def prepare(self, pt: Point) -> None:
        src = pt.dir / "src"
        make_small_tree(src, pt.rng, dirs=8, per_dir=60)
        (src / "big").mkdir()
        for i in range(2):
            (src / f"big/b{i}").write_bytes(pt.rng.randbytes(pt.rng.randrange(MiB, 3 * MiB)))
        os.chmod(src / "d00", 0o750)
        pt.state.update(src=src, want=listing(src), counts=check_partial_copy(src, src))

    def start(self, pt: Point) -> subprocess.Popen:
        return start_child(pt, "cp", src=str(pt.state["src"]), dst=str(pt.mnt))

    def check(self, pt: Point) -> None:
        """Completed copies are whole, removed ones gone, the one in flight a partial copy."""
        ops = read_ops(pt.oplog)
        require(ops, "the cp workload logged no operation")
        done = {int(o[1]) for o in ops[:-1] if o[0] == "c"}
        gone = {int(o[1]) for o in ops[:-1] if o[0] == "r"}
        what, busy = {"c": "cp -a", "r": "rm -r"}[ops[-1][0]], int(ops[-1][1])
        extra = set(os.listdir(pt.mnt)) - {f"copy{n}" for n in done - gone | {busy}}
        require(not extra, f"names that no completed operation left: {sorted(extra)}")
        for n in done - gone - {busy}:
            self._check_complete(pt, pt.mnt / f"copy{n}")
        left = "nothing"
        if (pt.mnt / f"copy{busy}").exists():
            c, p, _ = check_partial_copy(pt.state["src"], pt.mnt / f"copy{busy}")
            left = f"{c} whole + {p} partial files"
        pt.notes.append(f"{len(done)} copies, {len(gone)} removed, in flight: {what} "
                        f"copy{busy} ({left} left)")

    def _check_complete(self, pt: Point, dst: Path) -> None:
        require(dst.is_dir(), f"{dst.name}: cp -a completed but the copy is missing")
        got = check_partial_copy(pt.state["src"], dst)
        require(got == pt.state["counts"], f"{dst.name}: cp -a completed but (complete, partial,"
                f" dirs) = {got}, source {pt.state['counts']}")
        have, want = listing(dst), pt.state["want"]
        bad = sorted(k for k in want.keys() | have.keys() if have.get(k) != want.get(k))
        require(not bad, f"{dst.name}: cp -a completed but differs from the source: "
                f"{[(k, have.get(k), want.get(k)) for k in bad[:3]]}")


def fio_block(pattern: bytes, off: int) -> bytes:
    """What fio's --verify_pattern=0x<pattern>%o puts into the 4 KiB block at `off`."""
    unit = pattern + off.to_bytes(8, "little")
    return (unit * (BS // len(unit) + 1))[:BS]


class FioRandwrite(Scenario):
    """(b) fio randwrite 4k psync: buffered, --fsync=N, --direct=1 or --direct=1 --fsync=N.
    fio logs each I/O as it issues it (--write_iolog); once the daemon is gone it gets
    ENOTCONN/ECONNABORTED, exits and flushes that log."""
    name = "fio"
    MODES = ("buffered", "fsync", "direct", "direct+fsync")

    def prepare(self, pt: Point) -> None:
        rng = pt.rng
        size = rng.choice([32, 48, 64]) * MiB
        sparse = rng.random() < 0.3
        data = bytes(size) if sparse else rng.randbytes(size)
        path = pt.mnt / "fio.dat"
        if sparse:
            with open(path, "wb") as f:
                f.truncate(size)
                os.fsync(f.fileno())
        else:
            write_fsync(path, data)
        mode = rng.choice(self.MODES)
        opts = ["--direct=1"] if "direct" in mode else []
        if "fsync" in mode:
            opts.append(f"--fsync={rng.choice([1, 4, 16, 64])}")
        pattern = (rng.getrandbits(32) | 1 << 31).to_bytes(4, "big")
        pt.state.update(path=path, data=data, opts=opts, pattern=pattern,
                        fioseed=rng.getrandbits(31))
        pt.notes.append(f"{' '.join(opts) or 'buffered'}, {'sparse' if sparse else 'prefilled'}"
                        f" {size // MiB} MiB")

    def start(self, pt: Point) -> subprocess.Popen:
        s = pt.state
        iolog = pt.dir / "fio.iolog"
        cmd = ["fio", "--name=kill", f"--filename={s['path']}", f"--size={len(s['data'])}",
               "--rw=randwrite", "--bs=4k", "--ioengine=psync", "--iodepth=1", "--time_based",
               "--runtime=120", "--verify=pattern", "--do_verify=0",
               f"--verify_pattern=0x{s['pattern'].hex()}%o", f"--write_iolog={iolog}",
               f"--randseed={s['fioseed']}", "--output=/dev/null", *s["opts"]]
        with open(pt.dir / "child.err", "wb") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err,
                                    start_new_session=True, cwd=pt.dir)
        deadline = time.monotonic() + 30
        while not iolog.exists():
            require(proc.poll() is None, f"fio died at start: {child_err(pt)}")
            require(time.monotonic() < deadline, "fio did not start in 30 s")
            time.sleep(0.01)
        return proc

    def check(self, pt: Point) -> None:
        s = pt.state
        text = (pt.dir / "fio.iolog").read_text()
        require(text.rstrip().endswith("close"), "fio's iolog is incomplete (fio killed?)")
        ios = [ln.split()[2:] for ln in text.splitlines()[1:]]
        ios = [(a[0], int(a[1])) for a in ios if a[0] in ("write", "sync", "datasync")]
        want = bytearray(s["data"])
        for kind, off in ios[:-1]:
            if kind == "write":
                want[off:off + BS] = fio_block(s["pattern"], off)
        inflight = None
        if ios and ios[-1][0] == "write":
            off = ios[-1][1]
            inflight = (off, fio_block(s["pattern"], off), bytes(want[off:off + BS]))
        torn = check_model(s["path"].read_bytes(), bytes(want), "fio.dat", inflight)
        writes = sum(k == "write" for k, _ in ios)
        pt.notes.append(f"{writes} writes, {len(ios) - writes} syncs, in flight: "
                        f"{ios[-1][0] if ios else '-'}{' (torn)' if torn else ''}")


class MmapWriter(Scenario):
    """(c) whole-page stores into a MAP_SHARED mapping, msync of one page or all of it."""
    name = "mmap"

    def prepare(self, pt: Point) -> None:
        rng = pt.rng
        npages = rng.choice([256, 1024, 4096])
        init = rng.choice(["prefilled", "sparse", "half"])
        size = npages * BS
        filled = {"prefilled": size, "sparse": 0, "half": size // 2}[init]
        data = rng.randbytes(filled) + bytes(size - filled)
        path = pt.mnt / "mmap.dat"
        write_fsync(path, data[:filled])
        with open(path, "r+b") as f:                 # the rest is a hole
            f.truncate(size)
            os.fsync(f.fileno())
        pt.state.update(path=path, data=data, npages=npages, wseed=rng.getrandbits(31))
        pt.notes.append(f"{npages} pages {init}")

    def start(self, pt: Point) -> subprocess.Popen:
        s = pt.state
        return start_child(pt, "mmap", path=str(s["path"]), npages=s["npages"], seed=s["wseed"])

    def stop(self, pt: Point, proc: subprocess.Popen) -> None:
        end_child(proc, timeout=0)      # only msync can have made its stores durable

    def check(self, pt: Point) -> None:
        s = pt.state
        ops = read_ops(pt.oplog)
        durable, later = self._model(ops)
        got = s["path"].read_bytes()
        require(len(got) == len(s["data"]), f"mmap.dat: size {len(got)}, was {len(s['data'])}")
        newer = torn = 0
        for pg in range(s["npages"]):
            g = got[pg * BS:(pg + 1) * BS]
            base = self._page(pt, pg, durable.get(pg))
            if g == base:
                continue
            cands = [self._page(pt, pg, v) for v in later.get(pg, [])]
            if g in cands:
                newer += 1
            elif byte_mix_ok(g, [base, *cands]):
                torn += 1
            else:
                raise CheckFailed(self._explain(pt, pg, g, durable.get(pg), ops))
        syncs = sum(o[0] in "sS" for o in ops[:-1])
        pt.notes.append(f"{len(ops)} ops, {syncs} msync; after the kill {newer} pages newer "
                        f"than msync'd, {torn} torn, in flight: {ops[-1][0] if ops else '-'}")

    @staticmethod
    def _model(ops: list[list[str]]) -> tuple[dict[int, int], dict[int, list[int]]]:
        """Per page: the version a completed msync made durable, and the versions stored
        after it (any of which the kernel may have written back by the kill)."""
        durable: dict[int, int] = {}
        later: dict[int, list[int]] = {}
        latest: dict[int, int] = {}
        for i, op in enumerate(ops):
            if op[0] == "w":
                pg, v = int(op[1]), int(op[2])
                latest[pg] = v
                later.setdefault(pg, []).append(v)
            elif i < len(ops) - 1:          # a completed msync
                pages = [int(op[1])] if op[0] == "s" else list(latest)
                for pg in pages:
                    durable[pg], later[pg] = latest[pg], []
        return durable, later

    @staticmethod
    def _page(pt: Point, pg: int, v: int | None) -> bytes:
        if v is None:
            return pt.state["data"][pg * BS:(pg + 1) * BS]
        return blob(BS, "mmap", pt.state["wseed"], pg, v)

    def _explain(self, pt: Point, pg: int, g: bytes, v: int | None, ops: list) -> str:
        versions = [int(o[2]) for o in ops if o[0] == "w" and int(o[1]) == pg]
        which = next((u for u in versions if g == self._page(pt, pg, u)), None)
        holds = ("the initial content" if g == self._page(pt, pg, None) else
                 f"version {which}" if which is not None else "bytes never stored there")
        return (f"mmap.dat page {pg}: msync'd version {v if v is not None else '(initial)'} "
                f"lost; the page holds {holds} (versions stored: {versions[-6:]})")


@dataclasses.dataclass
class Clone:
    """A clone in the reflink workload: cloned, cloning (cp in flight), unlinking or gone; its
    byte model after every logged write, and the write in flight (offset, new, old bytes)."""
    state: str
    model: bytearray
    inflight: tuple[int, bytes, bytes] | None = None


class ReflinkCow(Scenario):
    """(d) cp clones (copy_file_range) of big and fragmented files, COW breaks into the
    fresh clone, unlink of older clones."""
    name = "reflink"
    image_size = "512M"

    def prepare(self, pt: Point) -> None:
        rng = pt.rng
        (pt.mnt / "src").mkdir()
        (pt.mnt / "clones").mkdir()
        big = rng.randbytes(rng.randrange(20, 40) * MiB + rng.randrange(BS))
        write_fsync(pt.mnt / "src/big", big)
        nfrag = rng.randrange(256, 768)
        frags = [rng.randbytes(nfrag * BS) for _ in range(2)]
        self._write_interleaved([pt.mnt / "src/frag0", pt.mnt / "src/frag1"], frags)
        srcs = {"big": big, "frag0": frags[0], "frag1": frags[1]}
        pt.state.update(srcs=srcs, wseed=rng.getrandbits(31))
        pt.notes.append(f"big {len(big) / MiB:.1f} MiB, fragmented 2x{nfrag} blocks")

    @staticmethod
    def _write_interleaved(paths: list[Path], datas: list[bytes]) -> None:
        """Block by block in turn, so neither file gets two adjacent blocks: one extent per
        block, the costly case for a clone."""
        fds = [os.open(p, os.O_WRONLY | os.O_CREAT, 0o644) for p in paths]
        try:
            for off in range(0, len(datas[0]), BS):
                for fd, d in zip(fds, datas):
                    os.pwrite(fd, d[off:off + BS], off)
            for fd in fds:
                os.fsync(fd)
        finally:
            for fd in fds:
                os.close(fd)

    def start(self, pt: Point) -> subprocess.Popen:
        srcs = pt.state["srcs"]
        return start_child(pt, "reflink", srcs=[str(pt.mnt / "src" / n) for n in srcs],
                           sizes=[len(d) for d in srcs.values()], clones=str(pt.mnt / "clones"),
                           seed=pt.state["wseed"])

    def check(self, pt: Point) -> None:
        srcs = pt.state["srcs"]
        for name, data in srcs.items():
            require((pt.mnt / "src" / name).read_bytes() == data,
                    f"src/{name}: the source of the clones changed")
        ops = read_ops(pt.oplog)
        clones = self._replay(pt, ops, list(srcs.values()))
        have = set(os.listdir(pt.mnt / "clones"))
        extra = have - set(clones)
        require(not extra, f"clones/: names no completed operation left: {sorted(extra)}")
        torn = sum(self._check_clone(pt, name, c, name in have) for name, c in clones.items())
        require(ops, "the reflink workload logged no operation")
        what = {"c": "clone", "w": "COW write", "p": "COW write (short)", "f": "fsync",
                "r": "unlink"}[ops[-1][0]]
        pt.notes.append(f"{sum(o[0] == 'c' for o in ops)} clones, "
                        f"{sum(o[0] == 'w' for o in ops)} COW writes, in flight: {what}"
                        f"{' (torn)' if torn else ''}")

    @staticmethod
    def _check_clone(pt: Point, name: str, c: Clone, present: bool) -> bool:
        """One clone against its model; returns True when the write in flight is torn."""
        path = pt.mnt / "clones" / name
        if c.state == "gone":
            require(not present, f"clones/{name}: unlinked before the kill, but back")
        elif c.state == "cloning":
            if present:
                got = path.read_bytes()
                require(got == c.model[:len(got)], f"clones/{name}: the clone in flight is not "
                        f"a prefix of its source ({len(got)} of {len(c.model)} bytes)")
        elif present or c.state == "cloned":
            require(present, f"clones/{name}: cloned before the kill, but missing")
            return check_model(path.read_bytes(), bytes(c.model), f"clones/{name}", c.inflight)
        return False

    @staticmethod
    def _replay(pt: Point, ops: list[list[str]], datas: list[bytes]) -> dict[str, Clone]:
        """Per clone name, what the logged operations left (the last one in flight; a short
        write, `p`, completed its first bytes and left the rest in flight)."""
        clones: dict[str, Clone] = {}
        last_write = None
        for i, op in enumerate(ops):
            done = i < len(ops) - 1
            name = f"c{op[1]}"
            if op[0] == "c":
                clones[name] = Clone("cloned" if done else "cloning", bytearray(datas[int(op[2])]))
            elif op[0] == "w":
                k, j, off, n = map(int, op[1:])
                c, new = clones[name], blob(n, "cow", pt.state["wseed"], k, j)
                last_write = (c, off, new, bytes(c.model[off:off + n]))
                c.model[off:off + n] = new
                if not done:
                    c.inflight = last_write[1:]
            elif op[0] == "p":
                c, off, new, old = last_write
                m = int(op[3])
                c.inflight = (off + m, new[m:], old[m:])
            elif op[0] == "r":
                clones[name].state = "gone" if done else "unlinking"
        return clones


SCENARIO_TYPES: dict[str, type[Scenario]] = {
    s.name: s for s in (CpTree, FioRandwrite, MmapWriter, ReflinkCow)}


def walk_read(root: Path) -> int:
    """lstat every name and read every regular file (no error allowed); returns bytes read."""
    total = 0

    def onerror(e):
        raise e

    for dirpath, _dirnames, filenames in os.walk(root, onerror=onerror):
        for name in filenames:
            p = os.path.join(dirpath, name)
            if stat.S_ISREG(os.lstat(p).st_mode):
                with open(p, "rb") as f:
                    while chunk := f.read(MiB):
                        total += len(chunk)
    return total


def still_works(mnt: Path) -> None:
    """After recovery: write+fsync, read back, clone with cp, COW-break the clone, delete."""
    data = os.urandom(MiB + 123)
    write_fsync(mnt / "probe", data)
    require((mnt / "probe").read_bytes() == data, "probe: read back differs")
    subprocess.run(["cp", str(mnt / "probe"), str(mnt / "probe.clone")], check=True, timeout=60)
    with open(mnt / "probe.clone", "r+b") as f:
        f.seek(5 * BS)
        f.write(b"cow" * 100)
        os.fsync(f.fileno())
    want = data[:5 * BS] + b"cow" * 100 + data[5 * BS + 300:]
    require((mnt / "probe.clone").read_bytes() == want, "probe.clone: COW write lost")
    require((mnt / "probe").read_bytes() == data, "probe: changed by a write into its clone")
    os.unlink(mnt / "probe")
    os.unlink(mnt / "probe.clone")


def remove_all(mnt: Path) -> None:
    for p in mnt.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def wait_free(mnt: Path, want: tuple[int, int], timeout: float = 10.0) -> None:
    """statvfs (free blocks, free inodes) back to `want` (unlinked inodes are freed when the
    kernel forgets them, which can lag a little)."""
    deadline = time.monotonic() + timeout
    while True:
        st = os.statvfs(mnt)
        got = (st.f_bfree, st.f_ffree)
        if got == want:
            return
        require(time.monotonic() < deadline, f"after deleting everything: (free blocks, free "
                f"inodes) = {got}, the fresh image had {want}")
        time.sleep(0.05)


def run_point(scenario: str, seed: int, workdir: Path, keep: Path | None = None) -> str:
    """One kill point on a fresh image; returns a one-line summary, raises on any failure.
    Everything it made (mount, daemon, workload, image, files) is gone when it returns."""
    sc = SCENARIO_TYPES[scenario]()
    pt = Point(scenario, seed, Path(tempfile.mkdtemp(prefix=f"kill-{scenario}-", dir=workdir)),
               random.Random(f"{scenario}-{seed}"))
    proc = None
    try:
        pt.mnt.mkdir()
        cli("mkfs", pt.image, "--size", sc.image_size)
        pt.mount()
        st = os.statvfs(pt.mnt)
        fresh = (st.f_bfree, st.f_ffree)
        sc.prepare(pt)
        delay = pt.rng.uniform(*KILL_WINDOW)
        proc = sc.start(pt)
        _kill_during(pt, sc, proc, delay)
        if keep is not None:
            _keep_crashed(pt, keep)
        fsck_crashed(pt.image)
        pt.mount()
        walk_read(pt.mnt)
        sc.check(pt)
        _after_checks(pt, fresh)
        if keep is not None:
            shutil.rmtree(keep / pt.dir.name, ignore_errors=True)
        return f"kill@{delay:.2f}s " + "; ".join(pt.notes)
    finally:
        if proc is not None and proc.poll() is None:
            end_child(proc, timeout=0)
        stop_daemon(pt.image, pt.mnt)
        shutil.rmtree(pt.dir, ignore_errors=True)


def _kill_during(pt: Point, sc: Scenario, proc: subprocess.Popen, delay: float) -> None:
    """Let the workload run `delay` seconds, SIGKILL the daemon, stop the workload, detach."""
    try:
        time.sleep(delay)
        require(proc.poll() is None, f"the workload ended before the kill (exit status "
                f"{proc.returncode}): {child_err(pt)}")
        kill9(pt.image, pt.mnt)
    finally:
        sc.stop(pt, proc)
    lazy_umount(pt.mnt)
    require(not image_clean_flag(pt.image), "a killed daemon cannot have marked the image clean")


def _keep_crashed(pt: Point, keep: Path) -> None:
    """Copy the crashed image and the logs so far to keep/<point dir> (removed if it passes)."""
    dest = keep / pt.dir.name
    dest.mkdir(parents=True, exist_ok=True)
    for p in [pt.image, pt.oplog, pt.dir / "fio.iolog", pt.dir / "child.err", *pt.logs]:
        if p.exists():
            shutil.copy(p, dest / (p.name + (".crashed" if p == pt.image else "")))


def _after_checks(pt: Point, fresh: tuple[int, int]) -> None:
    """The recovered filesystem works and gives back all space; clean unmount and fsck."""
    still_works(pt.mnt)
    remove_all(pt.mnt)
    wait_free(pt.mnt, fresh)
    umount(pt.mnt)
    require(wait_unlocked(pt.image), "the daemon did not exit after umount")
    require(image_clean_flag(pt.image), "daxfs umount did not mark the image clean")
    check_fsck(pt.image)
    for log in pt.logs:
        bad = log_problems(log)
        require(not bad, f"daemon log {log.name}:\n" + "\n".join(bad[:20]))


# ---------------------------------------------------------------------------------------------
# command line

def plan(points: int, seed: int, scenario: str) -> list[tuple[str, int]]:
    """Point i: scenario SCENARIOS[i % 4] (or the one asked for), seed SEED + i."""
    return [(SCENARIOS[i % len(SCENARIOS)] if scenario == "all" else scenario, seed + i)
            for i in range(points)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--points", type=int, default=60, help="kill points in all (default 60)")
    ap.add_argument("--seed", type=int, default=1, help="seed of point 0 (point i: SEED+i)")
    ap.add_argument("--scenario", choices=("all", *SCENARIOS), default="all")
    ap.add_argument("--workdir", type=Path, default=Path("/dev/shm"),
                    help="where images, mountpoints and logs go (default /dev/shm)")
    ap.add_argument("--keep", type=Path, help="keep crashed image and logs of failed points here")
    ap.add_argument("--child", nargs=2, metavar=("KIND", "JSON"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return run_child(*args.child)
    ok = failed = 0
    t0 = time.monotonic()
    todo = plan(args.points, args.seed, args.scenario)
    for i, (scenario, seed) in enumerate(todo):
        t = time.monotonic()
        head = f"[{i + 1:3}/{len(todo)}] {scenario:7} seed={seed}"
        try:
            summary = run_point(scenario, seed, args.workdir, args.keep)
        except Exception as e:          # noqa: BLE001 -- every failure is reported, then next
            failed += 1
            print(f"{head} FAILED ({time.monotonic() - t:.1f}s): {type(e).__name__}: "
                  f"{str(e).strip()}\n    replay: {sys.argv[0]} --scenario {scenario} "
                  f"--seed {seed} --points 1", flush=True)
            continue
        ok += 1
        print(f"{head} ok ({time.monotonic() - t:.1f}s) {summary}", flush=True)
    print(f"total {time.monotonic() - t0:.0f}s", flush=True)
    print(f"{ok} kill points survived, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
