"""The one canonical on-image layout of daxfs (format version 1).

Everything daxfs keeps lives in one image file, addressed in 4 KiB blocks:

    block 0                 superblock (SUPERBLOCK_DTYPE), immutable but for `clean`/`mount_count`
    journal_start           journal header block (JOURNAL_HEADER_DTYPE; COW_APPLIED_OFF), then
                            the redo log, then the COW intent ring (Geometry.cow_ring)
    inode_start             inode table: inode_count records of INODE_DTYPE; index == inode number
    dirent_start            directory entry table: dirent_count records of DIRENT_DTYPE
    extent_start            extent table: extent_count records of EXTENT_DTYPE
    refcount_start          refcount table: one uint32 per block of the WHOLE image
    data_start .. nblocks   data blocks (file data, symlink targets, xattr blocks)

Every region's place derives from the superblock; nothing else is hard-coded but block 0.
The tables are updated only by replaying journal records (see journal.py), so after any crash
the image equals "tables as of the last checkpoint + every committed transaction since".

This module is the one place that spells a layout: each record's numpy dtype (whole-table
views) and its encode/decode for single records (`pack_inode`, `pack_dirent`, `pack_extent`,
the struct formats derived from the dtypes), the xattr block and the journal's records, and
the superblock's read, checksum and store. Every other module goes through these helpers.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import stat
import struct
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
# A regular file's size as stored is below this (the engine never grows one to MAX_FILE_BLOCKS;
# a larger one is corrupt). A bound on size, not on blocks: 2**52 bytes = MAX_FILE_BLOCKS << 12.
MAX_FILE_BYTES = MAX_FILE_BLOCKS << BLOCK_SHIFT
assert BLOCK_SIZE == 1 << BLOCK_SHIFT and MAX_FILE_BYTES == 1 << 52

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

# Not on the image: how the daemon hands a file's mapped runs to the C data plane
# (struct run in daxfs/_dataplane.c); `owned`: every block has reference count 1
PLANE_RUN_DTYPE = np.dtype([("lblk", "<u8"), ("pblk", "<u8"), ("n", "<u4"), ("owned", "<u4")])
assert PLANE_RUN_DTYPE.itemsize == 24

REFCOUNT_DTYPE = np.dtype("<u4")  # the refcount table: one per block of the image

# The tables' record types, by region name (Geometry.region / Geometry.table).
TABLE_DTYPES = {"inodes": INODE_DTYPE, "dirents": DIRENT_DTYPE, "extents": EXTENT_DTYPE,
                "refcounts": REFCOUNT_DTYPE}


# ------------------------------------------------------------------------------ record codecs
def _struct_of(dtype: np.dtype) -> struct.Struct:
    """The struct format of one packed little-endian record of `dtype` (so the layout is
    spelled once, by the dtype)."""
    spec = "<"
    for name in dtype.names:
        ft = dtype.fields[name][0]
        if ft.kind == "S":
            spec += f"{ft.itemsize}s"
        elif ft.kind == "V":
            spec += f"{ft.itemsize}x"
        else:
            spec += {("u", 1): "B", ("u", 2): "H", ("u", 4): "I", ("u", 8): "Q",
                    ("i", 8): "q"}[ft.kind, ft.itemsize]
    st = struct.Struct(spec)
    assert st.size == dtype.itemsize, dtype
    return st


_INODE_REC = _struct_of(INODE_DTYPE)
_DIRENT_REC = _struct_of(DIRENT_DTYPE)
_EXTENT_REC = _struct_of(EXTENT_DTYPE)

# The fields of an inode record that carry state (all but `reserved`), in record order: what
# `pack_inode` takes and `unpack_inode` gives.
INODE_FIELDS = INODE_DTYPE.names[:-1]
assert INODE_DTYPE.names[-1] == "reserved"


def pack_inode(mode: int, uid: int, gid: int, nlink: int, size: int, atime: int, mtime: int,
               ctime: int, btime: int, generation: int, flags: int, xattr_blk: int,
               rdev: int) -> bytes:
    """One inode record (the INODE_FIELDS in order; `reserved` zero)."""
    return _INODE_REC.pack(mode, uid, gid, nlink, size, atime, mtime, ctime, btime, generation,
                           flags, xattr_blk, rdev)


def unpack_inode(rec: np.void) -> tuple:
    """The INODE_FIELDS of a record of an INODE_DTYPE view, as Python ints."""
    return rec.item()[:len(INODE_FIELDS)]


def free_inode_record(generation: int) -> bytes:
    """A free inode slot: all zero but the generation, which the next user bumps."""
    return pack_inode(0, 0, 0, 0, 0, 0, 0, 0, 0, generation, 0, 0, 0)


def pack_dirent(parent: int, ino: int, name: bytes) -> bytes:
    return _DIRENT_REC.pack(parent, ino, len(name), name)


def pack_extent(ino: int, lblk: int, pblk: int, length: int) -> bytes:
    return _EXTENT_REC.pack(ino, length, lblk, pblk)


FREE_DIRENT = bytes(DIRENT_DTYPE.itemsize)
FREE_EXTENT = bytes(EXTENT_DTYPE.itemsize)

# ------------------------------------------------------------------------------ xattr block
# An xattr block (one per inode that has xattrs, a whole data block): u16 count, then `count`
# entries packed one after another: u8 name_len (>= 1), u16 value_len, name, value; the rest
# of the block is zero.
XATTR_COUNT = struct.Struct("<H")
XATTR_ENTRY = struct.Struct("<BH")          # name_len, value_len
XATTR_MIN_ENTRY = XATTR_ENTRY.size + 1      # an entry's smallest size (1-byte name, no value)


def xattr_block_bytes(attrs: dict[bytes, bytes]) -> int:
    """Bytes the xattr block holding `attrs` fills (fits iff <= BLOCK_SIZE)."""
    return XATTR_COUNT.size + sum(XATTR_ENTRY.size + len(k) + len(v) for k, v in attrs.items())


def pack_xattrs(attrs: dict[bytes, bytes]) -> bytes:
    """The xattr block holding `attrs`; ValueError unless they fit (xattr_block_bytes)."""
    if xattr_block_bytes(attrs) > BLOCK_SIZE:
        raise ValueError("xattrs exceed one block")
    out = bytearray(XATTR_COUNT.pack(len(attrs)))
    for name, value in attrs.items():
        out += XATTR_ENTRY.pack(len(name), len(value)) + name + value
    return bytes(out) + bytes(BLOCK_SIZE - len(out))


def unpack_xattrs(block: bytes) -> dict[bytes, bytes]:
    """Parse an xattr block; ValueError on a malformed one."""
    (count,) = XATTR_COUNT.unpack_from(block, 0)
    out: dict[bytes, bytes] = {}
    p = XATTR_COUNT.size
    for _ in range(count):
        if p + XATTR_ENTRY.size > len(block):
            raise ValueError("xattr block truncated")
        nlen, vlen = XATTR_ENTRY.unpack_from(block, p)
        p += XATTR_ENTRY.size
        if nlen == 0 or p + nlen + vlen > len(block):
            raise ValueError("xattr entry out of bounds")
        out[bytes(block[p:p + nlen])] = bytes(block[p + nlen:p + nlen + vlen])
        p += nlen + vlen
    return out


# ------------------------------------------------------------------------------ journal
# The journal header block starts with JOURNAL_HEADER_DTYPE; the log follows it (journal.py
# explains the protocol). A transaction in the log:
#     TXN_HEADER  magic TXN_MAGIC, nrec, body_len, crc32 (txn_crc), epoch, seq (32 bytes)
#     body        nrec records: TXN_RECORD (offset u64, length u32, pad u32), then the data
#                 padded to 8 bytes
#     commit word u64 == commit_word(epoch, seq), 8-byte aligned, after the body
JOURNAL_EPOCH_OFF = JOURNAL_HEADER_DTYPE.fields["epoch"][1]
TXN_MAGIC = 0x31545844  # 'DXT1'
TXN_HEADER = struct.Struct("<IIIIQQ")
TXN_RECORD = struct.Struct("<QII")
_TXN_CRC_FIELDS = struct.Struct("<IQQ")     # nrec, epoch, seq: what the crc covers before the body


def pack_journal_header(epoch: int) -> bytes:
    h = np.zeros(1, JOURNAL_HEADER_DTYPE)
    h["magic"] = JOURNAL_MAGIC
    h["epoch"] = epoch
    return h.tobytes()


def unpack_journal_header(raw: bytes) -> tuple[bool, int]:
    """(magic ok, epoch) of a journal header block's first bytes."""
    h = np.frombuffer(raw, JOURNAL_HEADER_DTYPE, 1)[0]
    return bytes(h["magic"]) == JOURNAL_MAGIC, int(h["epoch"])


