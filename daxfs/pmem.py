"""The mapped image and the one persistence API: store, persist(range), fence.

Every byte daxfs writes to the image goes through `PMem.store` / `PMem.zero` / `PMem.copy`, and
becomes durable against power loss only after `persist` of its range followed by `fence`.
Crash tests subclass `PMem` (or set `observer`) to see every store and persist point.

Three backends, chosen at map time:
- DAX: the image sits on a DAX filesystem/device and MAP_SHARED_VALIDATE|MAP_SYNC succeeds; a
  persist is libpmem's pmem_persist (cache-line flushes and a fence; libpmem loaded through
  ctypes when present), else the cache-line write-back of every line of the range (CLWB,
  CLFLUSHOPT or CLFLUSH, from daxfs._pmemflush) and `fence` is an SFENCE; msync where
  neither exists. `force_dax` (DAXFS_FORCE_DAX=1 for the daemon) runs this path on any
  mapping, so tests exercise the flush calls on a tmpfs image.
- page cache (the usual case: ext4, XFS): a persist is msync(MS_SYNC) of the page-aligned
  range; stores reach the page cache immediately, so a killed daemon loses nothing it stored.
- RAM (tmpfs, ramfs: the emulated pmem of tests and benchmarks): the page cache is the medium,
  so a persist is only a recorded persist point (crash tests still see every one).

`fence` issues an SFENCE on the cache-line path (its write-backs are weakly ordered) and
nothing elsewhere: msync(MS_SYNC) waits for the data and pmem_persist ends with its own fence,
so stores are already ordered by their persists; it also marks the ordering point for crash
tests (`observer`). What was tested where: the flush path runs (forced) on tmpfs images in the
test suite; no test here ran on real persistent memory.
`PMem.over_fd` maps a descriptor fsck owns, without probing the backend.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import os
import threading
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)

PAGE = mmap.PAGESIZE
_MAP_SHARED_VALIDATE = 0x03
_MAP_SYNC = 0x80000


def _load_libpmem():
    name = ctypes.util.find_library("pmem")
    if not name:
        return None
    try:
        lib = ctypes.CDLL(name)
        lib.pmem_persist.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.pmem_persist.restype = None
        return lib
    except OSError:
        return None


def _load_pmemflush():
    """daxfs._pmemflush if this CPU can write back cache lines (x86-64), else None."""
    try:
        from . import _pmemflush
    except ImportError:
        return None
    return _pmemflush if _pmemflush.method() != "none" else None


_RAM_FS_MAGIC = (0x01021994, 0x858458F6)     # tmpfs, ramfs
_MADV_POPULATE_WRITE = 23                    # Linux >= 5.14
_PREFAULT_CHUNK = 32 << 20


def _on_ram_fs(fd: int) -> bool:
    """True if the image lives on tmpfs/ramfs (fstatfs f_type)."""
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(256)      # struct statfs; f_type is its first long
    if libc.fstatfs(fd, buf) != 0:
        return False
    return ctypes.c_long.from_buffer(buf).value in _RAM_FS_MAGIC


class PMem:
    """A MAP_SHARED mapping of the whole image file."""

    observer: Callable[[str, int, int], None] | None = None   # (kind, offset, length)

    def __init__(self, path: str, *, readonly: bool = False, private: bool = False,
                 force_dax: bool | None = None):
        """`private`: a MAP_PRIVATE copy-on-write mapping of a read-only file; stores stay in
        this process (used to replay a journal for a read-only mount or a read-only fsck)."""
        self.path = path
        self.readonly = readonly or private
        flags = os.O_RDONLY if readonly or private else os.O_RDWR
        self.fd = os.open(path, flags | os.O_CLOEXEC)
        try:
            self.size = os.fstat(self.fd).st_size
            prot = mmap.PROT_READ if readonly else mmap.PROT_READ | mmap.PROT_WRITE
            self.dax = False
            self._libpmem = None
            mm = None
            if not self.readonly:
                try:
                    mm = mmap.mmap(self.fd, self.size, flags=_MAP_SHARED_VALIDATE | _MAP_SYNC,
                                   prot=prot)
                    self.dax = True
                    self._libpmem = _load_libpmem()
                except OSError:
                    mm = None
            if private:
                mm = mmap.mmap(self.fd, self.size, flags=mmap.MAP_PRIVATE,
                               prot=mmap.PROT_READ | mmap.PROT_WRITE)
            elif mm is None:
                mm = mmap.mmap(self.fd, self.size, flags=mmap.MAP_SHARED, prot=prot)
        except BaseException:
            os.close(self.fd)
            raise
        self.volatile = _on_ram_fs(self.fd)
        if force_dax is None:
            force_dax = os.environ.get("DAXFS_FORCE_DAX") == "1"
        self._flush = None
        if (self.dax or force_dax) and self._libpmem is None and not self.readonly:
            self._flush = _load_pmemflush()
            if force_dax and self._flush is not None:
                self.dax, self.volatile = True, False
        self._owns_fd = True
        self._attach(mm)
        log.debug("mapped %s (%d bytes, %s backend)", path, self.size,
                  ("DAX (" + (self._flush.method() if self._flush else "libpmem" if
                             self._libpmem else "msync") + ")") if self.dax else
                  "RAM" if self.volatile else "msync")

    @classmethod
    def over_fd(cls, path: str, fd: int, size: int, *, shared: bool) -> "PMem":
        """A mapping of `fd`, which the caller keeps owning (close() only unmaps), with no
        backend probing (fsck's): `shared`, MAP_SHARED and every persist an msync whatever
        the medium (a repair must reach the file); else a MAP_PRIVATE copy-on-write mapping
        whose stores stay in this process and whose persists do nothing (a plain check
        replays the journal into it)."""
        pm = cls.__new__(cls)
        pm.path, pm.fd, pm.size = path, fd, size
        pm.readonly = not shared
        pm.dax, pm.volatile, pm._libpmem, pm._owns_fd = False, False, None, False
        pm._flush = None
        flags = mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE
        pm._attach(mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE))
        return pm

    def _attach(self, mm: mmap.mmap) -> None:
        self.mm = mm
        self.buf = memoryview(mm)
        self.u8 = np.frombuffer(mm, dtype=np.uint8)

    @property
    def address(self) -> int:
        """Where the mapping starts in this process (for C code that reads and writes it; the
        mapping must outlive that code's use)."""
        return self.u8.ctypes.data

    @property
    def store_needs(self) -> str:
        """What makes a store durable here: "nothing" (RAM filesystem), "msync" (a file on
        disk), "flush" (cache-line write-backs of a DAX mapping), "none-allowed" (read-only)."""
        if self.readonly:
            return "none-allowed"
        if self.volatile:
            return "nothing"
        return "flush" if self.dax else "msync"

    # -- views -------------------------------------------------------------------------------
    def read(self, offset: int, length: int) -> memoryview:
        """The bytes [offset, offset+length) of the image, as a view of the mapping (zero-copy;
        read-only by convention, valid until the next store into the range)."""
        return self.buf[offset:offset + length]

    # -- stores --------------------------------------------------------------------------------
    def store(self, offset: int, data) -> None:
        n = len(data) if not isinstance(data, memoryview) else data.nbytes
        self.buf[offset:offset + n] = data
        if self.observer:
            self.observer("store", offset, n)

    def zero(self, offset: int, length: int) -> None:
        self.u8[offset:offset + length] = 0
        if self.observer:
            self.observer("store", offset, length)

    def copy(self, dst: int, src: int, length: int) -> None:
        self.u8[dst:dst + length] = self.u8[src:src + length]
        if self.observer:
            self.observer("store", dst, length)

    # -- persistence ---------------------------------------------------------------------------
    def persist(self, offset: int, length: int) -> None:
        if length <= 0 or self.readonly:
            return
        if self.observer:
            self.observer("persist", offset, length)
        if self.volatile:
            # tmpfs/ramfs: the page cache is the medium itself; msync has nothing to reach
            return
        if self._libpmem is not None:
            addr = ctypes.addressof(ctypes.c_char.from_buffer(self.mm, offset))
            self._libpmem.pmem_persist(addr, length)
            return
        if self._flush is not None:
            length = min(length, self.size - offset)
            self._flush.flush(ctypes.addressof(ctypes.c_char.from_buffer(self.mm, offset)),
                              length)
            return
        start = offset - offset % PAGE
        end = min(self.size, offset + length)
        self.mm.flush(start, end - start)

    def fence(self) -> None:
        """An ordering point: SFENCE after cache-line write-backs, else nothing but telling
        the observer (see the module docstring)."""
        if self._flush is not None and not self.readonly:
            self._flush.sfence()
        if self.observer:
            self.observer("fence", 0, 0)

    def persist_all(self) -> None:
        self.persist(0, self.size)
        self.fence()

    @property
    def prefaulting(self) -> bool:
        """The prefault thread is still mapping pages (it competes for CPU and memory)."""
        thread = getattr(self, "_prefault_thread", None)
        return thread is not None and thread.is_alive()

    def prefault(self, offset: int, length: int) -> bool:
        """Map the pages of [offset, offset+length) writable ahead of use, from a thread.

        A first store into a page of the mapping costs a fault (≈ 3.5 µs here, most of a COW
        break's copy and of a fresh sequential write); populating costs the same but off the
        request path. Only for reserved images in RAM (tmpfs): populating a sparse one would
        allocate it all, and on a disk filesystem write faults dirty every page, i.e. write
        the whole image back. ctypes drops the GIL around madvise, so requests go on
        meanwhile. Returns whether it started."""
        if self.readonly or self.dax or not self.volatile or \
                os.fstat(self.fd).st_blocks * 512 < self.size:
            return False
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        ptr = ctypes.c_char.from_buffer(self.mm, offset)
        base = ctypes.addressof(ptr)
        del ptr                                   # an export would block munmap
        end = min(self.size, offset + length)
        self._prefault_stop = threading.Event()

        def run() -> None:
            for at in range(0, end - offset, _PREFAULT_CHUNK):
                if self._prefault_stop.is_set():
                    return
                if libc.madvise(base + at, min(_PREFAULT_CHUNK, end - offset - at),
                                _MADV_POPULATE_WRITE) != 0:
                    log.debug("prefault stopped: %s", os.strerror(ctypes.get_errno()))
                    return
            log.debug("prefaulted %d bytes", end - offset)

        self._prefault_thread = threading.Thread(target=run, name="daxfs-prefault", daemon=True)
        self._prefault_thread.start()
        return True

    def close(self) -> None:
        if self.mm is not None:
            self.unmap(flush=not self.readonly)
            if self._owns_fd:
                os.close(self.fd)

    def unmap(self, flush: bool) -> None:
        thread = getattr(self, "_prefault_thread", None)
        if thread is not None:                    # never munmap under a running madvise
            self._prefault_stop.set()
            thread.join()
            self._prefault_thread = None
        if flush:
            self.mm.flush()
        self.u8 = None
        self.buf.release()
        try:
            self.mm.close()
        except BufferError:
            # a numpy view still references the map; it goes when the last view does
            log.debug("mapping still referenced at close")
        self.mm = None
