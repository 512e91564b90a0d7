"""The named checks, in run order (`check_step` registers them into `CHECKS`), and their
private helpers. Each reports problems on the `Context` and repairs its working copies."""
from __future__ import annotations

import stat
from typing import Callable

import numpy as np

from .. import format as fmt
from .context import _DIRENT_LEN_OFF, _DIRENT_NAME_OFF, BS, ROOT, S_IFMT, Context
from .report import ERROR, INFO, TYPE_NAMES, Problem

_VALID_TYPES = np.array(sorted(TYPE_NAMES), np.uint32)
_KNOWN_FLAGS = fmt.IFLAG_ORPHAN | fmt.IFLAG_TRIM
_MODE_BITS = 0o177777              # S_IFMT | 07777
_SIZELESS_TYPES = np.array([stat.S_IFDIR, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO,
                            stat.S_IFSOCK], np.uint32)
MAX_LBLK = fmt.MAX_FILE_BLOCKS     # what the engine addresses (and refuses past)


def _fmt_name(name: bytes) -> str:
    return repr(name.decode("utf-8", "backslashreplace"))


def _groups(keys: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """[(key, positions)] for the distinct values of `keys` (positions in original order)."""
    if keys.size == 0:
        return []
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    cut = np.flatnonzero(sk[1:] != sk[:-1]) + 1
    starts = np.concatenate(([0], cut))
    ends = np.concatenate((cut, [sk.size]))
    return [(int(sk[s]), order[s:e]) for s, e in zip(starts.tolist(), ends.tolist())]


# ------------------------------------------------------------------------------------ checks
CHECKS: list[tuple[str, Callable[[Context], None]]] = []


def check_step(name: str):
    def deco(fn):
        CHECKS.append((name, fn))
        return fn
    return deco


@check_step("superblock")
def check_superblock(ctx: Context) -> None:
    """The superblock itself parsed (else nothing runs); here: file size, clean flag, use."""
    g, sb = ctx.g, ctx.sb
    extra = ctx.file_size - g.nblocks * BS
    if extra > 0:
        ctx.problem("image", f"file has {extra} bytes past the {g.nblocks} blocks of the "
                    "filesystem (ignored)", repairable=False, severity=INFO)
    clean = int(sb["clean"])
    if clean not in (0, 1):
        ctx.problem("clean flag", f"invalid value {clean}", "set to 1")
        ctx.mark_clean = True
    elif clean == 0:
        ctx.problem("clean flag", "not cleanly unmounted (crash, or mounted right now)",
                    "marked clean", severity=INFO)
        ctx.mark_clean = True
    if ctx.in_use:
        ctx.problem("image", "locked by another process (mounted?): checked a snapshot, "
                    "results may be inconsistent", repairable=False, severity=INFO)


@check_step("journal")
def check_journal(ctx: Context) -> None:
    """Journal header (magic, epoch) and the outcome of replay."""
    js = ctx.journal
    if not js.magic_ok or js.epoch == 0:
        what = "bad magic" if not js.magic_ok else "epoch 0"
        ctx.problem("header", f"{what}: the journal cannot be replayed",
                    "header reset, log emptied (committed transactions in it are lost)")
        ctx.fix_journal_header = True
        return
    if js.unavailable:
        ctx.problem("log", f"not replayed: daxfs.journal unavailable ({js.unavailable})",
                    repairable=False, severity=INFO)
    if js.error:
        ctx.problem("log", f"replay failed: {js.error}", repairable=False)
    elif js.ran_replay and ctx.repair:
        ctx.problem("log", f"{js.replayed} committed transaction(s) pending",
                    "replayed into the image", severity=INFO)
    elif js.ran_replay:
        ctx.problem("log", f"{js.replayed} committed transaction(s) pending (checked a "
                    "replayed private copy)", "replay into the image", severity=INFO)


@check_step("inodes")
def check_inodes(ctx: Context) -> None:
    """Inode records: reserved inode 0, root a directory, valid file type, a size the type
    allows (symlink 1..4095 bytes), known flags."""
    ino = ctx.inodes
    mode = ino["mode"]
    if mode[0] != 0:
        ctx.problem("inode 0", f"reserved inode is in use (mode 0o{int(mode[0]):o})", "freed")
        ctx.free_inode(0)
    if mode[ROOT] & S_IFMT != stat.S_IFDIR:
        old = int(mode[ROOT])
        ctx.problem(f"inode {ROOT}", f"root is not a directory (mode 0o{old:o})",
                    "made a directory")
        r = ino[ROOT:ROOT + 1]
        r["mode"] = stat.S_IFDIR | ((old & 0o7777) if old else 0o755)
        r["size"] = 0
        r["flags"] = 0
        if r["nlink"][0] < 2:
            r["nlink"] = 2
    ft = mode & S_IFMT
    bad = np.flatnonzero((mode != 0) & ~np.isin(ft, _VALID_TYPES))
    for i in bad.tolist():
        ctx.problem(f"inode {i}", f"invalid file type (mode 0o{int(mode[i]):o})", "inode freed")
        ctx.free_inode(i)
    size = ino["size"]
    badlen = np.flatnonzero((ft == stat.S_IFLNK) & ((size == 0) | (size >= BS)))
    badlen = np.union1d(badlen, np.flatnonzero((ft == stat.S_IFREG) & (size >= np.uint64(1 << 52))))
    for i in badlen.tolist():
        ctx.problem(f"inode {i}", f"impossible size {int(size[i])} for its type "
                    f"(mode 0o{int(mode[i]):o})", "inode freed")
        ctx.free_inode(i)
    # directories, device nodes, fifos and sockets have size 0 (the engine never sets one; a
    # size it cannot report, >= 2**63, made every access to the inode fail)
    nosize = np.flatnonzero((mode != 0) & np.isin(ft, _SIZELESS_TYPES) & (size != 0))
    for i in nosize.tolist():
        ctx.problem(f"inode {i}", f"{ctx.type_name(i)} has size {int(size[i])} (must be 0)",
                    "size set to 0")
        size[i] = 0
    # mode: type and permission bits only
    extra = np.flatnonzero((mode != 0) & ((mode & ~np.uint32(_MODE_BITS)) != 0))
    for i in extra.tolist():
        ctx.problem(f"inode {i}", f"unknown mode bits 0x{int(mode[i]) & ~_MODE_BITS:x} (mode "
                    f"0o{int(mode[i]):o})", "cleared")
        mode[i] &= np.uint32(_MODE_BITS)
    fl = ino["flags"]
    unknown = np.flatnonzero((mode != 0) & ((fl & ~np.uint32(_KNOWN_FLAGS)) != 0))
    for i in unknown.tolist():
        ctx.problem(f"inode {i}", f"unknown flag bits 0x{int(fl[i]) & ~_KNOWN_FLAGS:x}", "cleared")
        fl[i] &= _KNOWN_FLAGS


@check_step("dirents")
def check_dirents(ctx: Context) -> None:
    """Each entry: parent a directory, target a used inode (never root), a valid name, and
    names unique within a directory."""
    n = ctx.n_inodes
    d = ctx.dirents
    a = ctx.alive_d()
    if a.size == 0:
        return
    mode = ctx.inodes["mode"]
    isdir = ctx.isdir()
    p = d["parent"][a].astype(np.int64)
    t = d["ino"][a].astype(np.int64)
    p_in = p < n
    p_ok = p_in.copy()
    p_ok[p_in] = isdir[p[p_in]]
    t_ok = (t < n) & (t != 0) & (t != ROOT)
    t_ok[t_ok] = mode[t[t_ok]] != 0
    for k in np.flatnonzero(~p_ok | ~t_ok).tolist():
        i = int(a[k])
        pi, ti = int(p[k]), int(t[k])
        name = _fmt_name(ctx.dname(i))
        if not p_ok[k]:
            why = f"parent is not a directory ({ctx.type_name(pi)})"
        elif ti == ROOT:
            why = "names the root directory"
        else:
            why = f"target is not a valid inode ({ctx.type_name(ti)})"
        ctx.problem(ctx.dentry(i), f"{name} in directory {pi} -> {ti}: {why}", "entry removed")
        ctx.dalive[i] = False
    # names: 1..255 bytes, no '/' and no NUL
    a = ctx.alive_d()
    badname, hashes = _scan_names(ctx.drows(), a)
    for k in np.flatnonzero(badname).tolist():
        i = int(a[k])
        old = ctx.dname(i)
        parent = int(d["parent"][i])
        new = old.replace(b"/", b"_").replace(b"\0", b"_") if old else b"#%d" % int(d["ino"][i])
        new = ctx.unique_name(parent, new)
        ctx.problem(ctx.dentry(i), f"invalid name {_fmt_name(old)} in directory {parent}",
                    f"renamed to {_fmt_name(new)}")
        ctx.set_dname(i, new)
    # duplicates: same parent and name (sorted by parent, length, name hash; then compared)
    for _round in range(4):
        if _round or badname.any():
            a = ctx.alive_d()
            hashes = _scan_names(ctx.drows(), a)[1]
        if a.size < 2:
            return
        par = d["parent"][a]
        nl = ctx.drows()[a, _DIRENT_LEN_OFF]
        order = np.lexsort((hashes, nl, par))
        sp, sn, sh = par[order], nl[order], hashes[order]
        same = (sp[1:] == sp[:-1]) & (sn[1:] == sn[:-1]) & (sh[1:] == sh[:-1])
        if not same.any():
            return
        starts = np.flatnonzero(np.concatenate(([True], ~same)))
        dup_pos = np.flatnonzero(same) + 1
        first_pos = starts[np.searchsorted(starts, dup_pos, "right") - 1]
        found = False
        for dp, fp in zip(dup_pos.tolist(), first_pos.tolist()):
            i, keep = int(a[order[dp]]), int(a[order[fp]])
            name = ctx.dname(i)
            if name != ctx.dname(keep):
                continue                            # a hash collision, not a duplicate
            found = True
            parent = int(d["parent"][i])
            ti, tk = int(d["ino"][i]), int(d["ino"][keep])
            if ti == tk:
                ctx.problem(ctx.dentry(i), f"duplicate of {ctx.dentry(keep)} ({_fmt_name(name)} in "
                            f"directory {parent} -> {ti})", "entry removed")
                ctx.dalive[i] = False
            else:
                new = ctx.unique_name(parent, name)
                ctx.problem(ctx.dentry(i), f"name {_fmt_name(name)} in directory {parent} -> {ti} "
                            f"is also used by {ctx.dentry(keep)} -> {tk}",
                            f"renamed to {_fmt_name(new)}")
                ctx.set_dname(i, new)
        if not found:
            return


def _scan_names(rows: np.ndarray, a: np.ndarray, chunk: int = 1 << 16):
    """For dirent rows `a`: (invalid name?, 64-bit FNV-1a hash of the name), in chunks and
    only over the columns up to the longest name, so memory stays small."""
    bad = np.zeros(a.size, bool)
    hashes = np.empty(a.size, np.uint64)
    cols = np.arange(fmt.MAX_NAME)
    prime = np.uint64(0x100000001B3)
    for s in range(0, a.size, chunk):
        idx = a[s:s + chunk]
        nl = rows[idx, _DIRENT_LEN_OFF].astype(np.int64)
        m = int(nl.max()) if nl.size else 0
        nm = rows[idx, _DIRENT_NAME_OFF:_DIRENT_NAME_OFF + m]
        inside = cols[None, :m] < nl[:, None]
        bad[s:s + chunk] = (nl == 0) | (((nm == 0) | (nm == 0x2F)) & inside).any(axis=1)
        h = np.full(idx.size, 0xCBF29CE484222325, np.uint64)
        for j in range(m):
            h ^= np.where(inside[:, j], nm[:, j], 0).astype(np.uint64)
            h *= prime
        hashes[s:s + chunk] = h
    return bad, hashes


@check_step("orphans")
def check_orphans(ctx: Context) -> None:
    """IFLAG_ORPHAN inodes (unlinked while open): reclaimed (inode, extents) when unnamed."""
    fl = ctx.inodes["flags"]
    orph = np.flatnonzero(ctx.used() & ((fl & fmt.IFLAG_ORPHAN) != 0))
    if orph.size == 0:
        return
    a = ctx.alive_d()
    n = ctx.n_inodes
    links = np.bincount(ctx.dirents["ino"][a], minlength=n)
    children = np.bincount(ctx.dirents["parent"][a], minlength=n)
    reclaim = []
    for i in orph.tolist():
        if i == ROOT or links[i] or children[i]:
            what = "root" if i == ROOT else f"{links[i]} name(s), {children[i]} child entries"
            ctx.problem(f"inode {i}", f"orphan flag set on a linked inode ({what})", "flag cleared")
            fl[i] &= ~np.uint32(fmt.IFLAG_ORPHAN)
            continue
        nlink = int(ctx.inodes["nlink"][i])
        msg = (f"orphan {ctx.type_name(i)} (unlinked while open, size {int(ctx.inodes['size'][i])})"
               f"{'' if nlink == 0 else f' with nlink {nlink}'}")
        ctx.problem(f"inode {i}", msg, "reclaimed (inode and blocks freed)",
                    severity=INFO if nlink == 0 else ERROR)
        reclaim.append(i)
    if reclaim:
        r = np.array(reclaim, np.int64)
        ctx.ealive &= ~np.isin(ctx.extents["ino"], r)
        for i in reclaim:
            ctx.free_inode(i)


@check_step("tree")
def check_tree(ctx: Context) -> None:
    """Directories: exactly one name each (root none), all reachable from root, no cycles;
    unreachable ones are reconnected into /lost+found as '#<ino>'."""
    n = ctx.n_inodes
    d = ctx.dirents
    isdir = ctx.isdir()
    a = ctx.alive_d()
    t = d["ino"][a].astype(np.int64)
    p = d["parent"][a].astype(np.int64)
    tdir = isdir[t]
    # directories with several names (hard links to a directory)
    cnt = np.bincount(t[tdir], minlength=n)
    if (cnt > 1).any():
        for dino, pos in _groups(t[tdir]):
            if pos.size < 2:
                continue
            ents = a[tdir][pos]
            keep = next((int(e) for e in ents if int(d["parent"][e]) != dino), int(ents[0]))
            for e in ents.tolist():
                if e != keep:
                    par = int(d["parent"][e])
                    ctx.problem(ctx.dentry(e), f"extra name {_fmt_name(ctx.dname(e))} in directory "
                                f"{par} of directory {dino} (a directory has one name; keeping "
                                f"{ctx.dentry(keep)})", "entry removed")
                    ctx.dalive[e] = False
        a = ctx.alive_d()
        t = d["ino"][a].astype(np.int64)
        p = d["parent"][a].astype(np.int64)
        tdir = isdir[t]
    par = np.zeros(n, np.int64)
    par[t[tdir]] = p[tdir]
    par[ROOT] = ROOT
    entry_of = np.full(n, -1, np.int64)
    entry_of[t[tdir]] = a[tdir]
    anc = par
    for _ in range(int(n).bit_length() + 1):
        nxt = anc[anc]
        if np.array_equal(nxt, anc):
            break
        anc = nxt
    lost = np.flatnonzero(isdir & (anc != ROOT))
    if lost.size == 0:
        return
    # components of the unreachable part: walk up each chain once
    par_l = par.tolist()
    comp: dict[int, int] = {}
    tops: list[tuple[int, list[int] | None]] = []   # (top directory, cycle members or None)
    for s in lost.tolist():
        if s in comp:
            continue
        path: list[int] = []
        where: dict[int, int] = {}
        x = s
        while True:
            if x in comp:
                cid = comp[x]
                break
            if x in where:                      # a cycle: break it at its smallest member
                cyc = path[where[x]:]
                cid = len(tops)
                tops.append((min(cyc), cyc))
                break
            where[x] = len(path)
            path.append(x)
            up = par_l[x]
            if up == 0:
                cid = len(tops)
                tops.append((x, None))
                break
            x = up
        for y in path:
            comp[y] = cid
    sizes = np.bincount(np.fromiter(comp.values(), np.int64, len(comp)), minlength=len(tops))
    for cid, (top, cyc) in enumerate(tops):
        size = int(sizes[cid])
        extra = f" ({size} directories cut off)" if size > 1 else ""
        ent = int(entry_of[top])
        if cyc is not None:
            chain = " -> ".join(str(c) for c in cyc + cyc[:1])
            what = f"directory cycle {chain} is unreachable from root{extra}"
        else:
            what = f"directory is not named by any entry{extra}"
        prob = ctx.problem(f"inode {top}", what, f"moved to /lost+found as #{top}")
        if not ctx.reconnect(top, ent if ent >= 0 else None):
            _cannot_reconnect(prob)


def _cannot_reconnect(p: Problem) -> None:
    p.message += " (cannot reconnect: no free inode or entry for /lost+found)"
    p.action, p.repairable = None, False


@check_step("links")
def check_links(ctx: Context) -> None:
    """Link counts: a directory has 2 + subdirectories, anything else its number of names;
    files named by no entry are reconnected into /lost+found."""
    n = ctx.n_inodes
    used, isdir = ctx.used(), ctx.isdir()
    fl = ctx.inodes["flags"]
    orphan = used & ((fl & fmt.IFLAG_ORPHAN) != 0)   # left in place by a plain check

    def counts():
        a = ctx.alive_d()
        t = ctx.dirents["ino"][a].astype(np.int64)
        p = ctx.dirents["parent"][a].astype(np.int64)
        return (np.bincount(t, minlength=n)[:n], np.bincount(p[isdir[t]], minlength=n)[:n])

    links, subdirs = counts()
    unattached = np.flatnonzero(used & ~isdir & ~orphan & (links == 0))
    for i in unattached.tolist():
        prob = ctx.problem(f"inode {i}", f"{ctx.type_name(i)} (size {int(ctx.inodes['size'][i])}) "
                           "is not named by any entry", f"moved to /lost+found as #{i}")
        if not ctx.reconnect(i):
            _cannot_reconnect(prob)
    if unattached.size:
        isdir = ctx.isdir()
        used = ctx.used()
        links, subdirs = counts()
    expect = np.where(isdir, 2 + subdirs, links)
    nlink = ctx.inodes["nlink"]
    bad = np.flatnonzero(used & ~orphan & (nlink != expect))
    for i in bad.tolist():
        why = f"2 + {int(subdirs[i])} subdirectories" if isdir[i] else f"{int(links[i])} names"
        ctx.problem(f"inode {i}", f"{ctx.type_name(i)} has nlink {int(nlink[i])}, expected "
                    f"{int(expect[i])} ({why})", "fixed")
        nlink[i] = expect[i]


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
        for o, pos in _groups(owner[bad]):
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
        for o, pos in _groups(owner[oob]):
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
    for o, pos in _groups(owner[ov]):
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
    is_reg = (ctx.inodes["mode"][owner] & 0o170000) == stat.S_IFREG
    # a regular file may own zero-filled blocks past EOF (fallocate KEEP_SIZE): only a
    # symlink's, or those of a file whose truncate was interrupted, must go
    wholly = (lb >= eof) & (trim_o | ~is_reg)
    straddle = trim_o & ~wholly & (end > eof)        # finishing a trim also cuts at EOF
    trimming = np.flatnonzero(ctx.used() & ((fl & fmt.IFLAG_TRIM) != 0))
    if not wholly.any() and not trimming.size:
        return
    past_by = {o: pos for o, pos in _groups(owner[wholly])}
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
    for b, pos in _groups(blk):
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
    """Vectorized form of xattrs.decode's validation: u16 count, then per entry u8 name_len
    (>= 1), u16 value_len, name, value, all inside the block."""
    base = blocks * BS
    cnt = u8[base].astype(np.int64) | (u8[base + 1].astype(np.int64) << 8)
    ok = cnt * 4 <= BS - 2                     # an entry takes at least 4 bytes
    pos = np.full(blocks.size, 2, np.int64)
    left = np.where(ok, cnt, 0)
    act = np.flatnonzero(left > 0)
    while act.size:
        p = pos[act]
        fits = p + 3 <= BS
        ok[act[~fits]] = False
        act, p = act[fits], p[fits]
        at = base[act] + p
        nl = u8[at].astype(np.int64)
        vl = u8[at + 1].astype(np.int64) | (u8[at + 2].astype(np.int64) << 8)
        end = p + 3 + nl + vl
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
