"""Measure -o uring against the default transport: fio jobs on a fresh 3G image on /dev/shm
per mount, a 1 GiB file written first (bs=1M), after the background prefault ended; the two
modes alternate for --rounds rounds.  Prints one table (IOPS per round and the median).

    python scripts/uring_bench.py [--rounds 2] [--runtime 3] [--jobs rr4k-dir,rr4k-dir-2j,...]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DAXFS = Path(sys.executable).parent / "daxfs"
FIO = HERE / "fio"
JOBS = {"rr4k-dir": ("rr4k-dir.fio", "rr4k-dir"), "rr4k-dir-2j": ("rr4k-dir.fio", "rr4k-dir-2j"),
        "rw4k-dir": ("rw4k-dir.fio", "rw4k-dir"), "rw4k-buf": ("rw4k-buf.fio", "rw4k-buf")}


BUSY = ("tests.harness.exerciser", "pytest", "bench.py", "fio", "kill_explore", "crash_explore")


def foreign() -> list[str]:
    """Benchmarks, tests and exercisers running beside us (not our children): the figures of a
    round measured while one ran are noted."""
    parent, cmd = {}, {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    cmd[int(d)] = f.read().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, IndexError, ValueError):
                pass
    me = os.getpid()

    def ours(pid: int) -> bool:
        for _ in range(64):
            if pid == me:
                return True
            if pid <= 1 or pid not in parent:
                return False
            pid = parent[pid]
        return False
    up, pid = set(), me                           # and not our parents (timeout, make)
    while pid in parent and pid > 1:
        up.add(pid)
        pid = parent[pid]
    return sorted({b for p, c in cmd.items() for b in BUSY
                   if b in c and not ours(p) and p not in up})


def wait_quiet(limit: float) -> list[str]:
    t = time.monotonic() + limit
    while (f := foreign()) and time.monotonic() < t:
        time.sleep(2)
    return f


def stats(mnt) -> dict:
    return json.loads(os.getxattr(mnt, "user.daxfs.stats"))


def fio(args: list[str], env: dict | None = None) -> dict:
    out = subprocess.run(["fio", "--output-format=json", *args], check=True, capture_output=True,
                         text=True, env=env, cwd=FIO).stdout
    return json.loads(out[out.index("{"):])


def iops(result: dict) -> float:
    return sum(j["read"]["iops"] + j["write"]["iops"] for j in result["jobs"])


def one_mount(mode: str, jobs: list[str], runtime: int, work: Path, quiet: float) -> dict:
    img, mnt = Path("/dev/shm") / f"uring-bench-{os.getpid()}.img", work / "mnt"
    mnt.mkdir(exist_ok=True)
    subprocess.run([DAXFS, "mkfs", img, "--size", "3G", "--force"], check=True,
                   capture_output=True)
    opts = ["-o", f"log={work}/{mode}.log"] + (["-o", "uring"] if mode != "default" else [])
    env = dict(os.environ)
    if mode == "uring:other":                 # ring threads SCHED_OTHER (an experiment)
        env["DAXFS_URING_SCHED"] = "other"
    subprocess.run([DAXFS, "mount", img, mnt, *opts], check=True, env=env)
    out = {}
    try:
        fio([f"--directory={mnt}", "--name=fill", "--filename=fio.dat", "--size=1G", "--bs=1M",
             "--rw=write", "--end_fsync=1", "--ioengine=psync"])
        while stats(mnt)["prefaulting"]:
            time.sleep(0.5)
        s0 = stats(mnt)
        env = {**os.environ, "DIR": str(mnt), "RUNTIME": str(runtime), "SIZE": "1G"}
        busy = set(wait_quiet(quiet))
        for job in jobs:
            f, section = JOBS[job]
            out[job] = iops(fio([f"--section={section}", f], env))
            busy |= set(foreign())
        out["_busy"] = len(busy)
        s1 = stats(mnt)
        out["_uring_requests"] = s1["dp_uring_requests"] - s0["dp_uring_requests"]
        out["_uring"] = s1["uring"]
    finally:
        subprocess.run([DAXFS, "umount", mnt], check=False)
        img.unlink(missing_ok=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--runtime", type=int, default=3)
    p.add_argument("--jobs", default=",".join(JOBS))
    p.add_argument("--modes", default="default,uring",
                   help="alternated per round: default, uring, uring:other (ring threads "
                        "SCHED_OTHER instead of SCHED_IDLE)")
    p.add_argument("--wait-quiet", type=float, default=60,
                   help="wait up to this long for other benchmarks/tests to end (60 s)")
    args = p.parse_args()
    jobs = args.jobs.split(",")
    modes = args.modes.split(",")
    res: dict[str, list[dict]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as t:
        for r in range(args.rounds):
            for mode in modes:
                got = one_mount(mode, jobs, args.runtime, Path(t), args.wait_quiet)
                res[mode].append(got)
                print(f"round {r + 1} {mode}: " + ", ".join(
                    f"{k} {v:,.0f}" for k, v in got.items()) + f"; load {os.getloadavg()[0]:.2f}",
                    flush=True)
    print("\n| job | " + " | ".join(f"{m} r{i + 1}" for m in modes for i in range(args.rounds))
          + " | " + " | ".join(f"{m} median" for m in modes) + " |")
    print("|---|" + "---:|" * (len(modes) * (args.rounds + 1)))
    for job in jobs:
        vals = {m: [x[job] for x in res[m]] for m in modes}
        print(f"| {job} | " + " | ".join(f"{v / 1000:.1f}k" for m in modes for v in vals[m]) +
              " | " + " | ".join(f"{statistics.median(vals[m]) / 1000:.1f}k" for m in modes) + " |")
    print("busy rounds (other tests/benchmarks seen): " + ", ".join(
        f"{m} r{i + 1}" for m in modes for i, x in enumerate(res[m]) if x["_busy"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
