"""Dedupe: make byte-identical blocks of two files share one frame (FIDEDUPERANGE semantics).

The kernel has no FUSE opcode for FIDEDUPERANGE, so `daxfs dedupe` (cli/dedupe.py) finds
candidate blocks itself and asks the daemon through the write-only virtual xattr
`user.daxfs.dedupe` of the destination file, whose value is JSON: a list of
[src_ino, src_offset, dst_offset, length] ranges, block-aligned. For each range the engine
compares the two files' bytes and, only where every block of a run is equal, remaps the
destination's blocks onto the source's frames (the clone path: one transaction per range,
space settled first). Compare and remap happen in one engine call, which no other request
interleaves with (nothing here awaits): a concurrent writer's bytes are either compared
or land after the remap, in a fresh COW copy; none is lost.

Setting the xattr needs write access to the destination (the kernel checks it for user.*);
the source must be readable by the caller (checked here from its mode and owner), as
FIDEDUPERANGE needs the source open for reading.
"""
from __future__ import annotations

import errno
import json
import stat
from typing import TYPE_CHECKING

import numpy as np

from . import format as fmt
from .errors import FsError
from .extents import HOLE

if TYPE_CHECKING:
    from .fs import FileSystem
    from .inodes import Inode

BS = fmt.BLOCK_SIZE
DEDUPE_XATTR = b"user.daxfs.dedupe"


def _readable(node: Inode, uid: int, gid: int) -> bool:
    if uid == 0:
        return True
    if uid == node.uid:
        return bool(node.mode & stat.S_IRUSR)
    if gid == node.gid:
        return bool(node.mode & stat.S_IRGRP)
    return bool(node.mode & stat.S_IROTH)


def parse(value: bytes) -> list[tuple[int, int, int, int]]:
    try:
        ranges = json.loads(value)
        out = [(int(a), int(b), int(c), int(d)) for a, b, c, d in ranges]
    except (ValueError, TypeError):
        raise FsError(errno.EINVAL, "dedupe request: a JSON list of "
                                    "[src_ino, src_offset, dst_offset, length]") from None
    if any(o % BS or p % BS or n % BS or n <= 0 or o < 0 or p < 0 for _i, o, p, n in out):
        raise FsError(errno.EINVAL, "dedupe ranges must be block-aligned")
    return out


def dedupe(fs: FileSystem, dst_ino: int, value: bytes, uid: int, gid: int) -> int:
    """Share every equal block of the requested ranges; returns the blocks now shared."""
    dst = fs.inodes.get(dst_ino)
    if not dst.is_reg:
        raise FsError(errno.EINVAL)
    done = 0
    ranges = parse(value)
    fs.tx.changing(dst_ino, *(r[0] for r in ranges))    # no write between compare and share
    for src_ino, so, do, n in ranges:
        src = fs.inodes.get(src_ino)
        if not src.is_reg:
            raise FsError(errno.EINVAL)
        if not _readable(src, uid, gid):
            raise FsError(errno.EACCES)
        if src is dst and so < do + n and do < so + n:
            raise FsError(errno.EINVAL)
        n = min(n, src.size - so, dst.size - do) // BS * BS     # whole blocks inside both
        for l, k in _equal_runs(fs, src, so // BS, dst, do // BS, n // BS):
            done += _share_run(fs, src, l, dst, l + (do - so) // BS, k)
    return done


def _equal_runs(fs: FileSystem, src: Inode, sl: int, dst: Inode, dl: int, n: int):
    """Runs (src block, count) of [sl, sl+n) whose bytes equal dst's at the same distance,
    both mapped, and not already the same frame."""
    if n <= 0:
        return []
    a = _block_matrix(fs, src, sl, n)
    b = _block_matrix(fs, dst, dl, n)
    equal = (a == b).all(axis=1)
    ps, pd = _frames(src, sl, n), _frames(dst, dl, n)
    equal &= (ps != HOLE) & (pd != HOLE) & (ps != pd)
    idx = np.flatnonzero(equal)
    if not idx.size:
        return []
    cut = np.flatnonzero(np.diff(idx) != 1) + 1
    starts = np.split(idx, cut)
    return [(sl + int(r[0]), int(r.size)) for r in starts]


def _block_matrix(fs: FileSystem, node: Inode, l0: int, n: int) -> np.ndarray:
    data = fs.bufcache.read(node, l0 * BS, n * BS)
    buf = np.frombuffer(bytes(data).ljust(n * BS, b"\0"), np.uint64)
    return buf.reshape(n, BS // 8)


def _frames(node: Inode, l0: int, n: int) -> np.ndarray:
    out = np.full(n, HOLE, np.int64)
    for l, k, p in node.extents.segments(l0, l0 + n):
        if p != HOLE:
            out[l - l0:l - l0 + k] = np.arange(p, p + k)
    return out


def _share_run(fs: FileSystem, src: Inode, sl: int, dst: Inode, dl: int, n: int) -> int:
    fs.bufcache.reserve(0, fs.bufcache.share_needs(src, sl, n))
    with fs.tx.open() as t:
        shared = fs.bufcache.share(t, src, sl, dst, dl, n)
        dst.touch()
        t.inode(dst)
    return shared
