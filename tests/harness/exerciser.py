"""The data-path exerciser (issue 9): seeded random file operations through real syscalls on a
fresh daxfs mount, every read checked against an in-memory byte model; on the first mismatch the
operation list is shrunk (ddmin, each candidate replayed on a fresh image) and printed as a
runnable Python reproduction. Ends with the line `N operations, M mismatches`.

    python -m tests.harness.exerciser --ops 10000 --seed 1 [--mode normal|full] [--avoid NAME]
                                      [--mount-opts writeback]

Modes: `normal` (a 64 MiB image, no errors allowed) and `full` (a 16 MiB image that writes mostly
fill, so operations meet ENOSPC; see runner.py for what must still hold). `--avoid NAME` steers
around a defect known today (see --help). A failed `daxfs fsck` and a traceback in the daemon log
count as mismatches too."""
from __future__ import annotations

import argparse
import json
import sys
import time

from .gen import AVOIDABLE, Generator
from .mountctl import Mount
from .runner import Mismatch, Runner
from .shrink import ddmin, render_op, snippet

SIZES = {"normal": "64M", "full": "16M"}


class Failure:
    def __init__(self, index: int | None, m: Mismatch, op: tuple | None):
        self.index, self.m, self.op = index, m, op

    @property
    def signature(self):
        return (self.op[0] if self.op else "end", self.m.kind)


def execute(ops, args, record=None, final_checks=True, progress=None) -> tuple[int, list]:
    """Run `ops` (a list, or a generator when `record` is given) on a fresh image. Returns
    (operations done, failures); stops at the first mismatch of an operation."""
    mount = Mount(SIZES[args.mode] if not args.image_size else args.image_size,
                  options=args.mount_opts)
    failures, done = [], 0
    try:
        mount.mount()
        r = Runner(mount, args.mode, set(args.avoid), fsck_on_remount=final_checks)
        r.open_all()
        source = ops if record is None else iter(lambda: ops.next(r.sizes(), r.free_blocks), None)
        t0 = time.monotonic()
        for op in source:
            if record is not None:
                if done >= args.ops:
                    break
                record.append(op)
            done += 1
            try:
                r.run(op)
            except Mismatch as m:
                failures.append(Failure(done - 1, m, op))
                break
            if progress and done % progress == 0:
                rate = done / (time.monotonic() - t0)
                print(f"  {done} operations ({rate:.0f}/s), sizes {r.sizes()}, "
                      f"{r.free_blocks()} blocks free", file=sys.stderr, flush=True)
        if not failures:
            try:
                r.check_all("the last operation")
            except Mismatch as m:
                failures.append(Failure(None, m, None))
        if final_checks:
            try:
                r.close_all(strict=not failures)
                mount.umount()
            except Exception as e:          # a failed umount is a finding too
                failures.append(Failure(None, Mismatch("umount", str(e)), None))
            tb = mount.new_tracebacks()
            if tb:
                failures.append(Failure(None, Mismatch("traceback", "the daemon log holds a "
                                                       f"traceback:\n{tb}"), None))
            bad = mount.fsck() if not mount.mounted else None
            if bad:
                failures.append(Failure(None, Mismatch("fsck", bad), None))
        if record is not None:
            args.stats = {**r.stats, **mount.served}
    finally:
        mount.destroy()
    return done, failures


def shrink(ops: list, first: Failure, args) -> tuple[list, Failure]:
    """The shortest list found that still fails the same way, and that failure."""
    want = first.signature
    end_check = first.op is None
    last = [first]

    def fails(cand):
        try:
            _n, fl = execute(cand, args, final_checks=end_check or want[1] in ("fsck", "traceback"))
        except Exception as e:                       # a replay that cannot even run
            print(f"  replay failed to run: {e}", file=sys.stderr)
            return None
        for fa in fl:
            if fa.signature == want:
                last[0] = fa
                return len(cand) if fa.index is None else fa.index + 1
        return None

    ops = ops if first.index is None else ops[:first.index + 1]
    print(f"shrinking {len(ops)} operations (budget {args.shrink_time:.0f} s) ...", file=sys.stderr)
    ops = ddmin(ops, fails, time.monotonic() + args.shrink_time,
                log=lambda s: print(s, file=sys.stderr, flush=True))
    return ops, last[0]


