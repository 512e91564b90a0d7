#!/usr/bin/env python3
"""daxfs benchmark suite: fio jobs + copy and mount measurements, per target.

    python scripts/bench.py --short                       # tmpfs baseline only
    python scripts/bench.py --full --daxfs --target disk=/tmp/benchdir

Every target is a directory; the fio job files live in scripts/fio/ (one per
workload, see common.inc).  Results go to results/<timestamp>/ as
results.json, results.md and chart.png (needs matplotlib).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

try:
    import numpy as np
except ImportError:
    sys.exit("bench.py needs numpy: run it with the project venv (.venv/bin/python), "
             "see `make setup`")

log = logging.getLogger("bench")

ROOT = Path(__file__).resolve().parent.parent
FIO_DIR = ROOT / "scripts" / "fio"
FILE_SIZE = 1 << 30
CHUNK = 1 << 20
DATA, CLONE, CP_DST, CAT_DST = "fio.dat", "clone.dat", "cp.dat", "cat.dat"
BENCH_FILES = (DATA, CLONE, CP_DST, CAT_DST)
TMPFS_DIR = Path("/dev/shm/daxfs-bench")


class BenchError(Exception):
    """A user-facing error: printed as one message, never as a traceback."""


@dataclass(frozen=True)
class Job:
    name: str               # fio section name == table row
    file: str               # job file in scripts/fio/
    metric: str             # "MB/s" or "IOPS"
    prep: str = ""          # "warm" | "cold" (once per job), "clone" (every run)
    full_only: bool = False


JOBS = [
    Job("seqW", "seqW.fio", "MB/s"),
    Job("seqR-buf", "seqR-buf.fio", "MB/s", "warm"),
    Job("seqR-dir", "seqR-dir.fio", "MB/s", "cold"),
    Job("rr4k-buf", "rr4k-buf.fio", "IOPS", "warm"),
    Job("rr4k-dir", "rr4k-dir.fio", "IOPS", "cold"),
    Job("rr4k-dir-2j", "rr4k-dir.fio", "IOPS", "cold", full_only=True),
    Job("rw4k-buf", "rw4k-buf.fio", "IOPS"),
    Job("rw4k-dir", "rw4k-dir.fio", "IOPS"),
    Job("mmapR", "mmapR.fio", "IOPS", "warm"),
    Job("mmapW", "mmapW.fio", "IOPS"),
    Job("cow-storm", "cow-storm.fio", "IOPS", "clone"),
    Job("cow-storm-orig", "cow-storm.fio", "IOPS"),
]


@dataclass
class Target:
    name: str
    path: Path
    mount: "DaxfsMount | None" = None


# --------------------------------------------------------------------------
# helpers

def run(cmd, timeout=120, **kw) -> subprocess.CompletedProcess:
    """Run a command; failures become BenchError carrying its stderr verbatim."""
    log.debug("$ %s", " ".join(map(str, cmd)))
    try:
        p = subprocess.run([str(c) for c in cmd], timeout=timeout, text=True,
                           stdout=kw.pop("stdout", subprocess.PIPE),
                           stderr=subprocess.PIPE, **kw)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{cmd[0]} timed out after {timeout}s: {' '.join(map(str, cmd))}")
    except FileNotFoundError:
        raise BenchError(f"command not found: {cmd[0]}")
    if p.returncode != 0:
        raise BenchError(f"`{' '.join(map(str, cmd))}` failed (exit {p.returncode}):\n"
                         f"{(p.stderr or '').strip()}")
    return p


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


def drop_caches() -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as e:
        log.warning("cannot drop caches (%s); cold jobs may be warm", e)


def read_once(path: Path) -> None:
    buf = bytearray(CHUNK)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def layout(path: Path) -> float:
    """Write FILE_SIZE bytes of random data (not zeros: no hole/zero shortcuts)."""
    buf = np.random.default_rng(0).integers(0, 256, CHUNK, dtype=np.uint8)
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        for i in range(FILE_SIZE // CHUNK):
            buf[:8] = np.frombuffer(i.to_bytes(8, "little"), np.uint8)  # no two chunks alike
            f.write(buf)
        os.fsync(f.fileno())
    return FILE_SIZE / 1e6 / (time.perf_counter() - t0)


def make_clone(t: Target) -> None:
    (t.path / CLONE).unlink(missing_ok=True)
    run(["cp", t.path / DATA, t.path / CLONE], timeout=600)
    fsync_path(t.path / CLONE)


def fstype(path: Path) -> str:
    try:
        return run(["findmnt", "-n", "-o", "FSTYPE", "-T", path]).stdout.split()[0]
    except (BenchError, IndexError):
        return "?"


# --------------------------------------------------------------------------
# daxfs image + mount

def find_daxfs() -> Path:
    exe = Path(sys.executable).parent / "daxfs"
    if exe.exists():
        return exe
    found = shutil.which("daxfs")
    if not found:
        raise BenchError("daxfs executable not found next to "
                         f"{sys.executable} nor on PATH; run `make setup` (pip install -e .)")
    return Path(found)


class DaxfsMount:
    def __init__(self, exe: Path, image: Path, mnt: Path, logfile: Path, opts: str = ""):
        self.exe, self.image, self.mnt, self.logfile = exe, image, mnt, logfile
        self.opts = opts

    def mount(self) -> None:
        """Return once the mountpoint answers stat() as a mount."""
        opts = f"log={self.logfile}" + (f",{self.opts}" if self.opts else "")
        run([self.exe, "mount", "-o", opts, self.image, self.mnt], timeout=300)
        deadline = time.monotonic() + 30
        while not os.path.ismount(self.mnt):
            if time.monotonic() > deadline:
                raise BenchError(f"`daxfs mount` returned but {self.mnt} is not a mountpoint")
            time.sleep(0.001)
        os.stat(self.mnt)

    def umount(self) -> None:
        run([self.exe, "umount", self.mnt], timeout=600)


@contextlib.contextmanager
def daxfs_target(image_size: str, outdir: Path, name: str = "daxfs", opts: str = ""):
    exe = find_daxfs()
    image = Path(f"/dev/shm/daxfs-bench-{os.getpid()}.img")
    mnt = Path(tempfile.mkdtemp(prefix="daxfs-bench-mnt-"))
    m = DaxfsMount(exe, image, mnt, outdir / f"{name}-daemon.log", opts)
    try:
        run([exe, "mkfs", image, "--size", image_size], timeout=300)
        m.mount()
        yield Target(name, mnt, m)
    finally:
        for attempt in range(5):  # EBUSY while killed processes exit: retry, then lazy
            if not os.path.ismount(mnt):
                break
            try:
                m.umount()
            except BenchError as e:
                if attempt == 4:
                    log.error("%s\nfalling back to fusermount3 -u -z", e)
                    subprocess.run(["fusermount3", "-u", "-z", str(mnt)])
                time.sleep(1)
        with contextlib.suppress(OSError):
            mnt.rmdir()
        image.unlink(missing_ok=True)


@contextlib.contextmanager
def dir_target(name: str, path: Path):
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BenchError(f"cannot create {path}: {e}")
    try:
        yield Target(name, path)
    finally:
        if created:
            shutil.rmtree(path, ignore_errors=True)
        else:
            for f in BENCH_FILES:
                (path / f).unlink(missing_ok=True)


# --------------------------------------------------------------------------
# measurements: one function per kind

def fio_once(t: Target, job: Job, runtime: int, out: Path) -> dict:
    cmd = ["fio", f"--section={job.name}", "--output-format=json",
           f"--output={out}", FIO_DIR / job.file]
    env = {**os.environ, "DIR": str(t.path), "RUNTIME": str(runtime)}
    log.debug("$ DIR=%s RUNTIME=%s %s", t.path, runtime, " ".join(map(str, cmd)))
    # fio forks one process per job: give it its own process group so that a
    # timeout or Ctrl-C kills the job processes too (they would keep the mount busy)
    p = subprocess.Popen([str(c) for c in cmd], env=env, text=True, start_new_session=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stdout, stderr = p.communicate(timeout=10 * runtime + 300)
    except BaseException as e:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        if isinstance(e, subprocess.TimeoutExpired):
            raise BenchError(f"fio {job.name} timed out, killed") from None
        raise
    try:
        jobs = json.loads(out.read_text())["jobs"]
    except (OSError, ValueError, KeyError):
        jobs = []
    errs = [j["error"] for j in jobs if j.get("error")]
    if p.returncode != 0 or not jobs or errs:
        raise BenchError(f"fio {job.name} failed (exit {p.returncode}, errors {errs}):\n"
                         f"{(stderr + stdout).strip()[-2000:]}")
    bw = sum(j[d]["bw_bytes"] for j in jobs for d in ("read", "write"))
    iops = sum(j[d]["iops"] for j in jobs for d in ("read", "write"))
    return {"MB/s": bw / 1e6, "IOPS": iops}


def run_fio_job(t: Target, job: Job, runtime: int, runs: int, outdir: Path) -> dict:
    if job.prep == "warm":
        read_once(t.path / DATA)
    elif job.prep == "cold":
        drop_caches()
    samples = []
    for i in range(runs):
        if job.prep == "clone":
            make_clone(t)
        samples.append(fio_once(t, job, runtime, outdir / f"{t.name}-{job.name}-{i}.json"))
    (t.path / CLONE).unlink(missing_ok=True)
    value = float(np.median([s[job.metric] for s in samples]))
    log.info("  %-15s %12.1f %s", job.name, value, job.metric)
    return {"metric": job.metric, "value": value, "runs": samples}


def measure_copy(t: Target, runs: int) -> dict:
    """Wall time of `cp` (reflink on daxfs) vs a byte copy `cat src | cat > dst` of the 1 GiB
    file, incl. fsync of dst. The pipe matters: GNU cat >= 9 itself uses copy_file_range when
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


