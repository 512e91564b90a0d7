"""Running fsck: open and lock the image, map it, replay the journal, run the checks, write the
repairs back and check again; `check()` for code, `main_check()`/`main()` for the command line."""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import sys
import time

import numpy as np

from .. import format as fmt
from ..progress import Progress
from ..daemon.mounttab import is_locked
from .checks import CHECKS
from ..pmem import PMem
from .context import BS, Context, JournalState, journal_phase, read_journal_header
from ..errors import EXIT_OPERATIONAL
from .report import ERROR, FsckError, FsckReport

log = logging.getLogger("daxfs.fsck")


# ------------------------------------------------------------------------------------ running
def _run_checks(ctx: Context) -> None:
    progress = Progress("fsck")
    for i, (name, fn) in enumerate(CHECKS):
        progress.show(i, len(CHECKS), name)
        ctx.check_name = name
        fn(ctx)
    progress.done()
    used = ctx.used()
    used[0] = False
    ft = ctx.ftype()
    ctx.counts.update(
        inodes=int(np.count_nonzero(used)),
        directories=int(np.count_nonzero(used & (ft == stat.S_IFDIR))),
        files=int(np.count_nonzero(used & (ft == stat.S_IFREG))),
        symlinks=int(np.count_nonzero(used & (ft == stat.S_IFLNK))),
        dirents=int(np.count_nonzero(ctx.dalive)),
        extents=int(np.count_nonzero(ctx.ealive)),
        data_blocks=ctx.g.data_blocks,
    )


def _changed_rows(work: np.ndarray, disk: np.ndarray) -> np.ndarray:
    """Indexes where two equal-length record arrays differ in any byte."""
    if work.size == 0:
        return np.empty(0, np.int64)
    isz = work.dtype.itemsize
    w = np.ascontiguousarray(work).view(np.uint8).reshape(-1, isz)
    d = np.ascontiguousarray(disk).view(np.uint8).reshape(-1, isz)
    return np.flatnonzero((w != d).any(axis=1))


def _write_back(ctx: Context) -> bool:
    """Store every difference between the working copies and the image; True if any."""
    g, mem = ctx.g, ctx.mem
    wrote = False
    ch = _changed_rows(ctx.inodes, ctx.v_inodes)
    if ch.size:
        ctx.v_inodes[ch] = ctx.inodes[ch]
        wrote = True
    for work, slot, alive, new, view in (
            (ctx.dirents, ctx.dslot, ctx.dalive, ctx.dnew, ctx.v_dirents),
            (ctx.extents, ctx.eslot, ctx.ealive, None, ctx.v_extents)):
        old = np.ones(slot.size, bool) if new is None else ~new
        gone = slot[old & ~alive]
        if gone.size:
            view[gone] = np.zeros(1, view.dtype)[0]
            wrote = True
        keep = np.flatnonzero(old & alive)
        ch = keep[_changed_rows(work[keep], view[slot[keep]])]
        if ch.size:
            view[slot[ch]] = work[ch]
            wrote = True
        if new is not None:
            add = np.flatnonzero(new & alive)
            if add.size:
                view[slot[add]] = work[add]
                wrote = True
    if ctx.refcount_fix is not None:
        idx, val = ctx.refcount_fix
        ctx.v_refcounts[idx] = val
        wrote = True
    if ctx.fix_journal_header:
        off = g.journal_start * BS
        _, epoch = read_journal_header(mem, g)
        mem.zero(off + BS, 64)          # replay stops at the first bad transaction header
        mem.store(off, fmt.pack_journal_header(max(1, (epoch + 1) & 0xFFFFFFFFFFFFFFFF)))
        wrote = True
    mem.persist(0, mem.size)
    if ctx.mark_clean or (wrote and int(ctx.sb["clean"]) != 1):
        sb = ctx.sb.copy()
        sb["clean"] = 1
        fmt.store_superblock(mem, sb)       # msync'ed: the mapping is shared when repairing
        ctx.sb = sb
        wrote = True
    return wrote


