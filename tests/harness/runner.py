"""Executes the exerciser's operations through real syscalls on a daxfs mount, applies to the
model exactly what each syscall reported, and checks every read (and the size) against it.

Errors: in near-full mode ENOSPC is allowed where the operation can need space, and then the file
must be as before (a write or copy that returns a count n applied exactly n bytes); EIO and EROFS
are never allowed; EFBIG only where it is the expected answer."""
from __future__ import annotations

import ctypes
import errno
import mmap
import os

from .gen import NFILES
from .model import BS, FileModel, make_data, summary

libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
FALLOC_MODE = dict(punch=0x02 | 0x01, zero=0x10, zerokeep=0x10 | 0x01, alloc=0, allockeep=0x01)
PAGE = mmap.PAGESIZE
CHUNK = 4 << 20
CHECK_EDGE = 512 << 10


def fallocate(fd: int, mode: int, off: int, n: int) -> None:
    if libc.fallocate(fd, mode, off, n) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class Mismatch(Exception):
    """`where`: (file, off, n) of a failed data check, so a reproduction can end with that read."""

    def __init__(self, kind: str, text: str, where: tuple | None = None, expected: str = ""):
        super().__init__(f"{kind}: {text}")
        self.kind, self.text, self.where, self.expected = kind, text, where, expected


def _en(e: OSError) -> str:
    return errno.errorcode.get(e.errno, str(e.errno))


