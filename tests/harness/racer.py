"""The racer: concurrent writers, cloners and readers on one real mount, checked against a model.

Why. The data-path exerciser (exerciser.py) is one process: it never has two requests in the
daemon at once, so it cannot see a race between the C data plane's threads (in-place writes,
COW breaks into the pool, the overlay) and Python (reflinks that take a file back, the batch
that applies C's breaks). The racer makes exactly those races, and checks every byte anyway.

How the outcome stays checkable. Every file is cut into chunks (512 B .. 8 KiB, one size per
file) and, with K writers, writer i owns chunk c when c % (K + 1) == i, in every file; the
last class belongs to the mutator, which punches, zeroes and copy_file_range's into its chunks
while the writers write theirs. So a chunk has one owner, and its contents at the end of a
phase are known exactly. Chunks smaller than a block put several owners into the same block
at once: concurrent COW breaks of one shared block, which must not lose each other's bytes. What is not determined, and is checked by time windows
(time.monotonic_ns, one clock for all processes):
  - a clone (copy_file_range of a whole file, the reflink path) taken while writers write its
    source: each 512-byte sector of the clone must hold the sector as some version of its chunk
    held it while the clone ran: the version before a write that ended before the clone began
    is no longer valid; a write that began after the clone ended cannot show;
  - a read racing writers: the same rule per sector, over the read's window (Linux does not
    make a read atomic against a write, so sectors may come from different versions; a sector
    that mixes versions byte by byte is counted as torn, not failed, for reads only).

A run is phases. In each, K writer processes, the mutator, one cloner and one reader start
together; then the coordinator checks the clones and reads against the owners' logs, adopts
what it checked as the model of the new clones, reads every file back whole against the
model, and changes the set of files: deletes some, punches a hole, truncates, sometimes remounts (with fsck in
between). At the end: fsck, and no traceback in the daemon's log.

    python -m tests.harness.racer --seed S [--phases N] [--ops N] [--writers K]
        [--mount-opts OPTS] [--keep]

Prints one line per phase and a summary (with how many COW breaks the C data plane did); exit
status 1 and the first disagreement (file, offset, what was found, what was possible) on
failure. Timing decides the interleaving, so a seed does not replay a failure exactly: the
report says what raced with what instead of a shrunk program.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import sys
import time

from .kill_mount import fsck_crashed, kill9, lazy_umount
from .mountctl import Mount
from .racer_model import CHUNKS, FileModel, Mismatch, Versions, check_range, diff
from .racer_procs import cloner, mutator, reader, writer
from .runner import FALLOC_MODE, fallocate

# -- the coordinator ------------------------------------------------------------------------------

class Racer:
    def __init__(self, a):
        self.a = a
        self.rng = random.Random(a.seed)
        self.m = Mount("256M", tag="racer", options=a.mount_opts)
        self.files: dict[str, FileModel] = {}
        self.serial = 0
        self.stats = {"writes": 0, "clones": 0, "reads": 0, "torn": 0, "remounts": 0,
                      "overlaps": 0, "kills": 0, "inflight": 0, "landed": 0}

    def new_name(self) -> str:
        self.serial += 1
        return f"f{self.serial}"

    def create(self, name: str, size_chunks: int, chunk: int) -> None:
        data = bytearray(self.rng.randbytes(size_chunks * chunk))
        with open(f"{self.m.mnt}/{name}", "wb") as f:
            f.write(data)
        self.files[name] = FileModel(chunk, data)

    def verify_all(self, when: str) -> None:
        for n, fm in sorted(self.files.items()):
            with open(f"{self.m.mnt}/{n}", "rb") as f:
                got = f.read()
            if got != bytes(fm.data):
                raise Mismatch(f"{when}: {n} ({fm.chunk} B chunks) differs from the model: "
                               f"{diff(got, bytes(fm.data))}")

    def phase(self, p: int) -> None:
        a = self.a
        ctx = mp.get_context("fork")
        q = ctx.Queue()
        names = sorted(self.files)
        new = [self.new_name() for _ in range(self.rng.randint(1, 3))]
        hot = self.rng.choice(names)
        k = a.writers + 1                               # chunk classes: the writers', the mutator's
        killed = ctx.Event()
        kill = self.rng.random() < a.kill_rate
        procs = [ctx.Process(target=writer, args=(str(self.m.mnt), self.files, hot, i, k,
                                                  a.ops, self.rng.getrandbits(32), killed, q))
                 for i in range(a.writers)]
        procs.append(ctx.Process(target=mutator, args=(str(self.m.mnt), self.files, hot,
                                                       a.writers, k, a.ops // 4,
                                                       self.rng.getrandbits(32), killed, q)))
        done_ev = ctx.Event()
        procs.append(ctx.Process(target=cloner, args=(str(self.m.mnt), names, hot, new,
                                                      self.rng.getrandbits(32), done_ev, killed,
                                                      q)))
        procs.append(ctx.Process(target=reader, args=(str(self.m.mnt), self.files, a.ops // 2,
                                                      self.rng.getrandbits(32), killed, q)))
        for pr in procs:
            pr.start()
        if kill:                                        # kill -9 the daemon in the middle
            time.sleep(self.rng.uniform(0.02, 0.3))
            killed.set()
            kill9(self.m.image, self.m.mnt)
        logs = {}
        deadline = time.monotonic() + 600
        while len(logs) < len(procs):
            who, log = q.get(timeout=max(1.0, deadline - time.monotonic()))
            logs[who] = log
            if all(i in logs for i in [*range(a.writers), "mutator"]):
                done_ev.set()
        for pr in procs:
            pr.join(60)
        for who, log in logs.items():
            if log.error:
                raise Mismatch(f"phase {p}, {who}: {log.error}")
        writes = [w for i in [*range(a.writers), "mutator"] for w in logs[i].writes]
        v = Versions(self.files, writes)
        for c in logs["cloner"].clones:                 # each clone: a snapshot in its window
            src = self.files[c.name]
            if len(c.data) != len(src.data):
                raise Mismatch(f"phase {p}: clone {c.into} of {c.name} has {len(c.data)} "
                               f"bytes, not {len(src.data)}")
            check_range(v, c.name, 0, c.data, c.t0, c.t1, f"phase {p}, clone {c.into} of "
                        f"{c.name}", tolerate_tear=False)
            self.stats["clones"] += 1
            self.stats["overlaps"] += sum(w.name == c.name and w.t0 < c.t1 and w.t1 > c.t0
                                          for w in writes)
        for r in logs["reader"].reads:
            self.stats["torn"] += check_range(v, r.name, r.off, r.data, r.t0, r.t1,
                                              f"phase {p}, read", tolerate_tear=True)
        self.stats["reads"] += len(logs["reader"].reads)
        self.stats["writes"] += len(writes)
        for w in writes:                                # the end of the phase: each chunk's last
            fm = self.files[w.name]
            fm.data[w.chunk * fm.chunk:(w.chunk + 1) * fm.chunk] = w.after
        if self.a.inject and p == 0 and writes:         # proof that a lost write is caught
            w = max(writes, key=lambda w: w.t1)
            fm = self.files[w.name]
            fm.data[w.chunk * fm.chunk] ^= 0xFF
        for c in logs["cloner"].clones:                 # each new file: its last clone
            self.files[c.into] = FileModel(self.files[c.name].chunk, bytearray(c.data))
        if kill:
            self.recover(p, logs)
        self.verify_all(f"after phase {p}")
        self.reshape(p)

    def recover(self, p: int, logs: dict) -> None:
        """After a kill -9: fsck (no error), mount again; then every acknowledged write must be
        there (write-through: the durability contract), and each chunk something was writing
        when the daemon died must hold, byte by byte, its old or its new contents; the model
        takes what it found there. A new file whose clone was in flight is dropped."""
        lazy_umount(self.m.mnt)
        self.m.mounted = False
        fsck_crashed(self.m.image)
        self.m.mount()
        self.stats["kills"] += 1
        for into in logs["cloner"].inflight:
            self.files.pop(into, None)
            try:
                os.unlink(f"{self.m.mnt}/{into}")
            except FileNotFoundError:
                pass
        for who, log in logs.items():
            for w in log.inflight if who != "cloner" else ():
                fm = self.files[w.name]
                lo, hi = w.chunk * fm.chunk, (w.chunk + 1) * fm.chunk
                old = bytes(fm.data[lo:hi])
                with open(f"{self.m.mnt}/{w.name}", "rb") as f:
                    got = os.pread(f.fileno(), fm.chunk, lo)
                if any(g != o and g != n for g, o, n in zip(got, old, w.after)) or \
                        len(got) != len(old):
                    raise Mismatch(f"phase {p}, after kill -9: {w.name} chunk {w.chunk} "
                                   f"({fm.chunk} B), in flight from {who}, holds bytes that are "
                                   f"neither its old nor its new contents: {diff(got, old)}")
                fm.data[lo:hi] = got
                self.stats["inflight"] += 1
                self.stats["landed"] += got == w.after and got != old

    def reshape(self, p: int) -> None:
        """Between phases: drop files, punch, truncate, remount; the model follows."""
        rng = self.rng
        while len(self.files) > self.a.max_files:
            n = rng.choice(sorted(self.files))
            os.unlink(f"{self.m.mnt}/{n}")
            del self.files[n]
        n = rng.choice(sorted(self.files))
        fm = self.files[n]
        r = rng.random()
        if r < 0.3:                                     # punch a chunk-aligned hole
            c0 = rng.randrange(fm.nchunks)
            c1 = min(fm.nchunks, c0 + rng.randint(1, 16))
            fd = os.open(f"{self.m.mnt}/{n}", os.O_RDWR)
            try:
                fallocate(fd, FALLOC_MODE["punch"], c0 * fm.chunk, (c1 - c0) * fm.chunk)
            finally:
                os.close(fd)
            fm.data[c0 * fm.chunk:c1 * fm.chunk] = bytes((c1 - c0) * fm.chunk)
        elif r < 0.5:                                   # truncate to a chunk boundary
            nc = max(8, fm.nchunks + rng.randint(-fm.nchunks // 2, fm.nchunks // 2))
            os.truncate(f"{self.m.mnt}/{n}", nc * fm.chunk)
            del fm.data[nc * fm.chunk:]
            fm.data.extend(bytes(nc * fm.chunk - len(fm.data)))
        if rng.random() < self.a.remount_rate:
            self.m.umount()
            bad = self.m.fsck()
            if bad:
                raise Mismatch(f"fsck after phase {p}: {bad}")
            self.m.mount()
            self.stats["remounts"] += 1
        self.verify_all(f"after reshaping, phase {p}")

    def run(self) -> int:
        a = self.a
        self.m.mount()
        try:
            first = self.new_name()
            self.create(first, self.rng.randint(256, 1024), 4096)
            for _ in range(a.start_files - 1):
                n = self.new_name()
                if self.rng.random() < 0.5:             # a clone: shared from the start
                    src = self.rng.choice(sorted(self.files))
                    if os.system(f"cp {self.m.mnt}/{src} {self.m.mnt}/{n}"):
                        raise Mismatch(f"cp {src} {n} failed")
                    data = self.files[src].data
                    chunk = self.rng.choice([c for c in CHUNKS if len(data) % c == 0])
                    self.files[n] = FileModel(chunk, bytearray(data))
                else:
                    self.create(n, self.rng.randint(64, 512), self.rng.choice(CHUNKS))
            for p in range(a.phases):
                t = time.monotonic()
                self.phase(p)
                print(f"phase {p}: {len(self.files)} files, {self.stats['writes']} writes, "
                      f"{self.stats['clones']} clones, {self.stats['reads']} reads so far "
                      f"({time.monotonic() - t:.1f} s)", flush=True)
            self.m.umount()
            bad = self.m.fsck()
            if bad:
                raise Mismatch(f"fsck at the end: {bad}")
            tb = self.m.new_tracebacks()
            if tb:
                raise Mismatch(f"traceback in the daemon log:\n{tb}")
        except Mismatch as e:
            print(f"FAILED (seed {a.seed}): {e}", flush=True)
            tb = self.m.new_tracebacks()
            if tb:
                print(f"daemon log:\n{tb[-4000:]}")
            return 1
        finally:
            if not a.keep:
                self.m.destroy()
        s = self.stats
        print(f"racer: seed {a.seed}, {a.phases} phases, {a.writers} writers: {s['writes']} writes, "
              f"{s['clones']} clones racing {s['overlaps']} writes, {s['reads']} racing reads ({s['torn']} sectors "
              f"torn), {s['remounts']} remounts, {s['kills']} kill -9 ({s['inflight']} chunks in "
              f"flight, {s['landed']} of them found new); C data plane: {self.m.served['c_writes']} "
              f"writes, {self.m.served['c_cow_breaks']} COW breaks, {self.m.served['c_reads']} "
              f"reads; 0 mismatches")
        return 0


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m tests.harness.racer",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--phases", type=int, default=8)
    p.add_argument("--ops", type=int, default=400, help="operations per writer per phase")
    p.add_argument("--writers", type=int, default=3)
    p.add_argument("--start-files", type=int, default=4)
    p.add_argument("--max-files", type=int, default=8)
    p.add_argument("--remount-rate", type=float, default=0.25)
    p.add_argument("--mount-opts", default="", help="extra -o options, e.g. uring")
    p.add_argument("--kill-rate", type=float, default=0.0,
                   help="share of phases in which the daemon is killed (kill -9) mid-way; not "
                        "with writeback, whose contract keeps only flushed data")
    p.add_argument("--keep", action="store_true", help="keep the image and mount on exit")
    p.add_argument("--inject", action="store_true",
                   help="self-test: the model loses one byte of the last write of phase 0, "
                        "which the run must report")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse(argv)
    if a.kill_rate and "writeback" in a.mount_opts:
        print("racer: --kill-rate needs a write-through mode (not -o writeback)", file=sys.stderr)
        return 2
    return Racer(a).run()


if __name__ == "__main__":
    sys.exit(main())
