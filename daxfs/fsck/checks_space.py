"""fsck checks of space: extents (overlaps, past EOF), xattr blocks, refcounts."""
from __future__ import annotations

import stat

import numpy as np

from .. import format as fmt
from .checks import MAX_LBLK, groups, check_step
from .context import BS, S_IFMT, Context
from .report import INFO


@check_step("extents")
def check_extents(ctx: Context) -> None:
    """Extents: owner a regular file or symlink, inside the data region, no overlap within
    a file (later ones are cut), none wholly past EOF but a regular file's preallocation."""
    g, n = ctx.g, ctx.n_inodes
    e = ctx.extents
    mode = ctx.inodes["mode"]
    a = ctx.alive_e()
    if a.size:
        owner = e["ino"][a].astype(np.int64)
        inr = owner < n
        ft = np.zeros(a.size, np.uint32)
        ft[inr] = mode[owner[inr]] & S_IFMT
        bad = ~((ft == stat.S_IFREG) | (ft == stat.S_IFLNK))
        for o, pos in groups(owner[bad]):
            ctx.problem(f"inode {o}", f"{pos.size} extent(s) owned by {ctx.type_name(o)} "
                        "(only regular files and symlinks own blocks)", "extents removed")
        ctx.ealive[a[bad]] = False
        a = a[~bad]
    if a.size:
        ln = e["length"][a].astype(np.uint64)
        lb, pb = e["lblk"][a], e["pblk"][a]
        nb, ds, ml = np.uint64(g.nblocks), np.uint64(g.data_start), np.uint64(MAX_LBLK)
        oob = ((ln == 0) | (pb < ds) | (pb > nb) | (ln > nb - np.minimum(pb, nb))
               | (lb > ml) | (ln > ml - np.minimum(lb, ml)))
        owner = e["ino"][a].astype(np.int64)
        for o, pos in groups(owner[oob]):
            k = int(a[oob][pos[0]])
            ctx.problem(f"inode {o}", f"{pos.size} extent(s) empty or outside the data region "
                        f"[{g.data_start}, {g.nblocks}) (first: slot {int(ctx.eslot[k])}, file "
                        f"block {int(e['lblk'][k])}, block {int(e['pblk'][k])}, length "
                        f"{int(e['length'][k])})", "extents removed")
        ctx.ealive[a[oob]] = False
    _check_overlaps(ctx)
    _check_past_eof(ctx)


def _check_overlaps(ctx: Context) -> None:
    e = ctx.extents
    a = ctx.alive_e()
    owner = e["ino"][a].astype(np.int64)
    multi = np.bincount(owner, minlength=ctx.n_inodes)[owner] > 1
    a, owner = a[multi], owner[multi]
    if a.size < 2:
        return
    lb = e["lblk"][a].astype(np.int64)
    order = np.lexsort((lb, owner))
    a, owner, lb = a[order], owner[order], lb[order]
    end = lb + e["length"][a].astype(np.int64)
    # segmented inclusive prefix max of `end` per owner (Hillis-Steele scan)
    m = end.copy()
    shift = 1
    while shift < a.size:
        same = owner[shift:] == owner[:-shift]
        nm = m.copy()
        np.maximum(m[shift:], np.where(same, m[:-shift], 0), out=nm[shift:])
        m = nm
        shift <<= 1
    prev = np.full(a.size, -1, np.int64)
    prev[1:] = np.where(owner[1:] == owner[:-1], m[:-1], -1)
    ov = np.flatnonzero(lb < prev)
    if ov.size == 0:
        return
    for o, pos in groups(owner[ov]):
        k = ov[pos]
        cut = int(np.count_nonzero(end[k] > prev[k]))
        ctx.problem(f"inode {o}", f"{k.size} extent(s) overlap earlier ones in the file (first at "
                    f"file block {int(lb[k[0]])})", f"{cut} cut, {k.size - cut} removed")
    rows, delta = a[ov], (prev[ov] - lb[ov])
    keep = end[ov] > prev[ov]
    ctx.ealive[rows[~keep]] = False
    r, dl = rows[keep], delta[keep]
    e["lblk"][r] += dl.astype(np.uint64)
    e["pblk"][r] += dl.astype(np.uint64)
    e["length"][r] -= dl.astype(np.uint32)


