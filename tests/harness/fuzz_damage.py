"""Image fuzzer, damage: one case = one base image with ONE metadata region damaged by a few
seeded bit/byte flips (sometimes a run of bytes), mostly inside slots in use."""
from __future__ import annotations

import dataclasses
import hashlib
import random

import numpy as np

from daxfs import format as fmt

from .fuzz_bases import Base
from .fuzz_common import BS, REGIONS, SB_LEN


# =============================================================================== damage
@dataclasses.dataclass
class Case:
    index: int
    seed: int
    base: str
    region: str
    where: str                 # "used" / "anywhere" / "header" / "log" / "struct" / "padding"
    flips: list                # [(offset, old byte, new byte)] (only bytes that changed)
    desc: str                  # human readable


_INODE_FIELDS = [(n, fmt.INODE_DTYPE.fields[n][1], fmt.INODE_DTYPE.fields[n][0].itemsize, w)
                 for n, w in (("mode", 3), ("uid", .5), ("gid", .5), ("nlink", 2), ("size", 2),
                              ("atime", .3), ("mtime", .3), ("ctime", .3), ("btime", .3),
                              ("generation", .5), ("flags", 2), ("xattr_blk", 2), ("rdev", .5),
                              ("reserved", .5))]


_DIRENT_FIELDS = [("parent", 0, 4, 2), ("ino", 4, 4, 2), ("namelen", 8, 1, 1)]


_EXTENT_FIELDS = [(n, fmt.EXTENT_DTYPE.fields[n][1], fmt.EXTENT_DTYPE.fields[n][0].itemsize, w)
                  for n, w in (("ino", 1), ("length", 1), ("lblk", 1), ("pblk", 1))]


def case_seed(seed: int, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:8], "little")


