"""Image fuzzer, findings: what a case reports (category, where, a signature without offsets),
the per-case result, and the helpers that turn errors, events and CLI runs into findings."""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import traceback

from .fuzz_damage import Case
from .fuzz_state import Event

DAXFS = os.path.join(os.path.dirname(sys.executable), "daxfs")


@dataclasses.dataclass
class Finding:
    category: str      # traceback | not_repaired | mount | undetected | hang
    where: str         # fsck | repair | open | walk | write-after-eio | close | cli-... | mount
    summary: str       # the signature (no offsets)
    detail: str = ""
    tb: str = ""


@dataclasses.dataclass
class Result:
    case: Case
    fsck_exit: int | None = None
    repair_exit: int | None = None
    recheck_exit: int | None = None
    mount: str = ""
    findings: list = dataclasses.field(default_factory=list)
    notes: list = dataclasses.field(default_factory=list)
    seconds: float = 0.0


def _tb_summary(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    frames = [f for f in tb if "/daxfs/" in f.filename] or tb
    f = frames[-1] if frames else None
    where = f"{os.path.basename(f.filename)}:{f.lineno} in {f.name}" if f else "?"
    return f"{type(exc).__name__} at {where}"


def _ev_summary(ev: Event) -> str:
    if ev.tb:
        lines = [ln for ln in ev.tb.strip().splitlines()]
        files = [ln.strip() for ln in lines if ln.strip().startswith("File ") and "/daxfs/" in ln]
        last = files[-1] if files else ""
        m = re.search(r'File ".*/(daxfs/[^"]+)", line (\d+), in (\S+)', last)
        loc = f"{m.group(1)}:{m.group(2)} in {m.group(3)}" if m else "?"
        return f"{ev.detail.split(':')[0]} at {loc}"
    return ev.detail


_KIND_TEXT = {
    "short": "returned fewer bytes than the file size says (extent beyond the image?)",
    "outside": "served bytes of an extent outside the data region instead of EIO",
    "name": "served name differs from the entry's name[:namelen] (engine ignores namelen)",
    "bad-symlink": "served a symlink whose size is invalid instead of EIO",
}


def _ev_text(ev: Event) -> str:
    return f"{ev.op}: " + _KIND_TEXT.get(ev.kind, _generic(ev.detail))


def _clean_path(path: str) -> str:
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in path)[:200]


def _generic(detail: str) -> str:
    return re.sub(r"\d+", "N", re.sub(r"0x[0-9a-fA-F]+", "0xN", detail))[:100]


def _compare(F, category, where, orig: dict, got: dict, good: set, exact: dict | None) -> None:
    if exact is not None:
        missing = sorted(set(exact) - set(got))
        extra = sorted(set(got) - set(exact) - {"/lost+found"})
        differ = sorted(p for p in set(exact) & set(got) if exact[p] != got[p])
        if missing or extra or differ:
            F.append(Finding(category, where, f"{where}: state is not the expected journal "
                             "prefix state", f"missing {missing[:4]}, extra {extra[:4]}, "
                             f"different {differ[:4]}"))
        return
    bad = []
    for p in sorted(good):
        o, n = orig.get(p), got.get(p)
        if n is None or o[:5] != n[:5]:
            bad.append(p)
    if bad:
        o, n = orig.get(bad[0]), got.get(bad[0])
        F.append(Finding(category, where, f"{where}: undamaged file changed or missing",
                         f"{len(bad)} path(s), first {_clean_path(bad[0])}: {o} -> {n}"))


# =============================================================================== CLI / mount
def _cli(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([DAXFS, *map(str, args)], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return subprocess.CompletedProcess(e.cmd, 124, e.stdout or "", (e.stderr or "") +
                                           "\n[fuzz: timed out]")


def _check_cli_output(F: list, where: str, p: subprocess.CompletedProcess, allowed) -> None:
    err = p.stderr or ""
    if "Traceback" in err or "internal error" in err:
        F.append(Finding("traceback", where, f"{where}: "
                         + ("traceback on stderr" if "Traceback" in err else
                            _generic(err.strip().splitlines()[-1])), err[-2000:]))
    elif p.returncode not in allowed:
        F.append(Finding("traceback", where, f"{where}: exit {p.returncode}", err[-500:]))
    elif p.returncode == 8:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        if len(lines) != 1:
            F.append(Finding("traceback", where, f"{where}: exit 8 without exactly one line",
                             err[-500:]))