def _check_past_eof(ctx: Context) -> None:
    e = ctx.extents
    fl = ctx.inodes["flags"]
    a = ctx.alive_e()
    owner = e["ino"][a].astype(np.int64)
    size = ctx.inodes["size"][owner]
    eof = (size >> np.uint64(12)) + ((size & np.uint64(BS - 1)) != 0).astype(np.uint64)
    lb = e["lblk"][a]
    end = lb + e["length"][a].astype(np.uint64)
    trim_o = (fl[owner] & fmt.IFLAG_TRIM) != 0
    is_reg = (ctx.inodes["mode"][owner] & S_IFMT) == stat.S_IFREG
    # a regular file may own zero-filled blocks past EOF (fallocate KEEP_SIZE): only a
    # symlink's, or those of a file whose truncate was interrupted, must go
    wholly = (lb >= eof) & (trim_o | ~is_reg)
    straddle = trim_o & ~wholly & (end > eof)        # finishing a trim also cuts at EOF
    trimming = np.flatnonzero(ctx.used() & ((fl & fmt.IFLAG_TRIM) != 0))
    if not wholly.any() and not trimming.size:
        return
    past_by = {o: pos for o, pos in groups(owner[wholly])}
    for o, pos in past_by.items():
        if fl[o] & fmt.IFLAG_TRIM:
            continue
        k = a[wholly][pos[0]]
        ctx.problem(f"inode {o}", f"{pos.size} extent(s) wholly past EOF (size "
                    f"{int(ctx.inodes['size'][o])}; first at file block {int(e['lblk'][k])})",
                    "extents removed")
    for o in trimming.tolist():
        np_ = past_by.get(o)
        k = 0 if np_ is None else np_.size
        ctx.problem(f"inode {o}", f"interrupted truncate (trim pending, {k} extent(s) wholly "
                    "past EOF)", "finished: blocks past EOF freed, flag cleared", severity=INFO)
        fl[o] &= ~np.uint32(fmt.IFLAG_TRIM)
    ctx.ealive[a[wholly]] = False
    rows = a[straddle]
    e["length"][rows] = (eof[straddle] - lb[straddle]).astype(np.uint32)


@check_step("xattrs")
def check_xattrs(ctx: Context) -> None:
    """xattr blocks: inside the data region, a valid layout, owned by one inode and not
    mapped by any extent; a bad one is detached (its xattrs are lost)."""
    g = ctx.g
    xb = ctx.inodes["xattr_blk"]
    has = np.flatnonzero(ctx.used() & (xb != 0))
    if has.size == 0:
        return
    blk = xb[has]
    oob = (blk < np.uint64(g.data_start)) | (blk >= np.uint64(g.nblocks))
    for i in has[oob].tolist():
        ctx.problem(f"inode {i}", f"xattr block {int(xb[i])} is outside the data region",
                    "xattrs dropped")
        xb[i] = 0
    has = has[~oob]
    if has.size == 0:
        return
    ok = _xattr_layout_ok(ctx.mem.u8, xb[has].astype(np.int64))
    for i in has[~ok].tolist():
        ctx.problem(f"inode {i}", f"xattr block {int(xb[i])} is malformed", "xattrs dropped")
        xb[i] = 0
    has = has[ok]
    blk = xb[has].astype(np.int64)
    for b, pos in groups(blk):
        if pos.size > 1:
            inos = has[pos]
            for i in inos[1:].tolist():
                ctx.problem(f"inode {i}", f"xattr block {b} is also the xattr block of inode "
                            f"{int(inos[0])}", "xattrs dropped")
                xb[i] = 0
    has = np.flatnonzero(ctx.used() & (xb != 0))
    if has.size:
        cov = ctx.coverage()
        clash = cov[xb[has].astype(np.int64)] > 0
        for i in has[clash].tolist():
            ctx.problem(f"inode {i}", f"xattr block {int(xb[i])} is also mapped as file data",
                        "xattrs dropped")
            xb[i] = 0


