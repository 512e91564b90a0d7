"""kill -9 of the daxfs daemon at random moments of real workloads on a real mount, then recovery
and checks (issue "Prove crash consistency" -> real-process faults).

Scenarios (each kill point gets a fresh image, so any point replays on its own):

    cp       `cp -a` of a small tree into the mount, in a loop with `rm -r` of older copies
    fio      fio randwrite, bs=4k, psync into a pre-filled or sparse file: buffered, --fsync=N,
             --direct=1 or both; every block fio writes holds a pattern with its own offset
    mmap     a child maps a file MAP_SHARED, stores whole pages and msyncs some (one page or all)
    reflink  a child clones big files with `cp` (copy_file_range, daxfs's reflink), COW-breaks
             each clone with random pwrites (fsync now and then) and removes older clones

Every workload logs each operation BEFORE starting it, to a file outside the mount (fio: its
--write_iolog); the workloads are serial, so the last logged operation is the one in flight at
the kill and every earlier one completed. The kill moment is drawn from the point's seed, within
KILL_WINDOW seconds after the workload started. After the kill: the mount must go stale; it is
lazily unmounted; `daxfs fsck` of the crashed image must exit 0 (notes only: clean flag, pending
journal) and must not change it; `daxfs mount` replays the journal; then

  * the README's contract for a killed daemon: everything a completed request did is there --
    a completed write(2) (daxfs has no writeback cache), fsync, clone, unlink, `cp -a`; mmap
    stores only once msync'd. The operation in flight left old or new bytes (byte by byte: a
    torn in-place store), a prefix of a copy or clone, or a name present or absent;
  * the source of every reflink is byte-identical; the whole tree reads without error;
  * the filesystem works (write, fsync, clone, COW, delete) and, once everything is deleted,
    statvfs gives back every block and inode of the fresh image;
  * `daxfs umount` marks it clean, `daxfs fsck` exits 0, no daemon log has an ERROR/Traceback.

    scripts/kill_explore.py [--points 60] [--seed 1] [--scenario all|cp|fio|mmap|reflink]
                            [--workdir /dev/shm] [--keep DIR]

Point i runs scenario SCENARIOS[i % 4] (or --scenario) with seed SEED+i, so a failure replays
with `--scenario X --seed SEED+i --points 1` (same workload and kill delay; how far the workload
got by then depends on the machine). One line per point; the LAST line is always
`N kill points survived, M failed` (exit status 1 when M > 0). With --keep, a failed point
leaves its crashed image, workload log and daemon logs in DIR.

Modules: kill_mount (CLI, mount, daemon, kill -9 and cleanup helpers, post-recovery checks),
kill_models (trees and byte models), kill_workloads (the workload children), kill_scenarios (a
kill point and the four scenarios); this one runs the points and is the command line
(scripts/kill_explore.py, or `python -m tests.harness.kill_explore` from the repository root).
The helpers are shared with tests/test_mount_crash.py, test_mount_full.py and
test_mount_kill.py, which import them from the harness package.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .kill_models import check_model, read_ops
from .kill_mount import (BS, CheckFailed, check_fsck, cli, fsck_crashed, image_clean_flag, kill9,
                         lazy_umount, log_problems, remove_all, require, still_works, stop_daemon,
                         umount, wait_free, wait_unlocked, walk_read)
from .kill_scenarios import (SCENARIO_TYPES, FioRandwrite, MmapWriter, Point, Scenario,
                             child_err, end_child)
from .kill_workloads import run_child

SCENARIOS = ("cp", "fio", "mmap", "reflink")
KILL_WINDOW = (0.05, 2.5)      # seconds after the workload is ready

__all__ = ["BS", "KILL_WINDOW", "SCENARIOS", "SCENARIO_TYPES", "CheckFailed", "FioRandwrite",
           "MmapWriter", "check_model", "main", "plan", "read_ops", "run_point"]


def run_point(scenario: str, seed: int, workdir: Path, keep: Path | None = None) -> str:
    """One kill point on a fresh image; returns a one-line summary, raises on any failure.
    Everything it made (mount, daemon, workload, image, files) is gone when it returns."""
    sc = SCENARIO_TYPES[scenario]()
    pt = Point(scenario, seed, Path(tempfile.mkdtemp(prefix=f"kill-{scenario}-", dir=workdir)),
               random.Random(f"{scenario}-{seed}"))
    proc = None
    try:
        pt.mnt.mkdir()
        cli("mkfs", pt.image, "--size", sc.image_size)
        pt.mount()
        st = os.statvfs(pt.mnt)
        fresh = (st.f_bfree, st.f_ffree)
        sc.prepare(pt)
        delay = pt.rng.uniform(*KILL_WINDOW)
        proc = sc.start(pt)
        _kill_during(pt, sc, proc, delay)
        if keep is not None:
            _keep_crashed(pt, keep)
        fsck_crashed(pt.image)
        pt.mount()
        walk_read(pt.mnt)
        sc.check(pt)
        _after_checks(pt, fresh)
        if keep is not None:
            shutil.rmtree(keep / pt.dir.name, ignore_errors=True)
        return f"kill@{delay:.2f}s " + "; ".join(pt.notes)
    finally:
        if proc is not None and proc.poll() is None:
            end_child(proc, timeout=0)
        stop_daemon(pt.image, pt.mnt)
        shutil.rmtree(pt.dir, ignore_errors=True)


def _kill_during(pt: Point, sc: Scenario, proc: subprocess.Popen, delay: float) -> None:
    """Let the workload run `delay` seconds, SIGKILL the daemon, stop the workload, detach."""
    try:
        time.sleep(delay)
        require(proc.poll() is None, f"the workload ended before the kill (exit status "
                f"{proc.returncode}): {child_err(pt)}")
        kill9(pt.image, pt.mnt)
    finally:
        sc.stop(pt, proc)
    lazy_umount(pt.mnt)
    require(not image_clean_flag(pt.image), "a killed daemon cannot have marked the image clean")


def _keep_crashed(pt: Point, keep: Path) -> None:
    """Copy the crashed image and the logs so far to keep/<point dir> (removed if it passes)."""
    dest = keep / pt.dir.name
    dest.mkdir(parents=True, exist_ok=True)
    for p in [pt.image, pt.oplog, pt.dir / "fio.iolog", pt.dir / "child.err", *pt.logs]:
        if p.exists():
            shutil.copy(p, dest / (p.name + (".crashed" if p == pt.image else "")))


def _after_checks(pt: Point, fresh: tuple[int, int]) -> None:
    """The recovered filesystem works and gives back all space; clean unmount and fsck."""
    still_works(pt.mnt)
    remove_all(pt.mnt)
    wait_free(pt.mnt, fresh)
    umount(pt.mnt)
    require(wait_unlocked(pt.image), "the daemon did not exit after umount")
    require(image_clean_flag(pt.image), "daxfs umount did not mark the image clean")
    check_fsck(pt.image)
    for log in pt.logs:
        bad = log_problems(log)
        require(not bad, f"daemon log {log.name}:\n" + "\n".join(bad[:20]))


def _prog() -> str:
    """This command as the user can run it again (a package module is not runnable as a file)."""
    return f"python -m {__spec__.name}" if __name__ == "__main__" else sys.argv[0]


def plan(points: int, seed: int, scenario: str) -> list[tuple[str, int]]:
    """Point i: scenario SCENARIOS[i % 4] (or the one asked for), seed SEED + i."""
    return [(SCENARIOS[i % len(SCENARIOS)] if scenario == "all" else scenario, seed + i)
            for i in range(points)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--points", type=int, default=60, help="kill points in all (default 60)")
    ap.add_argument("--seed", type=int, default=1, help="seed of point 0 (point i: SEED+i)")
    ap.add_argument("--scenario", choices=("all", *SCENARIOS), default="all")
    ap.add_argument("--workdir", type=Path, default=Path("/dev/shm"),
                    help="where images, mountpoints and logs go (default /dev/shm)")
    ap.add_argument("--keep", type=Path, help="keep crashed image and logs of failed points here")
    ap.add_argument("--child", nargs=2, metavar=("KIND", "JSON"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return run_child(*args.child)
    ok = failed = 0
    t0 = time.monotonic()
    todo = plan(args.points, args.seed, args.scenario)
    for i, (scenario, seed) in enumerate(todo):
        t = time.monotonic()
        head = f"[{i + 1:3}/{len(todo)}] {scenario:7} seed={seed}"
        try:
            summary = run_point(scenario, seed, args.workdir, args.keep)
        except Exception as e:          # noqa: BLE001 -- every failure is reported, then next
            failed += 1
            print(f"{head} FAILED ({time.monotonic() - t:.1f}s): {type(e).__name__}: "
                  f"{str(e).strip()}\n    replay: {_prog()} --scenario {scenario} "
                  f"--seed {seed} --points 1", flush=True)
            continue
        ok += 1
        print(f"{head} ok ({time.monotonic() - t:.1f}s) {summary}", flush=True)
    print(f"total {time.monotonic() - t0:.0f}s", flush=True)
    print(f"{ok} kill points survived, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
