"""Image fuzzer, real mounts: a sample of damaged images is mounted with `daxfs mount` and
walked in a child process (fuzz_walk); the daemon must survive, refuse in one line or serve
EIO, and log no escaped exception."""
from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import tempfile
import time

from .fuzz_common import SB_LEN, _write
from .fuzz_damage import make_case
from .fuzz_findings import Finding, Result, _clean_path, _cli, _generic
from .fuzz_tables import Tables, _base_tables, undamaged_paths
from .fuzz_walk import walk_mount_argv


def mount_sample(bases, seed: int, index: int, workdir: str, timeout: float = 60) -> Result:
    """Mount the damaged image of one case for real; walk it in a child process."""
    from daxfs import daemon
    case, img = make_case(bases, seed, index)
    res = Result(case)
    b = bases[case.base]
    F = res.findings
    mpath = os.path.join(workdir, f"mount-{index}.img")
    mnt = tempfile.mkdtemp(prefix=f"daxfs-fuzz-mnt-{index}-")
    logp = os.path.join(workdir, f"mount-{index}.log")
    _write(mpath, img)
    try:
        p = _cli("mount", mpath, mnt, "-o", f"log={logp}", timeout=timeout)
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        if p.returncode != 0:
            res.mount = "refused: " + (lines[-1] if lines else "")
            if "Traceback" in p.stderr or "unexpected failure" in p.stderr or \
                    "internal error" in p.stderr:
                F.append(Finding("traceback", "cli-mount", "mount: " + _generic(
                    lines[-1] if lines else "?"), p.stderr[-2000:] + _log_tail(logp)))
            elif p.returncode != 1 or len(lines) != 1 or not lines[0].startswith("daxfs:"):
                F.append(Finding("mount", "cli-mount", "refusal is not one 'daxfs:' line",
                                 f"exit {p.returncode}: {p.stderr[-500:]}"))
            return res
        res.mount = "mounted"
        pid = daemon.lock_holder(mpath)
        w = subprocess.run(walk_mount_argv(mnt), capture_output=True, text=True, timeout=timeout)
        try:
            walked = json.loads(w.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            F.append(Finding("mount", "mount-walk", "walker failed", w.stderr[-1000:]))
            walked = None
        if walked is not None:
            for path, op, err in walked["errors"]:
                if op == "short-read":
                    F.append(Finding("mount", "mount-walk", "cat reads fewer bytes than st_size "
                                     "(short read, no error)", _clean_path(path)))
                elif err != errno.EIO:
                    F.append(Finding("mount", "mount-walk", f"{op}: {errno.errorcode.get(err, err)}"
                                     " (not EIO)", path))
            if walked["eio"] and walked["write_after"] not in (errno.EROFS, errno.EIO):
                F.append(Finding("mount", "mount-write", "write after EIO did not fail with "
                                 f"EROFS/EIO ({walked['write_after']})"))
            d_t = Tables(img, b.g) if not any(o < SB_LEN for o, _a, _b in case.flips) else None
            if d_t is not None:
                good = undamaged_paths(b, _base_tables(b), d_t)
                got = {k: tuple(v) if v is not None else None for k, v in walked["state"].items()}
                bad = [q for q in sorted(good) if q in b.state and b.state[q][0] == "f"
                       and (got.get(q) is None or got[q][1] != b.state[q][3])]
                if bad:
                    F.append(Finding("mount", "mount-walk", "undamaged file reads differently on "
                                     "the mount", f"{len(bad)} path(s), first {bad[0]}"))
        alive = pid is not None and _alive(pid)
        if not alive:
            F.append(Finding("traceback", "mount", "the daemon died while serving",
                             _log_tail(logp)))
        u = _cli("umount", mnt, timeout=timeout)
        if "Traceback" in u.stderr or "internal error" in u.stderr:
            F.append(Finding("traceback", "cli-umount", "umount: traceback", u.stderr[-1500:]))
        for ln in _log_problems(logp):
            F.append(Finding("traceback", "daemon", "daemon log: " + _generic(
                re.sub(r"^.*? (ERROR|WARNING|CRITICAL) ", "", ln)), ln, _log_tail(logp)))
    except subprocess.TimeoutExpired as e:
        F.append(Finding("hang", "mount", f"timed out: {e.cmd[:3]}", _log_tail(logp)))
    finally:
        _force_cleanup(mpath, mnt)
        try:
            os.rmdir(mnt)
        except OSError:
            pass
        for q in (mpath,):
            try:
                os.unlink(q)
            except FileNotFoundError:
                pass
    return res


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _log_tail(path: str, n: int = 40) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def _log_problems(path: str) -> list[str]:
    """Daemon log lines that mean a Python exception escaped the engine (the adapter turns
    them into EIO, or the failsafe caught something that is not a CorruptionError)."""
    out = []
    try:
        with open(path, errors="replace") as f:
            for ln in f:
                if "unexpected error in" in ln or "FUSE main loop failed" in ln or \
                        "daemon failed" in ln or "closing the filesystem failed" in ln:
                    out.append(ln.strip())
                m = re.search(r"failsafe\): (\w+)\(", ln)
                if m and m.group(1) not in ("CorruptionError", "FsError"):
                    out.append(ln.strip())
    except OSError:
        pass
    return out


def _force_cleanup(image: str, mnt: str) -> None:
    from daxfs import daemon
    if daemon.find_mount(os.path.realpath(mnt)) is not None:
        subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True, timeout=30)
    if not os.path.exists(image):
        return
    pid = daemon.lock_holder(image)
    if pid and pid != os.getpid():
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and daemon.is_locked(image):
            time.sleep(0.05)
        if daemon.is_locked(image):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
