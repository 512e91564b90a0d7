"""The one canonical on-image layout of daxfs (format version 1).

Everything daxfs keeps lives in one image file, addressed in 4 KiB blocks:

    block 0                 superblock (SUPERBLOCK_DTYPE), immutable but for `clean`/`mount_count`
    journal_start           journal header block (JOURNAL_HEADER_DTYPE), then the redo log
    inode_start             inode table: inode_count records of INODE_DTYPE; index == inode number
    dirent_start            directory entry table: dirent_count records of DIRENT_DTYPE
    extent_start            extent table: extent_count records of EXTENT_DTYPE
    refcount_start          refcount table: one uint32 per block of the WHOLE image
    data_start .. nblocks   data blocks (file data, symlink targets, xattr blocks)

Every region's place derives from the superblock; nothing else is hard-coded but block 0.
The tables are updated only by replaying journal records (see journal.py), so after any crash
the image equals "tables as of the last checkpoint + every committed transaction since".
"""
from __future__ import annotations

import dataclasses
import os
import stat
import zlib
from collections.abc import Callable

import numpy as np

BLOCK_SIZE = 4096
BLOCK_SHIFT = 12
MAGIC = b"DAXFSIMG"
VERSION = 1
MIN_IMAGE_BYTES = 8 << 20
MAX_NAME = 255
ROOT_INO = 1            # FUSE's root inode number; inode 0 is never used
REFCOUNT_RESERVED = 0xFFFFFFFF   # refcount of metadata blocks: never allocatable
MAX_REFCOUNT = 0xFFFFFFF0        # clone refuses (EMLINK-like) beyond this
MAX_FILE_BLOCKS = 1 << 40        # file blocks [0, 2**40) are addressable (4 PiB); EFBIG past it,
                                 #   and an extent reaching past it is corrupt

SUPERBLOCK_DTYPE = np.dtype([
    ("magic", "S8"),            # == MAGIC
    ("version", "<u4"),         # == VERSION; a newer version is refused at mount
    ("block_size", "<u4"),      # == BLOCK_SIZE
    ("nblocks", "<u8"),         # image size in blocks; the file is exactly nblocks*BLOCK_SIZE bytes
    ("journal_start", "<u8"),   # all *_start are block numbers, strictly increasing in this order
    ("journal_blocks", "<u8"),  # >= 2: header block + log
    ("inode_start", "<u8"),
    ("inode_count", "<u8"),     # inode numbers are 1 .. inode_count-1
    ("dirent_start", "<u8"),
    ("dirent_count", "<u8"),
    ("extent_start", "<u8"),
    ("extent_count", "<u8"),
    ("refcount_start", "<u8"),  # nblocks uint32 entries
    ("data_start", "<u8"),      # first allocatable block; blocks below have REFCOUNT_RESERVED
    ("uuid", "S16"),
    ("created_ns", "<i8"),
    ("clean", "<u4"),           # 1 after a clean unmount, 0 while mounted (journal may hold work)
    ("mount_count", "<u4"),
    ("checksum", "<u4"),        # crc32 of all bytes before this field
])

JOURNAL_HEADER_DTYPE = np.dtype([
    ("magic", "S8"),            # == b"DAXJRNL1"
    ("epoch", "<u8"),           # 8-byte aligned, written atomically: only transactions stamped with
                                # this epoch are replayed; a checkpoint bumps it
])
JOURNAL_MAGIC = b"DAXJRNL1"

# The file-type bits of a mode (stat.S_IFMT as a constant, for numpy masks of whole tables)
S_IFMT_BITS = 0o170000
assert stat.S_IFMT(0o177777) == S_IFMT_BITS

# Inode flags
IFLAG_ORPHAN = 1        # nlink reached 0 while the file was open: reclaim at next mount
IFLAG_TRIM = 2          # blocks past EOF are being freed in steps: finish at next mount