def make_case(bases: dict[str, Base], seed: int, index: int) -> tuple[Case, bytes]:
    cs = case_seed(seed, index)
    rng = random.Random(cs)
    r = rng.random()
    base = "clean" if r < 0.6 else ("live" if r < 0.85 else "crash")
    b = bases[base]
    g = b.g
    region = "journal" if base == "crash" else rng.choice(REGIONS)
    img = bytearray(b.data)
    nflips = rng.randint(1, 8)
    one_record = rng.random() < 0.6
    anywhere = rng.random() < 0.15
    where = "anywhere" if anywhere else "used"

    if region == "superblock":
        if rng.random() < 0.85:
            where = "struct"
            pick = lambda: rng.randrange(SB_LEN)  # noqa: E731
        else:
            where = "padding"
            pick = lambda: rng.randrange(SB_LEN, BS)  # noqa: E731
    elif region == "journal":
        hdr = g.journal_start * BS
        log_off = hdr + BS
        used = b.log_used if base == "clean" else (b.txn_spans[-1][1] if b.txn_spans else 0)
        if rng.random() < 0.2:
            where = "header"
            field = rng.choice([(0, 8), (8, 16)])
            pick = lambda: hdr + rng.randrange(*field)  # noqa: E731
        elif anywhere or used == 0:
            where = "log-anywhere"
            pick = lambda: log_off + rng.randrange((g.journal_blocks - 1) * BS)  # noqa: E731
        else:
            where = "log"
            if b.txn_spans and rng.random() < 0.3:
                # one field of one transaction header: magic, nrec, body_len, crc, epoch, seq
                s, e = rng.choice(b.txn_spans)
                fo, fl = rng.choice([(0, 4), (4, 4), (8, 4), (12, 4), (16, 8), (24, 8)])
                where = f"txn-header+{fo}"
                pick = lambda: log_off + s + fo + rng.randrange(fl)  # noqa: E731
            elif one_record and b.txn_spans:
                s, e = rng.choice(b.txn_spans)
                pick = lambda: log_off + rng.randrange(s, e)  # noqa: E731
            else:
                pick = lambda: log_off + rng.randrange(used)  # noqa: E731
    else:
        off, length = g.region(region)
        if region == "inodes":
            rsz = fmt.INODE_DTYPE.itemsize
            v = np.frombuffer(b.data, fmt.INODE_DTYPE, g.inode_count, off)
            slots = np.flatnonzero(v["mode"] != 0)
            fields = _INODE_FIELDS
        elif region == "dirents":
            rsz = fmt.DIRENT_DTYPE.itemsize
            v = np.frombuffer(b.data, fmt.DIRENT_DTYPE, g.dirent_count, off)
            slots = np.flatnonzero(v["parent"] != 0)
            fields = None
        elif region == "extents":
            rsz = fmt.EXTENT_DTYPE.itemsize
            v = np.frombuffer(b.data, fmt.EXTENT_DTYPE, g.extent_count, off)
            slots = np.flatnonzero(v["ino"] != 0)
            fields = _EXTENT_FIELDS
        else:
            rsz = 4
            v = np.frombuffer(b.data, "<u4", g.nblocks, off)
            nz = np.flatnonzero(v[g.data_start:]) + g.data_start
            slots = nz if rng.random() < 0.7 else np.arange(int(nz[-1]) + 8)
            fields = None
        nslots = length // rsz
        if anywhere:
            slots = np.arange(nslots)
        rec_choice = [int(rng.choice(slots.tolist()))]

        def pick():
            slot = rec_choice[0] if one_record else int(rng.choice(slots.tolist()))
            base_off = off + slot * rsz
            if region == "dirents":
                nl = int(v["namelen"][slot]) or 1
                f = rng.choices(["parent", "ino", "namelen", "name", "pad"], [2, 2, 1, 2, .5])[0]
                if f == "name":
                    return base_off + 9 + rng.randrange(nl)
                if f == "pad":
                    return base_off + 9 + rng.randrange(255)
                o, s = {"parent": (0, 4), "ino": (4, 4), "namelen": (8, 1)}[f]
                return base_off + o + rng.randrange(s)
            if fields is None:
                return base_off + rng.randrange(rsz)
            _n, o, s, _w = rng.choices(fields, [f[3] for f in fields])[0]
            return base_off + o + rng.randrange(s)

    parts = []
    if where.startswith("txn-header") and rng.random() < 0.5:
        # nudge the field's value by a little (a count off by one, a near-miss sequence...)
        fo = int(where.split("+")[1])
        fl = 8 if fo >= 16 else 4
        at = log_off + s + fo
        val = int.from_bytes(img[at:at + fl], "little")
        new = (val + rng.choice([-3, -2, -1, 1, 2, 3])) % (1 << (8 * fl))
        img[at:at + fl] = new.to_bytes(fl, "little")
        parts.append(f"nudge {val}->{new} @{at}")
        nflips = 0
    for _ in range(nflips):
        at = pick()
        kind = rng.random()
        if kind < 0.6:
            bit = rng.randrange(8)
            img[at] ^= 1 << bit
            parts.append(f"bit {bit} @{at}")
        elif kind < 0.9:
            img[at] = rng.randrange(256)
            parts.append(f"byte @{at}")
        else:
            n = rng.randint(2, 32)
            # keep the run inside the region
            lo, hi = _region_bounds(g, region)
            at = max(lo, min(at, hi - n))
            fill = rng.choice(["random", "zero", "ff"])
            run = {"random": rng.randbytes(n), "zero": bytes(n), "ff": b"\xff" * n}[fill]
            img[at:at + n] = run
            parts.append(f"run {n}x{fill} @{at}")
    lo, hi = _region_bounds(g, region)
    orig = np.frombuffer(b.data, np.uint8, hi - lo, lo)
    new = np.frombuffer(img, np.uint8, hi - lo, lo)
    changed = np.flatnonzero(orig != new) + lo
    flips = [(int(o), int(b.data[o]), int(img[o])) for o in changed]
    desc = (f"case {index} (case seed {cs}): base {base}, region {region} ({where}), "
            + (f"{nflips} flip(s)" if nflips else "1 nudge")
            + f"{' in one record' if one_record and region in REGIONS[2:] else ''}: "
            + ", ".join(parts))
    return Case(index, cs, base, region, where, flips, desc), bytes(img)


def _region_bounds(g: fmt.Geometry, region: str) -> tuple[int, int]:
    if region == "superblock":
        return 0, BS
    if region == "journal":
        return g.journal_start * BS, (g.journal_start + g.journal_blocks) * BS
    off, length = g.region(region)
    return off, off + length
