"""Crash-state harness, exploration: `Explorer` runs operation sequences, builds their crash
images in one scratch file, recovers and judges each, and collects failures (told apart from
the engine bugs already known, KNOWN_ISSUES); `replay` rebuilds one crash state from a
failure's trace."""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import random
import time
from typing import Callable, Iterator

from daxfs import fs as fsmod
from daxfs.fs import FileSystem

from .crashsim_check import FsckCache, Observed, Scratch, recover_and_check
from .crashsim_images import PageImage, kill_image, kill_states, power_image, power_states
from .crashsim_oracle import Verdict, judge
from .crashsim_record import Recording, ReferenceError_, _restore, open_recording, record
from .crashsim_state import IMAGE_SIZE, PAGE, extract
from .crashsim_workload import CATALOG, build_template

# Engine bugs this harness found, so that exploration output and the CI test can tell them
# from new ones. Each predicate looks at a Failure; remove an entry when its bug is fixed (the
# strict-xfail tests in tests/test_crash_states.py start passing then).

# Fixed since (regression tests in tests/test_crash_states.py): "stale-tail" (zero_tail did not
# persist the zeroed EOF tail before the growing commit), "xattr-checkpoint" (a checkpoint did
# not persist journaled xattr blocks in the data region), "clone-size-first" (clone_range
# committed dst's new size before the shared blocks), "punch-multi-txn" (an unaligned
# PUNCH_HOLE/ZERO_RANGE ran as head write, unmap and tail write: three transactions).
# "torn-write" is now the documented contract (README: file data is not journaled) and the
# kill oracle accepts it.

def _k_clone_chunked(f, kind) -> bool:
    return kind in ("size", "content") and f.interrupted[0] == "clone" and f.chunked


KNOWN_ISSUES = [
    ("clone-chunked", "with small TXN_BLOCKS (--txn-blocks) a clone spans several 'chunk' "
                      "transactions and can end shorter after a crash (documented for clones "
                      "over 16 MiB)", _k_clone_chunked),
]


def known_issue(f) -> str | None:
    """The known issue(s) that explain every difference of a failure, or None."""
    if not f.kinds:          # mount / read / fsck errors: never a known issue
        return None
    names = []
    for kind in sorted(f.kinds):
        hit = [name for name, _d, pred in KNOWN_ISSUES if pred(f, kind)]
        if not hit:
            return None
        names.extend(n for n in hit[:1] if n not in names)
    return "+".join(sorted(names))


@dataclasses.dataclass
class Failure:
    model: str
    ops: list
    point: tuple
    interrupted: tuple
    message: str
    kinds: frozenset = frozenset()
    stale: bool = False              # the bad bytes lie past an old EOF (truncated-away data)
    phase: str = "workload"          # or "recovery": a crash while recovering a crash image
    chunked: bool = False            # explored with a small fs.TXN_BLOCKS

    @property
    def known(self) -> str | None:
        return known_issue(self)

    @property
    def signature(self) -> str:
        what = ",".join(sorted(self.kinds)) or ("fsck/mount" if "fsck" in self.message or
                                                  "mount" in self.message else "error")
        return f"{self.model} {self.phase} during {self.interrupted[0]}: {what}"

    def trace(self) -> str:
        return json.dumps({"model": self.model, "ops": self.ops, "point": _jsonable(self.point)})

    def text(self) -> str:
        k = self.known
        tag = f" [known issue: {k}]" if k else ""
        where = "at the end of" if self.point and str(self.point[0]).endswith("-end") else "during"
        return (f"FAIL [{self.model}{'/recovery' if self.phase == 'recovery' else ''}]{tag} "
                f"ops={self.ops} crash point={_jsonable(self.point)} ({where} {self.interrupted}): "
                f"{self.message}\n  replay: {self.trace()}")


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): v for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


