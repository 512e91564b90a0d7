"""The data path: primary frames, alias descriptors, and the COW break.

Physical block b's *primary frame* is its 4 KiB in the mapped image (at byte b << BLOCK_SHIFT),
with its reference count in the allocator. Each inode that maps b holds an *alias descriptor* in
its extent map: (inode, file index) -> b. Many aliases may point at one frame, at different
file indexes (the design's W/X/Y/Z example), and reads go straight from the frame.

A write never changes a frame that another alias can see. Writing to a shared frame breaks
the sharing, as a staged operation in XFS order:
  1. allocate a new block,               (refcount 0 -> 1, in the open transaction)
  2. copy the old frame's bytes the write does not cover,
  3. apply the write to the new block, persist it,
  4. remap this inode's alias to the new block, drop one reference from the old frame,
  5. commit: the new data is durable before the remap is, so a crash shows old or new state.
Writes into holes follow the same path with zero-fill instead of the copy.
"""
from __future__ import annotations

import errno
from collections.abc import Callable

import numpy as np

from . import format as fmt
from .alloc import BlockAllocator, runs_of
from .errors import FsError
from .extents import HOLE, LEAF, Leaf, _fastmaps
from .frames import FrameIndex
from .inodes import Inode, InodeTable
from .pmem import PMem
from .txn import Buffer, Transaction

BS = fmt.BLOCK_SIZE
SHIFT = fmt.BLOCK_SHIFT
Segments = list[tuple[int, int, int]]    # ExtentMap.segments(): (lblk, count, pblk or HOLE)


class Stats:
    """Counters for `daxfs stat`: cumulative since the image was mounted."""

    def __init__(self) -> None:
        self.cow_breaks = 0       # blocks copied because they were shared
        self.clones = 0           # copy_file_range calls that shared blocks (counted in fs.py)
        self.cloned_blocks = 0