INODE_DTYPE = np.dtype([
    ("mode", "<u4"),        # 0 == free slot; else S_IFMT type bits + permissions
    ("uid", "<u4"),
    ("gid", "<u4"),
    ("nlink", "<u4"),       # == number of dirents naming it (+1 per subdirectory '..' for dirs
                            #    + 1 for its own '.'), 0 only with IFLAG_ORPHAN
    ("size", "<u8"),        # bytes; blocks wholly past ceil(size/BLOCK) are mapped only for a regular
                            #    file (zero-filled fallocate KEEP_SIZE preallocation) or with IFLAG_TRIM
    ("atime", "<i8"),       # ns since the epoch
    ("mtime", "<i8"),
    ("ctime", "<i8"),
    ("btime", "<i8"),
    ("generation", "<u4"),  # bumped each time the slot is reused (NFS-style handle safety)
    ("flags", "<u4"),       # IFLAG_*
    ("xattr_blk", "<u8"),   # 0 or a data block holding the xattrs (XATTR layout below), refcount 1
    ("rdev", "<u8"),        # device number for block/char nodes
    ("reserved", "V48"),
])
assert INODE_DTYPE.itemsize == 128

DIRENT_DTYPE = np.dtype([
    ("parent", "<u4"),      # 0 == free slot; else inode number of a directory
    ("ino", "<u4"),         # the named inode (valid, mode != 0)
    ("namelen", "u1"),      # 1..255; name bytes hold no b'/' and no NUL
    ("name", "S255"),       # unique per parent
])
assert DIRENT_DTYPE.itemsize == 264

EXTENT_DTYPE = np.dtype([
    ("ino", "<u4"),         # 0 == free slot; else owner inode (regular file or symlink)
    ("length", "<u4"),      # blocks, >= 1
    ("lblk", "<u8"),        # first file block; extents of one inode never overlap
    ("pblk", "<u8"),        # first physical block; [pblk, pblk+length) within the data region
])
assert EXTENT_DTYPE.itemsize == 24

# An xattr block: u16 count, then per entry u8 name_len, u16 value_len, name, value.
XATTR_MAX_BYTES = BLOCK_SIZE - 2


class FormatError(Exception):
    """The image is not a daxfs image this code can use; str() is a one-line reason."""


