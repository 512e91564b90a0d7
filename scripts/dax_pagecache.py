#!/usr/bin/env python3
"""Page-cache cost of clones, default mode vs dax mode (issue 11): one file of SIZE MiB,
N clones (cp = reflink), each read fully by its own process; prints the clones' pages in the
kernel's page cache (fincore) and the growth of `Cached` in /proc/meminfo.

Usage: python scripts/dax_pagecache.py [--clones 8] [--mib 256]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

DAXFS = os.path.join(os.path.dirname(sys.executable), "daxfs")


def meminfo_cached() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Cached:"):
                return int(line.split()[1]) * 1024
    return 0


def run_mode(dax: bool, clones: int, mib: int) -> tuple[int, int]:
    tmp = tempfile.mkdtemp(prefix="daxfs-pc-")
    img, mnt = f"/dev/shm/daxfs-pc-{os.getpid()}.img", os.path.join(tmp, "mnt")
    os.mkdir(mnt)
    subprocess.run([DAXFS, "mkfs", img, "--size", f"{mib * 2 + 256}M", "--force"], check=True,
                   capture_output=True)
    subprocess.run([DAXFS, "mount", img, mnt, *(["-o", "dax"] if dax else [])], check=True)
    try:
        src = os.path.join(mnt, "src")
        with open(src, "wb") as f:
            for _ in range(mib):
                f.write(os.urandom(1 << 20))
        paths = [os.path.join(mnt, f"clone{i}") for i in range(clones)]
        for p in paths:
            subprocess.run(["cp", src, p], check=True)
        subprocess.run(["sh", "-c", "sync; echo 1 > /proc/sys/vm/drop_caches"], check=True)
        time.sleep(0.5)
        before = meminfo_cached()
        procs = [subprocess.Popen([sys.executable, "-c", "import sys\nwith open(sys.argv[1],'rb')"
                                   " as f:\n    while f.read(1 << 20): pass", p]) for p in paths]
        for p in procs:
            p.wait()
        grown = meminfo_cached() - before
        pages = sum(int(subprocess.run(["fincore", "-b", "-n", "-o", "PAGES", p],
                                       capture_output=True, text=True).stdout.split()[0])
                    for p in paths)
        return pages, grown
    finally:
        subprocess.run([DAXFS, "umount", mnt])
        os.unlink(img)
        os.rmdir(mnt)
        os.rmdir(tmp)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clones", type=int, default=8)
    ap.add_argument("--mib", type=int, default=256)
    a = ap.parse_args()
    for dax in (False, True):
        pages, grown = run_mode(dax, a.clones, a.mib)
        print(f"{'dax' if dax else 'default'} mode: {a.clones} clones of {a.mib} MiB read by "
              f"{a.clones} processes: {pages * 4096 >> 20} MiB of their pages cached, "
              f"Cached grew {grown >> 20} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
