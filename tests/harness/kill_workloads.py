"""kill -9 harness, the workload children: `python kill_workloads.py KIND JSON` runs one (cp,
mmap, reflink) until its filesystem goes away, logging each operation BEFORE it starts to a file
outside the mount. Standard library only and no package-relative import, so the child runs it
as a plain file; the checkers import `blob` from here to recompute what the children wrote."""
from __future__ import annotations

import errno
import hashlib
import itertools
import json
import mmap
import os
import random
import subprocess
import sys
from typing import Callable

BS = 4096


class OpLog:
    """Append-only operation log outside the mount, one line per operation, each line written
    (line-buffered: one write(2)) BEFORE the operation starts."""

    def __init__(self, path: str):
        self.f = open(path, "w", buffering=1)

    def __call__(self, *fields: object) -> None:
        self.f.write(" ".join(map(str, fields)) + "\n")


def blob(n: int, *key: object) -> bytes:
    """n deterministic pseudo-random bytes named by `key` (the checker recomputes them)."""
    return hashlib.shake_128(repr(key).encode()).digest(n)


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


def workload_argv(kind: str, params: dict) -> list[str]:
    """The command that runs workload `kind` with `params` in a child process."""
    return [sys.executable, os.path.abspath(__file__), kind, json.dumps(params)]


if __name__ == "__main__":
    sys.exit(run_child(sys.argv[1], sys.argv[2]))