@dataclasses.dataclass(frozen=True)
class Geometry:
    nblocks: int
    journal_start: int
    journal_blocks: int
    inode_start: int
    inode_count: int
    dirent_start: int
    dirent_count: int
    extent_start: int
    extent_count: int
    refcount_start: int
    data_start: int

    @classmethod
    def for_size(cls, size_bytes: int, inode_count: int | None = None,
                 extent_count: int | None = None) -> "Geometry":
        nblocks = size_bytes // BLOCK_SIZE
        if nblocks * BLOCK_SIZE < MIN_IMAGE_BYTES:
            raise FormatError(f"image size {size_bytes} is below the minimum of {MIN_IMAGE_BYTES} bytes")
        journal_blocks = int(min(max(nblocks // 128, 256), 16384))
        if inode_count is None:
            inode_count = max(nblocks // 4, 256)    # one inode per 16 KiB
        dirent_count = inode_count
        if extent_count is None:
            extent_count = nblocks                   # every block its own extent; reflinks of
                                                     # fragmented files can need more (--extents)
        pos = 1
        journal_start = pos
        pos += journal_blocks
        inode_start = pos
        pos += blocks_for(inode_count * INODE_DTYPE.itemsize)
        dirent_start = pos
        pos += blocks_for(dirent_count * DIRENT_DTYPE.itemsize)
        extent_start = pos
        pos += blocks_for(extent_count * EXTENT_DTYPE.itemsize)
        refcount_start = pos
        pos += blocks_for(nblocks * 4)
        if nblocks - pos < 64:
            raise FormatError(f"image size {size_bytes} leaves no room for data")
        return cls(nblocks, journal_start, journal_blocks, inode_start, inode_count, dirent_start,
                   dirent_count, extent_start, extent_count, refcount_start, pos)

    @property
    def data_blocks(self) -> int:
        return self.nblocks - self.data_start

    # byte offsets of the tables in the image
    def region(self, name: str) -> tuple[int, int]:
        """(byte offset, byte length) of a named region."""
        g = self
        table = {
            "journal": (g.journal_start, g.journal_blocks * BLOCK_SIZE),
            "inodes": (g.inode_start, g.inode_count * INODE_DTYPE.itemsize),
            "dirents": (g.dirent_start, g.dirent_count * DIRENT_DTYPE.itemsize),
            "extents": (g.extent_start, g.extent_count * EXTENT_DTYPE.itemsize),
            "refcounts": (g.refcount_start, g.nblocks * 4),
        }
        start, length = table[name]
        return start * BLOCK_SIZE, length


def blocks_for(nbytes: int) -> int:
    return -(-nbytes // BLOCK_SIZE)


def superblock_checksum(sb: np.ndarray) -> int:
    raw = sb.tobytes()
    return zlib.crc32(raw[:SUPERBLOCK_DTYPE.fields["checksum"][1]])


def make_superblock(g: Geometry, uuid: bytes, created_ns: int) -> np.ndarray:
    sb = np.zeros(1, SUPERBLOCK_DTYPE)[0]
    sb["magic"] = MAGIC
    sb["version"] = VERSION
    sb["block_size"] = BLOCK_SIZE
    for f in dataclasses.fields(g):
        sb[f.name] = getattr(g, f.name)
    sb["uuid"] = uuid
    sb["created_ns"] = created_ns
    sb["clean"] = 1
    sb["checksum"] = superblock_checksum(sb)
    return sb


def parse_superblock(raw: bytes, file_size: int) -> tuple[np.void, Geometry]:
    """Validate block 0 against the file; FormatError with a one-line reason if unusable."""
    if len(raw) < SUPERBLOCK_DTYPE.itemsize or raw[:8] != MAGIC:
        raise FormatError("not a daxfs image (bad magic)")
    sb = np.frombuffer(raw[:SUPERBLOCK_DTYPE.itemsize], SUPERBLOCK_DTYPE)[0]
    if int(sb["version"]) > VERSION:
        raise FormatError(f"image format version {int(sb['version'])} is newer than this daxfs "
                          f"supports ({VERSION})")
    if int(sb["version"]) != VERSION:
        raise FormatError(f"unsupported image format version {int(sb['version'])}")
    if superblock_checksum(sb) != int(sb["checksum"]):
        raise FormatError("superblock checksum mismatch (image corrupt)")
    if int(sb["block_size"]) != BLOCK_SIZE:
        raise FormatError(f"unsupported block size {int(sb['block_size'])}")
    g = Geometry(**{f.name: int(sb[f.name]) for f in dataclasses.fields(Geometry)})
    if g.nblocks * BLOCK_SIZE > file_size:
        raise FormatError(f"image truncated: {file_size} bytes, superblock says "
                          f"{g.nblocks * BLOCK_SIZE}")
    try:
        expect = Geometry.for_size(g.nblocks * BLOCK_SIZE, g.inode_count, g.extent_count)
    except FormatError as e:
        raise FormatError(f"superblock geometry invalid: {e}") from None
    if expect != g:
        raise FormatError("superblock geometry inconsistent (image corrupt)")
    return sb, g


def open_regular(path: str, flags: int, *, open_error: Callable[[OSError], Exception],
                 not_regular: Exception, mode: int = 0o644) -> tuple[int, os.stat_result]:
    """Open an image file: (fd, fstat) of `path` opened with `flags | O_CLOEXEC`; the caller
    closes the fd. The caller's own errors: `open_error(e)` is raised when os.open fails,
    `not_regular` (fd closed) when `path` is not a regular file."""
    try:
        fd = os.open(path, flags | os.O_CLOEXEC, mode)
    except OSError as e:
        raise open_error(e) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise not_regular
    except BaseException:
        os.close(fd)
        raise
    return fd, st
