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


def stats(mnt) -> dict:
    return json.loads(os.getxattr(mnt, "user.daxfs.stats"))


def fio(args: list[str], env: dict | None = None) -> dict:
    out = subprocess.run(["fio", "--output-format=json", *args], check=True, capture_output=True,
                         text=True, env=env, cwd=FIO).stdout
    return json.loads(out[out.index("{"):])


def iops(result: dict) -> float:
    return sum(j["read"]["iops"] + j["write"]["iops"] for j in result["jobs"])


def one_mount(mode: str, jobs: list[str], runtime: int, work: Path) -> dict:
    img, mnt = Path("/dev/shm") / f"uring-bench-{os.getpid()}.img", work / "mnt"
    mnt.mkdir(exist_ok=True)
    subprocess.run([DAXFS, "mkfs", img, "--size", "3G", "--force"], check=True,
                   capture_output=True)
    opts = ["-o", f"log={work}/{mode}.log"] + (["-o", "uring"] if mode == "uring" else [])
    subprocess.run([DAXFS, "mount", img, mnt, *opts], check=True)
    out = {}
    try:
        fio([f"--directory={mnt}", "--name=fill", "--filename=fio.dat", "--size=1G", "--bs=1M",
             "--rw=write", "--end_fsync=1", "--ioengine=psync"])
        while stats(mnt)["prefaulting"]:
            time.sleep(0.5)
        s0 = stats(mnt)
        env = {**os.environ, "DIR": str(mnt), "RUNTIME": str(runtime), "SIZE": "1G"}
        for job in jobs:
            f, section = JOBS[job]
            out[job] = iops(fio([f"--section={section}", f], env))
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
    args = p.parse_args()
    jobs = args.jobs.split(",")
    res: dict[str, list[dict]] = {"default": [], "uring": []}
    with tempfile.TemporaryDirectory() as t:
        for r in range(args.rounds):
            for mode in ("default", "uring"):
                got = one_mount(mode, jobs, args.runtime, Path(t))
                res[mode].append(got)
                print(f"round {r + 1} {mode}: " + ", ".join(
                    f"{k} {v:,.0f}" for k, v in got.items()), flush=True)
    print("\n| job | " + " | ".join(f"default r{i + 1}" for i in range(args.rounds)) + " | " +
          " | ".join(f"uring r{i + 1}" for i in range(args.rounds)) +
          " | default median | uring median | uring/default |")
    print("|---|" + "---:|" * (2 * args.rounds + 3))
    for job in jobs:
        d = [x[job] for x in res["default"]]
        u = [x[job] for x in res["uring"]]
        md, mu = statistics.median(d), statistics.median(u)
        print(f"| {job} | " + " | ".join(f"{v / 1000:.1f}k" for v in d + u) +
              f" | {md / 1000:.1f}k | {mu / 1000:.1f}k | {mu / md:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
