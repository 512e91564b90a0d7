"""Crash-state harness, recording: a workload runs on a copy of the template through
`RecordingPMem`, which logs every store, persist and fence with the index of the operation in
progress; the logical state after each operation is the reference a crash image is judged
against."""
from __future__ import annotations

import dataclasses
import os
import random

from daxfs.fs import FileSystem
from daxfs.pmem import PMem

from .crashsim_oracle import DATA_OPS, allowed_versions, initial_allowed, kill_before
from .crashsim_state import PAGE, State, diff_states, extract
from .crashsim_workload import Workload, random_op

class RecordingPMem(PMem):
    """PMem that logs ('S', op, offset, bytes_after) / ('P', op, offset, length) / ('F', op)."""

    def __init__(self, path: str, log: list, op_ref: list):
        super().__init__(path)
        self.log = log
        self.op_ref = op_ref          # [current op index], shared with the workload runner
        self.observer = self._observe

    def _observe(self, kind: str, offset: int, length: int) -> None:
        op = self.op_ref[0]
        if kind == "store":
            self.log.append(("S", op, offset, bytes(self.buf[offset:offset + length])))
        elif kind == "persist":
            self.log.append(("P", op, offset, length))
        else:
            self.log.append(("F", op, 0, 0))

    def close(self) -> None:
        # PMem.close msyncs the whole mapping without going through persist(): log it as one
        if self.mm is not None and not self.readonly:
            self.log.append(("P", self.op_ref[0], 0, self.size))
            self.log.append(("F", self.op_ref[0], 0, 0))
        self.observer = None
        super().close()


def open_recording(path: str, log: list, op_ref: list) -> FileSystem:
    """FileSystem.open, but over a RecordingPMem (the mount itself is recorded)."""
    return FileSystem.open(path, make_pmem=lambda p: RecordingPMem(p, log, op_ref))


class _PageCollector:
    """Class-level PMem observer used while a crash image is recovered: which pages changed."""

    def __init__(self):
        self.pages: set[int] = set()

    def __call__(self, kind: str, offset: int, length: int) -> None:
        if kind == "store" and length > 0:
            self.pages.update(range(offset // PAGE, (offset + length - 1) // PAGE + 1))


@dataclasses.dataclass
class Recording:
    ops: list            # full op list: ("mount",), workload ops..., ("close",)
    results: list        # errno per op (0 = success)
    events: list         # ('S'|'P'|'F', op index, offset, bytes|length)
    states: list         # states[k] = logical state before op k; states[len(ops)] = after all
    allowed: list | None      # power oracle: allowed[k] page versions for states[k]
    allowed_pre: list | None  # allowed_pre[k]: versions for states[k] while op k runs
    problems: list       # failures of the reference run itself (no crash involved)
    killed_pre: list | None = None   # kill model: versions for states[k] while op k runs


class ReferenceError_(Exception):
    """The workload itself (no crash) misbehaved: the engine failed or lost state."""


def record(base: bytes, work_path: str, ops: list | None, template_state: State,
           rng: random.Random | None = None, n_random: int = 0, want_allowed: bool = True,
           work_dirty: set | None = None) -> Recording:
    """Run mount + ops (or n_random random ops drawn from rng) + close on a copy of the
    template (`base`), logging every store/persist/fence and the logical state after each op.
    `work_dirty`: pages in which `work_path` differs from `base` (None: rewrite it whole);
    the set is updated to what this run leaves behind."""
    _restore(work_path, base, work_dirty)
    log: list = []
    op_ref = [0]
    full_ops: list = [("mount",)]
    results = [0]
    problems = []
    try:
        fs = open_recording(work_path, log, op_ref)
        states = [template_state, extract(fs, live=True)]
        w = Workload(fs)
        workload = list(ops) if ops is not None else [None] * n_random
        for k, op in enumerate(workload, 1):
            op_ref[0] = k
            if op is None:
                op = random_op(w, rng)
            op = tuple(op)
            full_ops.append(op)
            if op[0] == "remount":
                fs.close()
                fs = open_recording(work_path, log, op_ref)
                w = Workload(fs)
                results.append(0)
            else:
                results.append(w.apply(op))
            if fs.failed:
                raise ReferenceError_(f"engine went read-only during {op}: {fs.failed}")
            states.append(extract(fs, live=True))
        op_ref[0] = len(full_ops)
        full_ops.append(("close",))
        results.append(0)
        fs.close()
        states.append(states[-1])
    except ReferenceError_ as e:
        e.ops = full_ops[1:]
        raise
    except Exception as e:
        err = ReferenceError_(f"reference run raised {type(e).__name__}: {e}")
        err.ops = full_ops[1:]
        raise err from e
    finally:
        if work_dirty is not None:
            for kind, _k, off, x in log:
                if kind == "S" and x:
                    work_dirty.update(range(off // PAGE, (off + len(x) - 1) // PAGE + 1))
    # the reference run itself: a clean remount must show the final state
    fs = FileSystem.open(work_path, readonly=True)
    try:
        final = extract(fs)
    finally:
        fs.close()
    if not final.same(states[-1]):
        problems.append(f"after a clean unmount the image differs from the engine's state: "
                        f"{diff_states(final, states[-1])}")
    allowed, allowed_pre, killed_pre = _page_versions(states, full_ops)
    if not want_allowed:
        allowed = allowed_pre = None
    return Recording(full_ops, results, log, states, allowed, allowed_pre, problems, killed_pre)


def _page_versions(states: list, full_ops: list) -> tuple[list, list, list]:
    """The oracle's page versions for every reference state: (allowed, allowed_pre,
    killed_pre) as in Recording."""
    allowed = [initial_allowed(states[0])]
    allowed_pre, killed_pre = [], []
    for k, op in enumerate(full_ops):
        a, b, inplace = allowed_versions(states[k], states[k + 1], allowed[k], op)
        allowed.append(a)
        allowed_pre.append(b)
        killed_pre.append(kill_before(states[k], inplace) if op[0] in DATA_OPS else None)
    return allowed, allowed_pre, killed_pre


def _restore(path: str, base: bytes, dirty: set | None) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        if dirty is None or os.fstat(fd).st_size != len(base):
            os.ftruncate(fd, len(base))
            os.pwrite(fd, base, 0)
        else:
            for p in dirty:
                os.pwrite(fd, base[p * PAGE:(p + 1) * PAGE], p * PAGE)
            dirty.clear()
    finally:
        os.close(fd)