def bench_target(t: Target, jobs, args, outdir: Path) -> dict:
    log.info("== %s: %s (%s)", t.name, t.path, fstype(t.path))
    res = {"path": str(t.path), "fstype": fstype(t.path), "jobs": {}, "errors": {}}
    res["layout_MBps"] = layout(t.path / DATA)
    log.info("  layout 1 GiB: %.0f MB/s", res["layout_MBps"])
    for job in jobs:
        try:
            res["jobs"][job.name] = run_fio_job(t, job, args.runtime, args.runs, outdir)
        except (BenchError, OSError) as e:
            log.error("  %s on %s: %s", job.name, t.name, e)
            res["errors"][job.name] = str(e)
    extras = [("copy", lambda: measure_copy(t, args.runs))]
    if t.mount:
        extras.append(("mount", lambda: measure_mount(t, args.nfiles, args.runs)))
    for name, fn in extras:
        try:
            res[name] = fn()
        except (BenchError, OSError) as e:
            log.error("  %s on %s: %s", name, t.name, e)
            res["errors"][name] = str(e)
    return res


# --------------------------------------------------------------------------
# report

def machine_info() -> dict:
    mem = next(l for l in Path("/proc/meminfo").read_text().splitlines()
               if l.startswith("MemTotal"))
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.machine())
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "host": platform.node(), "nproc": os.cpu_count(), "cpu": cpu,
            "memtotal_GiB": round(int(mem.split()[1]) / 2**20, 1),
            "kernel": platform.release(), "fio": run(["fio", "--version"]).stdout.strip(),
            "python": platform.python_version()}


