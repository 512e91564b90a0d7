"""Image fuzzer, one case: damage a copy of a base image, then fsck it (must report what it
can check), run the engine on it (fuzz_engine), repair it, check again and serve the repaired
image, all under a time limit."""
from __future__ import annotations

import os
import signal
import time
import traceback

from daxfs import fsck
from daxfs.fs import FileSystem

from .fuzz_bases import Base
from .fuzz_common import BS, CASE_TIMEOUT, SB_LEN, _CaseTimeout, _write
from .fuzz_damage import Case, make_case
from .fuzz_engine import _engine_check
from .fuzz_findings import (Finding, Result, _check_cli_output, _clean_path, _cli, _compare,
                            _ev_summary, _ev_text, _tb_summary)
from .fuzz_state import walk_engine
from .fuzz_tables import Tables, _base_tables, must_detect, undamaged_paths


def _on_alarm(signum, frame):  # noqa: ARG001
    raise _CaseTimeout()


def run_case(bases: dict[str, Base], seed: int, index: int, workdir: str, *,
             cli: bool = False, save: str | None = None, verbose: bool = False) -> Result:
    t0 = time.perf_counter()
    case, img = make_case(bases, seed, index)
    res = Result(case)
    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(CASE_TIMEOUT)
    dpath = os.path.join(workdir, f"case-{os.getpid()}-d.img")
    epath = os.path.join(workdir, f"case-{os.getpid()}-e.img")
    try:
        if save:
            _write(save, img)
        _run_case(bases, case, img, res, dpath, epath, cli, verbose)
    except _CaseTimeout:
        res.findings.append(Finding("hang", "case", f"case did not finish in {CASE_TIMEOUT}s"))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        for p in (dpath, epath):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
    res.seconds = time.perf_counter() - t0
    return res