@dataclasses.dataclass
class Stats:
    states: dict = dataclasses.field(default_factory=lambda: {"kill": 0, "power": 0})
    failed: dict = dataclasses.field(default_factory=lambda: {"kill": 0, "power": 0})
    points: dict = dataclasses.field(default_factory=lambda: {"kill": 0, "power": 0})
    recovery_states: dict = dataclasses.field(default_factory=lambda: {"kill": 0, "power": 0})
    by_issue: dict = dataclasses.field(default_factory=dict)
    sequences: int = 0
    record_s: float = 0.0
    check_s: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.states.values())

    @property
    def total_failed(self) -> int:
        return sum(self.failed.values())

    @property
    def unknown_failed(self) -> int:
        return self.total_failed - sum(n for k, n in self.by_issue.items() if k is not None)


class Explorer:
    """Runs sequences, builds their crash images in one scratch file and judges them."""

    def __init__(self, workdir: str, seed: int = 0, models: tuple = ("kill", "power"),
                 n_random_subsets: int = 20, raw_fsck: bool = True, image_size: int = IMAGE_SIZE,
                 on_failure: Callable[[Failure], None] | None = None, verify_every: int = 0,
                 save_failures: str | None = None, recovery_crashes: bool = True,
                 txn_blocks: int | None = None):
        """`txn_blocks`: run the engine with this fs.TXN_BLOCKS (blocks per transaction of a
        big truncate / unlink / clone / punch), so small files take the multi-transaction
        paths (IFLAG_TRIM, chunked reclaim) that otherwise need images of many MiB."""
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        tag = f"{os.getpid()}-{id(self):x}"
        self.template_path = os.path.join(workdir, f"cs-template-{tag}.img")
        self.work_path = os.path.join(workdir, f"cs-work-{tag}.img")
        self.scratch_path = os.path.join(workdir, f"cs-scratch-{tag}.img")
        build_template(self.template_path, image_size)
        with open(self.template_path, "rb") as f:
            self.base = f.read()
        fs = FileSystem.open(self.template_path, readonly=True)
        try:
            self.template_state = extract(fs, live=True)
        finally:
            fs.close()
        self.scratch = Scratch(self.scratch_path, self.base)
        self.fsck_cache = FsckCache()
        self.work_dirty: set | None = None
        self.seed = seed
        self.models = models
        self.n_random_subsets = n_random_subsets
        self.raw_fsck = raw_fsck
        self.recovery_crashes = recovery_crashes
        self.txn_blocks = txn_blocks
        self.stats = Stats()
        self.failures: list[Failure] = []
        self.on_failure = on_failure
        self.explored: set = set()          # op sequences whose last op's crash points were done
        self.verify_every = verify_every
        self.save_failures = save_failures
        self._n = 0
        self._deadline = None
        self._max_states = None

    def close(self) -> None:
        self.scratch.close()
        for p in (self.template_path, self.work_path, self.scratch_path):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass

    def out_of_budget(self) -> bool:
        return (self._deadline is not None and time.perf_counter() > self._deadline) or \
            (self._max_states is not None and self.stats.total >= self._max_states)

    def set_budget(self, deadline: float | None, max_states: int | None) -> None:
        self._deadline, self._max_states = deadline, max_states

    @contextlib.contextmanager
    def _engine_params(self):
        saved = fsmod.TXN_BLOCKS
        if self.txn_blocks:
            fsmod.TXN_BLOCKS = self.txn_blocks
        try:
            yield
        finally:
            fsmod.TXN_BLOCKS = saved

    # -- one sequence ----------------------------------------------------------------------------
    def run_sequence(self, ops: list | None = None, *, n_random: int = 0, rng_seed: int = 0,
                     prefix_closed: bool = True) -> Recording | None:
        with self._engine_params():
            return self._run_sequence(ops, n_random, rng_seed, prefix_closed)

    def _run_sequence(self, ops, n_random, rng_seed, prefix_closed) -> Recording | None:
        t0 = time.perf_counter()
        rng = random.Random(rng_seed)
        try:
            rec = self._record(ops, rng, n_random)
        except ReferenceError_ as e:
            self._fail(Failure("reference", _jsonable(getattr(e, "ops", ops)), ("none",),
                               ("none",), str(e)), None)
            return None
        self.stats.record_s += time.perf_counter() - t0
        self.stats.sequences += 1
        work = [tuple(o) for o in rec.ops[1:-1]]
        for msg in rec.problems:
            self._fail(Failure("reference", _jsonable(work), ("none",), ("none",), msg), None)
        skip: set = set()
        if prefix_closed:
            if () in self.explored:
                skip.add(0)
            for k in range(1, len(work) + 1):
                if tuple(work[:k]) in self.explored:
                    skip.add(k)
            self.explored.add(())
            for k in range(1, len(work) + 1):
                self.explored.add(tuple(work[:k]))
        img = PageImage(self.base)
        for model in self.models:
            if model == "kill":
                gen = kill_states(rec, img, skip)
            else:
                gen = power_states(rec, img, random.Random(f"{self.seed}/{rng_seed}/{work}"),
                                   self.n_random_subsets, skip)
            self._check_all(model, rec, gen, work, None)
        if self.recovery_crashes and len(work) not in skip:
            self._recovery_crashes(rec, img, work)
        return rec

    def _record(self, ops, rng, n_random) -> Recording:
        if self.work_dirty is None:
            self.work_dirty = set()
            _restore(self.work_path, self.base, None)
        try:
            return record(self.base, self.work_path, ops, self.template_state, rng=rng,
                          n_random=n_random, want_allowed="power" in self.models,
                          work_dirty=self.work_dirty)
        except ReferenceError_:
            self.work_dirty = None
            raise

    def _recovery_crashes(self, rec: Recording, img: PageImage, work: list) -> None:
        """Crash while recovering the image a power loss leaves at the end of the last op
        (journal committed, nothing applied in place durable): recovery must converge."""
        start = power_image(rec, img, ("power-end", len(work), {}))
        rrec, rbase = self._record_recovery(start)
        if rrec is None:
            return
        rimg = PageImage(rbase)
        for model in self.models:
            if model == "kill":
                gen = kill_states(rrec, rimg)
            else:
                gen = power_states(rrec, rimg, random.Random(f"{self.seed}/rec/{work}"),
                                   self.n_random_subsets)
            merged = (({**start, **pages}, exp) for pages, exp in gen)
            self._check_all(model, rrec, merged, work, start)

    def _record_recovery(self, start: dict):
        _restore(self.work_path, self.base, self.work_dirty)
        fd = os.open(self.work_path, os.O_RDWR | os.O_CLOEXEC)
        try:
            for p, v in start.items():
                os.pwrite(fd, v, p * PAGE)
                self.work_dirty.add(p)
        finally:
            os.close(fd)
        base = bytearray(self.base)
        for p, v in start.items():
            base[p * PAGE:(p + 1) * PAGE] = v
        log: list = []
        op_ref = [0]
        try:
            fs = open_recording(self.work_path, log, op_ref)
            try:
                r = extract(fs)
            finally:
                op_ref[0] = 1
                fs.close()
        except Exception:          # noqa: BLE001 (the plain check of this image reports it)
            return None, None
        finally:
            for kind, _k, off, x in log:
                if kind == "S" and x:
                    self.work_dirty.update(range(off // PAGE, (off + len(x) - 1) // PAGE + 1))
        rrec = Recording([("recover",), ("close",)], [0, 0], log, [r, r, r], None, None, [])
        return rrec, bytes(base)

    def _check_all(self, model: str, rec: Recording, gen, work: list, recovery_of) -> None:
        # group crash points by image: each distinct image is recovered and checked once
        by_image: dict = {}
        for image, exp in gen:
            self.stats.points[model] += 1
            key = tuple(sorted((p, id(v)) for p, v in image.items()))
            slot = by_image.get(key)
            if slot is None:
                by_image[key] = (image, [exp])
            elif all(e.cands != exp.cands for e in slot[1]):
                slot[1].append(exp)
        t0 = time.perf_counter()
        phase = "workload" if recovery_of is None else "recovery"
        for image, exps in by_image.values():
            if self.out_of_budget():
                break
            self.scratch.load(image)
            obs = recover_and_check(self.scratch, self.raw_fsck, self.fsck_cache)
            self._n += 1
            if self.verify_every and self._n % self.verify_every == 0:
                self.scratch.verify()
            self.stats.states[model] += 1
            if recovery_of is not None:
                self.stats.recovery_states[model] += 1
            for exp in exps:
                if obs.error is not None:
                    v = Verdict(obs.error)
                else:
                    v = judge(obs.state, rec, exp.cands)
                if v is None:
                    continue
                point = exp.point if recovery_of is None else ("recovery",) + tuple(exp.point)
                f = Failure(model, _jsonable(work), point, rec.ops[exp.op], v.message, v.kinds,
                            phase=phase, chunked=bool(self.txn_blocks))
                if v.path is not None and v.k >= 0 and recovery_of is None:
                    f.stale = _beyond_old_eof(rec, v)
                self.stats.failed[model] += 1
                if self.save_failures:
                    self._save_image(image, f)
                self._fail(f, f.known)
                break
        self.stats.check_s += time.perf_counter() - t0

    def _save_image(self, image: dict, f: Failure) -> None:
        os.makedirs(self.save_failures, exist_ok=True)
        path = os.path.join(self.save_failures, f"crash-{len(self.failures):04d}.img")
        data = bytearray(self.base)
        for p, v in image.items():
            data[p * PAGE:(p + 1) * PAGE] = v
        with open(path, "wb") as fh:
            fh.write(data)
        f.message += f" [image saved: {path}]"

    def _fail(self, f: Failure, issue: str | None) -> None:
        self.failures.append(f)
        self.stats.by_issue[issue] = self.stats.by_issue.get(issue, 0) + 1
        if self.on_failure:
            self.on_failure(f)

    # -- replay one crash state ------------------------------------------------------------------
    def replay(self, model: str, ops: list, point: list, save: str | None = None) -> tuple[Observed, Verdict | None]:
        """Rebuild one crash state from a failure's trace and judge it again."""
        with self._engine_params():
            return self._replay(model, ops, point, save)

    def _replay(self, model, ops, point, save):
        rec = self._record(ops, random.Random(0), 0)
        img = PageImage(self.base)
        point = tuple(point)
        start = None
        if point[0] == "recovery":
            start = power_image(rec, img, ("power-end", len(rec.ops) - 2, {}))
            rec, rbase = self._record_recovery(start)
            img = PageImage(rbase)
            point = tuple(point[1:])
        if model == "kill":
            image = kill_image(rec, img, point)
            k = _point_op(rec, point)
            cands = ((k + 1, None),) if point[0] == "kill-end" else ((k, "kpre"), (k + 1, None))
        else:
            image = power_image(rec, img, point)
            k = _point_op(rec, point)
            cands = ((k + 1, "post"),) if point[0] == "power-end" else ((k, "pre"), (k + 1, "post"))
        if start is not None:
            image = {**start, **image}
        if save:
            data = bytearray(self.base)
            for p, v in image.items():
                data[p * PAGE:(p + 1) * PAGE] = v
            with open(save, "wb") as fh:
                fh.write(data)
        self.scratch.load(image)
        obs = recover_and_check(self.scratch, self.raw_fsck)
        v = Verdict(obs.error) if obs.error else judge(obs.state, rec, cands)
        return obs, v


def _beyond_old_eof(rec: Recording, v: Verdict) -> bool:
    """Is the bad page an acceptable version up to an old EOF of this file (its smallest size
    so far), differing only past it, i.e. showing bytes a truncate once cut off?"""
    want = rec.states[v.k]
    f = want.fid.get(v.path)
    sizes = [s.meta[p][1] for s in rec.states[:v.k + 1] for p, g in s.fid.items()
             if g == f and p in s.data]
    if not sizes or v.page is None:
        return False
    lo = v.offset // PAGE * PAGE
    cut = min(sizes) - lo
    if not 0 <= cut < PAGE:
        return False
    return any(v.page[:cut] == x[:cut] for x in v.versions) and v.page[cut:] != bytes(PAGE - cut)


def _point_op(rec: Recording, point: tuple) -> int:
    kind = point[0]
    if kind in ("kill-end", "power-end"):
        return int(point[1])
    idx = int(point[1])
    return 0 if idx < 0 else rec.events[idx][1]


def catalog_sequences(length: int) -> Iterator[list]:
    for combo in itertools.product(CATALOG, repeat=length):
        yield [tuple(o) for o in combo]
