"""Shrinking a failing operation list (delta debugging, each candidate replayed on a fresh image)
and printing the result as a runnable Python snippet of plain syscalls."""
from __future__ import annotations

import time

from .runner import FALLOC_MODE


def ddmin(ops: list, fails, deadline: float, log=print) -> list:
    """The classic ddmin: drop chunks of `ops` while `fails(candidate)` still holds; `fails`
    returns the failing prefix length (or None), so trailing ops are trimmed too."""
    n = 2
    while len(ops) >= 2 and time.monotonic() < deadline:
        chunk = -(-len(ops) // n)
        reduced = False
        for i in range(0, len(ops), chunk):
            cand = ops[:i] + ops[i + chunk:]
            if not cand:
                continue
            k = fails(cand)
            if k is not None:
                ops = cand[:k]
                n = max(n - 1, 2)
                reduced = True
                log(f"  shrink: {len(ops)} ops still fail")
                break
            if time.monotonic() >= deadline:
                break
        if not reduced:
            if n >= len(ops):
                break
            n = min(len(ops), 2 * n)
    return ops


HEADER = '''\
#!/usr/bin/env python3
"""daxfs exerciser reproduction ({what}).
Run from the repository with the venv's python: .venv/bin/python THIS_FILE
Expected: {expected}"""
import ctypes, hashlib, mmap, os, subprocess, sys, tempfile
import numpy as np

DAXFS = os.path.join(os.path.dirname(sys.executable), "daxfs")
IMG, MNT = f"/dev/shm/daxfs-repro-{{os.getpid()}}.img", tempfile.mkdtemp()
subprocess.run([DAXFS, "mkfs", IMG, "--size", "{size}"], check=True, capture_output=True)
MOUNT_OPTS = ["-o", "{options}"] if "{options}" else []
subprocess.run([DAXFS, "mount", IMG, MNT, *MOUNT_OPTS], check=True)
libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def data(seed, n):
    return np.random.default_rng(seed).integers(1, 256, n, dtype=np.uint8).tobytes()


def summary(b):
    return f"{{len(b)}} bytes, {{len(b) - b.count(0)}} non-zero, sha1 {{hashlib.sha1(b).hexdigest()[:12]}}"


def do(label, fn):
    try:
        r = fn()
    except OSError as e:
        r = "error " + (os.strerror(e.errno) if e.errno else str(e))
    print(f"{{label:60}} -> {{summary(r) if isinstance(r, bytes) else r}}")


def fallocate(fd, mode, off, n):
    if libc.fallocate(fd, mode, off, n):
        raise OSError(ctypes.get_errno(), "fallocate")
    return 0


def mapped(f, off, n, store=None, seek=False):
    size = os.fstat(fd[f]).st_size
    base = off // mmap.PAGESIZE * mmap.PAGESIZE
    n = min(n, size - off)
    if n <= 0:
        return "nothing mapped (size %#x)" % size
    mm = mmap.mmap(fd[f], off + n - base, offset=base)
    try:
        if store is None:
            return mm[off - base:off - base + n]
        mm[off - base:off - base + n] = store[:n]
        if seek:
            do(f"  lseek(f{{f}}, {{base:#x}}, SEEK_DATA) before msync", lambda: os.lseek(fd[f], base, os.SEEK_DATA))
        mm.flush()
        return "msync 0"
    finally:
        mm.close()


def reopen(f):
    os.close(fd[f])
    fd[f] = os.open(f"{{MNT}}/f{{f}}", os.O_RDWR)
    os.posix_fadvise(fd[f], 0, 0, os.POSIX_FADV_DONTNEED)
    return "reopened, page cache dropped"


def direct(f, off, n, store=None):
    d = os.open(f"{{MNT}}/f{{f}}", (os.O_WRONLY if store else os.O_RDONLY) | os.O_DIRECT)
    buf = mmap.mmap(-1, n)
    try:
        if store:
            buf[:] = store
            return os.pwrite(d, buf, off)
        return buf[:os.preadv(d, [buf], off)]
    finally:
        os.close(d)
        buf.close()


def append(f, b):
    d = os.open(f"{{MNT}}/f{{f}}", os.O_WRONLY | os.O_APPEND)
    try:
        return os.write(d, b)
    finally:
        os.close(d)


def otrunc(f):
    d = os.open(f"{{MNT}}/f{{f}}", os.O_RDWR | os.O_TRUNC)
    os.close(fd[f])
    fd[f] = d
    return os.fstat(d).st_size


def remount():
    for f in range(3):
        os.close(fd[f])
    subprocess.run([DAXFS, "umount", MNT], check=True)
    print("fsck:", subprocess.run([DAXFS, "fsck", IMG], capture_output=True).returncode)
    subprocess.run([DAXFS, "mount", IMG, MNT, *MOUNT_OPTS], check=True)
    for f in range(3):
        fd[f] = os.open(f"{{MNT}}/f{{f}}", os.O_RDWR)
    return "remounted"


fd = [os.open(f"{{MNT}}/f{{f}}", os.O_RDWR | os.O_CREAT, 0o644) for f in range(3)]
try:
'''

FOOTER = '''\
    print("sizes:", [os.fstat(x).st_size for x in fd])
finally:
    for x in fd:
        os.close(x)
    subprocess.run([DAXFS, "umount", MNT])
    print("fsck:", subprocess.run([DAXFS, "fsck", IMG], capture_output=True).returncode)
    os.unlink(IMG)
'''


def render_op(op: tuple) -> tuple[str, str]:
    """(label, python expression) of one op."""
    name, a = op[0], op[1:]
    if name == "read":
        f, off, n = a
        return f"pread(f{f}, {n:#x}, {off:#x})", f"os.pread(fd[{f}], {n:#x}, {off:#x})"
    if name == "write":
        f, off, n, seed = a[:4]
        return (f"pwrite(f{f}, {n:#x} bytes, {off:#x})",
                f"os.pwrite(fd[{f}], data({seed}, {n:#x}), {off:#x})")
    if name == "append":
        f, n, seed = a
        return f"O_APPEND write(f{f}, {n:#x} bytes)", f"append({f}, data({seed}, {n:#x}))"
    if name == "trunc":
        f, size = a
        return f"ftruncate(f{f}, {size:#x})", f"os.ftruncate(fd[{f}], {size:#x})"
    if name == "mread":
        f, off, n = a
        return f"mmap read(f{f}, {off:#x}, {n:#x})", f"mapped({f}, {off:#x}, {n:#x})"
    if name in ("mwrite", "mseek"):
        f, off, n, seed = a
        seek = ", seek=True" if name == "mseek" else ""
        return (f"mmap store + msync(f{f}, {off:#x}, {n:#x})",
                f"mapped({f}, {off:#x}, {n:#x}, data({seed}, {n:#x}){seek})")
    if name == "falloc":
        f, kind, off, n = a
        return (f"fallocate(f{f}, {kind}, {off:#x}, {n:#x})",
                f"fallocate(fd[{f}], {FALLOC_MODE[kind]:#x}, {off:#x}, {n:#x})")
    if name == "copy":
        fi, oi, fo, oo, n = a
        return (f"copy_file_range(f{fi}@{oi:#x} -> f{fo}@{oo:#x}, {n:#x})",
                f"os.copy_file_range(fd[{fi}], fd[{fo}], {n:#x}, {oi:#x}, {oo:#x})")
    if name == "seek":
        f, whence, off = a
        w = "SEEK_DATA" if whence == "data" else "SEEK_HOLE"
        return f"lseek(f{f}, {off:#x}, {w})", f"os.lseek(fd[{f}], {off:#x}, os.{w})"
    if name == "reopen":
        return f"close + open + DONTNEED(f{a[0]})", f"reopen({a[0]})"
    if name == "dread":
        f, off, n = a
        return f"O_DIRECT pread(f{f}, {n:#x}, {off:#x})", f"direct({f}, {off:#x}, {n:#x})"
    if name == "dwrite":
        f, off, n, seed = a
        return (f"O_DIRECT pwrite(f{f}, {n:#x} bytes, {off:#x})",
                f"direct({f}, {off:#x}, {n:#x}, data({seed}, {n:#x}))")
    if name == "otrunc":
        return f"open(f{a[0]}, O_RDWR|O_TRUNC) -> size", f"otrunc({a[0]})"
    if name == "efbig":
        f, kind = a
        expr = {"trunc": f"os.ftruncate(fd[{f}], 1 << 62)",
                "write": f"os.pwrite(fd[{f}], b'x', 1 << 60)",
                "falloc": f"fallocate(fd[{f}], 0, 1 << 60, 4096)"}[kind]
        return f"{kind} at 2**60 (EFBIG expected)", expr
    if name == "remount":
        return "umount + fsck + mount", "remount()"
    raise AssertionError(name)


def snippet(ops: list, mismatch, what: str, size: str, options: str = "") -> str:
    expected = mismatch.text.replace('"""', "'''")
    if mismatch.expected:
        expected += f"\nthe model's bytes there: {mismatch.expected}"
    out = [HEADER.format(what=what, expected=expected, size=size, options=options)]
    for op in ops:
        label, expr = render_op(op)
        out.append(f"    do({label!r}, lambda: {expr})\n")
    if mismatch.where:
        f, off, n = mismatch.where
        out.append(f"    do('check: pread(f{f}, {n:#x}, {off:#x})', "
                   f"lambda: os.pread(fd[{f}], {n:#x}, {off:#x}))\n")
        out.append(f"    do('check: reopen(f{f}) + pread(f{f}, {n:#x}, {off:#x})', "
                   f"lambda: (reopen({f}), os.pread(fd[{f}], {n:#x}, {off:#x}))[1])\n")
    out.append(FOOTER)
    return "".join(out)
