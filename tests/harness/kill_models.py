"""kill -9 harness, trees and byte models (shared with the tests): a small tree to copy, the
check of a copy a crash interrupted, listings, the workload operation log, and the byte model
of a file (what completed writes left; the write in flight may be old, new or torn)."""
from __future__ import annotations

import os
import random
import stat
from pathlib import Path

import numpy as np

from .kill_mount import CheckFailed, require
from .kill_workloads import BS


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


def read_ops(path: Path) -> list[list[str]]:
    """The logged operations, without `ready` and the `x ...` line a failing child writes."""
    lines = path.read_text().splitlines()
    return [ln.split() for ln in lines if ln and ln.split()[0] not in ("ready", "x")]
