"""fsck checks of the namespace: directory entries, orphans, the tree, link counts."""
from __future__ import annotations


import numpy as np

from .. import format as fmt
from .checks import fmt_name, groups, check_step
from .context import DIRENT_LEN_OFF, DIRENT_NAME_OFF, ROOT, Context
from .report import ERROR, INFO, Problem


@check_step("dirents")
def check_dirents(ctx: Context) -> None:
    """Each entry: parent a directory, target a used inode (never root), a valid name, and
    names unique within a directory."""
    if ctx.alive_d().size == 0:
        return
    _drop_dangling_entries(ctx)
    a, hashes, renamed = _fix_invalid_names(ctx)
    _fix_duplicate_names(ctx, a, hashes, rescan=renamed)


def _drop_dangling_entries(ctx: Context) -> None:
    """Entries whose parent is not a directory or whose target is not a used inode (or is
    the root) are removed."""
    n = ctx.n_inodes
    d = ctx.dirents
    a = ctx.alive_d()
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
        name = fmt_name(ctx.dname(i))
        if not p_ok[k]:
            why = f"parent is not a directory ({ctx.type_name(pi)})"
        elif ti == ROOT:
            why = "names the root directory"
        else:
            why = f"target is not a valid inode ({ctx.type_name(ti)})"
        ctx.problem(ctx.dentry(i), f"{name} in directory {pi} -> {ti}: {why}", "entry removed")
        ctx.dalive[i] = False


def _fix_invalid_names(ctx: Context) -> tuple[np.ndarray, np.ndarray, bool]:
    """Names must be 1..255 bytes with no '/' and no NUL: bad ones are renamed. Returns the
    live entries, their name hashes as scanned, and whether any was renamed (the hashes are
    stale then)."""
    d = ctx.dirents
    a = ctx.alive_d()
    badname, hashes = _scan_names(ctx.drows(), a)
    for k in np.flatnonzero(badname).tolist():
        i = int(a[k])
        old = ctx.dname(i)
        parent = int(d["parent"][i])
        new = old.replace(b"/", b"_").replace(b"\0", b"_") if old else b"#%d" % int(d["ino"][i])
        new = ctx.unique_name(parent, new)
        ctx.problem(ctx.dentry(i), f"invalid name {fmt_name(old)} in directory {parent}",
                    f"renamed to {fmt_name(new)}")
        ctx.set_dname(i, new)
    return a, hashes, bool(badname.any())


def _fix_duplicate_names(ctx: Context, a: np.ndarray, hashes: np.ndarray, rescan: bool) -> None:
    """Same parent and name: sorted by parent, length and name hash, then compared; an
    exact duplicate (same target) is removed, another target's entry renamed. Up to four
    rounds (a rename may collide again)."""
    d = ctx.dirents
    for _round in range(4):
        if _round or rescan:
            a = ctx.alive_d()
            hashes = _scan_names(ctx.drows(), a)[1]
        if a.size < 2:
            return
        par = d["parent"][a]
        nl = ctx.drows()[a, DIRENT_LEN_OFF]
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
                ctx.problem(ctx.dentry(i), f"duplicate of {ctx.dentry(keep)} ({fmt_name(name)} in "
                            f"directory {parent} -> {ti})", "entry removed")
                ctx.dalive[i] = False
            else:
                new = ctx.unique_name(parent, name)
                ctx.problem(ctx.dentry(i), f"name {fmt_name(name)} in directory {parent} -> {ti} "
                            f"is also used by {ctx.dentry(keep)} -> {tk}",
                            f"renamed to {fmt_name(new)}")
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
        nl = rows[idx, DIRENT_LEN_OFF].astype(np.int64)
        m = int(nl.max()) if nl.size else 0
        nm = rows[idx, DIRENT_NAME_OFF:DIRENT_NAME_OFF + m]
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
    _drop_extra_directory_names(ctx)
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
    comp, tops = _unreachable_components(par, lost)
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


def _drop_extra_directory_names(ctx: Context) -> None:
    """A directory has one name: of several (hard links to a directory) the first entry
    outside the directory itself is kept, the others are removed."""
    d = ctx.dirents
    a = ctx.alive_d()
    t = d["ino"][a].astype(np.int64)
    tdir = ctx.isdir()[t]
    cnt = np.bincount(t[tdir], minlength=ctx.n_inodes)
    if not (cnt > 1).any():
        return
    for dino, pos in groups(t[tdir]):
        if pos.size < 2:
            continue
        ents = a[tdir][pos]
        keep = next((int(e) for e in ents if int(d["parent"][e]) != dino), int(ents[0]))
        for e in ents.tolist():
            if e != keep:
                par = int(d["parent"][e])
                ctx.problem(ctx.dentry(e), f"extra name {fmt_name(ctx.dname(e))} in directory "
                            f"{par} of directory {dino} (a directory has one name; keeping "
                            f"{ctx.dentry(keep)})", "entry removed")
                ctx.dalive[e] = False


def _unreachable_components(par: np.ndarray, lost: np.ndarray
                            ) -> tuple[dict[int, int], list[tuple[int, list[int] | None]]]:
    """Group the unreachable directories `lost` by walking up each parent chain once:
    (directory -> component, [(top directory, cycle members or None)] per component)."""
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
    return comp, tops


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
