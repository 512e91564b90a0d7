"""Image fuzzer, shared pieces: constants, image file I/O (sparse writes), the in-memory PMem
the analysis side replays journals into, and the exception a case's time limit raises."""
from __future__ import annotations

import os

import numpy as np

from daxfs import format as fmt

BS = fmt.BLOCK_SIZE
ROOT = fmt.ROOT_INO
IMAGE_BYTES = 16 << 20
READ_CHUNK = 128 << 10
CASE_TIMEOUT = 60              # seconds per case before it counts as a hang
MEM_LIMIT_GB = 2               # address-space limit of a worker process
SB_LEN = fmt.SUPERBLOCK_DTYPE.itemsize
SHM = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
REGIONS = ("superblock", "journal", "inodes", "dirents", "extents", "refcounts")
S_IFMT = 0o170000


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


_CHUNK = 64 << 10


def _write(path: str, data) -> None:
    """Write an image file; all-zero 64 KiB chunks become holes (the images are mostly empty
    and this runs several times per case)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        mv = memoryview(data)
        n = len(mv)
        os.ftruncate(fd, n)
        key = n // _CHUNK
        a = np.frombuffer(mv[:key * _CHUNK], np.uint64).reshape(key, -1)
        nz = np.flatnonzero(a.any(axis=1)).tolist() + ([key] if n % _CHUNK else [])
        for c in nz:
            off = c * _CHUNK
            chunk = mv[off:off + _CHUNK]
            done = 0
            while done < len(chunk):
                done += os.pwrite(fd, chunk[done:], off + done)
    finally:
        os.close(fd)


class _MemPM:
    """Enough of PMem for daxfs.journal over a bytearray (analysis-side replay). `size` may
    exceed the buffer (only the metadata area is kept): stores past its end are dropped."""

    def __init__(self, data: bytearray, size: int | None = None):
        self.data = data
        self.buf = memoryview(data)
        self.size = len(data) if size is None else size
        self.readonly = False

    def store(self, off, data):
        n = len(data) if not isinstance(data, memoryview) else data.nbytes
        if off >= len(self.data):
            return
        self.buf[off:off + n] = bytes(data)[:len(self.data) - off]

    def persist(self, off, n):
        pass

    def fence(self):
        pass


# =============================================================================== one case
class _CaseTimeout(BaseException):
    pass
