#!/usr/bin/env python3
"""daxfs benchmark suite: fio jobs + copy and mount measurements, per target, in one run.

    python scripts/bench.py --short --daxfs --dax --writeback --uring --peers  # make bench-short
    python scripts/bench.py --full --daxfs --dax --writeback --uring --peers   # make bench
    python scripts/bench.py --short --target disk=/tmp/benchdir

Targets: tmpfs (/dev/shm), a fresh daxfs image (--daxfs), one mounted -o dax (--dax), one
-o writeback (--writeback) and one -o uring (--uring), the
peers of bench_peers.py (--peers: libfuse's C passthrough_ll with and without writeback cache,
pyfuse3's passthroughfs.py, all over /dev/shm) and any directory (--target NAME=PATH).
The fio job files live in scripts/fio/ (one per workload, see common.inc). Jobs run in the order
of JOBS, each on the file the jobs before it left: nothing warms or drops the page cache between
them (except the last, extra one), so the buffered and mmap reads show whether data just written
stayed cached. Results go to results/<timestamp>/: results.json, results.md, chart.png (needs
matplotlib) and the fio outputs and daemon logs.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

try:
    import numpy as np
except ImportError:
    sys.exit("bench.py needs numpy: run it with the project venv (.venv/bin/python), "
             "see `make setup`")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (CLONE, DATA, BenchError, Target, log,  # noqa: E402
                          oneline, run)
from bench_targets import (PEER_CACHE, PEER_NAMES, PEERS, daxfs_target,  # noqa: E402
                           dir_target, find_daxfs, peer_target)
from bench_report import chart, markdown  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIO_DIR = ROOT / "scripts" / "fio"
CHUNK = 1 << 20
CP_DST, CAT_DST = "cp.dat", "cat.dat"
TMPFS_DIR = Path(f"/dev/shm/daxfs-bench-tmpfs-{os.getpid()}")  # ours alone: a test may bench too
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Job:
    name: str               # fio section name
    file: str               # job file in scripts/fio/
    metric: str             # "MB/s" or "IOPS"
    label: str              # table row
    prep: str = ""          # "fresh": delete fio.dat before each run, "clone": cp it before
                            # each run, "warm": read it once first; "": as left by the job before


# The order is part of the measurement: rr4k-buf and mmapR read what seqW wrote and the direct
# jobs read, with no warm-up and no drop_caches in between.
JOBS = [
    Job("seqW", "seqW.fio", "MB/s", "seq write 1 MiB, fresh file, end_fsync", "fresh"),
    Job("seqR-dir", "seqR-dir.fio", "MB/s", "seq read 1 MiB, O_DIRECT"),
    Job("rr4k-dir", "rr4k-dir.fio", "IOPS", "4k random read O_DIRECT, 1 job"),
    Job("rr4k-dir-2j", "rr4k-dir.fio", "IOPS", "same, 2 jobs"),
    Job("rr4k-buf", "rr4k-buf.fio", "IOPS", "4k random read buffered, after the jobs above"),
    Job("rw4k-buf", "rw4k-buf.fio", "IOPS", "4k random write buffered + end_fsync"),
    Job("mmapR", "mmapR.fio", "IOPS", "mmap 4k random read"),
    Job("mmapW", "mmapW.fio", "IOPS", "mmap 4k random write + end_fsync"),
    Job("rw4k-dir", "rw4k-dir.fio", "IOPS", "4k random write O_DIRECT"),
    Job("cow-storm", "cow-storm.fio", "IOPS", "COW storm: 4k O_DIRECT writes into a fresh cp",
        "clone"),
    Job("cow-storm-orig", "cow-storm.fio", "IOPS", "same writes into the original"),
    Job("seqR-buf", "seqR-buf.fio", "MB/s", "extra: seq read 1 MiB buffered, warmed", "warm"),
]


# --------------------------------------------------------------------------
# helpers

def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    try:
        n = int(t[:-1]) * units[t[-1]] if t and t[-1] in units else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1G, 64M)") from None
    if n < 1 << 20 or n % (1 << 20):
        raise argparse.ArgumentTypeError(f"size {text!r}: a whole number of MiB, at least 1M")
    return n


def timed(fn, *a, **kw) -> float:
    t0 = time.perf_counter()
    fn(*a, **kw)
    return time.perf_counter() - t0


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_once(path: Path) -> None:
    buf = bytearray(CHUNK)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def layout(path: Path, size: int) -> float:
    """Write `size` bytes of random data (not zeros: no hole/zero shortcuts)."""
    buf = np.random.default_rng(0).integers(0, 256, CHUNK, dtype=np.uint8)
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        for i in range(size // CHUNK):
            buf[:8] = np.frombuffer(i.to_bytes(8, "little"), np.uint8)  # no two chunks alike
            f.write(buf)
        os.fsync(f.fileno())
    return size / 1e6 / (time.perf_counter() - t0)


def ensure_data(t: Target, size: int, res: dict) -> None:
    """fio.dat must be whole before a job reads it: seqW may not have reached its end (a slow
    target in a short run) or may not have run (--jobs)."""
    try:
        have = (t.path / DATA).stat().st_size
    except FileNotFoundError:
        have = 0
    if have >= size:
        return
    if have:
        log.info("  %s has %d of %d bytes (seqW did not reach its end): laying it out",
                 DATA, have, size)
    res["layout_MBps"] = layout(t.path / DATA, size)
    log.info("  layout %d MiB: %.0f MB/s", size >> 20, res["layout_MBps"])


def make_clone(t: Target) -> None:
    (t.path / CLONE).unlink(missing_ok=True)
    run(["cp", t.path / DATA, t.path / CLONE], timeout=600)
    fsync_path(t.path / CLONE)


def fstype(path: Path) -> str:
    try:
        return run(["findmnt", "-n", "-o", "FSTYPE", "-T", path]).stdout.split()[0]
    except (BenchError, IndexError):
        return "?"


def cpu_ticks(pid: int | None) -> int | None:
    """utime + stime of all threads of `pid`, in clock ticks (None if it is gone)."""
    if not pid:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return None


# --------------------------------------------------------------------------
# measurements: one function per kind

def fio_once(t: Target, job: Job, a, out: Path) -> dict:
    cmd = ["fio", f"--section={job.name}", "--output-format=json",
           f"--output={out}", FIO_DIR / job.file]
    env = {**os.environ, "DIR": str(t.path), "RUNTIME": str(a.runtime), "SIZE": str(a.size)}
    log.debug("$ DIR=%s RUNTIME=%s SIZE=%s %s", t.path, a.runtime, a.size,
              " ".join(map(str, cmd)))
    pid = t.pid() if t.pid else None
    cpu0 = cpu_ticks(pid)
    # fio forks one process per job: give it its own process group so that a
    # timeout or Ctrl-C kills the job processes too (they would keep the mount busy)
    p = subprocess.Popen([str(c) for c in cmd], env=env, text=True, start_new_session=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stdout, stderr = p.communicate(timeout=10 * a.runtime + 300)
    except BaseException as e:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        if isinstance(e, subprocess.TimeoutExpired):
            raise BenchError(f"fio {job.name} timed out, killed") from None
        raise
    cpu1 = cpu_ticks(pid)
    try:
        jobs = json.loads(out.read_text())["jobs"]
    except (OSError, ValueError, KeyError):
        jobs = []
    errs = [j["error"] for j in jobs if j.get("error")]
    if p.returncode != 0 or not jobs or errs:
        raise BenchError(f"fio {job.name} failed (exit {p.returncode}, errors {errs}): "
                         f"{oneline(stderr + stdout) or 'no output'}")
    sample = {"MB/s": sum(j[d]["bw_bytes"] for j in jobs for d in ("read", "write")) / 1e6,
              "IOPS": sum(j[d]["iops"] for j in jobs for d in ("read", "write")),
              "ios": sum(j[d]["total_ios"] for j in jobs for d in ("read", "write"))}
    if cpu0 is not None and cpu1 is not None and sample["ios"]:
        sample["daemon_cpu_us_per_op"] = (cpu1 - cpu0) / CLK_TCK / sample["ios"] * 1e6
    return sample


def run_fio_job(t: Target, job: Job, a, outdir: Path, res: dict) -> dict:
    if job.prep != "fresh":
        ensure_data(t, a.size, res)
    if job.prep == "warm":
        read_once(t.path / DATA)
    samples = []
    for i in range(a.runs):
        if job.prep == "fresh":
            (t.path / DATA).unlink(missing_ok=True)
        elif job.prep == "clone":
            make_clone(t)
        samples.append(fio_once(t, job, a, outdir / f"{t.name}-{job.name}-{i}.json"))
    (t.path / CLONE).unlink(missing_ok=True)
    out = {"metric": job.metric, "value": float(np.median([s[job.metric] for s in samples])),
           "runs": samples}
    cpu = [s["daemon_cpu_us_per_op"] for s in samples if "daemon_cpu_us_per_op" in s]
    if cpu:
        out["daemon_cpu_us_per_op"] = float(np.median(cpu))
    log.info("  %-15s %12.1f %s%s", job.name, out["value"], job.metric,
             f"   daemon CPU {out['daemon_cpu_us_per_op']:.1f} us/op" if cpu else "")
    return out


def measure_copy(t: Target, runs: int) -> dict:
    """Wall time of `cp` (reflink on daxfs) vs a byte copy `cat src | cat > dst` of fio.dat,
    incl. fsync of dst. The pipe matters: GNU cat >= 9 itself uses copy_file_range when
    writing to a regular file, so `cat src > dst` would be a reflink on daxfs too."""
    src = t.path / DATA
    read_once(src)

    def cp():
        run(["cp", src, t.path / CP_DST], timeout=600)
        fsync_path(t.path / CP_DST)

    def cat():
        run(["sh", "-c", 'cat "$0" | cat > "$1"', src, t.path / CAT_DST], timeout=600)
        fsync_path(t.path / CAT_DST)

    res = {}
    for name, fn, dst in (("cp", cp, CP_DST), ("cat", cat, CAT_DST)):
        secs = []
        for _ in range(runs):
            secs.append(timed(fn))
            (t.path / dst).unlink()
        res[f"{name}_s"] = float(np.median(secs))
    res["cp_over_cat"] = res["cp_s"] / res["cat_s"]
    log.info("  cp %.3fs  cat %.3fs  cp/cat %.3f", res["cp_s"], res["cat_s"], res["cp_over_cat"])
    return res


def measure_mount(t: Target, nfiles: int, runs: int) -> dict:
    """Fill the fs with nfiles empty files, then time umount, mount and `ls`."""
    m = t.mount
    log.info("  creating %d files through the mount ...", nfiles)
    t0 = time.perf_counter()
    for i in range(nfiles):
        os.close(os.open(t.path / f"f{i:06d}", os.O_CREAT | os.O_WRONLY, 0o644))
        if i and i % 25000 == 0:
            log.info("    %d files, %.0f/s", i, i / (time.perf_counter() - t0))
    res = {"nfiles": nfiles, "create_per_s": nfiles / (time.perf_counter() - t0)}
    samples = []
    for _ in range(runs):
        s = {"umount_s": timed(m.umount), "mount_s": timed(m.mount)}
        t0 = time.perf_counter()
        out = run(["ls", t.path], timeout=600).stdout
        s["ls_s"] = time.perf_counter() - t0
        s["ls_entries"] = len(out.splitlines())
        samples.append(s)
    for k in ("umount_s", "mount_s", "ls_s"):
        res[k] = float(np.median([s[k] for s in samples]))
    res["ls_entries"] = samples[-1]["ls_entries"]
    if res["ls_entries"] < nfiles:
        log.error("  only %d of %d files listed after remount", res["ls_entries"], nfiles)
    log.info("  %d files: mount %.3fs, ls %.3fs (%d entries), umount %.3fs, create %.0f/s",
             nfiles, res["mount_s"], res["ls_s"], res["ls_entries"], res["umount_s"],
             res["create_per_s"])
    return res


def bench_target(t: Target, jobs, a, outdir: Path) -> dict:
    log.info("== %s: %s (%s)", t.name, t.path, fstype(t.path))
    res = {"path": str(t.path), "fstype": fstype(t.path), "desc": t.desc, "jobs": {},
           "errors": {}}
    for job in jobs:
        try:
            res["jobs"][job.name] = run_fio_job(t, job, a, outdir, res)
        except (BenchError, OSError) as e:
            log.error("  %s on %s: %s", job.name, t.name, e)
            res["errors"][job.name] = str(e)
    extras = [] if a.no_extras else [("copy", lambda: measure_copy(t, a.runs))]
    if t.mount and not a.no_extras:
        extras.append(("mount", lambda: measure_mount(t, a.nfiles, a.runs)))
    for name, fn in extras:
        try:
            ensure_data(t, a.size, res)
            res[name] = fn()
        except (BenchError, OSError) as e:
            log.error("  %s on %s: %s", name, t.name, e)
            res["errors"][name] = str(e)
    return res


# --------------------------------------------------------------------------

def machine_info() -> dict:
    mem = next(l for l in Path("/proc/meminfo").read_text().splitlines()
               if l.startswith("MemTotal"))
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.machine())
    try:
        libfuse = run(["pkg-config", "--modversion", "fuse3"]).stdout.strip()
    except BenchError:
        libfuse = "?"
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "host": platform.node(), "nproc": os.cpu_count(), "cpu": cpu,
            "memtotal_GiB": round(int(mem.split()[1]) / 2**20, 1),
            "kernel": platform.release(), "fio": run(["fio", "--version"]).stdout.strip(),
            "libfuse": libfuse, "python": platform.python_version(), "loadavg_start": loadavg(),
            "memavail_start_GiB": mem_available_gib()}


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def mem_available_gib() -> float:
    """MemAvailable: what the page cache may use. Leftover images in /dev/shm take it, and
    then cached-read and mmap jobs measure evictions (seen: 0.78 -> 0.21 for mmap writes)."""
    line = next(l for l in Path("/proc/meminfo").read_text().splitlines()
                if l.startswith("MemAvailable"))
    return round(int(line.split()[1]) / 2**20, 1)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--short", dest="mode", action="store_const", const="short",
                      help="3 s per job, 1 run (default)")
    mode.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="5 s per job, median of 3 runs")
    p.add_argument("--target", action="append", default=[], metavar="NAME=PATH",
                   help="benchmark directory PATH as NAME (repeatable)")
    p.add_argument("--daxfs", action="store_true", help="also benchmark a fresh daxfs mount")
    p.add_argument("--dax", action="store_true",
                   help="also benchmark a fresh daxfs mount in dax mode (-o dax)")
    p.add_argument("--writeback", action="store_true",
                   help="also benchmark a fresh daxfs mount with the writeback cache "
                        "(-o writeback)")
    p.add_argument("--uring", action="store_true",
                   help="also benchmark a fresh daxfs mount with FUSE-over-io_uring (-o uring)")
    p.add_argument("--peers", action="store_true",
                   help="also benchmark the peers: " + ", ".join(PEER_NAMES))
    p.add_argument("--peer", action="append", default=[], choices=PEER_NAMES, metavar="NAME",
                   help="benchmark this one peer (repeatable): " + ", ".join(PEER_NAMES))
    p.add_argument("--peer-cache", type=Path, default=PEER_CACHE, metavar="DIR",
                   help="where the peers are built and downloaded to (default: %(default)s)")
    p.add_argument("--no-tmpfs", action="store_true", help="skip the tmpfs baseline (a fresh directory in /dev/shm)")
    p.add_argument("--runtime", type=int, help="seconds per fio job (overrides mode)")
    p.add_argument("--runs", type=int, help="repetitions per job, median reported (overrides mode)")
    p.add_argument("--jobs", help="comma-separated subset of: " + ",".join(j.name for j in JOBS))
    p.add_argument("--size", type=parse_size, default=1 << 30,
                   help="size of the fio file (default 1G; smaller only for smoke tests)")
    p.add_argument("--no-extras", action="store_true",
                   help="skip the cp/cat copy timing and the daxfs many-files mount test")
    p.add_argument("--nfiles", type=int, default=100_000, help="files for the daxfs mount test")
    p.add_argument("--image-size", default="3G", help="daxfs image size (sparse, on /dev/shm)")
    p.add_argument("--out", type=Path, default=ROOT / "results", help="results base directory")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    a.mode = a.mode or "short"
    a.runtime = a.runtime or (3 if a.mode == "short" else 5)
    a.runs = a.runs or (1 if a.mode == "short" else 3)
    return a


def select_targets(a, outdir: Path) -> list[tuple[str, object]]:
    targets = [] if a.no_tmpfs else [("tmpfs", lambda: dir_target("tmpfs", TMPFS_DIR))]
    reserved = {"tmpfs", "daxfs", "daxfs-dax", "daxfs-writeback", "daxfs-uring", *PEER_NAMES}
    for spec in a.target:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise BenchError(f"--target expects NAME=PATH, got {spec!r}")
        if name in reserved or name in (n for n, _ in targets):
            raise BenchError(f"--target name {name!r} is reserved or used twice")
        targets.append((name, lambda n=name, p=Path(path).absolute(): dir_target(n, p)))
    if a.daxfs:
        find_daxfs()
        targets.append(("daxfs", lambda: daxfs_target(a.image_size, outdir)))
    if a.dax:
        find_daxfs()
        targets.append(("daxfs-dax", lambda: daxfs_target(a.image_size, outdir, "daxfs-dax",
                                                           "dax")))
    if a.writeback:
        find_daxfs()
        targets.append(("daxfs-writeback", lambda: daxfs_target(
            a.image_size, outdir, "daxfs-writeback", "writeback")))
    if a.uring:
        find_daxfs()
        targets.append(("daxfs-uring", lambda: daxfs_target(
            a.image_size, outdir, "daxfs-uring", "uring")))
    for peer in PEERS:
        if a.peers or peer.name in a.peer:
            targets.append((peer.name, lambda pr=peer: peer_target(pr, outdir, a.peer_cache)))
    if not targets:
        raise BenchError("nothing to benchmark: give --target, --daxfs, --peers or drop --no-tmpfs")
    return targets


def select_jobs(a) -> list[Job]:
    if not a.jobs:
        return list(JOBS)
    wanted = a.jobs.split(",")
    unknown = set(wanted) - {j.name for j in JOBS}
    if unknown:
        raise BenchError(f"unknown job(s) {sorted(unknown)}; known: {[j.name for j in JOBS]}")
    return [j for j in JOBS if j.name in wanted]


def main(argv=None) -> int:
    a = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # cleanups run as for Ctrl-C
    try:
        if not shutil.which("fio"):
            raise BenchError("fio not found on PATH: run `make setup` or install fio "
                             "(e.g. apt-get install fio)")
        if os.geteuid() != 0:
            log.warning("not root: daxfs and peer mounts may fail")
        outdir = a.out / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        targets, jobs = select_targets(a, outdir), select_jobs(a)
        (outdir / "fio").mkdir(parents=True, exist_ok=True)
        logging.getLogger().addHandler(logging.FileHandler(outdir / "bench.log"))
        info = machine_info()
        need = round(4 * a.size / 2**30 + 2, 1)    # image + file + its page cache, twice over
        if info["memavail_start_GiB"] < need:
            log.warning("only %.1f GiB of memory available (want %.1f): cached and mmap jobs "
                        "will measure evictions; look for leftover images in /dev/shm",
                        info["memavail_start_GiB"], need)
        cfg = {"mode": a.mode, "runtime": a.runtime, "runs": a.runs, "size": a.size,
               "nfiles": a.nfiles, "jobs": [j.name for j in jobs], "argv": sys.argv[1:]}
        log.info("%s mode, %d s x %d run(s), %d jobs, %d targets -> %s", a.mode, a.runtime,
                 a.runs, len(jobs), len(targets), outdir)
        results = {}
        for name, make in targets:
            try:
                with make() as t:
                    results[name] = bench_target(t, jobs, a, outdir / "fio")
            except (BenchError, OSError) as e:  # build, mount or setup failed: report, go on
                log.error("target %s skipped: %s", name, e)
                results[name] = {"path": "?", "fstype": "?", "desc": "", "jobs": {},
                                 "errors": {"setup": str(e)}}
        info["loadavg_end"] = loadavg()
        info["memavail_end_GiB"] = mem_available_gib()
        (outdir / "results.json").write_text(json.dumps(
            {"machine": info, "config": cfg, "results": results}, indent=2))
        md = markdown(info, cfg, results, jobs)
        note = chart(results, jobs, outdir / "chart.png")
        (outdir / "results.md").write_text(
            md + ("\n![ratios to tmpfs](chart.png)\n" if note.startswith("chart:") else f"\n{note}\n"))
        print(md)
        log.info("%s; results in %s", note, outdir)
        return 1 if any(r["errors"] for r in results.values()) else 0
    except BenchError as e:
        log.error("%s", e)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    except Exception as e:  # a bug in the bench itself: still one line (-v: the traceback)
        log.debug("traceback", exc_info=True)
        log.error("bench.py internal error: %s: %s", type(e).__name__, e)
        return 3


if __name__ == "__main__":
    sys.exit(main())