# ------------------------------------------------------------------------------ COW intent ring
# The journal region's last blocks hold a ring of COW_RECORD_DTYPE records that the C data
# plane writes when it breaks a block's sharing itself (_cowplane.c; cowlog.py applies them):
# "inode `ino` now maps file block `lblk` to `new_pblk`, not the shared `old_pblk`". Record
# `seq` lives in slot seq % slots and counts if magic and check match and seq >= the applied
# number (u64 at COW_APPLIED_OFF of the journal header block, changed only by journal
# transactions). Old log bytes there (images from before the ring) never match.
COW_MAGIC = int.from_bytes(b"DAXCOW01", "little")
COW_RECORD_DTYPE = np.dtype([(name, "<u8") for name in (
    "magic", "seq", "ino", "lblk", "new_pblk", "old_pblk", "mtime", "check")])
assert COW_RECORD_DTYPE.itemsize == 64
COW_APPLIED_OFF = 64            # in the journal header block, after JOURNAL_HEADER_DTYPE
assert JOURNAL_HEADER_DTYPE.itemsize <= COW_APPLIED_OFF
COW_RING_MAX_BLOCKS = 256       # 16384 records (1 MiB); at most an eighth of the journal


def cow_check(words) -> int:
    """A COW record's check word over its first seven words (the same in C)."""
    h = 0x9E3779B97F4A7C15
    for w in words:
        h = ((h ^ int(w)) * 0xFF51AFD7ED558CCD) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 33
    return h