def opts_note(args) -> str:
    return f" (-o {args.mount_opts})" if args.mount_opts else ""


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m tests.harness.exerciser",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="known defects for --avoid:\n" + "\n".join(
                                    f"  {k:11} {v}" for k, v in AVOIDABLE.items()))
    p.add_argument("--ops", type=int, default=10000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--mode", choices=("normal", "full"), default="normal")
    p.add_argument("--avoid", action="append", default=[],
                   help="a known defect to steer around (repeat or comma-separate; 'all')")
    p.add_argument("--remount-rate", type=float, default=0.002, help="chance per op (0.002)")
    p.add_argument("--dropcache-rate", type=float, default=0.05,
                   help="chance that a reopen also writes /proc/sys/vm/drop_caches (0.05)")
    p.add_argument("--shrink-time", type=float, default=300, help="seconds for shrinking (300)")
    p.add_argument("--no-shrink", action="store_true")
    p.add_argument("--image-size", help="instead of 64M (normal) / 16M (full)")
    p.add_argument("--mount-opts", default="",
                   help="extra daxfs mount options (-o), e.g. writeback")
    p.add_argument("--repro", help="also write the reproduction to this file (its operations "
                                   "as JSON to FILE.json, for --replay)")
    p.add_argument("--progress", type=int, default=0, help="report every N operations")
    p.add_argument("--replay", help="run the operations of this JSON file (written by --repro)")
    p.add_argument("--inject", type=int, help=argparse.SUPPRESS)   # flip a model byte at op N
    args = p.parse_args(argv)
    avoid = {a for v in args.avoid for a in v.split(",") if a}
    if "all" in avoid:
        avoid = set(AVOIDABLE)
    unknown = avoid - set(AVOIDABLE)
    if unknown:
        p.error(f"unknown --avoid {', '.join(sorted(unknown))}; known: {', '.join(AVOIDABLE)}")
    if "writeback" in args.mount_opts.split(","):
        avoid.add("efbigwrite")
        if args.mode == "full":
            # a buffered write(2) then succeeds in the page cache and meets ENOSPC only at
            # writeback (fsync/close report it, the data is gone): the full mode's model, which
            # expects ENOSPC or a short count from write(2) itself, does not describe that
            p.error("--mode full with --mount-opts writeback is not supported: ENOSPC comes at "
                    "writeback, not from write(2)")
    args.avoid = sorted(avoid)
    return args


def main(argv=None) -> int:
    args = parse(argv)
    gen = Generator(args.seed, args.mode, set(args.avoid), args.remount_rate,
                    args.dropcache_rate, args.inject)
    record: list = []
    t0 = time.monotonic()
    if args.replay:
        with open(args.replay) as f:
            record = [tuple(op) for op in json.load(f)]
        done, failures = execute(record, args)
    else:
        done, failures = execute(gen, args, record=record, progress=args.progress)
    dt = time.monotonic() - t0
    st = getattr(args, "stats", {})
    print(f"seed {args.seed}, mode {args.mode}{opts_note(args)}, avoid {','.join(args.avoid) or '-'}: {done} "
          f"operations in {dt:.1f} s ({done / dt:.0f}/s); " +
          ", ".join(f"{k} {v}" for k, v in st.items()), file=sys.stderr)
    for fa in failures:
        where = f"operation {fa.index} {render_op(fa.op)[0]}" if fa.op else "the end of the run"
        print(f"MISMATCH at {where}: [{fa.m.kind}] {fa.m.text}")
    if failures and not args.no_shrink:
        first = failures[0]
        ops, first = shrink(record, first, args)
        print(f"MISMATCH of the shortest sequence: [{first.m.kind}] {first.m.text}")
        what = (f"seed {args.seed}, mode {args.mode}{opts_note(args)}, avoid {','.join(args.avoid) or '-'}; "
                f"{len(ops)} of {done} operations")
        text = snippet(ops, first.m, what, SIZES[args.mode] if not args.image_size else args.image_size,
                       args.mount_opts)
        print(f"--- shortest reproduction found ({len(ops)} operations):")
        print(text, end="")
        print("--- end of reproduction")
        if args.repro:
            with open(args.repro, "w") as f:
                f.write(text)
            with open(args.repro + ".json", "w") as f:
                json.dump(ops, f)
    print(f"{done} operations, {len(failures)} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
