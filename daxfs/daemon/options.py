"""Mount options: `-o` parsing into MountOptions, the options handed to libfuse, and the
constants they share (FSTYPE, SUBTYPE, DEFAULT_*, IGNORED_OPTIONS)."""
from __future__ import annotations

import dataclasses
import os

from ..errors import UsageError
from .kcache import DEFAULT_ATTR_TIMEOUT, DEFAULT_BDI_MAX_RATIO

FSTYPE = "fuse.daxfs"
SUBTYPE = "daxfs"
DEFAULT_MIN_TASKS = 2
DEFAULT_MAX_TASKS = 32
# After a read or write, the C hook keeps polling /dev/fuse this long and serves what comes in
# place, skipping a trio round trip per request (2-3x the 4 KiB IOPS). Costs at most this much
# CPU per request, nothing while idle. `-o spin_us=0` turns it off.
DEFAULT_SPIN_US = 50
# C threads that read /dev/fuse and answer reads and in-place overwrites without Python (the
# data plane, daxfs/_dataplane.c): one per core. `-o threads=0` serves everything in Python.
DEFAULT_THREADS = min(8, os.cpu_count() or 1)

# Options mount(8)/mount.fuse3 may hand us that are accepted and ignored (a FUSE mount is always
# nosuid,nodev; `noexec` / `exec` are honoured, see MountOptions.noexec).
IGNORED_OPTIONS = frozenset({
    "rw", "dev", "suid", "nodev", "nosuid", "auto", "noauto", "user", "nouser",
    "users", "_netdev", "nofail", "defaults", "default_permissions",
})


@dataclasses.dataclass
class MountOptions:
    allow_other: bool = False
    ro: bool = False
    debug: bool = False
    default_permissions: bool = True
    noexec: bool = False
    log: str | None = None          # None: default_log_path(image) when daemonized, stderr with -f
    min_tasks: int = DEFAULT_MIN_TASKS
    max_tasks: int = DEFAULT_MAX_TASKS
    spin_us: int = DEFAULT_SPIN_US
    threads: int = DEFAULT_THREADS
    dax: bool = False               # every open direct I/O: clones read through one frame
    writeback: bool = False         # the kernel's writeback cache (see README, Modes)
    uring: bool = False             # FUSE-over-io_uring for the data plane (README, Design)
    cow: bool = True                # cow=c: the data plane breaks COW of one-block writes
    bdi_max_ratio: int = DEFAULT_BDI_MAX_RATIO     # % of the dirty limit; 0: kernel's 1 %
    attr_timeout: float = DEFAULT_ATTR_TIMEOUT     # s, attributes and entries

    def fuse_options(self, image: str) -> set[str]:
        opts = {f"fsname={fuse_opt_escape(image)}", f"subtype={SUBTYPE}"}
        if self.default_permissions:
            opts.add("default_permissions")
        if self.allow_other:
            opts.add("allow_other")
        if self.ro:
            opts.add("ro")
        if self.debug:
            opts.add("debug")
        if self.noexec:
            opts.add("noexec")
        return opts


def parse_mount_options(groups: list[str] | None, *, debug: bool = False) -> MountOptions:
    """`-o a,b=c` groups (possibly several) -> MountOptions; UsageError on anything unknown."""
    mo = MountOptions(debug=debug)
    for group in groups or ():
        for opt in group.split(","):
            opt = opt.strip()
            if not opt:
                continue
            key, eq, value = opt.partition("=")
            if key == "allow_other" and not eq:
                mo.allow_other = True
            elif key == "ro" and not eq:
                mo.ro = True
            elif key == "debug" and not eq:
                mo.debug = True
            elif key == "dax" and not eq:
                mo.dax = True
            elif key == "writeback" and not eq:
                mo.writeback = True
            elif key == "uring" and not eq:
                mo.uring = True
            elif key == "cow" and eq:
                if value not in ("c", "python"):
                    raise UsageError(f"mount option cow must be c or python, not {value!r}")
                mo.cow = value == "c"
            elif key in ("noexec", "exec") and not eq:
                mo.noexec = key == "noexec"
            elif key == "nodefault_permissions" and not eq:
                mo.default_permissions = False
            elif key == "log" and eq:
                if not value:
                    raise UsageError("mount option log= needs a file name")
                mo.log = os.path.abspath(value)
            elif key in ("min_tasks", "max_tasks", "spin_us", "threads") and eq:
                try:
                    n = int(value)
                except ValueError:
                    raise UsageError(f"mount option {key} needs a number, not {value!r}") from None
                lo, hi = {"spin_us": (0, 1_000_000), "threads": (0, 64)}.get(key, (1, 1 << 20))
                if not lo <= n <= hi:
                    raise UsageError(f"mount option {key} must be between {lo} and {hi}")
                setattr(mo, key, n)
            elif key in ("bdi_max_ratio", "attr_timeout") and eq:
                mo_set_number(mo, key, value, 100 if key == "bdi_max_ratio" else 1e6)
            elif (key in IGNORED_OPTIONS and not eq) or key.startswith("x-") or key == "comment":
                continue
            else:
                raise UsageError(f"unknown mount option {opt!r} (known: allow_other, ro, debug, "
                                 f"dax, writeback, uring, cow=c|python, noexec, default_permissions, log=FILE, "
                                 f"min_tasks=N, max_tasks=N, spin_us=N, threads=N, bdi_max_ratio=N, "
                                 f"attr_timeout=S)")
    if mo.dax and mo.writeback:
        raise UsageError("mount options dax and writeback exclude each other (dax makes every "
                         "open direct I/O: nothing would use the writeback cache)")
    if mo.uring and mo.threads == 0:
        raise UsageError("mount option uring needs the data plane (threads=N with N > 0): its "
                         "rings are served by the data plane's C code")
    if mo.min_tasks > mo.max_tasks:
        raise UsageError(f"mount option min_tasks={mo.min_tasks} exceeds max_tasks={mo.max_tasks}")
    return mo


def mo_set_number(mo: MountOptions, key: str, value: str, hi: float) -> None:
    """bdi_max_ratio=N (an int, 0..100) or attr_timeout=S (seconds, may have a fraction)."""
    try:
        n = int(value) if key == "bdi_max_ratio" else float(value)
    except ValueError:
        raise UsageError(f"mount option {key} needs a number, not {value!r}") from None
    if not 0 <= n <= hi:
        raise UsageError(f"mount option {key} must be between 0 and {hi:g}")
    setattr(mo, key, n)


def fuse_opt_escape(text: str) -> str:
    """Escape a value for libfuse's option parser (',' and '\\' and non-ASCII as \\ooo)."""
    out = []
    for b in os.fsencode(text):
        if b < 0x20 or b >= 0x7F or b in b",\\":
            out.append("\\%03o" % b)
        else:
            out.append(chr(b))
    return "".join(out)
