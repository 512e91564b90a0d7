"""What scripts/bench.py and its modules (bench_peers, bench_report) share: the error type, the
target record and running a command."""
from __future__ import annotations

import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

log = logging.getLogger("bench")

DATA, CLONE = "fio.dat", "clone.dat"                  # the fio file and its cp for the COW storm
BENCH_FILES = (DATA, CLONE, "cp.dat", "cat.dat")      # what a run may leave in a target dir


class BenchError(Exception):
    """A user-facing error: printed as one line, never as a traceback."""


@dataclass
class Target:
    name: str
    path: Path
    mount: object = None                         # DaxfsMount for daxfs (remount test)
    pid: Callable[[], int | None] | None = None  # the daemon serving it, for CPU per op
    desc: str = ""                               # how it was mounted, for results.md


def oneline(text: str, limit: int = 300) -> str:
    """The last non-empty line of a command's output, cut to `limit` characters."""
    lines = [l.strip() for l in (text or "").splitlines() if l.strip()]
    last = lines[-1] if lines else ""
    return last if len(last) <= limit else last[:limit] + "..."


def run(cmd, timeout=120, **kw) -> subprocess.CompletedProcess:
    """Run a command; a failure becomes a BenchError with the last line of its stderr."""
    cmd = [str(c) for c in cmd]
    log.debug("$ %s", " ".join(cmd))
    try:
        p = subprocess.run(cmd, timeout=timeout, text=True,
                           stdout=kw.pop("stdout", subprocess.PIPE),
                           stderr=subprocess.PIPE, **kw)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{Path(cmd[0]).name} timed out after {timeout}s: {' '.join(cmd)}") \
            from None
    except FileNotFoundError:
        raise BenchError(f"command not found: {cmd[0]}") from None
    if p.returncode != 0:
        raise BenchError(f"`{' '.join(cmd)}` failed (exit {p.returncode}): "
                         f"{oneline(p.stderr or p.stdout) or 'no output'}")
    return p