def _run_case(bases, case: Case, img: bytes, res: Result, dpath: str, epath: str, cli: bool,
              verbose: bool) -> None:
    b = bases[case.base]
    g = b.g
    F = res.findings
    sb_broken = any(o < SB_LEN for o, _a, _b in case.flips)
    jhdr = g.journal_start * BS
    magic_broken = any(jhdr <= o < jhdr + 8 for o, _a, _b in case.flips)
    o_t = _base_tables(b)
    d_t = None if sb_broken else Tables(img, g)
    good_paths = set() if d_t is None else undamaged_paths(b, o_t, d_t)
    expect_state = None
    if case.base == "crash" and not sb_broken:
        # damage in the log of a crash image: replay must stop at the torn transaction, which
        # is checked below as an exact state; what fsck finds then is a valid prefix state
        expect_state = b.prefix_states[_expected_prefix(b, case)]
    if not case.flips:
        res.notes.append("no byte changed")

    # ---- 1. plain fsck (read-only) ------------------------------------------------------
    _write(dpath, img)
    rep = None
    if cli:
        p = _cli("fsck", dpath)
        res.fsck_exit = p.returncode
        _check_cli_output(F, "cli-fsck", p, allowed=(0, 4, 8))
    try:
        rep = fsck.check(dpath)
        code = rep.exit_code
    except fsck.FsckError as e:
        code = fsck.EXIT_OPERATIONAL
        if "\n" in str(e):
            F.append(Finding("traceback", "fsck", "FsckError message spans several lines", str(e)))
    except _CaseTimeout:
        raise
    except Exception as e:      # noqa: BLE001
        code = None
        F.append(Finding("traceback", "fsck", _tb_summary(e), f"{type(e).__name__}: {e}",
                         traceback.format_exc()))
    if cli:
        for cmd in (("info", dpath), ("stat", dpath)):
            p = _cli(*cmd)
            _check_cli_output(F, f"cli-{cmd[0]}", p, allowed=(0, 1))
            if p.returncode == 1 and len([ln for ln in p.stderr.splitlines() if ln.strip()]) != 1:
                F.append(Finding("traceback", f"cli-{cmd[0]}", f"{cmd[0]}: exit 1 without exactly "
                                 "one line", p.stderr[-500:]))
    if cli and code is not None and res.fsck_exit != code:
        F.append(Finding("traceback", "cli-fsck", "CLI fsck exit differs from in-process check",
                         f"cli {res.fsck_exit}, in-process {code}"))
    if not cli:
        res.fsck_exit = code
    if sb_broken:
        if code != fsck.EXIT_OPERATIONAL:
            F.append(Finding("undetected", "fsck", "superblock damage not refused (exit != 8)",
                             f"exit {code}"))
    elif rep is not None:
        why = must_detect(o_t, d_t) if expect_state is None else []
        if magic_broken:
            why.append("journal magic")
        lines = tuple(sorted(x.line() for x in rep.problems))
        detected = rep.exit_code != b.fsck_exit or lines != b.fsck_lines
        if why and not detected:
            F.append(Finding("undetected", "fsck", "fsck reports nothing for damaged " +
                             why[0].split(" ")[0] + " fields", "; ".join(why[:6])))
        if verbose:
            print(f"must detect: {why}\nfsck exit {rep.exit_code}:", *rep.problems, sep="\n  ")

    # ---- 2. the engine on a copy: open, walk, failsafe ----------------------------------
    _write(epath, img)
    _engine_check(b, case, epath, d_t, good_paths, expect_state, sb_broken, magic_broken, res,
                  verbose)

    # ---- 3. repair, then a second check, then the engine on the repaired image ----------
    rmsg = ""
    if cli:
        p = _cli("fsck", "--repair", dpath)
        rmsg = (p.stderr or p.stdout)[-500:]
        res.repair_exit = p.returncode
        _check_cli_output(F, "cli-repair", p, allowed=(0, 1, 4, 8))
        rcode = p.returncode
    else:
        try:
            rrep = fsck.check(dpath, repair=True)
            rcode = rrep.exit_code
            if verbose:
                print(f"repair exit {rcode}:", *rrep.problems, sep="\n  ")
        except fsck.FsckError as e:
            rcode = fsck.EXIT_OPERATIONAL
            rmsg = str(e)
        except _CaseTimeout:
            raise
        except Exception as e:      # noqa: BLE001
            rcode = None
            F.append(Finding("traceback", "repair", _tb_summary(e), f"{type(e).__name__}: {e}",
                             traceback.format_exc()))
        res.repair_exit = rcode
    if sb_broken:
        if rcode != fsck.EXIT_OPERATIONAL:
            F.append(Finding("not_repaired", "repair", "superblock damage: repair exit != 8",
                             f"exit {rcode}"))
        return                  # no backup superblock: refusing is the expected outcome
    if rcode is None:
        return
    if rcode not in (0, 1):
        F.append(Finding("not_repaired", "repair", f"fsck --repair exits {rcode}", rmsg))
    if cli:
        p = _cli("fsck", dpath)
        _check_cli_output(F, "cli-recheck", p, allowed=(0, 4, 8))
        res.recheck_exit = p.returncode
        again_lines = p.stdout.strip().splitlines()[:-1]
    else:
        try:
            again = fsck.check(dpath)
            res.recheck_exit = again.exit_code
            again_lines = [x.line() for x in again.problems if x.severity == fsck.ERROR]
        except fsck.FsckError as e:
            res.recheck_exit = fsck.EXIT_OPERATIONAL
            again_lines = [str(e)]
        except _CaseTimeout:
            raise
        except Exception as e:      # noqa: BLE001
            F.append(Finding("traceback", "recheck", _tb_summary(e), f"{type(e).__name__}: {e}",
                             traceback.format_exc()))
            return
    if res.recheck_exit != 0:
        F.append(Finding("not_repaired", "recheck", "second fsck after --repair is not clean",
                         f"exit {res.recheck_exit}: " + "; ".join(again_lines[:4])))
        return
    # the repaired image must open (read-write: recovery runs) and serve everything without
    # EIO, undamaged files intact
    try:
        fs = FileSystem.open(dpath)
    except _CaseTimeout:
        raise
    except Exception as e:      # noqa: BLE001
        F.append(Finding("not_repaired", "repaired-open", f"repaired image does not open: "
                         f"{type(e).__name__}", str(e), traceback.format_exc()))
        return
    try:
        with open(dpath, "rb") as f:
            meta = f.read(g.data_start * BS)
        state, _ident, events = walk_engine(fs, forget=False,
                                            tables=Tables(meta, g, g.nblocks * BS))
    finally:
        try:
            fs.close()
        except _CaseTimeout:
            raise
        except Exception as e:      # noqa: BLE001
            F.append(Finding("traceback", "repaired-close", _tb_summary(e),
                             f"{type(e).__name__}: {e}", traceback.format_exc()))
    for ev in events:
        cat = "traceback" if ev.kind == "exception" else "not_repaired"
        text = f"{ev.op}: {_ev_summary(ev)}" if ev.kind == "exception" else _ev_text(ev)
        F.append(Finding(cat, "repaired-walk", f"after repair: {text}",
                         f"{_clean_path(ev.path)}: {ev.detail[:300]}", ev.tb))
    _compare(F, "not_repaired", "repaired", b.state, state, good_paths, expect_state)


def _expected_prefix(b: Base, case: Case) -> int:
    """Crash base: how many transactions replay must apply given where the damage is."""
    g = b.g
    hdr = g.journal_start * BS
    log_off = hdr + BS
    first = min(o for o, _a, _b in case.flips) if case.flips else None
    if first is None:
        return len(b.txn_spans)
    if hdr <= first < hdr + 16:
        return 0                      # header: magic (log emptied by repair) or epoch (no match)
    for m, (s, e) in enumerate(b.txn_spans):
        if log_off + s <= first < log_off + e:
            return m
    return len(b.txn_spans)
