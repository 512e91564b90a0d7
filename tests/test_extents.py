"""The extent map (daxfs/extents.py) against a per-block model: random remaps, including the COW
break's split fast path (`_split_inside`), must give the same mapping, the same table records
and the same removed runs as a plain dict of file block -> physical block would."""
from __future__ import annotations

import random

import pytest

from daxfs.extents import HOLE, LEAF, ExtentMap


def _records_to_map(records: dict[int, tuple[int, int, int]]) -> dict[int, int]:
    out = {}
    for lb, pb, n in records.values():
        for k in range(n):
            assert lb + k not in out, "two records map one file block"
            out[lb + k] = pb + k
    return out


@pytest.mark.parametrize("fast", [True, False], ids=["c", "python"])
@pytest.mark.parametrize("seed", range(4))
def test_random_remaps_match_a_block_model(seed, fast, monkeypatch):
    from daxfs import extents
    if not fast:                        # the numpy splice instead of _fastmaps.extent_replace
        monkeypatch.setattr(extents, "_fastmaps", None)
    rng = random.Random(seed)
    nblocks = 3000
    em = ExtentMap([0], [10_000], [nblocks], [0])       # one big extent, like a fresh clone
    model = {l: 10_000 + l for l in range(nblocks)}
    records = {0: (0, 10_000, nblocks)}                  # slot -> (lblk, pblk, length)
    free_slots = list(range(1, 100_000))[::-1]
    next_p = 50_000
    split_hits = 0
    for step in range(4000):
        n = rng.choice([1, 1, 1, 2, 5])
        l0 = rng.randrange(nblocks - n)
        if rng.random() < 0.1:
            p0 = HOLE
        else:
            p0, next_p = next_p, next_p + n + rng.choice([0, 1])   # sometimes contiguous
        before = em.count
        res = em.remap(l0, n, p0, free_slots.pop)
        if em.count == before + 2 and len(res.written) == 3 and not res.freed_slots:
            split_hits += 1
        # removed runs are exactly the old physical blocks of the range
        removed = sorted((lb + k, p + k) for p, m, lb in res.removed for k in range(m))
        assert removed == sorted((l, model[l]) for l in range(l0, l0 + n) if l in model)
        for l in range(l0, l0 + n):
            model.pop(l, None)
            if p0 != HOLE:
                model[l] = p0 + l - l0
        for slot, lb, pb, m in res.written:
            records[slot] = (lb, pb, m)
        for slot in res.freed_slots:
            del records[slot]
            free_slots.append(slot)
        if step % 97 == 0 or step == 3999:
            assert _records_to_map(records) == model
            runs = em.runs()
            assert len(runs) == em.count == len(records)
            assert {l0 + k: p + k for l0, p, m in runs for k in range(m)} == model
            assert all(len(leaf.lblk) <= LEAF for leaf in em.leaves)
            assert em.mapped == len(model)
    assert split_hits > 500, "the split fast path was hardly exercised"