class Runner:
    def __init__(self, mount, mode: str, avoid: set[str], fsck_on_remount: bool = True):
        self.m = mount
        self.mode = mode
        self.avoid = avoid
        self.fsck_on_remount = fsck_on_remount
        self.models = [FileModel() for _ in range(NFILES)]
        self.fds: list[int | None] = [None] * NFILES
        self.stats = {"enospc": 0, "short": 0, "erofs_rebaselines": 0, "msync_errors": 0}

    # ---- plumbing
    def path(self, f: int) -> str:
        return os.path.join(self.m.mnt, f"f{f}")

    def open_all(self) -> None:
        for f in range(NFILES):
            self.fds[f] = os.open(self.path(f), os.O_RDWR | os.O_CREAT, 0o644)

    def close_all(self, strict: bool = True) -> None:
        for f in range(NFILES):
            if self.fds[f] is not None:
                self._close(f, strict)

    def _close(self, f: int, strict: bool = True) -> None:
        fd, self.fds[f] = self.fds[f], None
        try:
            os.close(fd)
        except OSError as e:
            # a close reports a failed writeback of mmap stores; those pages are unknown already
            if strict and not (self.models[f].unknown and e.errno in (errno.ENOSPC, errno.EIO)):
                raise Mismatch("errno", f"close(f{f}) failed with {_en(e)}")

    def sizes(self) -> list[int]:
        return [m.size for m in self.models]

    def free_blocks(self) -> int:
        return os.statvfs(self.m.mnt).f_bavail

    def allowed(self, e: OSError, what: str, space: bool = True) -> None:
        """Return if `e` is a permitted failure of `what`, else raise a Mismatch."""
        if space and self.mode == "full" and e.errno == errno.ENOSPC:
            self.stats["enospc"] += 1
            return
        if e.errno == errno.EROFS and "erofs" in self.avoid:
            raise _Rebaseline(what)
        raise Mismatch("errno", f"{what} failed with {_en(e)} ({e.strerror})")

    # ---- checks
    def check_size(self, f: int, where: str) -> None:
        st = os.fstat(self.fds[f]).st_size
        if st != self.models[f].size:
            raise Mismatch("size", f"{where}: f{f} has size {st:#x}, the model {self.models[f].size:#x}")

    def check_bytes(self, f: int, off: int, n: int, got: bytes, how: str) -> None:
        m = self.models[f]
        want = max(0, min(n, m.size - off))
        if len(got) != want:
            raise Mismatch("count", f"{how} f{f} [{off:#x}+{n:#x}) returned {len(got):#x} bytes, "
                                    f"the model {want:#x}")
        d = m.compare(got, off)
        if d:
            raise Mismatch("data", f"{how} f{f} [{off:#x}+{n:#x}): {d}", (f, off, n),
                           summary(bytes(m.data[off:off + len(got)])))

    def check_read(self, f: int, off: int, n: int, how: str = "pread") -> None:
        while n > 0:
            k = min(n, CHUNK)
            self.check_bytes(f, off, k, os.pread(self.fds[f], k, off), how)
            off, n = off + k, n - k

    def check_after(self, f: int, lo: int, hi: int, where: str) -> None:
        """After a change of [lo, hi): the size, and the bytes of the blocks around it."""
        self.check_size(f, where)
        lo = lo // BS * BS
        hi = min(-(-hi // BS) * BS, self.models[f].size)
        if hi - lo > 2 * CHECK_EDGE:       # the edges; the middle is met by reads and reopens
            self.check_read(f, lo, CHECK_EDGE, f"pread after {where}:")
            self.check_read(f, hi - CHECK_EDGE, CHECK_EDGE, f"pread after {where}:")
        elif hi > lo:
            self.check_read(f, lo, hi - lo, f"pread after {where}:")

    def check_all(self, where: str) -> None:
        for f in range(NFILES):
            self.check_size(f, where)
            self.check_read(f, 0, self.models[f].size, f"pread after {where}:")

    # ---- one op
    def run(self, op: tuple) -> None:
        """Execute one op; raises Mismatch on the first difference from the model."""
        try:
            getattr(self, "op_" + op[0])(*op[1:])
        except _Rebaseline as r:
            self.stats["erofs_rebaselines"] += 1
            self.rebaseline()
        except Mismatch:
            raise
        except OSError as e:
            raise Mismatch("errno", f"{op[0]}: unexpected {_en(e)} ({e.strerror})") from None

    def op_read(self, f, off, n):
        self.check_size(f, "read")
        self.check_bytes(f, off, n, os.pread(self.fds[f], n, off), "pread")

    def op_write(self, f, off, n, seed, flip=False):
        data = make_data(seed, n)
        try:
            w = os.pwrite(self.fds[f], data, off)
        except OSError as e:
            self.allowed(e, f"pwrite(f{f}, {n:#x} bytes at {off:#x})")
            w = 0
        self._applied_write(f, off, n, w, data, "pwrite")
        if flip:            # --inject: a deliberately wrong model, to prove mismatches are caught
            self.models[f].data[off] ^= 0x5A
        self.check_after(f, off, off + n, "pwrite")

    def _applied_write(self, f, off, n, w, data, how):
        if w != n:
            if self.mode != "full" or not 0 <= w < n:
                raise Mismatch("count", f"{how}(f{f}, {n:#x} bytes at {off:#x}) returned {w:#x}")
            self.stats["short"] += w > 0
        if w:
            self.models[f].write(off, data[:w])

    def op_append(self, f, n, seed):
        data = make_data(seed, n)
        off = self.models[f].size
        fd = os.open(self.path(f), os.O_WRONLY | os.O_APPEND)
        try:
            w = os.write(fd, data)
        except OSError as e:
            self.allowed(e, f"O_APPEND write(f{f}, {n:#x} bytes)")
            w = 0
        finally:
            os.close(fd)
        self._applied_write(f, off, n, w, data, "O_APPEND write")
        self.check_after(f, off, off + n, "O_APPEND write")

    def op_trunc(self, f, size):
        m = self.models[f]
        old = m.size
        try:
            os.ftruncate(self.fds[f], size)
            m.truncate(size)
        except OSError as e:
            self.allowed(e, f"ftruncate(f{f}, {size:#x}) from {old:#x}", space=size > old)
        self.check_after(f, max(0, min(old, size) - 1), max(old, size), "ftruncate")

    def _map(self, f, off, n, write):
        size = self.models[f].size
        self.check_size(f, "before mmap")
        n = min(n, size - off)
        if n <= 0:
            return None, 0, 0
        base = off // PAGE * PAGE
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if write else 0)
        mm = mmap.mmap(self.fds[f], off + n - base, mmap.MAP_SHARED, prot, offset=base)
        return mm, off - base, n

    def op_mread(self, f, off, n):
        mm, a, n = self._map(f, off, n, False)
        if mm is not None:
            got = mm[a:a + n]
            mm.close()
            self.check_bytes(f, off, n, got, "mmap read")

    def op_mwrite(self, f, off, n, seed, seek_dirty=False):
        mm, a, n = self._map(f, off, n, True)
        if mm is None:
            return
        data = make_data(seed, n)
        mm[a:a + n] = data
        m = self.models[f]
        m.write(off, data)
        try:
            if seek_dirty:
                self._check_seek(f, "data", off - a, "SEEK_DATA with dirty mmap pages")
            try:
                mm.flush()
            except OSError as e:
                if self.mode != "full" or e.errno not in (errno.ENOSPC, errno.EIO):
                    raise Mismatch("errno", f"msync after an mmap store into f{f} "
                                            f"[{off:#x}+{n:#x}) failed with {_en(e)}")
                self.stats["msync_errors"] += 1
                m.set_unknown(off // PAGE * PAGE, -(-(off + n) // PAGE) * PAGE)
        finally:
            mm.close()
        self.check_after(f, off, off + n, "mmap store + msync")

    def op_mseek(self, f, off, n, seed):
        self.op_mwrite(f, off, n, seed, seek_dirty=True)

    def op_falloc(self, f, kind, off, n):
        m = self.models[f]
        try:
            fallocate(self.fds[f], FALLOC_MODE[kind], off, n)
        except OSError as e:
            self.allowed(e, f"fallocate(f{f}, {kind}, {off:#x}, {n:#x})")
        else:
            if kind in ("zero", "alloc") and off + n > m.size:
                m.truncate(off + n)
            if kind in ("punch", "zero", "zerokeep"):
                m.zero(off, off + n)
        self.check_after(f, off, off + n, f"fallocate {kind}")

    def op_copy(self, fi, oi, fo, oo, n):
        src, dst = self.models[fi], self.models[fo]
        want = max(0, min(n, src.size - oi))
        try:
            w = os.copy_file_range(self.fds[fi], self.fds[fo], n, oi, oo)
        except OSError as e:
            self.allowed(e, f"copy_file_range(f{fi}@{oi:#x} -> f{fo}@{oo:#x}, {n:#x})")
            w = None
        if w is not None:
            if w > want or (w == 0 and want) or (w < want and self.mode != "full"):
                raise Mismatch("count", f"copy_file_range(f{fi}@{oi:#x} -> f{fo}@{oo:#x}, "
                                        f"{n:#x}) returned {w:#x}, the model {want:#x}")
            self.stats["short"] += w < want
            src.copy_to(dst, oi, oo, w)
        self.check_size(fi, "copy_file_range source")
        self.check_after(fo, oo, oo + n, "copy_file_range")

    def _check_seek(self, f, whence, off, how):
        m = self.models[f]
        name = "SEEK_DATA" if whence == "data" else "SEEK_HOLE"
        what = f"lseek(f{f}, {off:#x}, {name}) [{how}, size {m.size:#x}]"
        try:
            r = os.lseek(self.fds[f], off, os.SEEK_DATA if whence == "data" else os.SEEK_HOLE)
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise Mismatch("errno", f"{what} failed with {_en(e)}")
            if off < m.size and not (whence == "data" and m.maybe_zero(off, m.size)):
                raise Mismatch("seek", f"{what} gave ENXIO, the model has data in "
                                       f"[{off:#x}, {m.size:#x})")
            return
        if off >= m.size:
            raise Mismatch("seek", f"{what} = {r:#x}, expected ENXIO at/after EOF")
        if not off <= r <= m.size:
            raise Mismatch("seek", f"{what} = {r:#x}, outside [{off:#x}, {m.size:#x}]")
        if whence == "data":
            if not m.maybe_zero(off, r):
                raise Mismatch("seek", f"{what} = {r:#x} skips data of the model in [{off:#x}, {r:#x})")
        elif r < m.size:
            if r % BS and r != off:
                raise Mismatch("seek", f"{what} = {r:#x}: a hole that starts mid-block")
            end = min(r // BS * BS + BS, m.size)
            if not m.maybe_zero(r, end):
                raise Mismatch("seek", f"{what} = {r:#x} is a hole, the model has data in "
                                       f"[{r:#x}, {end:#x})")

    def op_seek(self, f, whence, off):
        self.check_size(f, "seek")
        self._check_seek(f, whence, off, "")

    def op_reopen(self, f, drop_all):
        self._close(f)
        self.fds[f] = fd = os.open(self.path(f), os.O_RDWR)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if drop_all:
            try:
                with open("/proc/sys/vm/drop_caches", "w") as p:
                    p.write("3\n")
            except OSError:
                pass
        self.check_size(f, "reopen")
        self.check_read(f, 0, self.models[f].size, "pread after reopen + DONTNEED:")

    def _direct(self, f, flags):
        return os.open(self.path(f), flags | os.O_DIRECT)

    def op_dread(self, f, off, n):
        fd = self._direct(f, os.O_RDONLY)
        buf = mmap.mmap(-1, n)
        try:
            got = buf[:os.preadv(fd, [buf], off)]
        finally:
            os.close(fd)
            buf.close()
        self.check_bytes(f, off, n, got, "O_DIRECT pread")

    def op_dwrite(self, f, off, n, seed):
        data = make_data(seed, n)
        fd = self._direct(f, os.O_WRONLY)
        buf = mmap.mmap(-1, n)
        buf[:] = data
        try:
            w = os.pwrite(fd, buf, off)
        except OSError as e:
            self.allowed(e, f"O_DIRECT pwrite(f{f}, {n:#x} bytes at {off:#x})")
            w = 0
        finally:
            os.close(fd)
            buf.close()
        self._applied_write(f, off, n, w, data, "O_DIRECT pwrite")
        self.check_after(f, off, off + n, "O_DIRECT pwrite")

    def op_otrunc(self, f):
        fd = os.open(self.path(f), os.O_RDWR | os.O_TRUNC)
        self._close(f)
        self.fds[f] = fd
        self.models[f].truncate(0)
        self.check_size(f, "open(O_TRUNC)")

    def op_efbig(self, f, kind):
        fd, far = self.fds[f], 1 << 60
        try:
            if kind == "trunc":
                os.ftruncate(fd, 1 << 62)
            elif kind == "write":
                os.pwrite(fd, b"x", far)
            else:
                fallocate(fd, 0, far, BS)
        except OSError as e:
            if e.errno != errno.EFBIG:
                raise Mismatch("errno", f"{kind} at 2**60 in f{f}: {_en(e)}, expected EFBIG")
        else:
            raise Mismatch("errno", f"{kind} at 2**60 in f{f} succeeded, expected EFBIG")
        self.check_after(f, max(0, self.models[f].size - 1), self.models[f].size, f"{kind} EFBIG")

    def op_remount(self):
        self.close_all()
        try:
            self.m.umount()
        except RuntimeError as e:
            raise Mismatch("umount", str(e))
        tb = self.m.new_tracebacks()
        if tb:
            raise Mismatch("traceback", f"the daemon log holds a traceback:\n{tb}")
        if self.fsck_on_remount:
            bad = self.m.fsck()
            if bad:
                raise Mismatch("fsck", bad)
        self.m.mount()
        self.open_all()
        self.check_all("remount")

    def rebaseline(self) -> None:
        """--avoid erofs: remount and take what the files hold as the new model."""
        self.close_all(strict=False)
        try:
            self.m.umount()     # after the failsafe it exits 1 (not closed cleanly): expected here
        except RuntimeError:
            pass
        self.m.new_tracebacks()
        self.m.mount()
        self.open_all()
        for f in range(NFILES):
            m = self.models[f] = FileModel()
            size = os.fstat(self.fds[f]).st_size
            off = 0
            while off < size:
                b = os.pread(self.fds[f], min(CHUNK, size - off), off)
                m.write(off, b)
                off += len(b)


class _Rebaseline(Exception):
    pass
