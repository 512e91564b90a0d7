"""Crash-state harness, crash images: the page versions a crash leaves, rebuilt from a
recording's log, in the two crash models (kill: every store so far survives, in order; power
loss: a store is durable once persisted and fenced, in-flight pages may hold any version)."""
from __future__ import annotations

import dataclasses
import itertools
import random
from typing import Iterable, Iterator

from .crashsim_record import Recording
from .crashsim_state import PAGE

@dataclasses.dataclass
class Expect:
    """One crash point producing an image: which reference states it may show."""
    point: tuple          # replayable description of the crash point
    op: int               # index of the interrupted op (len(ops) at the very end)
    cands: tuple          # ((state index, allowed kind: None|'pre'|'post'), ...)


class PageImage:
    """Page versions over a base image, with interning so equal pages are one object."""

    def __init__(self, base: bytes):
        self.base = base
        self.intern: dict[bytes, bytes] = {}

    def base_page(self, p: int) -> bytes:
        return self.base[p * PAGE:(p + 1) * PAGE]

    def apply_store(self, cur: dict, off: int, data: bytes) -> None:
        end = off + len(data)
        for p in range(off // PAGE, (end - 1) // PAGE + 1):
            lo = p * PAGE
            old = cur.get(p)
            if old is None:
                old = self.base_page(p)
            a, b = max(off, lo), min(end, lo + PAGE)
            if a == lo and b == lo + PAGE:
                new = data[a - off:b - off]
            else:
                new = old[:a - lo] + data[a - off:b - off] + old[b - lo:]
            new = self.intern.setdefault(new, new)
            if new == self.base_page(p):
                cur.pop(p, None)
            else:
                cur[p] = new


def kill_states(rec: Recording, img: PageImage, skip_ops: set = frozenset()) -> Iterator[tuple[dict, Expect]]:
    """Daemon killed: an image after every store, and at the end of every op."""
    cur: dict = {}
    nops = len(rec.ops)
    last_op = 0
    if 0 not in skip_ops:
        yield dict(cur), Expect(("kill", -1), 0, ((0, None),))
    for i, (kind, k, off, payload_) in enumerate(rec.events):
        while last_op < k:          # ops [last_op, k) are complete
            if last_op not in skip_ops:
                yield dict(cur), Expect(("kill-end", last_op), last_op, ((last_op + 1, None),))
            last_op += 1
        if kind != "S":
            continue
        img.apply_store(cur, off, payload_)
        if k not in skip_ops:
            yield dict(cur), Expect(("kill", i), k, ((k, "kpre"), (k + 1, None)))
    while last_op < nops:
        if last_op not in skip_ops:
            yield dict(cur), Expect(("kill-end", last_op), last_op, ((last_op + 1, None),))
        last_op += 1


def kill_image(rec: Recording, img: PageImage, point: tuple) -> dict:
    cur: dict = {}
    kind, x = point
    for i, (ek, k, off, payload_) in enumerate(rec.events):
        if kind == "kill" and i > x or kind == "kill-end" and k > x:
            break
        if ek == "S":
            img.apply_store(cur, off, payload_)
    return cur


class PowerTracker:
    """Durable / persisted-unfenced / current version of every page touched so far."""

    def __init__(self, img: PageImage):
        self.img = img
        self.cur: dict = {}          # page -> bytes (absent: base)
        self.durable: dict = {}      # page -> bytes (absent: base)
        self.pending: dict = {}      # page -> bytes at the last persist since the last fence
        self.touched: set = set()

    def event(self, kind: str, off: int, x) -> None:
        if kind == "S":
            self.img.apply_store(self.cur, off, x)
            self.touched.update(range(off // PAGE, (off + len(x) - 1) // PAGE + 1))
        elif kind == "P":
            if x <= 0:
                return
            lo, hi = off // PAGE, (off + x - 1) // PAGE
            for p in self.touched:
                if lo <= p <= hi:
                    self.pending[p] = self.cur.get(p)
        else:
            for p, v in self.pending.items():
                if v is None:
                    self.durable.pop(p, None)
                else:
                    self.durable[p] = v
            self.pending.clear()

    def units(self, with_pending: bool) -> list[tuple[int, list]]:
        """In-flight pages and their possible versions (index 0 = durable)."""
        out = []
        for p in sorted(self.touched):
            d, c = self.durable.get(p), self.cur.get(p)
            opts = [d]
            if with_pending and p in self.pending:
                v = self.pending[p]
                if v is not d and v != d and v != c:
                    opts.append(v)
            if c is not d and c != d:
                opts.append(c)
            if len(opts) > 1:
                out.append((p, opts))
        return out

    def image(self, units: list, choice: Iterable[int]) -> dict:
        img = dict(self.durable)
        for (p, opts), c in zip(units, choice):
            v = opts[c]
            if v is None:
                img.pop(p, None)
            else:
                img[p] = v
        return img


def choices(units: list, rng: random.Random, n_random: int) -> list[tuple]:
    """Combinations of versions to try for the in-flight units."""
    sizes = [len(o) for _p, o in units]
    total = 1
    for s in sizes:
        total *= s
        if total > 16:
            break
    if total <= 16:
        return list(itertools.product(*[range(s) for s in sizes]))
    n = len(units)
    out = {tuple([0] * n), tuple(s - 1 for s in sizes)}
    if n <= 24:
        for i in range(n):
            one = [0] * n
            one[i] = sizes[i] - 1
            out.add(tuple(one))
            allbut = [s - 1 for s in sizes]
            allbut[i] = 0
            out.add(tuple(allbut))
    for _ in range(n_random):
        out.add(tuple(rng.randrange(s) for s in sizes))
    return sorted(out)


def power_states(rec: Recording, img: PageImage, rng: random.Random, n_random: int = 20,
                 skip_ops: set = frozenset()) -> Iterator[tuple[dict, Expect]]:
    """Power loss: at each fence (before and after) and at the end of each op, every
    combination (or a sample) of in-flight page versions."""
    t = PowerTracker(img)
    nops = len(rec.ops)
    last_op = 0

    def emit(point_kind, idx, k, cands, with_pending):
        units = t.units(with_pending)
        for ch in choices(units, rng, n_random):
            landed = {p: c for (p, _o), c in zip(units, ch) if c}
            yield t.image(units, ch), Expect((point_kind, idx, landed), k, cands)

    for i, (kind, k, off, x) in enumerate(rec.events):
        while last_op < k:
            if last_op not in skip_ops:
                yield from emit("power-end", last_op, last_op, ((last_op + 1, "post"),), True)
            last_op += 1
        if kind == "F" and k not in skip_ops:
            cands = ((k, "pre"), (k + 1, "post"))
            yield from emit("power-before-fence", i, k, cands, True)
            t.event(kind, off, x)
            yield from emit("power-after-fence", i, k, cands, False)
            continue
        t.event(kind, off, x)
    while last_op < nops:
        if last_op not in skip_ops:
            yield from emit("power-end", last_op, last_op, ((last_op + 1, "post"),), True)
        last_op += 1


def power_image(rec: Recording, img: PageImage, point: tuple) -> dict:
    kind, idx, landed = point
    t = PowerTracker(img)
    for i, (ek, k, off, x) in enumerate(rec.events):
        if kind == "power-end" and k > idx:
            break
        if kind != "power-end" and i == idx:
            if kind == "power-after-fence":
                t.event(ek, off, x)
            break
        t.event(ek, off, x)
    units = t.units(kind != "power-after-fence")
    landed = {int(p): c for p, c in landed.items()}
    return t.image(units, [landed.get(p, 0) for p, _o in units])
