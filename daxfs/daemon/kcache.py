"""The kernel's side of a daxfs mount: its page cache, its attribute cache and the mount's bdi
dirty limits. The daemon is the only writer of the image, so the kernel may keep what it caches
for as long as it likes, provided the daemon tells it about the one kind of change it makes
behind the kernel's back (see `Invalidator`).

Page cache. libfuse turns FUSE_CAP_AUTO_INVAL_DATA on by default: every attribute refresh that
sees a new mtime (every write changes it) then drops ALL cached pages of the file, so data just
written was never in the page cache (`fincore`: 0 of 16,384 pages after a 64 MiB dd). We turn it
off and ask for FUSE_CAP_EXPLICIT_INVAL_DATA (kernel >= 5.2), with which a size that changed on
refresh only trims the pages past the new EOF; opens keep the cache (keep_cache in fuse_ops).
Where the data changes through a request, the kernel updates its own cache: a write(2) goes
through it, a direct write invalidates the pages it overlaps, copy_file_range truncates the
destination range and fallocate(PUNCH_HOLE/ZERO_RANGE) the punched one after the reply, truncate
trims. `daxfs dedupe` (a virtual xattr write the kernel knows nothing of) only remaps blocks
whose bytes are equal, so no cached page changes. tests/test_mount_cache.py checks each.

Attributes. The one change the daemon makes that the kernel does not know of is clearing
setuid/setgid on a direct write (FUSE_WRITE_KILL_SUIDGID, fuse_ops.write_sync): the kernel marks
only size/mtime/ctime/blocks stale after such a write, so a statx(STATX_MODE) or a permission
check would use the old mode until the attribute timeout. The daemon invalidates the inode's
attributes then (attr-only: no page is locked, safe inside a request). Everything else the
kernel learns from the replies (entries, setattr) or marks stale itself (write, link, unlink,
rename, setxattr, writeback), so the timeouts can be long.

bdi. Each FUSE mount gets its own backing device, created with max_ratio 1 % and strict_limit
on: the kernel throttles a process that dirties its pages (mmap stores, the writeback cache)
to the daemon's request rate as soon as the mount holds 1 % of the dirty limit, even while the
system as a whole is far below it. As root we raise max_ratio and turn strict_limit off
(`/sys/class/bdi/0:N/`, kernel >= 6.2 for strict_limit); see DEFAULT_BDI_MAX_RATIO.
"""
from __future__ import annotations

import errno
import logging
import os

log = logging.getLogger("daxfs.daemon")

# attribute and entry timeouts (s): the daemon is the only writer and tells the kernel what it
# changes behind its back (see above), so any length is correct; shorter only costs requests
DEFAULT_ATTR_TIMEOUT = 3600.0
# the mount's share of the system's dirty-page limit (vm.dirty_ratio of available memory), in
# percent. The kernel's default for FUSE is 1 % with strict_limit: mmap 4 KiB random stores then
# run at the daemon's request rate (~25k/s here, ~400k/s at 50). 50 lets the mount dirty up to
# half of the system's allowance (~2.3 GiB of 23.5 GiB here) before it is throttled, and leaves
# the other half to the other devices (a stuck daemon cannot pin all dirty memory). Without
# strict_limit the bdi is held to its share only once the whole system is past the midpoint of
# the background and dirty limits, as other devices are. 0: leave the kernel's setting.
DEFAULT_BDI_MAX_RATIO = 50


def conn_options(fusehook) -> dict:
    """set_conn_options() keys: keep the page cache across attribute refreshes."""
    return {"want_flags_on": fusehook.FUSE_CAP_EXPLICIT_INVAL_DATA,
            "want_flags_off": fusehook.FUSE_CAP_AUTO_INVAL_DATA}


def mount_dev(mountpoint: str) -> str | None:
    """'major:minor' of the filesystem mounted at `mountpoint` (a resolved path, as preflight
    makes it), from /proc/self/mountinfo: a stat() of the mountpoint would be a FUSE request
    that the daemon, not yet serving, cannot answer. The last entry wins, as mounts stack."""
    target = os.path.abspath(mountpoint)   # not realpath: its lstat would be such a request
    dev = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and _unescape(fields[4]) == target:
                    dev = fields[2]
    except OSError:
        return None
    return dev


def _unescape(field: str) -> str:
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def set_bdi_limits(mountpoint: str, max_ratio: int, sysfs: str = "/sys/class/bdi") -> bool:
    """Raise the mount's bdi max_ratio to `max_ratio` and turn strict_limit off. Logs one line
    either way; True when both took effect."""
    if max_ratio <= 0:
        log.info("bdi limits left at the kernel's (bdi_max_ratio=0)")
        return False
    dev = mount_dev(mountpoint)
    bdi = os.path.join(sysfs, dev) if dev else None
    if bdi is None or not os.path.isdir(bdi):
        log.warning("bdi of %s not found (%s): the kernel's FUSE dirty limit (1 %%, strict) "
                    "stays, so mmap stores are throttled to the daemon's request rate",
                    mountpoint, dev)
        return False
    done = []
    for name, value in (("max_ratio", max_ratio), ("strict_limit", 0)):
        path = os.path.join(bdi, name)
        if not os.path.exists(path):
            continue                    # strict_limit: kernel < 6.2
        try:
            with open(path, "w") as f:
                f.write(f"{value}\n")
            done.append(f"{name}={value}")
        except OSError as e:
            why = "not root" if e.errno in (errno.EACCES, errno.EPERM) else e.strerror
            log.warning("cannot set %s of the mount's bdi %s (%s): the kernel's FUSE dirty "
                        "limit (max_ratio 1 %%, strict_limit) stays, so mmap stores (and the "
                        "writeback cache) are throttled to the daemon's request rate",
                        name, bdi, why)
            return False
    log.info("bdi %s: %s", bdi, ", ".join(done))
    return len(done) == 2


class Invalidator:
    """Tells the kernel about attribute changes the daemon made behind its back."""

    def __init__(self, pyfuse3):
        self.pyfuse3 = pyfuse3
        self.sent = 0

    def attrs(self, ino: int) -> None:
        """Mark the inode's cached attributes stale (attr-only: no page lock is taken, so this
        is safe inside a request handler). An inode the kernel does not hold is fine."""
        try:
            self.pyfuse3.invalidate_inode(ino, attr_only=True)
            self.sent += 1
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENOSYS):
                log.warning("invalidating the attributes of inode %d: %s", ino, e)