def _open(path: str, repair: bool) -> tuple[int, os.stat_result, bool]:
    fd, st = fmt.open_regular(path, os.O_RDWR if repair else os.O_RDONLY,
                              open_error=lambda e: FsckError(f"{path}: cannot open: {e.strerror}"),
                              not_regular=FsckError(f"{path}: not a regular file"))
    try:
        in_use = False
        try:
            if repair:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            elif is_locked(path):
                # probed read-write (or via /proc/locks): a reader may not take the lock
                raise BlockingIOError(errno.EWOULDBLOCK, "locked")
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise FsckError(f"{path}: cannot lock: {e.strerror}") from None
            if repair:
                raise FsckError(f"{path} is in use (mounted?): refusing to repair; unmount it "
                                "first") from None
            in_use = True
        return fd, st, in_use
    except BaseException:
        os.close(fd)
        raise


def check(path: str, repair: bool = False) -> FsckReport:
    """Check the image at `path` (and repair it when `repair`). Raises FsckError (one-line
    reason) when the image cannot be checked at all."""
    t0 = time.perf_counter()
    fd, st, in_use = _open(path, repair)
    mem = None
    try:
        try:
            sb, g = fmt.read_superblock(fd)
        except OSError as e:
            raise FsckError(f"{path}: cannot read: {e.strerror}") from None
        except fmt.FormatError as e:
            raise FsckError(f"{path}: {e}") from None
        try:
            mem = PMem.over_fd(path, fd, st.st_size, shared=repair)
        except (OSError, ValueError) as e:
            raise FsckError(f"{path}: cannot map: {e}") from None
        needs_replay = int(sb["clean"]) != 1
        js = journal_phase(mem, sb, g, replay=True)
        if repair and js.error and needs_replay:
            raise FsckError(f"{path}: the journal must be replayed before repair, but "
                            f"replay failed: {js.error}")
        ctx = Context(mem, sb, g, repair=repair, journal=js, file_size=st.st_size, in_use=in_use)
        _run_checks(ctx)
        problems = ctx.problems
        modified = False
        counts = ctx.counts
        if not repair:
            clean = not any(p.severity == ERROR for p in problems)
        else:
            modified = _write_back(ctx) or js.ran_replay
            for p in problems:
                p.repaired = p.repairable
            magic_ok, epoch = read_journal_header(mem, g)
            again = Context(mem, ctx.sb, g, repair=False, journal=JournalState(magic_ok, epoch),
                            file_size=st.st_size)
            _run_checks(again)
            left = [p for p in again.problems if p.severity == ERROR]
            for p in left:
                p.check = "after repair: " + p.check
            problems = problems + left
            clean = not left and not any(p.severity == ERROR and not p.repairable
                                         for p in ctx.problems)
            counts = again.counts
            del again
        del ctx
        return FsckReport(path, problems, counts, clean, modified, time.perf_counter() - t0)
    finally:
        if mem is not None:
            mem.close()
        os.close(fd)


def main_check(path: str, repair: bool = False) -> int:
    """`daxfs fsck`: one line per problem and a summary on stdout; fsck(8) exit codes."""
    try:
        rep = check(path, repair)
    except FsckError as e:
        print(f"cannot check: {e}", file=sys.stderr)
        return EXIT_OPERATIONAL
    except MemoryError:
        print(f"cannot check: {path}: out of memory", file=sys.stderr)
        return EXIT_OPERATIONAL
    except Exception as e:      # noqa: BLE001 - never a traceback for any image content
        log.debug("fsck internal error", exc_info=True)
        print(f"cannot check: {path}: internal error ({type(e).__name__}: {e})", file=sys.stderr)
        return EXIT_OPERATIONAL
    out = sys.stdout
    for p in rep.problems:
        print(p.line(), file=out)
    print(rep.summary(), file=out)
    return rep.exit_code


def main(argv: list[str] | None = None) -> int:
    """`python -m daxfs.fsck`: the command line of `daxfs fsck` (cli/main.py), IMAGE and
    `--repair`, which is also spelled `-y`, the "answer yes" flag util-linux fsck(8) passes
    on to a filesystem's checker."""
    import argparse
    ap = argparse.ArgumentParser(prog="python -m daxfs.fsck",
                                 description="Check (and repair) an unmounted daxfs image.")
    ap.add_argument("image", metavar="IMAGE")
    ap.add_argument("--repair", "-y", action="store_true",
                    help="repair what can be repaired (-y: as util-linux fsck passes it)")
    a = ap.parse_args(argv)
    return main_check(a.image, a.repair)
