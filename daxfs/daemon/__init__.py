"""Mounting, serving and unmounting a daxfs image (the machinery behind `daxfs mount/umount`).

Life of a mount (`daxfs mount IMAGE MNT`):

1. The CLI process checks what it can cheaply (image exists and its superblock parses, image not
   locked, mountpoint an empty directory, stale FUSE mount cleaned up), opens the log file, then
   forks. Nothing here imports trio or pyfuse3: they are imported only in the child.
2. The child calls setsid(), points stdin at /dev/null and stdout/stderr at the log file, takes an
   exclusive `flock` on the image, opened read-write so that only a writer can hold it (the
   authoritative "is it mounted" test: a second daemon fails
   with "already mounted (locked by pid N)"), opens the engine (`FileSystem.open`: validates,
   replays the journal), imports `daxfs.fusehook` (if present) and then pyfuse3, and mounts with
   `pyfuse3.init` (fsname = absolute image path, subtype = daxfs).
3. The child writes one line into a pipe to the parent: "ok" or "error <one-line reason>"; the
   parent prints the reason (if any) and exits 0/1. So `daxfs mount` returns once the mount is
   live, and fails with the real reason otherwise.
4. The child runs `trio.run(pyfuse3.main)` until the filesystem is unmounted (fusermount3 -u) or
   it gets SIGTERM/SIGINT/SIGHUP (-> pyfuse3.terminate()); then pyfuse3.close(unmount=True),
   fs.close() (commit, checkpoint, mark clean, unmap), releases the lock and exits 0 (non-zero if
   fs.close failed).

`daxfs umount MNT` finds the image from /proc/mounts (source field == fsname == image path), runs
`fusermount3 -u`, then waits until the image's lock is free, i.e. the daemon has finished.

With `-f` steps 2-4 run in the foreground process itself (logging to stderr).

Modules: `options` (MountOptions, `-o` parsing), `mounttab` (the mount table, the image lock,
stale mounts, fusermount3), `preflight` (checks before mounting), `daemonize` (logging, fork,
the report pipe: `mount`), `server` (the FUSE daemon: `Server`), `unmount` (`umount`). Importing
this package imports neither trio nor pyfuse3.
"""
from __future__ import annotations

import logging

from .daemonize import LOG_FORMAT, default_log_path, mount, setup_logging
from .mounttab import (MountEntry, _unmangle, describe_lock, find_mount, is_locked, is_stale,
                       lock_holder, mounts_of_image, notice, proc_mounts, run_fusermount, try_lock)
from .options import (DEFAULT_MAX_TASKS, DEFAULT_MIN_TASKS, DEFAULT_SPIN_US, FSTYPE,
                      IGNORED_OPTIONS, SUBTYPE, MountOptions, fuse_opt_escape, parse_mount_options)
from .preflight import check_image, check_mountpoint
from .server import Server
from .unmount import UMOUNT_TIMEOUT, umount

log = logging.getLogger("daxfs.daemon")

__all__ = [
    "FSTYPE", "SUBTYPE", "DEFAULT_MIN_TASKS", "DEFAULT_MAX_TASKS", "DEFAULT_SPIN_US",
    "IGNORED_OPTIONS", "MountOptions", "parse_mount_options", "fuse_opt_escape",
    "MountEntry", "_unmangle", "proc_mounts", "find_mount", "mounts_of_image", "lock_holder",
    "try_lock", "is_locked", "describe_lock", "run_fusermount", "is_stale", "notice",
    "check_image", "check_mountpoint",
    "LOG_FORMAT", "default_log_path", "setup_logging", "mount",
    "Server", "UMOUNT_TIMEOUT", "umount", "log",
]
