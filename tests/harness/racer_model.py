"""The racer's model (racer.py): files cut into chunks with one owner each, the owners' logs,
and the time-window rule that judges what a racing clone or read may have seen."""
from __future__ import annotations

from dataclasses import dataclass, field

SECTOR = 512
CHUNKS = (512, 1024, 2048, 4096, 8192)


class Mismatch(Exception):
    pass


@dataclass
class FileModel:
    chunk: int                      # chunk size in bytes: ownership unit
    data: bytearray

    @property
    def nchunks(self) -> int:
        return len(self.data) // self.chunk


@dataclass
class Write:
    name: str
    chunk: int                      # chunk index
    t0: int
    t1: int                         # -1: in flight when the daemon was killed
    after: bytes                    # the whole chunk once this write is done


@dataclass
class Timed:                        # a clone (name: its source; into: the new file) or a read
    name: str
    t0: int
    t1: int
    off: int = 0
    data: bytes = b""
    into: str = ""


@dataclass
class Log:
    writes: list = field(default_factory=list)
    clones: list = field(default_factory=list)
    reads: list = field(default_factory=list)
    inflight: list = field(default_factory=list)    # Writes, or names a clone was going into
    error: str = ""


def diff(got: bytes, want: bytes) -> str:
    if len(got) != len(want):
        return f"{len(got)} bytes instead of {len(want)}"
    i = next(j for j in range(len(got)) if got[j] != want[j])
    return f"first difference at byte {i}: {got[i:i + 8].hex()} instead of {want[i:i + 8].hex()}"


class Versions:
    """The versions each chunk went through in a phase: (valid from, valid until, bytes), where
    `from` is when the write that made it began and `until` when the next write ended."""

    def __init__(self, start: dict, writes: list):
        self.start = start                              # name -> FileModel at phase start
        self.hist: dict = {}
        for w in writes:                                # each chunk's writes: one writer, in order
            self.hist.setdefault((w.name, w.chunk), []).append(w)

    def possible(self, name: str, c: int, t0: int, t1: int) -> list[bytes]:
        fm = self.start[name]
        ws = self.hist.get((name, c), [])
        out = []
        prev = bytes(fm.data[c * fm.chunk:(c + 1) * fm.chunk])
        began = -1
        for w in ws + [None]:
            until = w.t1 if w else None
            if began < t1 and (until is None or until > t0):
                out.append(prev)
            if w:
                prev, began = w.after, w.t0
        return out


def check_range(v: Versions, name: str, off: int, data: bytes, t0: int, t1: int,
                what: str, tolerate_tear: bool) -> int:
    """Every sector of `data` (file `name` at `off`) as some version held it in [t0, t1];
    returns how many sectors were torn (mixed versions byte by byte; readers only)."""
    fm = v.start[name]
    torn = 0
    pos = off
    end = off + len(data)
    while pos < end:
        c = pos // fm.chunk
        s_end = min(end, (pos // SECTOR + 1) * SECTOR, (c + 1) * fm.chunk)
        got = data[pos - off:s_end - off]
        lo, hi = pos - c * fm.chunk, s_end - c * fm.chunk
        cands = [x[lo:hi] for x in v.possible(name, c, t0, t1)]
        if got not in cands:
            if tolerate_tear and all(any(x[j] == got[j] for x in cands) for j in range(len(got))):
                torn += 1
            else:
                raise Mismatch(
                    f"{what}: {name} bytes [{pos}, {s_end}) (chunk {c} of {fm.chunk} B) hold "
                    f"{got[:8].hex()}.. which no version of that chunk held during "
                    f"[{t0}, {t1}] ns; {len(cands)} possible: "
                    f"{', '.join(x[:8].hex() for x in cands)}")
        pos = s_end
    return torn