def ratio_columns(names: list[str]) -> list[tuple[str, str]]:
    """(numerator, denominator) pairs: each target / tmpfs, daxfs / each named target."""
    pairs = [(n, "tmpfs") for n in names if n != "tmpfs" and "tmpfs" in names]
    if "daxfs" in names:
        pairs += [("daxfs", n) for n in names if n not in ("daxfs", "tmpfs")]
    return pairs


def value(results, target, row):
    return results[target]["jobs"].get(row, {}).get("value")


def fmt(v, metric=""):
    if v is None:
        return "err"
    if metric == "IOPS":
        return f"{v / 1e3:.1f}k" if v >= 1e3 else f"{v:.0f}"
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}"


def markdown(info: dict, cfg: dict, results: dict, jobs) -> str:
    names = list(results)
    pairs = ratio_columns(names)
    lines = [f"# daxfs benchmark {info['date']}", "",
             f"- machine: {info['host']}, {info['nproc']} CPUs ({info['cpu']}), "
             f"{info['memtotal_GiB']} GiB RAM, kernel {info['kernel']}, {info['fio']}",
             f"- mode: {cfg['mode']}, runtime {cfg['runtime']} s, median of {cfg['runs']} run(s)",
             *(f"- {n}: `{r['path']}` ({r['fstype']})" for n, r in results.items()), "",
             "| job | unit | " + " | ".join(names) + "".join(f" | {a}/{b}" for a, b in pairs) + " |",
             "|---|---|" + "---:|" * (len(names) + len(pairs))]
    for job in jobs:
        vals = [fmt(value(results, n, job.name), job.metric) for n in names]
        ratios = []
        for a, b in pairs:
            va, vb = value(results, a, job.name), value(results, b, job.name)
            ratios.append(f"{va / vb:.2f}" if va and vb else "–")
        lines.append(f"| {job.name} | {job.metric} | " + " | ".join(vals + ratios) + " |")
    lines += ["", "| other | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]

    def row(label, get):  # rows nobody has (e.g. mount without daxfs) are left out
        cells = []
        for n in names:
            try:
                cells.append(get(results[n]))
            except (KeyError, TypeError, ZeroDivisionError):
                cells.append("–")
        if set(cells) != {"–"}:
            lines.append(f"| {label} | " + " | ".join(cells) + " |")

    row("layout 1 GiB (MB/s)", lambda r: f"{r['layout_MBps']:.0f}")
    row("cp 1 GiB (s)", lambda r: f"{r['copy']['cp_s']:.3f}")
    row("cat > 1 GiB (s)", lambda r: f"{r['copy']['cat_s']:.3f}")
    row("cp / cat time", lambda r: f"{r['copy']['cp_over_cat']:.3f}")
    row("cow-storm clone/orig IOPS",
        lambda r: f"{r['jobs']['cow-storm']['value'] / r['jobs']['cow-storm-orig']['value']:.2f}")
    row("create files (/s)", lambda r: f"{r['mount']['create_per_s']:.0f}")
    row("mount, N files (s)", lambda r: f"{r['mount']['mount_s']:.3f} (N={r['mount']['nfiles']})")
    row("ls top dir (s)", lambda r: f"{r['mount']['ls_s']:.3f} ({r['mount']['ls_entries']} entries)")
    row("umount (s)", lambda r: f"{r['mount']['umount_s']:.3f}")
    errors = [(n, k, e) for n, r in results.items() for k, e in r["errors"].items()]
    if errors:
        lines += ["", "## Errors", ""]
        lines += [f"- **{n} / {k}**:\n\n```\n{e}\n```" for n, k, e in errors]
    return "\n".join(lines) + "\n"


def chart(results: dict, jobs, path: Path) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "chart skipped: matplotlib not installed (pip install matplotlib)"
    others = [n for n in results if n != "tmpfs"]
    if "tmpfs" not in results or not others:
        return "chart skipped: needs the tmpfs baseline and one other target"
    x = np.arange(len(jobs))
    width = 0.8 / len(others)
    fig, ax = plt.subplots(figsize=(max(8, len(jobs) * 0.9), 4.5))
    for i, n in enumerate(others):
        ys = [(value(results, n, j.name) or 0) / (value(results, "tmpfs", j.name) or np.inf)
              for j in jobs]
        ax.bar(x + (i - (len(others) - 1) / 2) * width, ys, width, label=n)
    ax.axhline(1, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.set_xticks(x, [j.name for j in jobs], rotation=30, ha="right")
    ax.set_ylabel("ratio to tmpfs (log)")
    ax.set_title("throughput relative to tmpfs (higher is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"chart: {path}"


# --------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--short", dest="mode", action="store_const", const="short",
                      help="runtime 3 s, 1 run, no 2-thread job (default)")
    mode.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="runtime 10 s, 3 runs, all jobs")
    p.add_argument("--target", action="append", default=[], metavar="NAME=PATH",
                   help="benchmark directory PATH as NAME (repeatable)")
    p.add_argument("--daxfs", action="store_true", help="also benchmark a fresh daxfs mount")
    p.add_argument("--dax", action="store_true",
                   help="also benchmark a fresh daxfs mount in dax mode (-o dax)")
    p.add_argument("--no-tmpfs", action="store_true", help=f"skip the tmpfs baseline ({TMPFS_DIR})")
    p.add_argument("--runtime", type=int, help="seconds per fio job (overrides mode)")
    p.add_argument("--runs", type=int, help="repetitions per job, median reported (overrides mode)")
    p.add_argument("--jobs", help="comma-separated subset of: " + ",".join(j.name for j in JOBS))
    p.add_argument("--nfiles", type=int, default=100_000, help="files for the daxfs mount test")
    p.add_argument("--image-size", default="3G", help="daxfs image size (sparse, on /dev/shm)")
    p.add_argument("--out", type=Path, default=ROOT / "results", help="results base directory")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    a.mode = a.mode or "short"
    a.runtime = a.runtime or (3 if a.mode == "short" else 10)
    a.runs = a.runs or (1 if a.mode == "short" else 3)
    return a


def select_targets(a, outdir: Path) -> list[tuple[str, object]]:
    targets = [] if a.no_tmpfs else [("tmpfs", lambda: dir_target("tmpfs", TMPFS_DIR))]
    for spec in a.target:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise BenchError(f"--target expects NAME=PATH, got {spec!r}")
        if name in ("tmpfs", "daxfs", "daxfs-dax") or name in (n for n, _ in targets):
            raise BenchError(f"--target name {name!r} is reserved or used twice")
        targets.append((name, lambda n=name, p=Path(path).absolute(): dir_target(n, p)))
    if a.daxfs:
        find_daxfs()
        targets.append(("daxfs", lambda: daxfs_target(a.image_size, outdir)))
    if a.dax:
        find_daxfs()
        targets.append(("daxfs-dax", lambda: daxfs_target(a.image_size, outdir, "daxfs-dax",
                                                           "dax")))
    if not targets:
        raise BenchError("nothing to benchmark: give --target, --daxfs or drop --no-tmpfs")
    return targets


def select_jobs(a) -> list[Job]:
    if not a.jobs:
        return [j for j in JOBS if a.mode == "full" or not j.full_only]
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
            log.warning("not root: cannot drop caches, cold jobs may run warm")
        outdir = a.out / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        targets, jobs = select_targets(a, outdir), select_jobs(a)
        (outdir / "fio").mkdir(parents=True, exist_ok=True)
        logging.getLogger().addHandler(logging.FileHandler(outdir / "bench.log"))
        info = machine_info()
        cfg = {"mode": a.mode, "runtime": a.runtime, "runs": a.runs, "nfiles": a.nfiles,
               "jobs": [j.name for j in jobs], "argv": sys.argv[1:]}
        log.info("%s mode, %d s x %d run(s), %d jobs -> %s", a.mode, a.runtime, a.runs,
                 len(jobs), outdir)
        results = {}
        for name, make in targets:
            try:
                with make() as t:
                    results[name] = bench_target(t, jobs, a, outdir / "fio")
            except (BenchError, OSError) as e:  # setup/layout failed: report, go on
                log.error("target %s: %s", name, e)
                results[name] = {"path": "?", "fstype": "?", "jobs": {}, "errors": {"setup": str(e)}}
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


if __name__ == "__main__":
    sys.exit(main())
