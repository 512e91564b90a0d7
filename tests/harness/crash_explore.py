"""Explore daxfs crash states in-process (crashsim): every store (kill model) and every
fence x in-flight page subsets (power model), for ACE-style operation sequences on a small
pre-populated image, plus crashes during the recovery of a crash image.

Plan (deterministic for a seed): all length-1 sequences of the catalog, then length-2 sequences
(all of them, in a seeded order) interleaved with sampled length-3 and seeded random sequences,
until the plan, --budget or --max-states runs out. The last line is always
`N crash states checked, M failed` (exit status 1 when M > 0).

    scripts/crash_explore.py [--budget SECONDS] [--seed N] [--max-states N] [--model kill|power|both]
    scripts/crash_explore.py --replay '{"model": ..., "ops": [...], "point": [...]}' [--save IMG]

(or `python -m tests.harness.crash_explore ...` from the repository root)
"""
from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import os
import random
import sys
import time

from . import crashsim as cs
from .crashsim_state import _fmt_meta


def plan(seed: int, n_len3: int, n_random: int, worker: int = 0, jobs: int = 1):
    """Yield ('ops', list) / ('random', rng_seed, length) items. With jobs > 1, catalog
    sequences are split by their first operation so every prefix stays in one worker."""
    cat = cs.CATALOG
    owner = lambda ops: cat.index(ops[0]) % jobs == worker   # noqa: E731
    for op in cat:
        if owner([op]):
            yield ("ops", [op])
    rng = random.Random(seed)
    pairs = [[a, b] for a in cat for b in cat]
    rng.shuffle(pairs)
    triples = [[rng.choice(cat) for _ in range(3)] for _ in range(n_len3)]
    randoms = [(rng.randrange(1 << 30), rng.randint(3, 8)) for _ in range(n_random)]
    pattern = ["2", "2", "2", "2", "2", "2", "3", "r"]
    i = [0, 0, 0]
    while i[0] < len(pairs) or i[1] < len(triples) or i[2] < len(randoms):
        for kind in pattern:
            if kind == "2" and i[0] < len(pairs):
                ops = pairs[i[0]]
                i[0] += 1
                if owner(ops):
                    yield ("ops", ops)
            elif kind == "3" and i[1] < len(triples):
                ops = triples[i[1]]
                i[1] += 1
                if owner(ops):
                    yield ("ops", ops)
            elif kind == "r" and i[2] < len(randoms):
                rs, n = randoms[i[2]]
                if i[2] % jobs == worker:
                    yield ("random", rs, n)
                i[2] += 1


def _models(name: str) -> tuple:
    return {"kill": ("kill",), "power": ("power",), "both": ("kill", "power")}[name]


def run_worker(args, worker: int, jobs: int, queue=None):
    """Explore this worker's share of the plan; returns (stats dict, failures)."""
    deadline = time.perf_counter() + args.budget if args.budget else None
    ex = cs.Explorer(args.workdir, seed=args.seed, models=_models(args.model),
                     n_random_subsets=args.subsets, raw_fsck=not args.no_raw_fsck,
                     recovery_crashes=not args.no_recovery, save_failures=args.save_failures,
                     verify_every=args.verify_every, txn_blocks=args.txn_blocks)
    per_worker_max = None if args.max_states is None else -(-args.max_states // jobs)
    ex.set_budget(deadline, per_worker_max)
    shown = collections.Counter()
    last_report = time.perf_counter()

    def on_failure(f):
        sig = (f.known, f.signature)
        shown[sig] += 1
        if shown[sig] <= args.show and not args.quiet:
            print(f.text(), flush=True)

    ex.on_failure = on_failure
    try:
        for item in plan(args.seed, args.len3, args.random, worker, jobs):
            if ex.out_of_budget():
                break
            if item[0] == "ops":
                ex.run_sequence(item[1])
            else:
                ex.run_sequence(None, n_random=item[2], rng_seed=item[1], prefix_closed=False)
            now = time.perf_counter()
            if args.progress and now - last_report > args.progress:
                last_report = now
                st = ex.stats
                print(f"[worker {worker}] {st.sequences} sequences, {st.total} states, "
                      f"{st.total_failed} failed", file=sys.stderr, flush=True)
    finally:
        ex.close()
    st = ex.stats
    out = {"states": st.states, "failed": st.failed, "points": st.points,
           "recovery_states": st.recovery_states, "sequences": st.sequences,
           "record_s": st.record_s, "check_s": st.check_s}
    fails = [(f.known, f.signature, f.text()) for f in ex.failures]
    return out, fails


def _worker_entry(args, worker, jobs, q):
    q.put(run_worker(args, worker, jobs))


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=None, help="stop after this many seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-states", type=int, default=None)
    ap.add_argument("--model", choices=["kill", "power", "both"], default="both")
    ap.add_argument("--len3", type=int, default=600, help="sampled length-3 sequences (default 600)")
    ap.add_argument("--random", type=int, default=600, help="seeded random sequences (default 600)")
    ap.add_argument("--subsets", type=int, default=20,
                    help="random in-flight page combinations per power crash point (default 20)")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    ap.add_argument("--no-raw-fsck", action="store_true",
                    help="skip fsck of each crash image before recovery")
    ap.add_argument("--no-recovery", action="store_true",
                    help="skip crashes during the recovery of a crash image")
    ap.add_argument("--txn-blocks", type=int, default=None,
                    help="run the engine with fs.TXN_BLOCKS=N so small files take the "
                         "multi-transaction truncate/unlink/clone paths (e.g. 1)")
    ap.add_argument("--workdir", default="/dev/shm" if os.path.isdir("/dev/shm") else "/tmp")
    ap.add_argument("--save-failures", metavar="DIR", help="write each failing crash image here")
    ap.add_argument("--show", type=int, default=2, help="failures printed per distinct signature")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--progress", type=float, default=30.0, help="progress line period (s), 0: off")
    ap.add_argument("--verify-every", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--replay", metavar="JSON", help="re-check one crash state from a failure trace")
    ap.add_argument("--save", metavar="IMG", help="with --replay: write the crash image here")
    return ap


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.replay:
        return replay(args)
    t0 = time.perf_counter()
    results = _run_workers(args)
    return _report(args, results, time.perf_counter() - t0)


def _run_workers(args) -> list:
    """run_worker in this process (--jobs 1) or in forked workers; their (stats, failures)."""
    if args.jobs <= 1:
        return [run_worker(args, 0, 1)]
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker_entry, args=(args, w, args.jobs, q))
             for w in range(args.jobs)]
    for p in procs:
        p.start()
    results = [q.get() for _ in procs]
    for p in procs:
        p.join()
    return results


