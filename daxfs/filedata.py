"""File data: read, write, truncate, clone (reflink), lseek, fallocate, punch and zero.

The byte-level work (which blocks to store into, the COW break, extent remaps) is the data
path's (bufcache.py); this layer decides the shape of each operation in transactions: what
it needs in blocks and extent records (settled before the first transaction opens, so ENOSPC
never meets a half-done change), how it is cut into transactions of at most `txn_blocks`
blocks, and in which order the pieces commit so every intermediate state is a valid file.
"""
from __future__ import annotations

import errno
import os
import stat
from typing import TYPE_CHECKING

from . import format as fmt
from .errors import FsError
from .extents import HOLE
from .inodes import Inode, now_ns
from .txn import Buffer

if TYPE_CHECKING:
    from .fs import FileSystem

BS = fmt.BLOCK_SIZE
MAX_CLONE_BYTES = 1 << 30    # per call: the FUSE reply count is 32-bit; callers loop
CAPABILITY_XATTR = b"security.capability"
FALLOC_KEEP_SIZE, FALLOC_PUNCH_HOLE, FALLOC_ZERO_RANGE = 0x01, 0x02, 0x10


class FileData:
    def __init__(self, fs: FileSystem, txn_blocks: int) -> None:
        self.fs = fs
        self.pm, self.tx, self.alloc = fs.pm, fs.tx, fs.alloc
        self.inodes, self.bufcache = fs.inodes, fs.bufcache
        self.txn_blocks = txn_blocks     # bound on one transaction's blocks (tests lower it)
        # inode -> writable opens through the kernel's page cache: the kernel may hold dirty
        # pages of these files (lseek must not call their unwritten ranges holes)
        self.cached_writers: dict[int, int] = {}

    def open_file(self, ino: int, truncate: bool = False, kill_suidgid: bool = False,
                  cached_writer: bool = False) -> None:
        """An open of `ino`. `truncate`: O_TRUNC (size 0, and mtime/ctime even when it was
        empty, as Linux does), clearing setuid/setgid first if `kill_suidgid`.
        `cached_writer`: a writable open through the kernel's page cache (see lseek)."""
        node = self.inodes.get(ino)
        if truncate and node.is_reg:
            self.kill_privileges(ino, kill_suidgid)
            self.truncate(node, 0)
        node.opens += 1
        if cached_writer:
            self.cached_writers[ino] = self.cached_writers.get(ino, 0) + 1

    def release_file(self, ino: int, cached_writer: bool = False) -> None:
        if cached_writer:
            n = self.cached_writers.pop(ino, 0) - 1
            if n > 0:
                self.cached_writers[ino] = n
        node = self.inodes.cached(ino)
        if node is None:
            return
        node.opens = max(0, node.opens - 1)
        self.fs.orphans.maybe_reclaim(node)

    def kill_privileges(self, ino: int, suidgid: bool) -> bool:
        """What ext4's file_remove_privs() does before a write, for the writes whose kernel path
        leaves it to us (direct I/O): drop security.capability (whoever writes), and with
        `suidgid` (a writer without CAP_FSETID) clear setuid, and setgid if group-exec is set.
        Cheap when there is nothing to do: called before every write. True if the mode
        changed (the kernel's cached attributes are stale then)."""
        node = self.inodes.get(ino)
        kill = 0
        if suidgid and node.mode & (stat.S_ISUID | stat.S_ISGID) and node.is_reg:
            kill = node.mode & stat.S_ISUID
            if node.mode & (stat.S_ISGID | stat.S_IXGRP) == stat.S_ISGID | stat.S_IXGRP:
                kill |= stat.S_ISGID
        if ino in self.fs.xattrs.capability_inodes and CAPABILITY_XATTR in self.fs.xattrs.load(node):
            self.fs.xattrs.remove(ino, CAPABILITY_XATTR)
        if kill:
            with self.tx.open() as t:
                node.mode &= ~kill
                node.touch()
                t.inode(node)
        return bool(kill)

    def read(self, ino: int, off: int, size: int, view: bool = False) -> bytes | memoryview:
        """File bytes; `view=True` may return a zero-copy memoryview of the image (the FUSE
        reply path), valid only until the next mutating call."""
        node = self.inodes.get(ino)
        if node.is_dir:
            raise FsError(errno.EISDIR)
        return self.bufcache.read(node, off, size, view=view)

    def write(self, ino: int, off: int, data: Buffer, whole: bool = False) -> int:
        """Store `data` at `off`; returns the count stored. On a nearly full image a write
        stores the blocks that fit and returns a short count, like ext4's write(2); with
        `whole` (page-cache writeback, whose short counts the kernel ignores) it is stored
        entirely or fails with ENOSPC, never in part."""
        node = self.inodes.get(ino)
        if node.is_dir:
            raise FsError(errno.EISDIR)
        if off < 0:
            raise FsError(errno.EINVAL)
        if not len(data):
            return 0
        if fmt.blocks_for(off + len(data)) >= fmt.MAX_FILE_BLOCKS:
            raise FsError(errno.EFBIG)
        l0, l1 = off // BS, fmt.blocks_for(off + len(data))
        if l1 - l0 == 1 and off + len(data) <= node.size and self.tx.writable:
            # one block inside the file (the 4 KiB random write): one lookup, no growth
            at = node.extents.find(l0)
            if at is not None:
                if self.alloc.count(at[2]) <= 1:
                    self.bufcache.overwrite((l0, 1, at[2]), off, data)
                    node.mtime = node.ctime = now_ns()
                    self.tx.note_times(node)
                    return len(data)
                # the COW break of one block (a short count is impossible: it fits or not)
                self.bufcache.reserve(1, 2)
                with self.tx.open() as t:
                    self.bufcache.break_block(t, node, l0, at, off, memoryview(data).cast("B"))
                    node.touch(m=True)
                    t.inode(node)
                return len(data)
        segs = node.extents.segments(l0, l1)
        if len(segs) == 1 and segs[0][2] != HOLE and off + len(data) <= node.size \
                and not self.alloc.any_shared(segs[0][2], segs[0][1]) and self.tx.writable:
            # overwrite of owned blocks: no metadata but timestamps, no transaction
            self.bufcache.overwrite(segs[0], off, data)
            node.mtime = node.ctime = now_ns()
            self.tx.note_times(node)
            return len(data)
        if whole:
            self.bufcache.reserve(*self.bufcache.write_needs(node, off, off + len(data), segs))
        else:
            end = self.bufcache.fit_write(node, off, off + len(data), segs)
            if end < off + len(data):
                data, segs = memoryview(data).cast("B")[:end - off], None
        with self.tx.open() as t:
            n = self.bufcache.write(t, node, off, data, segs)
            node.touch(m=True)
            t.inode(node)
        return n

    def truncate(self, node: Inode, size: int) -> None:
        if size < 0:
            raise FsError(errno.EINVAL)
        if size // BS >= fmt.MAX_FILE_BLOCKS:
            raise FsError(errno.EFBIG)
        if size >= node.size:
            self.bufcache.reserve(*self.bufcache.grow_needs(node))
            with self.tx.open() as t:
                self.bufcache.zero_tail(t, node)
                node.size = size
                node.touch(m=True)
                t.inode(node)
            return
        keep = fmt.blocks_for(size)
        em = node.extents
        small = len(em) == 0 or em.end_block() - keep <= self.txn_blocks
        with self.tx.open() as t:
            node.size = size
            node.touch(m=True)
            if small:
                self.bufcache.punch(t, node, keep, max(keep, em.end_block()))
            else:
                node.flags |= fmt.IFLAG_TRIM
            t.inode(node)
        if not small:
            self.trim(node)

    def clone_range(self, ino_in: int, off_in: int, ino_out: int, off_out: int, length: int,
                    flags: int = 0) -> int:
        """copy_file_range: the block-aligned middle is shared (reflink), unaligned head and
        tail bytes are copied. Returns bytes done (0 at/after source EOF; may be short)."""
        if flags:
            raise FsError(errno.EINVAL)
        src, dst = self.inodes.get(ino_in), self.inodes.get(ino_out)
        if src.is_dir or dst.is_dir:
            raise FsError(errno.EISDIR)
        if not (src.is_reg and dst.is_reg) or off_in < 0 or off_out < 0:
            raise FsError(errno.EINVAL)
        length = min(length, src.size - off_in, MAX_CLONE_BYTES)
        if length <= 0:
            return 0
        if src is dst and off_in < off_out + length and off_out < off_in + length:
            raise FsError(errno.EINVAL)
        if fmt.blocks_for(off_out + length) >= fmt.MAX_FILE_BLOCKS:
            raise FsError(errno.EFBIG)
        end_in = off_in + length
        if (off_in - off_out) % BS:
            return self._copy_bytes(src, off_in, dst, off_out, length)
        # [a, b) in source bytes: the part that can be shared block for block
        a = fmt.blocks_for(off_in) * BS
        b = end_in // BS * BS
        if end_in == src.size and off_out + length >= dst.size:
            b = fmt.blocks_for(end_in) * BS     # the EOF block too: its tail is invisible in dst
        if b <= a:
            return self._copy_bytes(src, off_in, dst, off_out, length)
        # One transaction per chunk of txn_blocks: the first also copies the unaligned head,
        # the last the unaligned tail, so a clone of up to 16 MiB is atomic and a larger one
        # grows dst chunk by chunk (a crash leaves a shorter, consistent clone).
        shift = off_out - off_in
        head = self.bufcache.read(src, off_in, a - off_in) if a > off_in else b""
        tail = self.bufcache.read(src, b, end_in - b) if b < end_in else b""
        done = 0
        for c in range(a, b, self.txn_blocks * BS):
            c_end = min(b, c + self.txn_blocks * BS)
            first, last = c == a, c_end == b
            try:
                self.bufcache.reserve(*self._clone_chunk_needs(
                    src, c, c_end, dst, shift, head if first else b"", off_out,
                    tail if last else b"", b + shift, min(c_end, end_in) + shift))
            except FsError:
                if first:
                    raise                                  # ENOSPC/EMLINK, nothing changed
                break                                      # a short count: what is cloned
            with self.tx.open() as t:
                if first and head:
                    done += self.bufcache.write(t, dst, off_out, head)
                new_end = min(c_end, end_in) + shift
                if dst.size < new_end:
                    self.bufcache.zero_tail(t, dst)
                self.bufcache.share(t, src, c // BS, dst, (c + shift) // BS, (c_end - c) // BS)
                done += min(c_end, end_in) - c
                dst.size = max(dst.size, new_end)
                if last and tail:
                    done += self.bufcache.write(t, dst, b + shift, tail)
                dst.touch(m=True)
                t.inode(dst)
        self.bufcache.stats.clones += 1
        return done

    def _clone_chunk_needs(self, src: Inode, c: int, c_end: int, dst: Inode, shift: int,
                           head: bytes, head_at: int, tail: bytes, tail_at: int,
                           new_end: int) -> tuple[int, int]:
        """(blocks, extent records) one clone transaction may take: sharing source bytes
        [c, c_end) adds at most one record per mapped source segment plus one for splitting
        the destination extent around the range; the head and tail copies and the growth of
        dst are writes. EMLINK when a block's reference count is at its limit."""
        blocks, records = 0, self.bufcache.share_needs(src, c // BS, c_end // BS - c // BS)
        for data, at in ((head, head_at), (tail, tail_at)):
            if data:
                nb, nr = self.bufcache.write_needs(dst, at, at + len(data))
                blocks, records = blocks + nb, records + nr
        if new_end > dst.size:
            nb, nr = self.bufcache.grow_needs(dst)
            blocks, records = blocks + nb, records + nr
        return blocks, records

    def lseek(self, ino: int, off: int, whence: int) -> int:
        """SEEK_DATA / SEEK_HOLE. A shared block is data, never a hole."""
        node = self.inodes.get(ino)
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise FsError(errno.EINVAL)
        if off < 0 or off >= node.size:
            raise FsError(errno.ENXIO)
        if not node.has_data or ino in self.cached_writers:
            # no extent map, or the kernel may hold dirty pages we cannot see (it does not
            # write back before FUSE_LSEEK): "all data" is the answer that is always safe
            return off if whence == os.SEEK_DATA else node.size
        want_hole = whence == os.SEEK_HOLE
        for l, _n, p in node.extents.segments(off // BS, fmt.blocks_for(node.size)):
            if (p == HOLE) == want_hole:
                return min(node.size, max(off, l * BS))
        if want_hole:
            return node.size
        raise FsError(errno.ENXIO)

    def fallocate(self, ino: int, mode: int, off: int, length: int) -> None:
        node = self.inodes.get(ino)
        if off < 0 or length <= 0:
            raise FsError(errno.EINVAL)
        if node.is_dir:
            raise FsError(errno.EISDIR)
        if not node.is_reg:
            raise FsError(errno.ENODEV)
        if mode & ~(FALLOC_KEEP_SIZE | FALLOC_PUNCH_HOLE | FALLOC_ZERO_RANGE):
            raise FsError(errno.EOPNOTSUPP)
        if mode & FALLOC_PUNCH_HOLE and not mode & FALLOC_KEEP_SIZE:
            raise FsError(errno.EINVAL)
        end = off + length
        if fmt.blocks_for(end) >= fmt.MAX_FILE_BLOCKS:
            raise FsError(errno.EFBIG)
        if mode & (FALLOC_PUNCH_HOLE | FALLOC_ZERO_RANGE):
            keep = bool(mode & FALLOC_KEEP_SIZE)
            self._zero_range(node, off, min(end, node.size) if keep else end,
                             node.size if keep else max(end, node.size))
            return
        self._preallocate(node, off // BS, fmt.blocks_for(end))
        if not mode & FALLOC_KEEP_SIZE and end > node.size:
            self.truncate(node, end)
        node.touch(m=True)              # as ext4 (file_modified), even when nothing changed
        self.tx.note_times(node)

    def _zero_range(self, node: Inode, start: int, end: int, new_size: int) -> None:
        """Bytes [start, end) read as zeros afterwards and the size becomes `new_size`: whole
        blocks are unmapped (a shared one just loses this alias), the partial head and tail
        blocks get zeros written (breaking sharing). A range holding up to txn_blocks mapped
        blocks is one transaction, so a crash shows all of it or none; a larger one is
        punched from the top down, one transaction per chunk, the tail in the first and the
        head in the last. The work follows the mapped extents, not the byte range: punching
        a terabyte of holes is one small transaction."""
        if end <= start:
            if new_size != node.size:
                self.truncate(node, new_size)
            return
        a, b = fmt.blocks_for(start) * BS, end // BS * BS
        if b < a:                                    # inside one block
            pieces = [(start, end)]
        else:
            pieces = [(start, a)] if start < a else []
            pieces += [(b, end)] if b < end else []
        # zeros are written only over mapped bytes below EOF: holes and bytes past EOF read
        # as zeros already (zero_tail clears the old EOF block when the size grows)
        pieces = [(lo, min(hi, node.size)) for lo, hi in pieces
                  if lo < node.size and node.extents.lookup(lo // BS) != HOLE]
        chunks = self._punch_chunks(node, a // BS, max(a, b) // BS)
        blocks, records = 0, len(chunks)             # a punch splits at most one extent
        for p0, p1 in pieces:
            nb, nr = self.bufcache.write_needs(node, p0, p1)
            blocks, records = blocks + nb, records + nr
        if new_size > node.size:
            nb, nr = self.bufcache.grow_needs(node)
            blocks, records = blocks + nb, records + nr
        self.bufcache.reserve(blocks, records)
        for i, (lo, hi) in enumerate(chunks):
            first, last = i == 0, i == len(chunks) - 1
            with self.tx.open() as t:
                for p0, p1 in pieces:
                    if (first and p0 >= b) or (last and p1 <= a) or (first and last):
                        self.bufcache.write(t, node, p0, bytes(p1 - p0))
                self.bufcache.punch(t, node, lo, hi)
                if last and new_size != node.size:
                    if new_size > node.size:
                        self.bufcache.zero_tail(t, node)
                    node.size = new_size
                node.touch(m=True)
                t.inode(node)

    def _punch_chunks(self, node: Inode, la: int, lb: int) -> list[tuple[int, int]]:
        """Block ranges covering [la, lb) from the top down, each holding at most txn_blocks
        mapped blocks (holes cost nothing); always at least one, the last starting at la."""
        chunks: list[tuple[int, int]] = []
        hi, count = lb, 0
        runs = [(l, n) for l, n, p in node.extents.segments(la, lb) if p != HOLE] \
            if lb > la and node.has_data else []
        for l, n in reversed(runs):
            e = l + n
            while e > l:
                take = min(e - l, self.txn_blocks - count)
                e, count = e - take, count + take
                if count == self.txn_blocks:
                    chunks.append((e, hi))
                    hi, count = e, 0
        if count or not chunks:
            chunks.append((la, hi))
        else:
            chunks[-1] = (la, chunks[-1][1])
        return chunks

    def _preallocate(self, node: Inode, l0: int, l1: int) -> None:
        """Map every hole in [l0, l1) to fresh zeroed blocks, one transaction per txn_blocks.
        ENOSPC before the first changes nothing; a later chunk that cannot get its extent
        records stops there (what is preallocated stays, like ext4's)."""
        holes = [(l, n) for l, n, p in node.extents.segments(l0, l1) if p == HOLE]
        if not self.alloc.room(sum(n for _l, n in holes)):
            raise FsError(errno.ENOSPC)
        for l, n in holes:
            for c in range(l, l + n, self.txn_blocks):
                k = min(self.txn_blocks, l + n - c)
                runs = self.alloc.plan(k, node.extents.goal(c), home=node.ino)
                self.bufcache.reserve(k, 2 * len(runs))
                with self.tx.open() as t:
                    for q, m in self.alloc.take(runs):
                        self.pm.zero(q * BS, m * BS)
                        t.persist_data(q * BS, m * BS)
                        self.bufcache.remap(t, node, c, m, q)
                        c += m
                    node.touch()

    def _copy_bytes(self, src: Inode, off_in: int, dst: Inode, off_out: int, length: int) -> int:
        """Copy in 1 MiB writes; a later one that meets ENOSPC ends the call with a short
        count (what was copied), the first one's error is the caller's."""
        done = 0
        while done < length:
            n = min(length - done, 1 << 20)
            data = self.bufcache.read(src, off_in + done, n)
            if not data:
                break
            try:
                done += self.write(dst.ino, off_out + done, data)
            except FsError:
                if not done:
                    raise
                break
        return done

    def punch_chunked(self, node: Inode, from_blk: int) -> None:
        """Unmap every block at or past `from_blk`, at most self.txn_blocks blocks per transaction,
        from the end backwards so each intermediate state is a valid shorter file."""
        if not node.has_data:
            return
        em = node.extents
        while len(em) and em.end_block() > from_blk:
            hi = em.end_block()
            lo = max(from_blk, hi - self.txn_blocks)
            with self.tx.open() as t:
                self.bufcache.punch(t, node, lo, hi)

    def trim(self, node: Inode) -> None:
        self.punch_chunked(node, fmt.blocks_for(node.size))
        with self.tx.open() as t:
            node.flags &= ~fmt.IFLAG_TRIM
            t.inode(node)
