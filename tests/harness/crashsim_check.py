"""Crash-state harness, checking one crash image: it is written into one scratch file as page
differences from the base image, fsck'ed as found (verdicts memoized by image digest), mounted
(recovery), read, unmounted and fsck'ed again."""
from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Iterable

from daxfs import fsck
from daxfs.fs import FileSystem
from daxfs.pmem import PMem

from .crashsim_record import _PageCollector
from .crashsim_state import PAGE, State, extract

@dataclasses.dataclass
class Observed:
    state: State | None
    error: str | None            # mount / recovery / extraction / fsck failure


class Scratch:
    """One scratch image file; crash images are written as page diffs from the base."""

    def __init__(self, path: str, base: bytes):
        self.path = path
        self.base = base
        with open(path, "wb") as f:
            f.write(base)
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self.held: dict = {}           # page -> bytes it holds (None: unknown, restore it)
        self.pages_written = 0

    def close(self) -> None:
        os.close(self.fd)

    def load(self, image: dict) -> None:
        fd, base, held = self.fd, self.base, self.held
        for p in [p for p in held if p not in image]:
            os.pwrite(fd, base[p * PAGE:(p + 1) * PAGE], p * PAGE)
            del held[p]
            self.pages_written += 1
        for p, v in image.items():
            h = held.get(p, base)
            if h is not v:
                os.pwrite(fd, v, p * PAGE)
                held[p] = v
                self.pages_written += 1

    def dirty(self, pages: Iterable[int]) -> None:
        for p in pages:
            self.held[p] = None

    def digest(self) -> bytes:
        """Digest of the file's current bytes (only pages that may differ from base are read)."""
        h = hashlib.blake2b(digest_size=20)
        for p in sorted(self.held):
            v = self.held[p]
            if v is None:
                v = os.pread(self.fd, PAGE, p * PAGE)
                if v == self.base[p * PAGE:(p + 1) * PAGE]:
                    continue
            h.update(p.to_bytes(8, "little"))
            h.update(v)
        return h.digest()

    def verify(self) -> None:
        """Debug: the file must equal base + held pages exactly."""
        with open(self.path, "rb") as f:
            data = f.read()
        for p in range(len(self.base) // PAGE):
            want = self.held.get(p, self.base[p * PAGE:(p + 1) * PAGE])
            if want is not None and data[p * PAGE:(p + 1) * PAGE] != want:
                raise AssertionError(f"scratch page {p} is not what the tracker thinks")


class FsckCache:
    """fsck of an image is a pure function of its bytes: remember verdicts by digest."""

    def __init__(self, limit: int = 500_000):
        self.seen: dict[bytes, str | None] = {}
        self.limit = limit
        self.runs = 0
        self.hits = 0

    def check(self, scratch: Scratch, what: str) -> str | None:
        key = scratch.digest()
        if key in self.seen:
            self.hits += 1
            return self.seen[key]
        self.runs += 1
        try:
            rep = fsck.check(scratch.path)
            err = None if rep.clean else f"{what}: " + "; ".join(p.line() for p in rep.errors)
        except Exception as e:    # noqa: BLE001
            err = f"{what} raised {type(e).__name__}: {e}"
        if len(self.seen) >= self.limit:
            self.seen.clear()
        self.seen[key] = err
        return err


def recover_and_check(scratch: Scratch, raw_fsck: bool = True,
                      cache: FsckCache | None = None) -> Observed:
    """Mount the crash image in the scratch file (recovery), read its logical state, unmount,
    fsck. Every page recovery stores is noted so the next image restores it."""
    cache = cache or FsckCache(0)
    errs = []
    if raw_fsck:
        # fsck of the crash image as found (it replays the journal into a private mapping)
        err = cache.check(scratch, "fsck of the raw crash image")
        if err:
            errs.append(err)
    col = _PageCollector()
    saved = PMem.observer
    PMem.observer = col
    state = None
    try:
        try:
            fs = FileSystem.open(scratch.path)
        except Exception as e:     # noqa: BLE001
            return Observed(None, "; ".join(errs + [f"mount failed: {type(e).__name__}: {e}"]))
        try:
            if fs.failed:
                errs.append(f"recovery turned the engine read-only: {fs.failed}")
            state = extract(fs)
        except Exception as e:     # noqa: BLE001
            errs.append(f"reading the recovered tree failed: {type(e).__name__}: {e}")
        finally:
            fs.close()
    finally:
        PMem.observer = saved
        scratch.dirty(col.pages)
    err = cache.check(scratch, "fsck after recovery")
    if err:
        errs.append(err)
    return Observed(state, "; ".join(errs) or None)