def _report(args, results: list, elapsed: float) -> int:
    """Sum the workers' results, print the summary; the last line is the verdict."""
    tot = collections.Counter()
    failed = collections.Counter()
    rec_states = collections.Counter()
    points = collections.Counter()
    seqs = 0
    check_s = record_s = 0.0
    sigs = collections.Counter()
    example = {}
    for out, fails in results:
        tot.update(out["states"])
        failed.update(out["failed"])
        rec_states.update(out["recovery_states"])
        points.update(out["points"])
        seqs += out["sequences"]
        check_s += out["check_s"]
        record_s += out["record_s"]
        for known, sig, text in fails:
            sigs[(known or "NEW", sig)] += 1
            example.setdefault((known or "NEW", sig), text)
    n = sum(tot.values())
    m = sum(failed.values())
    print(f"--- {seqs} sequences in {elapsed:.1f}s ({n / max(elapsed, 1e-9):.0f} states/s overall; "
          f"recording {record_s:.1f}s, checking {check_s:.1f}s: "
          f"{n / max(check_s, 1e-9):.0f} states/s per checking process)")
    for model in _models(args.model):
        print(f"{model:>5}: {tot[model]} crash states ({rec_states[model]} during recovery) "
              f"from {points[model]} crash points, {failed[model]} failed")
    if sigs:
        print("failures by issue and signature:")
        for (known, sig), c in sorted(sigs.items()):
            print(f"  {c:6d}  [{known}] {sig}")
        descr = {name: d for name, d, _p in cs.KNOWN_ISSUES}
        descr["NEW"] = "not a known issue: investigate"
        names = sorted({n for k, _s in sigs for n in k.split("+")})
        for name in names:
            print(f"  {name}: {descr.get(name, '?')}")
    print(f"{n} crash states checked, {m} failed")
    return 1 if m else 0


def replay(args) -> int:
    t = json.loads(args.replay)
    ex = cs.Explorer(args.workdir, raw_fsck=not args.no_raw_fsck, txn_blocks=args.txn_blocks)
    try:
        obs, v = ex.replay(t["model"], [tuple(o) for o in t["ops"]], t["point"], save=args.save)
    finally:
        ex.close()
    print(f"model {t['model']}, ops {t['ops']}, crash point {t['point']}"
          + (f", txn_blocks {args.txn_blocks}" if args.txn_blocks else ""))
    if obs.state is not None:
        for path in sorted(obs.state.meta):
            print(f"  {path.decode(errors='replace')}: {_fmt_meta(obs.state.meta[path])}")
    if args.save:
        print(f"crash image written to {args.save}")
    print("OK" if v is None else f"FAIL: {v.message}")
    print(f"1 crash states checked, {0 if v is None else 1} failed")
    return 0 if v is None else 1


if __name__ == "__main__":
    sys.exit(main())
