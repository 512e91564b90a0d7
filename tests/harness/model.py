"""The exerciser's in-memory byte model: one bytearray per file plus byte ranges whose content is
unknown (pages whose msync failed: the kernel may or may not have stored them).

Every mutation the exerciser makes through a syscall is applied here with exactly the effect the
syscall reported (a short count applies that many bytes); every read is compared with it."""
from __future__ import annotations

import hashlib

import numpy as np

BS = 4096


def make_data(seed: int, n: int) -> bytes:
    """The deterministic payload of a write: n non-zero bytes from `seed` (non-zero so that a
    hole or a lost store can never pass for written data)."""
    return np.random.default_rng(seed).integers(1, 256, n, dtype=np.uint8).tobytes()


def summary(b: bytes) -> str:
    """What a reproduction prints for read bytes (the snippet has the same function)."""
    return f"{len(b)} bytes, {len(b) - b.count(0)} non-zero, sha1 {hashlib.sha1(b).hexdigest()[:12]}"


class Intervals:
    """Disjoint sorted [lo, hi) ranges."""

    def __init__(self, items=()):
        self.items: list[tuple[int, int]] = []
        for lo, hi in items:
            self.add(lo, hi)

    def __bool__(self) -> bool:
        return bool(self.items)

    def add(self, lo: int, hi: int) -> None:
        if hi <= lo:
            return
        out = []
        for a, b in self.items:
            if b < lo or a > hi:
                out.append((a, b))
            else:
                lo, hi = min(lo, a), max(hi, b)
        out.append((lo, hi))
        self.items = sorted(out)

    def remove(self, lo: int, hi: int) -> None:
        if hi <= lo or not self.items:
            return
        out = []
        for a, b in self.items:
            if b <= lo or a >= hi:
                out.append((a, b))
                continue
            if a < lo:
                out.append((a, lo))
            if b > hi:
                out.append((hi, b))
        self.items = out

    def within(self, lo: int, hi: int) -> list[tuple[int, int]]:
        return [(max(a, lo), min(b, hi)) for a, b in self.items if a < hi and b > lo]


class FileModel:
    def __init__(self):
        self.data = bytearray()
        self.unknown = Intervals()

    @property
    def size(self) -> int:
        return len(self.data)

    def clone(self) -> "FileModel":
        m = FileModel()
        m.data = bytearray(self.data)
        m.unknown = Intervals(self.unknown.items)
        return m

    # ---- mutations
    def write(self, off: int, b) -> None:
        if not len(b):
            return
        if off > len(self.data):
            self.data.extend(bytes(off - len(self.data)))
        self.data[off:off + len(b)] = b
        self.unknown.remove(off, off + len(b))

    def truncate(self, n: int) -> None:
        if n < len(self.data):
            del self.data[n:]
            self.unknown.remove(n, 1 << 62)
        else:
            self.data.extend(bytes(n - len(self.data)))

    def zero(self, lo: int, hi: int) -> None:
        hi = min(hi, len(self.data))
        if hi > lo:
            self.data[lo:hi] = bytes(hi - lo)
            self.unknown.remove(lo, hi)

    def set_unknown(self, lo: int, hi: int) -> None:
        self.unknown.add(lo, min(hi, len(self.data)))

    def copy_to(self, dst: "FileModel", off_in: int, off_out: int, n: int) -> None:
        b = bytes(self.data[off_in:off_in + n])
        unk = self.unknown.within(off_in, off_in + n)
        dst.write(off_out, b)
        for a, c in unk:
            dst.unknown.add(a - off_in + off_out, c - off_in + off_out)

    # ---- checks
    def maybe_zero(self, lo: int, hi: int) -> bool:
        """Could bytes [lo, hi) all be zero? (unknown bytes could be anything)"""
        hi = min(hi, len(self.data))
        pos = lo
        for a, b in self.unknown.within(lo, hi) + [(hi, hi)]:
            if a > pos and self.data.count(0, pos, a) != a - pos:
                return False
            pos = max(pos, b)
        return True

    def compare(self, got: bytes, off: int) -> str | None:
        """None if `got` is what a read at `off` may return, else a description. `got` must
        have the model's length for that range (the caller checks the count first)."""
        exp = self.data[off:off + len(got)]
        if got == exp:
            return None
        if len(got) != len(exp):
            return f"read {len(got)} bytes at {off:#x}, model has {len(exp)}"
        g = np.frombuffer(got, np.uint8)
        e = np.frombuffer(bytes(exp), np.uint8)
        bad = g != e
        for a, b in self.unknown.within(off, off + len(got)):
            bad[a - off:b - off] = False
        if not bad.any():
            return None
        idx = np.flatnonzero(bad)
        i = int(idx[0])
        return (f"{len(idx)} bytes differ in [{off:#x}, {off + len(got):#x}); first at "
                f"{off + i:#x} (block {(off + i) // BS}): got {bytes(g[i:i + 8]).hex()} "
                f"model {bytes(e[i:i + 8]).hex()}; last at {off + int(idx[-1]):#x}; "
                f"{int((g[bad] == 0).sum())} of them read as zero")