def pack_cow_record(seq: int, ino: int, lblk: int, new_pblk: int, old_pblk: int,
                    mtime: int) -> bytes:
    """One ring record as the C data plane stores it (tests write them the same way)."""
    words = [COW_MAGIC, seq, ino, lblk, new_pblk, old_pblk, mtime]
    return struct.pack("<8Q", *words, cow_check(words))


def valid_cow_records(ring: np.ndarray, applied: int) -> np.ndarray:
    """The records of a ring (a COW_RECORD_DTYPE array) that count, in seq order."""
    cand = ring[(ring["magic"] == COW_MAGIC) & (ring["seq"] >= applied)]
    ok = [i for i, r in enumerate(cand) if cow_check(r.tolist()[:7]) == int(r["check"])]
    return np.sort(cand[ok], order="seq")


def commit_word(epoch: int, seq: int) -> int:
    return ((epoch * 0x9E3779B97F4A7C15) ^ (seq * 0xC2B2AE3D27D4EB4F) ^ 0xDA7F5C0117) & \
        0xFFFFFFFFFFFFFFFF | 1


def txn_crc(nrec: int, epoch: int, seq: int, body: bytes) -> int:
    """crc32 over the header fields and the body: a damaged record count is a torn tail."""
    return zlib.crc32(body, zlib.crc32(_TXN_CRC_FIELDS.pack(nrec, epoch, seq)))


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
        pos += blocks_for(nblocks * REFCOUNT_DTYPE.itemsize)
        if nblocks - pos < 64:
            raise FormatError(f"image size {size_bytes} leaves no room for data")
        return cls(nblocks, journal_start, journal_blocks, inode_start, inode_count, dirent_start,
                   dirent_count, extent_start, extent_count, refcount_start, pos)

    @property
    def cow_ring_blocks(self) -> int:
        return min(COW_RING_MAX_BLOCKS, self.journal_blocks // 8)

    def cow_ring(self) -> tuple[int, int]:
        """(byte offset, slots) of the COW intent ring: the journal region's last blocks."""
        n = self.cow_ring_blocks
        start = self.journal_start + self.journal_blocks - n
        return start * BLOCK_SIZE, n * BLOCK_SIZE // COW_RECORD_DTYPE.itemsize

    @property
    def cow_applied_offset(self) -> int:
        return self.journal_start * BLOCK_SIZE + COW_APPLIED_OFF

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
            "refcounts": (g.refcount_start, g.nblocks * REFCOUNT_DTYPE.itemsize),
        }
        start, length = table[name]
        return start * BLOCK_SIZE, length

    def record_offset(self, name: str, index: int) -> int:
        """Byte offset in the image of record `index` of table `name` (TABLE_DTYPES)."""
        base, size = self._records[name]
        return base + index * size

    @functools.cached_property
    def _records(self) -> dict[str, tuple[int, int]]:
        """(byte offset, record size) of each table: record_offset runs for every record a
        transaction writes, so the region table is not rebuilt per call."""
        return {name: (self.region(name)[0], TABLE_DTYPES[name].itemsize)
                for name in TABLE_DTYPES}

    def table(self, buf, name: str) -> np.ndarray:
        """A numpy view of table `name` (TABLE_DTYPES) in `buf`, the mapped image."""
        off, length = self.region(name)
        dtype = TABLE_DTYPES[name]
        return np.frombuffer(buf, dtype, length // dtype.itemsize, off)


def blocks_for(nbytes: int) -> int:
    """Blocks needed to hold `nbytes` bytes (ceiling division; also: the file blocks that
    bytes [0, nbytes) touch, i.e. one past the block of byte nbytes - 1)."""
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
    seal_superblock(sb)
    return sb


def seal_superblock(sb: np.void) -> bytes:
    """The superblock's bytes with its checksum brought up to date (stored into `sb` too)."""
    sb["checksum"] = superblock_checksum(sb)
    return sb.tobytes()


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


def read_superblock(path_or_fd: str | int) -> tuple[np.void, Geometry]:
    """Read and validate block 0 of an image (a path, or an open fd, which stays open):
    (a writable copy of the superblock, its geometry). OSError when the file cannot be opened
    or read, FormatError (one-line reason) when it is not a usable daxfs image."""
    if isinstance(path_or_fd, int):
        return _read_superblock_fd(path_or_fd)
    fd = os.open(path_or_fd, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _read_superblock_fd(fd)
    finally:
        os.close(fd)


def _read_superblock_fd(fd: int) -> tuple[np.void, Geometry]:
    size = os.fstat(fd).st_size
    sb, g = parse_superblock(os.pread(fd, BLOCK_SIZE, 0), size)
    return sb.copy(), g


def store_superblock(target, sb: np.void) -> None:
    """Seal `sb` (checksum) and write it to block 0 of `target`: an fd (os.pwrite; the caller
    syncs), or a mapping with PMem's store / persist / fence, where it is durable on return."""
    raw = seal_superblock(sb)
    if isinstance(target, int):
        os.pwrite(target, raw, 0)
        return
    target.store(0, raw)
    target.persist(0, len(raw))
    target.fence()


def has_magic(path: str) -> bool:
    """Whether the file at `path` starts like a daxfs image (OSError if it cannot be read)."""
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


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