class BufCache:
    def __init__(self, pm: PMem, alloc: BlockAllocator, inodes: InodeTable,
                 frames: FrameIndex) -> None:
        self.pm = pm
        self.alloc = alloc
        self.inodes = inodes
        self.frames = frames        # shared blocks -> aliases; changed in step with the maps
        self.stats = Stats()
        self.reclaim_pool: Callable[[], bool] | None = None   # DataPlane.reclaim (extent_room)

    # -- read --------------------------------------------------------------------------------------
    def read(self, node: Inode, off: int, size: int, *, view: bool = False) -> bytes | memoryview:
        """Bytes [off, off+size) clipped to EOF. With `view`, a range inside one extent comes
        back as a memoryview of the frame itself (zero-copy: pyfuse3 replies from any buffer);
        the caller must drop it before the next request can change the mapping."""
        end = min(off + size, node.size)
        if off >= end:
            return b""
        l0, l1 = off >> SHIFT, fmt.blocks_for(end)
        segs = node.extents.segments(l0, l1)
        read = self.pm.read
        if len(segs) == 1 and segs[0][2] != HOLE:
            a = (segs[0][2] << SHIFT) + (off - (l0 << SHIFT))
            return read(a, end - off) if view else read(a, end - off).tobytes()
        parts = []
        for l, n, p in segs:
            fa, fb = max(off, l << SHIFT), min(end, (l + n) << SHIFT)
            if p == HOLE:
                parts.append(bytes(fb - fa))
            else:
                a = (p << SHIFT) + (fa - (l << SHIFT))
                parts.append(read(a, fb - fa))
        return b"".join(parts)

    def owned_runs(self, node: Inode) -> np.ndarray:
        """node's mapped runs (fmt.PLANE_RUN_DTYPE) in file order, cut where blocks start or
        stop being shared, each marked owned when its blocks have one reference: what the
        data plane may read, and overwrite in place where owned."""
        leaves = node.extents.leaves
        out = np.empty(0, fmt.PLANE_RUN_DTYPE)
        if not leaves:
            return out
        lb = np.concatenate([leaf.lblk for leaf in leaves])
        pb = np.concatenate([leaf.pblk for leaf in leaves])
        ln = np.concatenate([leaf.length for leaf in leaves]).astype(np.int64)
        if self.alloc.shared == 0:          # nothing on the image is shared: one pass
            out = np.empty(lb.size, fmt.PLANE_RUN_DTYPE)
            out["lblk"], out["pblk"], out["n"], out["owned"] = lb, pb, ln, 1
            return out
        # per block: file block, physical block, shared?; then cut where a run starts or
        # the shared flag flips
        offs = np.cumsum(ln) - ln
        step = np.arange(int(ln.sum()), dtype=np.int64) - np.repeat(offs, ln)
        fb = np.repeat(lb, ln) + step
        pbk = np.repeat(pb, ln) + step
        shared = self.alloc.rc[pbk] > 1
        cut = np.zeros(fb.size, bool)
        cut[offs] = True
        cut[1:] |= shared[1:] != shared[:-1]
        starts = np.flatnonzero(cut)
        out = np.empty(starts.size, fmt.PLANE_RUN_DTYPE)
        out["lblk"], out["pblk"] = fb[starts], pbk[starts]
        out["n"] = np.diff(np.append(starts, fb.size))
        out["owned"] = ~shared[starts]
        return out

    # -- write -------------------------------------------------------------------------------------
    def overwrite(self, seg: tuple[int, int, int], off: int, data: Buffer) -> None:
        """Store `data` in place into blocks this inode alone maps: `seg` is the one segment
        (lblk, n, pblk) of extents.segments() covering it, and no block in it is shared."""
        self._store(seg[0], seg[1], seg[2], off, memoryview(data).cast("B"))

    def write(self, txn: Transaction, node: Inode, off: int, data: Buffer,
              segs: Segments | None = None) -> int:
        """Store all of `data` at `off`; returns its length. The caller reserved the space
        (`write_needs` or `fit_write`, then `reserve`), so this never stops half way.
        `segs`: the caller's extents.segments() of the range, if it has them already."""
        mv = memoryview(data).cast("B")
        end = off + mv.nbytes
        if end > node.size:
            self.zero_tail(txn, node)
            segs = None                 # zero_tail may have broken a shared tail block
        l0, l1 = off >> SHIFT, fmt.blocks_for(end)
        for l, n, p in segs or node.extents.segments(l0, l1):
            if p != HOLE:
                self._write_mapped(txn, node, l, n, p, off, mv)
            else:
                self._write_new(txn, node, l, n, HOLE, off, mv)
        if end > node.size:
            node.size = end
            txn.inode(node)
        return end - off

    def _write_mapped(self, txn: Transaction, node: Inode, l: int, n: int, p: int, off: int, mv) -> None:
        shared_mask = self.alloc.shared_mask(p, n)
        if not shared_mask.any():
            self._store(l, n, p, off, mv)
            return
        if n == 1 or shared_mask.all():
            self._write_new(txn, node, l, n, p, off, mv)
            return
        # split into runs of unshared (write in place) and shared (break) blocks
        shared = shared_mask.tolist()
        i = 0
        while i < n:
            j = i
            while j < n and shared[j] == shared[i]:
                j += 1
            if shared[i]:
                self._write_new(txn, node, l + i, j - i, p + i, off, mv)
            else:
                self._store(l + i, j - i, p + i, off, mv)
            i = j

    def _store(self, l: int, n: int, p: int, off: int, mv) -> None:
        """Write the part of the request that falls in file blocks [l, l+n) into blocks at p."""
        fa = max(off, l << SHIFT)
        fb = min(off + mv.nbytes, (l + n) << SHIFT)
        self.pm.store((p << SHIFT) + fa - (l << SHIFT), mv[fa - off:fb - off])

    def _write_new(self, txn: Transaction, node: Inode, l: int, n: int, old_p: int, off: int, mv) -> None:
        """Give file blocks [l, l+n) fresh blocks holding old contents (old_p) or zeros (HOLE)
        overlaid with the request's bytes: the COW break / hole fill.

        Contract: the caller settled the space first (`write_needs` + `reserve`), so the
        allocation and the extent records cannot run out half way through a transaction."""
        end = off + mv.nbytes
        # a hole fill that meets another file moves to its home (side-by-side writers stay
        # contiguous); a COW break cannot continue its shared neighbours anyway: cursor
        home = node.ino if old_p == HOLE else 0
        for q, k in self.alloc.alloc(n, node.extents.goal(l), home=home):
            first, last = l, l + k - 1
            for b in {first, last}:
                # a block the request covers only partly: initialise the uncovered bytes
                if off > b << SHIFT or end < (b + 1) << SHIFT:
                    dst = (q + b - l) << SHIFT
                    if old_p == HOLE:
                        self.pm.zero(dst, BS)
                    else:
                        self.pm.copy(dst, (old_p + b - l) << SHIFT, BS)
            self._store(l, k, q, off, mv)
            txn.persist_data(q << SHIFT, k << SHIFT)
            self.remap(txn, node, l, k, q)
            if old_p != HOLE:
                self.stats.cow_breaks += k
                old_p += k
            l += k

    def break_block(self, txn: Transaction, node: Inode, l: int, at: tuple[int, int, int],
                    off: int, mv) -> None:
        """The COW break of one block: what _write_new(txn, node, l, 1, p, off, mv) does,
        without its run loops (the 4 KiB random write into a clone).

        Contract: `at` is node.extents.find(l), its block p is shared, the request
        [off, off+len) lies inside block l, and the caller reserved one block and two extent
        records."""
        em = node.extents
        p = at[2]
        q = self.alloc.alloc_one(em.goal_at(at, l))
        dst = q << SHIFT
        o = off & (BS - 1)
        if o or mv.nbytes != BS:            # partly covered: the rest is the old frame's
            self.pm.copy(dst, p << SHIFT, BS)
        self.pm.store(dst + o, mv)
        txn.persist_data(dst, BS)
        self.adopt_break(txn, node, l, at, q)

    def adopt_break(self, txn: Transaction, node: Inode, l: int, at: tuple[int, int, int],
                    q: int) -> None:
        """The mapping half of a COW break whose block `q` already holds the new bytes (and
        counts 1): file block l moves from the shared block `at` maps to q, the old block
        loses this reference and alias. break_block's second step; cowlog.py's for the
        breaks the C data plane did. Needs two extent records."""
        self._remapped(txn, node, node.extents.remap(l, 1, q, self.inodes.extent_pool.take, at))
        self.stats.cow_breaks += 1

    def adopt_breaks(self, txn: Transaction, node: Inode, ls: np.ndarray, qs: np.ndarray,
                     ps: np.ndarray) -> int:
        """adopt_break, with pool_used, for records (ls[i]: ps[i] -> qs[i], int64 arrays) of
        one file, in order, in C (_cowadopt.c) for as long as each is the common case (the
        block inside one extent of a leaf that has room); returns how many it applied: the
        caller applies the next through adopt_break and calls again. 0 without _fastmaps."""
        if _fastmaps is None or not ls.size:
            return 0
        alloc, em = self.alloc, node.extents
        done, added, refs, shared, freed = _fastmaps.cow_adopt(
            em.leaves, em.firsts, ls, qs, ps, self.inodes.extent_pool, txn.writes,
            txn._g.record_offset("extents", 0), node.ino, alloc.rc, self.frames.cut_block,
            Leaf, LEAF, alloc.dirty, alloc.quarantine)
        em.count += added
        alloc.pool_breaks(done, refs, shared, freed)
        self.stats.cow_breaks += done
        return done

    # -- mapping changes ---------------------------------------------------------------------------
    def remap(self, txn: Transaction, node: Inode, l: int, n: int, p: int) -> None:
        """Point file blocks [l, l+n) at [p, p+n) (or a hole), journal the extent records, and
        drop the references the old mapping held."""
        self._remapped(txn, node, node.extents.remap(l, n, p, self.inodes.extent_pool.take))

    def _remapped(self, txn: Transaction, node: Inode, res) -> None:
        """The rest of remap once the map changed: records, references, aliases."""
        for slot, lb, pb, ln in res.written:
            txn.extent(slot, fmt.pack_extent(node.ino, lb, pb, ln))
        for slot in res.freed_slots:
            txn.extent(slot, fmt.FREE_EXTENT)
            self.inodes.extent_pool.give(slot)
        for pb, ln, lb in res.removed:
            self._unmap(node.ino, pb, ln, lb)
        txn.inode(node)

    def _unmap(self, ino: int, pb: int, ln: int, lb: int) -> None:
        """`ino` stops mapping blocks [pb, pb+ln) at file blocks [lb, lb+ln): drop its
        references, its aliases of the shared ones, and the last alias of any that this
        leaves with a single owner."""
        alloc = self.alloc
        if ln == 1:                                  # the COW break's case, scalar
            refs = alloc.count(pb)
            if refs == 2:                            # one owner left: no alias at all
                self.frames.cut_block(pb)
            elif refs > 2:
                self.frames.cut_block(pb, ino, lb - pb)
            alloc.decref(pb, 1)
            return
        was_shared = alloc.shared_mask(pb, ln)
        if not was_shared.any():
            alloc.decref(pb, ln)
            return
        self.frames.remove(ino, pb, ln, lb)
        alloc.decref(pb, ln)
        for s, k in runs_of(np.flatnonzero(was_shared & alloc.single_mask(pb, ln)) + pb):
            self.frames.remove_all(s, k)

    def extent_room(self, n: int) -> None:
        """ENOSPC unless n more extent records can be taken (checked before any change)."""
        if len(self.inodes.extent_pool) < n and self.reclaim_pool is not None:
            self.reclaim_pool()             # the C COW pool's records first
        if len(self.inodes.extent_pool) < n:
            raise FsError(errno.ENOSPC, "no free extent records (mkfs --extents)")

    # -- settling space before a transaction ------------------------------------------------------
    # A transaction records changes as it goes and cannot be rolled back in memory, so running
    # out of blocks or extent records half way would leave memory and image apart (failsafe:
    # read-only for everyone). Every mutating operation therefore adds up what it needs first
    # and calls `reserve`, which refuses with ENOSPC while nothing has changed yet.

    def write_needs(self, node: Inode, off: int, end: int,
                    segs: Segments | None = None) -> tuple[int, int]:
        """(blocks, extent records) that writing bytes [off, end) of `node` may take: a fresh
        block for every hole and every shared block in the range, plus the old EOF block when
        the write grows the file and that block is shared (zero_tail breaks it). Each
        allocated run may split an extent in three: 2 records per run. Runs are bounded by
        the blocks, and when the table is short of that, by the runs a dry run of the
        allocator hands out plus one per place that allocates (a call boundary can cut a
        run)."""
        if end <= off:
            return 0, 0
        l0, l1 = off >> SHIFT, fmt.blocks_for(end)
        blocks = places = 0
        for _l, n, p in segs or node.extents.segments(l0, l1):
            k = n if p == HOLE else self.alloc.shared_count(p, n)
            if k:
                blocks += k
                # shared blocks scattered in an owned extent: up to one run per gap
                places += 1 if p == HOLE or k == n else 1 + min(k, n - k)
        if end > node.size and not l0 <= node.size >> SHIFT < l1 and self._tail_shared(node):
            blocks += 1
            places += 1
        if 2 * blocks <= len(self.inodes.extent_pool) or blocks > self.alloc.available():
            return blocks, 2 * blocks
        runs = len(self.alloc.plan(blocks, home=node.ino))
        return blocks, 2 * min(blocks, runs + places)

    def fit_write(self, node: Inode, off: int, end: int, segs: Segments | None = None) -> int:
        """The largest end' <= end such that writing [off, end') fits in the free blocks and
        extent records (the end of a short write(2) on a nearly full image); ENOSPC when not
        even the first block fits. Whole blocks only, and what it returns `write_needs` fits."""
        blocks, records = self.write_needs(node, off, end, segs)
        avail, recs = self.alloc.available(), len(self.inodes.extent_pool)
        if blocks <= avail and records <= recs:
            return end
        if self.reclaim_pool is not None and self.reclaim_pool():   # the C COW pool first
            avail, recs = self.alloc.available(), len(self.inodes.extent_pool)
            if blocks <= avail and records <= recs:
                return end
        budget = min(avail, recs // 2)
        if end > node.size and node.size >> SHIFT < off >> SHIFT and self._tail_shared(node):
            budget -= 1                      # zero_tail's break of the shared EOF block
        l0 = off >> SHIFT
        cut = l0
        for l, n, p in segs or node.extents.segments(l0, fmt.blocks_for(end)):
            need = np.ones(n, bool) if p == HOLE else self.alloc.shared_mask(p, n)
            cum = np.cumsum(need)
            k = int(np.searchsorted(cum, budget, "right"))       # blocks of this seg that fit
            if k < n:
                cut = l + k
                break
            budget -= int(cum[-1])
            cut = l + n
        new_end = min(end, cut << SHIFT)
        if new_end <= off:
            raise FsError(errno.ENOSPC)
        return new_end

    def grow_needs(self, node: Inode) -> tuple[int, int]:
        """(blocks, records) that growing `node` past its EOF block may take (zero_tail)."""
        return (1, 2) if self._tail_shared(node) else (0, 0)

    def _tail_shared(self, node: Inode) -> bool:
        """Is the file's EOF block partial, mapped and shared? Then growing the file breaks
        it (zero_tail), which takes a block."""
        if not node.size % BS:
            return False
        p = node.extents.lookup(node.size >> SHIFT)
        return p != HOLE and self.alloc.count(p) > 1

    def reserve(self, blocks: int, records: int) -> None:
        """ENOSPC, with nothing changed, unless `blocks` blocks and `records` extent records
        can be taken by the transaction about to start."""
        if not self.alloc.room(blocks):
            raise FsError(errno.ENOSPC)
        self.extent_room(records)

    def punch(self, txn: Transaction, node: Inode, l0: int, l1: int) -> None:
        """Unmap file blocks [l0, l1); freed blocks return to the allocator at commit."""
        if l1 > l0 and node.extents.segments(l0, l1) != [(l0, l1 - l0, HOLE)]:
            self.remap(txn, node, l0, l1 - l0, HOLE)

    def zero_tail(self, txn: Transaction, node: Inode) -> None:
        """Zero the bytes between EOF and the end of its block before the file grows, so they
        read as zeros afterwards. Bytes past EOF are invisible, so this is safe to do before
        the growing transaction commits. A shared tail block is broken first."""
        if node.size % BS == 0:
            return
        lb = node.size >> SHIFT
        p = node.extents.lookup(lb)
        if p == HOLE:
            return
        if self.alloc.count(p) > 1:        # reserved by the caller (grow_needs)
            self._write_new(txn, node, lb, 1, p, node.size, memoryview(bytes(BS - node.size % BS)))
        else:
            # durable before the growing commit, or a power loss could bring back bytes that
            # an earlier truncate cut off
            at = (p << SHIFT) + node.size % BS
            self.pm.zero(at, BS - node.size % BS)
            txn.persist_data(at, BS - node.size % BS)

    def share_needs(self, src: Inode, sl: int, n: int) -> int:
        """Extent records that `share` of src's blocks [sl, sl+n) may take: one per mapped
        source segment plus one for splitting the destination extent around the range.
        EMLINK when a block's reference count is at its limit."""
        records = 1
        for _l, k, p in src.extents.segments(sl, sl + n):
            if p != HOLE:
                records += 1
                if self.alloc.max_count(p, k) >= fmt.MAX_REFCOUNT:
                    raise FsError(errno.EMLINK, "block reference count limit reached")
        return records

    def share(self, txn: Transaction, src: Inode, sl: int, dst: Inode, dl: int, n: int) -> int:
        """Make dst's blocks [dl, dl+n) alias src's frames at [sl, sl+n) (the reflink core).
        Holes in src become holes in dst. Returns blocks shared."""
        shared = 0
        aliases: list[tuple[int, int, int, int]] = []
        for l, k, p in src.extents.segments(sl, sl + n):
            target = dl + (l - sl)
            if p == HOLE:
                self.punch(txn, dst, target, target + k)
                continue
            # blocks shared for the first time get the source's alias too
            single = self.alloc.single_mask(p, k)
            if single.all():
                aliases.append((src.ino, l, p, k))
            elif single.any():
                aliases += [(src.ino, l + (s - p), s, m)
                            for s, m in runs_of(np.flatnonzero(single) + p)]
            self.alloc.incref(p, k)
            txn.sharing(src.ino)
            self.remap(txn, dst, target, k, p)
            aliases.append((dst.ino, target, p, k))
            shared += k
        self.frames.add_many(aliases)
        self.stats.cloned_blocks += shared
        return shared
