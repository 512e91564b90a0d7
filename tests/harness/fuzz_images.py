"""Corruption fuzzer for daxfs images ("Prove crash consistency" -> "Corrupt images").

One populated image is built in-process with the engine API (files of many sizes, multi-extent
and sparse files, directories, symlinks, hard links, xattrs, reflinked files, special files),
plus two images whose journal holds committed-but-not-checkpointed transactions:

    clean   populated, then closed (checkpointed; the log holds only stale transactions)
    live    `clean` opened again, more operations, the file copied while the engine is open
            (tables current, journal pending, clean flag 0)
    crash   `clean`'s tables + `live`'s journal, data and superblock: power lost before any table
            store of the new transactions reached the media; replay must redo them, and a torn
            transaction ends replay (the result is exactly a prefix state S_m)

Each case copies one base image and damages ONE metadata region (superblock, journal header/log,
inode, dirent, extent or refcount table) with 1-8 seeded bit/byte flips, sometimes a run of bytes,
mostly inside the used part (slots in use). Then:

  * fsck (in-process `daxfs.fsck.check`; a sample through the real `daxfs fsck`) must not raise,
    must exit in {0,1,4,8}, and must report the damage when a field it can check changed;
  * the engine (`FileSystem.open`) must refuse with a FormatError or MountError (one line) or open, and then
    walking the tree and reading everything may fail only with EIO; after an EIO the failsafe
    must be on (writes give EROFS/EIO) and the image must not change any more; undamaged files
    read their original content; a sample is mounted for real (`daxfs mount`, ls -R/cat in a
    child process, the daemon must survive);
  * `fsck --repair` must leave an image a second fsck passes (exit 0), that the engine serves
    without EIO, with every undamaged file unchanged (crash/journal cases: exactly S_m).

    scripts/fuzz_images.py --cases N [--seed S] [--jobs J] [--mounts M] [--cli-every K]
    scripts/fuzz_images.py --seed S --case I [--save-image PATH] [-v]      # replay one case

The LAST line is always `N images tried, T tracebacks, U not repaired` (T, U: images with at least
one such finding); the exit status is 1 when T or U is non-zero (with --strict also when damage went
unreported by fsck or the engine served inconsistent data). Every finding is listed above that
line, grouped by signature with its first case (seed, region, offsets, traceback); --json FILE
keeps them all.

Modules: fuzz_common (constants, image I/O), fuzz_bases (the base images), fuzz_damage (cases),
fuzz_tables (analysis of the tables), fuzz_state (the engine walk), fuzz_findings, fuzz_case and
fuzz_engine (one case), fuzz_mount and fuzz_walk (real mounts); this one runs cases in worker
processes, sums them up and is the command line (scripts/fuzz_images.py, or
`python -m tests.harness.fuzz_images` from the repository root).
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import multiprocessing
import os
import resource
import shutil
import sys
import tempfile
import time
import traceback

from .fuzz_bases import Base, build_bases
from .fuzz_case import run_case
from .fuzz_common import MEM_LIMIT_GB, REGIONS, SHM, _read, _write
from .fuzz_damage import make_case
from .fuzz_findings import Result
from .fuzz_mount import _log_problems, _log_tail, mount_sample
from .fuzz_state import walk_engine
from .fuzz_tables import Tables
from .fuzz_walk import walk_mount, walk_mount_argv

__all__ = ["Base", "REGIONS", "SHM", "Tables", "_log_problems", "_log_tail", "_quiet_logging",
           "_read", "_write", "build_bases", "make_case", "main", "mount_sample", "run",
           "run_case", "walk_engine", "walk_mount", "walk_mount_argv"]


# =============================================================================== driver
_BASES: dict[str, Base] | None = None


_WORKDIR = ""


def _vm_size() -> int:
    try:
        with open("/proc/self/status") as f:
            for ln in f:
                if ln.startswith("VmSize:"):
                    return int(ln.split()[1]) << 10
    except (OSError, ValueError):
        pass
    return 0


def _worker_init(limit_gb: float) -> None:
    _quiet_logging()
    if limit_gb:
        # headroom above what the (forked) worker already maps
        lim = _vm_size() + int(limit_gb * (1 << 30))
        try:
            resource.setrlimit(resource.RLIMIT_AS, (lim, resource.RLIM_INFINITY))
        except (ValueError, OSError):
            pass


def _worker(args):
    seed, index, cli = args
    res = run_case(_BASES, seed, index, _WORKDIR, cli=cli)
    return res


def _quiet_logging() -> None:
    lg = logging.getLogger("daxfs")
    lg.setLevel(logging.CRITICAL + 1)
    lg.propagate = False


def run(cases: int, seed: int, *, jobs: int = 1, mounts: int = 0, cli_every: int = 0,
        workdir: str | None = None, progress: bool = False, first: int = 0) -> dict:
    """Run cases [first, first+cases); returns a summary dict (also used by the tests)."""
    global _BASES, _WORKDIR
    _quiet_logging()
    own = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="daxfs-fuzz-", dir=SHM)
    t0 = time.perf_counter()
    try:
        bases = build_bases(workdir, seed)
        _BASES, _WORKDIR = bases, workdir
        t_build = time.perf_counter() - t0
        todo = [(seed, i, bool(cli_every) and i % cli_every == 0)
                for i in range(first, first + cases)]
        results: list[Result] = []
        t1 = time.perf_counter()
        # always in worker processes: a damaged size can make the engine allocate gigabytes,
        # so each worker runs under an address-space limit (MemoryError instead of the OOM killer)
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(max(1, jobs), initializer=_worker_init, initargs=(MEM_LIMIT_GB,),
                      maxtasksperchild=200) as pool:
            for k, r in enumerate(pool.imap_unordered(_worker, todo, chunksize=4)):
                results.append(r)
                if progress and (k + 1) % 100 == 0:
                    _progress(results, t1)
        t_cases = time.perf_counter() - t1
        results.sort(key=lambda r: r.case.index)
        mres = []
        for i in pick_mount_samples(results, mounts):
            mres.append(mount_sample(bases, seed, i, workdir))
        return summarize(results, mres, seed, t_build, t_cases, time.perf_counter() - t0)
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)


def pick_mount_samples(results: list[Result], n: int) -> list[int]:
    """Cases worth a real mount: a refused one, ones whose engine check found something (one
    per distinct finding), then evenly spaced ones."""
    if n <= 0 or not results:
        return []
    picks: list[int] = []

    def add(i):
        if i not in picks and len(picks) < n:
            picks.append(i)
    refused = [r.case.index for r in results if r.mount.startswith("refused")]
    if refused:
        add(refused[0])
    seen = set()
    for r in results:
        for f in r.findings:
            if f.where in ("walk", "engine", "write-after-eio", "open") and f.summary not in seen:
                seen.add(f.summary)
                add(r.case.index)
    step = max(1, len(results) // n)
    for r in results[::step]:
        add(r.case.index)
    return picks


def _progress(results, t1):
    n = len(results)
    T = sum(any(f.category in ("traceback", "hang") for f in r.findings) for r in results)
    U = sum(any(f.category == "not_repaired" for f in r.findings) for r in results)
    print(f"  ... {n} cases, {time.perf_counter() - t1:.0f}s, {T} with tracebacks, "
          f"{U} not repaired", file=sys.stderr, flush=True)


def summarize(results: list[Result], mres: list[Result], seed: int, t_build, t_cases, t_all):
    allr = results + mres
    cats = collections.Counter()
    for r in allr:
        for c in {f.category for f in r.findings}:
            cats[c] += 1
    bugs: dict[tuple, dict] = {}
    for r in allr:
        for f in r.findings:
            key = (f.category, f.where if f.where.startswith(("cli", "mount", "daemon")) else "",
                   f.summary)
            bug = bugs.get(key)
            if bug is None:
                bug = bugs[key] = {"category": f.category, "where": f.where, "summary": f.summary,
                                   "count": 0, "cases": [], "regions": collections.Counter(),
                                   "first": {"case": r.case.index, "case_seed": r.case.seed,
                                             "base": r.case.base, "region": r.case.region,
                                             "desc": r.case.desc, "flips": r.case.flips[:16],
                                             "detail": f.detail, "traceback": f.tb}}
            if r.case.index in bug["cases"]:
                continue
            bug["count"] += 1
            bug["cases"].append(r.case.index)
            bug["regions"][f"{r.case.base}/{r.case.region}"] += 1
    by_region = collections.Counter(f"{r.case.base}/{r.case.region}" for r in results)
    outcomes = collections.Counter(r.mount.split(":")[0] for r in results)
    return {
        "seed": seed, "cases": len(results), "mount_samples": len(mres),
        "tracebacks": len({r.case.index for r in allr
                           if any(f.category in ("traceback", "hang") for f in r.findings)}),
        "not_repaired": len({r.case.index for r in allr
                             if any(f.category == "not_repaired" for f in r.findings)}),
        "undetected": cats["undetected"], "mount_inconsistent": cats["mount"],
        "hangs": cats["hang"],
        "failsafe": sum(any(n.startswith("failsafe") for n in r.notes) for r in results),
        "by_region": dict(by_region), "engine_outcomes": dict(outcomes),
        "fsck_exits": dict(collections.Counter(str(r.fsck_exit) for r in results)),
        "repair_exits": dict(collections.Counter(str(r.repair_exit) for r in results)),
        "seconds": {"build": round(t_build, 2), "cases": round(t_cases, 2),
                    "total": round(t_all, 2)},
        "bugs": sorted(bugs.values(), key=lambda x: (-x["count"])),
        "failing_cases": sorted({r.case.index for r in allr if r.findings}),
        "per_case": {r.case.index: sorted({f.category for f in r.findings}) for r in results
                     if r.findings},
        "per_mount": {r.case.index: sorted({f.category for f in r.findings}) for r in mres
                      if r.findings},
    }


def print_summary(s: dict, verbose: bool = False) -> None:
    print(f"seed {s['seed']}: {s['cases']} cases in {s['seconds']['cases']:.1f}s "
          f"(bases built in {s['seconds']['build']:.1f}s), {s['mount_samples']} real mounts")
    print("regions:", ", ".join(f"{k} {v}" for k, v in sorted(s["by_region"].items())))
    print("engine open:", ", ".join(f"{k} {v}" for k, v in sorted(s["engine_outcomes"].items())),
          "| fsck exits:", s["fsck_exits"], "| repair exits:", s["repair_exits"])
    print(f"findings: {s['tracebacks']} cases with tracebacks/hangs, {s['not_repaired']} not "
          f"repaired, {s['undetected']} damage not reported by fsck, {s['mount_inconsistent']} "
          f"inconsistent engine/mount behaviour; the failsafe triggered in {s['failsafe']} cases")
    for k, bug in enumerate(s["bugs"], 1):
        f = bug["first"]
        print(f"\n[{k}] {bug['category']} ({bug['where']}): {bug['summary']} -- {bug['count']} "
              f"case(s): {bug['cases'][:12]}; regions {dict(bug['regions'])}")
        print(f"    first: {f['desc']}")
        if f["detail"]:
            print("    detail:", f["detail"][:600].replace("\n", "\n    "))
        if f["traceback"] and (verbose or k <= 40):
            tb = f["traceback"].strip().splitlines()
            print("    " + "\n    ".join(tb[-12:]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--first", type=int, default=0, help="index of the first case")
    ap.add_argument("--jobs", type=int, default=max(1, min(os.cpu_count() or 1, 8)))
    ap.add_argument("--mounts", type=int, default=None,
                    help="real `daxfs mount` samples (default: 5 when /dev/fuse exists, as root)")
    ap.add_argument("--cli-every", type=int, default=25,
                    help="every K-th case runs fsck through the real CLI (0: never)")
    ap.add_argument("--case", type=int, help="run only this case, verbosely")
    ap.add_argument("--save-image", help="with --case: write the damaged image here")
    ap.add_argument("--json", help="write the full summary (bugs with tracebacks) here")
    ap.add_argument("--strict", action="store_true",
                    help="exit 1 on any finding (undetected damage, inconsistent serving), not "
                         "only on tracebacks and unrepaired images")
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--walk-mount", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.walk_mount:
        print(json.dumps(walk_mount(a.walk_mount)))
        return 0
    if a.case is not None:
        return _replay_case(a)
    mounts = a.mounts
    if mounts is None:
        mounts = 5 if os.geteuid() == 0 and os.path.exists("/dev/fuse") and \
            shutil.which("fusermount3") else 0
    try:
        s = run(a.cases, a.seed, jobs=a.jobs, mounts=mounts, cli_every=a.cli_every,
                progress=True, first=a.first)
    except Exception:       # noqa: BLE001 - the fuzzer itself failed: still end with the line
        traceback.print_exc()
        print("0 images tried, 1 tracebacks, 0 not repaired")
        return 1
    print_summary(s, a.verbose)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(s, f, indent=1, default=str)
    bad = s["tracebacks"] or s["not_repaired"] or \
        (a.strict and (s["undetected"] or s["mount_inconsistent"]))
    print(f"{s['cases']} images tried, {s['tracebacks']} tracebacks, "
          f"{s['not_repaired']} not repaired")
    return 1 if bad else 0


def _replay_case(a) -> int:
    """--case I: run one case verbosely (and a real mount of it with --mounts)."""
    _quiet_logging()
    workdir = tempfile.mkdtemp(prefix="daxfs-fuzz-", dir=SHM)
    try:
        bases = build_bases(workdir, a.seed)
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        try:        # as in the workers: a damaged size must end in MemoryError, not OOM
            resource.setrlimit(resource.RLIMIT_AS, (_vm_size() + (MEM_LIMIT_GB << 30), hard))
        except (ValueError, OSError):
            pass
        try:
            r = run_case(bases, a.seed, a.case, workdir, cli=True, save=a.save_image,
                         verbose=True)
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        print(r.case.desc)
        print(f"flips: {r.case.flips}")
        print(f"fsck {r.fsck_exit}, engine {r.mount}, repair {r.repair_exit}, "
              f"recheck {r.recheck_exit}, {r.seconds:.2f}s")
        for f in r.findings:
            print(f"FINDING {f.category} {f.where}: {f.summary}\n  {f.detail}")
            if f.tb:
                print("  " + f.tb.replace("\n", "\n  "))
        if a.mounts:
            m = mount_sample(bases, a.seed, a.case, workdir)
            print(f"real mount: {m.mount}")
            for f in m.findings:
                print(f"FINDING {f.category} {f.where}: {f.summary}\n  {f.detail}\n{f.tb}")
            r.findings += m.findings
        T = int(any(f.category in ("traceback", "hang") for f in r.findings))
        U = int(any(f.category == "not_repaired" for f in r.findings))
        print(f"1 images tried, {T} tracebacks, {U} not repaired")
        return 1 if T or U else 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
