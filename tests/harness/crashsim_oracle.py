"""Crash-state harness, the oracle: which 4 KiB page versions each file may show after a crash
(the README's durability contract: file data is not journaled, an overwrite in place is not
durable before fsync, newly allocated blocks are), and the verdict on a recovered state against
the candidate reference states."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from .crashsim_state import HOLE, PAGE, ZERO_PAGE, State, diff_states

if TYPE_CHECKING:
    from .crashsim_record import Recording


def page_of(content: bytes, p: int) -> bytes:
    b = content[p * PAGE:(p + 1) * PAGE]
    return b if len(b) == PAGE else b + bytes(PAGE - len(b))


def mask(v: bytes, size: int, p: int) -> bytes:
    """The page as the file shows it at `size`: bytes at or past EOF read as zeros."""
    lo = p * PAGE
    if size >= lo + PAGE:
        return v
    if size <= lo:
        return ZERO_PAGE
    return v[:size - lo] + bytes(lo + PAGE - size)


DATA_OPS = {"write", "clone", "punch", "falloc"}


SYNC_OPS = {"fsync", "remount", "close"}      # everything is durable when these return


def allowed_versions(prev: State, cur: State, prev_allowed: dict, op: tuple) -> tuple[dict, dict, dict]:
    """Page versions each file may show after a power loss, for `cur` (the state after `op`)
    and for `prev` as seen during `op` (prev's versions + in-place overwrites `op` made).
    Returns (allowed_after, allowed_before_during_op, in-place pages of op): the first two map
    fid -> list of sets of page bytes, the last fid -> {page: new bytes masked to old size}."""
    after: dict = {}
    kind = op[0]
    alias: dict[int, list] = {}
    for f, blocks in prev.pblk.items():
        for p, b in enumerate(blocks):
            if b != HOLE:
                alias.setdefault(b, []).append((f, p))
    prev_size = {prev.fid[path]: prev.meta[path][1] for path in prev.data}
    prev_data = {prev.fid[path]: c for path, c in prev.data.items()}
    before = {f: list(v) for f, v in prev_allowed.items()}
    inplace: dict = {}          # fid -> {page: new version masked to the old size}
    seen = set()
    for path, content in cur.data.items():
        f = cur.fid[path]
        if f in seen:
            continue
        seen.add(f)
        size = cur.meta[path][1]
        blocks = cur.pblk[f]
        old_blocks = prev.pblk.get(f, ())
        old_allowed = prev_allowed.get(f, [])
        pages = []
        for p in range(-(-size // PAGE)):
            now = page_of(content, p)
            b = blocks[p] if p < len(blocks) else HOLE
            if kind in SYNC_OPS:
                pages.append({now})
                continue
            if b == HOLE:
                pages.append({now})
                continue
            ob = old_blocks[p] if p < len(old_blocks) else None
            if ob == b:
                olds = old_allowed[p] if p < len(old_allowed) else {ZERO_PAGE}
                s = {mask(v, size, p) for v in olds}
                s.add(now)
                pages.append(s)
                if kind in DATA_OPS and f in prev_size and p < -(-prev_size[f] // PAGE):
                    # the interrupted op may have overwritten this page in place already
                    psize = prev_size[f]
                    if mask(now, psize, p) != mask(page_of(prev_data[f], p), psize, p):
                        before[f] = list(before.get(f, []))
                        while len(before[f]) <= p:
                            before[f].append({ZERO_PAGE})
                        before[f][p] = set(before[f][p]) | {mask(now, psize, p)}
                        inplace.setdefault(f, {})[p] = mask(now, psize, p)
            elif b in alias:
                s = {now}
                for g, q in alias[b]:
                    ga = prev_allowed.get(g, [])
                    if q < len(ga):
                        s.update(mask(v, size, p) for v in ga[q])
                pages.append(s)
            else:       # a block new in this operation: persisted before it was mapped
                pages.append({now})
        after[f] = pages
    return after, before, inplace


def kill_before(prev: State, inplace: dict) -> dict | None:
    """Kill model, S_before of an interrupted data op: file data is not journaled (README), so
    each page the op overwrites in place may already show its new bytes; nothing else."""
    if not inplace:
        return None
    out = {}
    for path, content in prev.data.items():
        f = prev.fid[path]
        pages = [{page_of(content, p)} for p in range(-(-len(content) // PAGE))]
        for p, v in inplace.get(f, {}).items():
            if p < len(pages):
                pages[p].add(v)
        out[f] = pages
    return out


def initial_allowed(s: State) -> dict:
    out = {}
    for path, content in s.data.items():
        f = s.fid[path]
        out[f] = [{page_of(content, p)} for p in range(-(-len(content) // PAGE))]
    return out


@dataclasses.dataclass
class Verdict:
    message: str
    kinds: frozenset = frozenset()     # what differs for the closest candidate
    k: int = -1                        # that candidate's state index
    path: bytes | None = None          # content failures: the file and first bad byte
    offset: int = -1
    page: bytes | None = None          # the bad page as found, and the versions allowed there
    versions: frozenset = frozenset()


def diff_kinds(got: State, want: State) -> tuple[frozenset, int]:
    kinds = set()
    n = 0
    for path in set(got.meta) | set(want.meta):
        g, w = got.meta.get(path), want.meta.get(path)
        if g != w:
            n += 1
            if g is None or w is None:
                kinds.add("namespace")
                continue
            if g[1] != w[1]:
                kinds.add("size")
            if g[4] != w[4]:
                kinds.add("xattrs")
            if (g[0], g[2], g[3], g[5]) != (w[0], w[2], w[3], w[5]):
                kinds.add("attrs")
        elif got.sha.get(path) != want.sha.get(path):
            n += 1
            kinds.add("content")
    return frozenset(kinds), n


def judge(obs: State, rec: Recording, cands: tuple) -> Verdict | None:
    """None if `obs` is an acceptable crash outcome for any candidate, else a Verdict."""
    why = []
    best = None
    for k, variant in cands:
        want = rec.states[k]
        kinds, n = diff_kinds(obs, want)
        if not kinds:
            return None
        label = f"S{k}" + (f" ({variant})" if variant and variant != "kpre" else "")
        v = Verdict(f"{label}: {diff_states(obs, want)}", kinds, k)
        if "content" in kinds:
            allowed = None
            if variant == "kpre":
                allowed = rec.killed_pre[k] if rec.killed_pre else None
            elif variant is not None and rec.allowed is not None:
                allowed = rec.allowed[k] if variant == "post" else rec.allowed_pre[k]
            bad = _content_ok(obs, want, allowed)
            n_meta = sum(1 for p in set(obs.meta) | set(want.meta) if obs.meta.get(p) != want.meta.get(p))
            n = n_meta + len(bad)
            if not bad:               # only contents differ, and only in allowed ways
                kinds = kinds - {"content"}
                v.kinds = kinds
                if not kinds:
                    return None
            else:
                if kinds == {"content"}:
                    v.message = f"{label}: " + "; ".join(b[0] for b in bad[:3])
                v.path, v.offset, v.page, v.versions = bad[0][1:]
        why.append(v.message)
        rank = (kinds != {"content"}, n, len(kinds))     # same metadata first
        if best is None or rank < best[0]:
            best = (rank, v)
    v = best[1]
    v.message = " | ".join(why)
    return v


def _content_ok(obs: State, want: State, allowed: dict | None) -> list:
    """[(message, path, first differing byte)] for every file whose metadata matches but whose
    contents are not allowed by `allowed` (None: must be exact)."""
    out = []
    for path, h in want.sha.items():
        if obs.sha.get(path) == h or obs.meta.get(path) != want.meta[path]:
            continue
        content = obs.data[path]
        w = want.data[path]
        al = allowed.get(want.fid[path], []) if allowed is not None else None
        for p in range(-(-len(content) // PAGE)):
            pg, wp = page_of(content, p), page_of(w, p)
            if pg == wp or al is not None and p < len(al) and pg in al[p]:
                continue
            kind = "zeros" if pg == ZERO_PAGE else "data"
            first = p * PAGE + next((i for i in range(PAGE) if pg[i] != wp[i]), 0)
            versions = frozenset(al[p]) if al is not None and p < len(al) else frozenset()
            out.append((f"{path.decode()}: page {p} holds {kind} the file never had there since "
                        f"its last sync point (first byte differing from the expected state: "
                        f"{first})", path, first, pg, versions | {wp}))
            break
    return out