def _xattr_layout_ok(u8: np.ndarray, blocks: np.ndarray) -> np.ndarray:
    """Vectorized form of format.unpack_xattrs's validation (the layout is format.py's): u16
    count, then per entry u8 name_len (>= 1), u16 value_len, name, value, all inside the
    block."""
    head, entry = fmt.XATTR_COUNT.size, fmt.XATTR_ENTRY.size
    assert (head, entry) == (2, 3)             # the little-endian fields read below
    base = blocks * BS
    cnt = u8[base].astype(np.int64) | (u8[base + 1].astype(np.int64) << 8)
    ok = cnt * fmt.XATTR_MIN_ENTRY <= BS - head
    pos = np.full(blocks.size, head, np.int64)
    left = np.where(ok, cnt, 0)
    act = np.flatnonzero(left > 0)
    while act.size:
        p = pos[act]
        fits = p + entry <= BS
        ok[act[~fits]] = False
        act, p = act[fits], p[fits]
        at = base[act] + p
        nl = u8[at].astype(np.int64)
        vl = u8[at + 1].astype(np.int64) | (u8[at + 2].astype(np.int64) << 8)
        end = p + entry + nl + vl
        good = (nl > 0) & (end <= BS)
        ok[act[~good]] = False
        act = act[good]
        pos[act] = end[good]
        left[act] -= 1
        act = act[left[act] > 0]
    return ok


@check_step("refcounts")
def check_refcounts(ctx: Context) -> None:
    """refcount[b] == extent blocks mapping b + 1 if b is an xattr block (data region);
    REFCOUNT_RESERVED below data_start. Repair rewrites the table from the maps."""
    g = ctx.g
    exp = ctx.expected_refcounts()
    act = ctx.v_refcounts.astype(np.int64)
    diff = np.flatnonzero(act != exp)
    ctx.counts["data_used"] = int(np.count_nonzero(exp[g.data_start:]))
    if diff.size == 0:
        return
    ctx.refcount_fix = (diff, exp[diff].astype(np.uint32))
    # counts that matched the tables as found change only because of repairs reported above
    old = ctx.expected_refcounts(original=True)
    follow = act[diff] == old[diff]
    if follow.any():
        k = int(np.count_nonzero(follow))
        freed = int(np.count_nonzero(follow & (exp[diff] == 0)))
        ctx.problem(f"{k} blocks", "refcounts follow the repairs above "
                    f"({freed} blocks become free)", "recomputed", severity=INFO)
        diff = diff[~follow]
        if diff.size == 0:
            return
    ea, ee = act[diff], exp[diff]
    res = fmt.REFCOUNT_RESERVED
    cat = np.where(diff < g.data_start, 0,
                   np.where(ee == 0, 1, np.where(ea == res, 2, np.where(ea > ee, 3, 4))))
    brk = np.flatnonzero((np.diff(diff) != 1) | (cat[1:] != cat[:-1])) + 1
    starts = np.concatenate(([0], brk)).tolist()
    ends = np.concatenate((brk, [diff.size])).tolist()
    label = {0: "metadata block not marked reserved",
             1: "leaked (allocated but mapped by nothing)",
             2: "in use but marked reserved",
             3: "count too high (leak)",
             4: "count too low (a block in use could be reallocated)"}
    for s, en in zip(starts, ends):
        b0, b1 = int(diff[s]), int(diff[en - 1])
        where = f"block {b0}" if b0 == b1 else f"blocks {b0}-{b1}"
        counts = f"refcount {int(ea[s])}, expected {int(ee[s])}"
        if en - s > 1:
            counts = f"{en - s} blocks, first: " + counts
        ctx.problem(where, f"{label[int(cat[s])]} ({counts})", "recomputed")
