"""The C hook at the libfuse boundary (:mod:`daxfs._fusehook`), seen from Python.

The extension interposes libfuse's ``fuse_session_new`` and patches pyfuse3's
operations table:

* copy_file_range, lseek(SEEK_DATA/SEEK_HOLE) and fallocate, for which pyfuse3
  (3.5) registers no handler, call the synchronous handlers of
  :func:`set_handlers`;
* read and write, with :func:`set_fast_path`, are answered in C by calling
  synchronous handlers (no coroutine, no copy of the write data), after which
  the hook keeps serving what arrives for up to ``spin_us`` (:func:`fast_stats`
  counts both);
* getxattr("security.capability"), which the kernel sends before each
  page-cache write, is answered ENODATA in C while :func:`set_capability_xattrs`
  says no inode has that xattr; any other getxattr goes to pyfuse3;
* :func:`set_conn_options` adjusts the connection settings at FUSE_INIT.

**Import order matters**: this module must be imported *before* ``pyfuse3``.
pyfuse3's extension binds ``fuse_session_new`` when it is loaded (Python loads
extensions with RTLD_NOW), so the interposer has to be in the global symbol
scope by then.  Importing this module after pyfuse3 raises :class:`RuntimeError`.

Usage::

    from daxfs import fusehook          # first!
    import pyfuse3

    fusehook.set_handlers(copy_file_range=..., lseek=..., fallocate=...)
    fusehook.set_fast_path(read=..., write=..., spin_us=50)
    fusehook.set_conn_options(max_readahead=1 << 20)
    pyfuse3.init(ops, mountpoint, options)
    assert fusehook.hooked()

Handlers run synchronously inside pyfuse3's request loop (while the trio task
that received the request is processing it), so they must not block for long
and cannot ``await``.  ``fh`` is the handle pyfuse3's ``open()``/``create()``
returned.  Raise ``OSError(errno, ...)`` to fail a request with that errno;
any other exception is logged on the ``daxfs.fusehook`` logger and the request
fails with EIO.

Without a registered handler the requests are answered so that the kernel
falls back to its generic behaviour: copy_file_range -> EOPNOTSUPP (the kernel
splice-copies through read/write; ENOSYS is never sent because it would
disable copy_file_range for the whole mount), lseek -> ENOSYS (kernel uses
generic_file_llseek: all data, hole at EOF, for the rest of the mount),
fallocate -> EOPNOTSUPP.  The kernel's own fallback on EXDEV/EOPNOTSUPP from
the copy_file_range handler is also a byte copy via read/write.
"""
from __future__ import annotations

import sys
from typing import Callable, Optional

if "pyfuse3" in sys.modules:
    raise RuntimeError(
        "daxfs.fusehook must be imported before pyfuse3: pyfuse3 binds "
        "fuse_session_new when it is loaded, so the hook would never run")

from . import _fusehook  # noqa: E402  (must precede pyfuse3)

__all__ = ["set_handlers", "set_fast_path", "fast_stats", "set_conn_options",
           "set_data_plane", "publish", "revoke", "take_times", "take_all_times", "revoke_all",
           "data_plane_stats", "stop_data_plane", "set_uring", "uring_status",
           "cow_configure", "cow_pool_add", "cow_pool_take", "cow_take", "cow_applied",
           "cow_disable", "cow_status",
           "set_capability_xattrs", "set_direct_io_mmap", "direct_io_mmap_sent",
           "set_killpriv_v2", "killpriv_v2_sent", "hooked",
           "conn_info", "cap_names",
           "CopyFileRange", "Lseek", "Fallocate", "KillPrivileges"]

# copy_file_range(ino_in, fh_in, off_in, ino_out, fh_out, off_out, length, flags) -> bytes copied
CopyFileRange = Callable[[int, int, int, int, int, int, int, int], int]
# lseek(ino, fh, off, whence) -> new offset; whence is os.SEEK_DATA or os.SEEK_HOLE
Lseek = Callable[[int, int, int, int], int]
# fallocate(ino, fh, mode, off, length) -> None; mode is the fallocate(2) FALLOC_FL_* mask
Fallocate = Callable[[int, int, int, int, int], None]
# kill_privileges(ino, suidgid) -> None: drop security.capability, and with suidgid clear
# setuid (and setgid when group-exec is set); see set_killpriv_v2
KillPrivileges = Callable[[int, bool], None]

# Re-export the FUSE_CAP_* bits for want_flags_on / want_flags_off, and the FUSE_WRITE_* bits
# the fast path's write handler receives.
globals().update({k: v for k, v in vars(_fusehook).items()
                  if k.startswith(("FUSE_CAP_", "FUSE_WRITE_"))})

_CONN_KEYS = ("max_readahead", "max_write", "max_background",
              "congestion_threshold", "time_gran", "want_flags_on", "want_flags_off")
_conn_opts: dict[str, int] = {}


def set_handlers(*, copy_file_range: Optional[CopyFileRange] = None,
                 lseek: Optional[Lseek] = None,
                 fallocate: Optional[Fallocate] = None,
                 kill_privileges: Optional[KillPrivileges] = None) -> None:
    """Register (or, with None, clear) all handlers at once.

    May be called before or after mounting; the C side picks up the current
    handlers on every request. ``kill_privileges`` is called only once
    FUSE_HANDLE_KILLPRIV_V2 was negotiated (:func:`set_killpriv_v2`).
    """
    _fusehook._set_handlers(copy_file_range, lseek, fallocate, kill_privileges)


def set_fast_path(*, read: Optional[Callable[[int, int, int], object]] = None,
                  write: Optional[Callable[[int, int, memoryview, int], int]] = None,
                  spin_us: int = 0) -> None:
    """Serve FUSE read/write with these synchronous handlers, called from C (no coroutine,
    no copy of the write data), instead of pyfuse3's async ``read``/``write``.

    ``read(fh, off, size)`` returns a buffer (it may be a view of the image: it is replied
    and dropped before the next request); ``write(fh, off, data, write_flags)`` gets a
    memoryview of libfuse's request buffer, valid only during the call, and the request's
    ``write_flags`` (``FUSE_WRITE_CACHE`` for page-cache writeback, ``FUSE_WRITE_KILL_SUIDGID``
    when the kernel wants setuid/setgid cleared: direct writes by a process without
    CAP_FSETID), and returns bytes written. Errors
    as for the other handlers. After each such request the hook polls the FUSE fd for up to
    ``spin_us`` microseconds and serves what arrives in place (0: never). Must be called
    before mounting: the operations table is patched when the session is created.
    """
    _fusehook._set_fast_path(read, write, int(spin_us))


def fast_stats() -> dict:
    """Requests served by the fast path, and how many of those (or others answered in C)
    came in through a drain rather than through pyfuse3's loop."""
    return _fusehook.fast_stats()


def set_conn_options(**kw: Optional[int]) -> None:
    """Request connection settings, applied in FUSE_INIT after pyfuse3's init.

    Keys: ``max_readahead``, ``max_write`` (bytes; can only be lowered from what
    the kernel offers / libfuse allows, max_write >= 4096), ``max_background``,
    ``congestion_threshold`` (libfuse clamps to < 65536), ``time_gran`` (ns),
    ``want_flags_on`` / ``want_flags_off`` (FUSE_CAP_* masks; bits the kernel
    does not offer are dropped, FUSE_CAP_SPLICE_* always stay off).  Calls
    accumulate; pass ``None`` to reset a key.  Must be called before mounting.
    """
    for k, v in kw.items():
        if k not in _CONN_KEYS:
            raise TypeError(f"unknown connection option {k!r} (valid: {', '.join(_CONN_KEYS)})")
        if v is None:
            _conn_opts.pop(k, None)
            continue
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{k} must be a non-negative int, got {v!r}")
        if k.startswith("want_flags") and v >= 1 << 32:
            raise ValueError(f"{k} must fit in 32 bits")
        if k == "max_write" and v < 4096:
            raise ValueError("max_write must be at least 4096")
        _conn_opts[k] = v
    g = _conn_opts.get
    _fusehook._set_conn_options(g("max_readahead", -1), g("max_write", -1),
                                g("max_background", -1), g("congestion_threshold", -1),
                                g("time_gran", -1), g("want_flags_on", 0),
                                g("want_flags_off", 0))


def set_capability_xattrs(present: bool) -> None:
    """Tell the hook whether any inode has a security.capability xattr. While none does,
    the kernel's getxattr("security.capability") before each write is answered in C."""
    _fusehook.set_capability_xattrs(bool(present))


def set_direct_io_mmap(on: bool) -> None:
    """Before the session is made: ask the kernel to allow MAP_SHARED on direct-I/O opens
    (FUSE_DIRECT_IO_ALLOW_MMAP, kernel >= 6.6), which libfuse 3.14 cannot request itself;
    for `-o dax`, where every open is direct I/O."""
    _fusehook.set_direct_io_mmap(bool(on))


def direct_io_mmap_sent() -> bool:
    """Whether the INIT reply carried FUSE_DIRECT_IO_ALLOW_MMAP."""
    return bool(_fusehook.direct_io_mmap_sent())


def set_killpriv_v2(on: bool) -> None:
    """Before the session is made: answer INIT with FUSE_HANDLE_KILLPRIV_V2 (which libfuse
    3.14 cannot request), so the kernel marks the superblock SB_NOSEC and stops asking
    getxattr("security.capability") before every write through its page cache. The daemon
    then clears setuid/setgid/capability itself (the comment above hook_setattr in
    _fusehook.c lists where); needs the ``kill_privileges`` handler and the fast-path write
    handler, which sees FUSE_WRITE_KILL_SUIDGID."""
    _fusehook.set_killpriv_v2(bool(on))


def killpriv_v2_sent() -> bool:
    """Whether the INIT reply carried FUSE_HANDLE_KILLPRIV_V2."""
    return bool(_fusehook.killpriv_v2_sent())


def hooked() -> bool:
    """True once a FUSE session was created through the hook with the slots filled."""
    return _fusehook.hooked()


def conn_info() -> dict:
    """Negotiated struct fuse_conn_info values after FUSE_INIT (empty before).

    Keys: proto_major, proto_minor, max_write, max_read, max_readahead,
    capable, want, max_background, congestion_threshold, time_gran.  These are
    the values handed back to libfuse at the end of init; libfuse then clamps
    max_background to < 65536 and, if congestion_threshold is 0, derives it as
    3/4 of max_background.  max_background == 0 means "kernel default" (12).
    """
    return _fusehook.conn_info()


def cap_names(mask: int) -> list[str]:
    """Names of the FUSE_CAP_* bits set in *mask* (e.g. ``conn_info()['want']``)."""
    caps = {k: v for k, v in vars(_fusehook).items() if k.startswith("FUSE_CAP_")}
    return sorted(k for k, v in caps.items() if mask & v)


# -- the data plane (daxfs/_dataplane.c, seen from the engine through daxfs/dataplane.py) -------
PERSIST_NONE, PERSIST_MSYNC, PERSIST_READS_ONLY = 0, 1, 2


def set_data_plane(*, threads: int, base: int, size: int, persist: int, writes: bool,
                   spin_us: int = 0) -> None:
    """Before mounting: serve READ and in-place WRITE of published files from `threads` C
    threads (0: everything goes through pyfuse3). `base`/`size`: the daemon's mapping of the
    image, which must outlive the session. `persist`: what a store into the image needs to be
    durable: PERSIST_NONE (RAM filesystem), PERSIST_MSYNC (disk file), PERSIST_READS_ONLY
    (cache-line flushes, left to Python: the threads serve reads only). `writes`: in-place
    writes allowed at all (not on a read-only mount). `spin_us`: after serving a request a
    thread polls this long for the next one before it sleeps (waking it costs more)."""
    _fusehook._dp_configure(int(threads), int(base), int(size), int(persist), bool(writes),
                            int(spin_us))


def publish(ino: int, size: int, writable: bool, runs) -> None:
    """Let the data plane serve `ino`: its size, whether owned runs may be overwritten in
    place, and its mapped runs (a buffer of format.PLANE_RUN_DTYPE records, sorted, disjoint,
    inside the image; ValueError otherwise). Replaces an earlier map, keeping its write time."""
    _fusehook.dp_publish(ino, size, writable, runs)


def revoke(ino: int) -> int:
    """Stop serving `ino` (waits for requests using its map); the ns time of the last write
    served for it since its time was last taken, 0 if none."""
    return _fusehook.dp_revoke(ino)


def take_times(ino: int) -> int:
    """The ns time of the last write served for `ino` since the last call, 0 if none."""
    return _fusehook.dp_take_times(ino)


def take_all_times() -> list[tuple[int, int]]:
    """[(ino, ns)] for every published inode written since its time was last taken."""
    return _fusehook.dp_take_all_times()


def revoke_all() -> list[tuple[int, int]]:
    """Stop serving every inode; [(ino, ns)] of those with an untaken write time."""
    return _fusehook.dp_revoke_all()


def data_plane_stats() -> dict:
    """threads running, writes allowed, reads/writes served and bytes, requests forwarded to
    Python; cow_breaks (writes served by a COW break in C, also counted in writes_served) and
    cow_forwarded (breaks given up for want of a pool block, ring slot or overlay room)."""
    return _fusehook.dp_stats()


# -- COW breaks by the data plane's threads (daxfs/_cowplane.c) ---------------------------------
def cow_configure(ring_off: int, slots: int, next_seq: int, applied_seq: int, pool_low: int,
                  drain_at: int) -> int:
    """After set_data_plane: let the threads break the sharing of the one block a write
    touches, logging each break in the image's COW ring (`slots` 64-byte records at byte
    `ring_off`, format.COW_RECORD_DTYPE; the next record is `next_seq`, those below
    `applied_seq` are applied). Returns an eventfd (non-blocking, close-on-exec; owned by the
    C side, never close it) that becomes readable when `drain_at` records wait for cow_take,
    the pool falls below `pool_low` blocks, or a break was given up (pool empty, ring full).
    No breaks happen on a read-only mount or with PERSIST_READS_ONLY, but the fd is returned.
    ValueError for a bad ring; RuntimeError if already configured (again only after
    cow_disable with nothing pending and the pool taken, returning the same fd)."""
    return _fusehook.cow_configure(int(ring_off), int(slots), int(next_seq), int(applied_seq),
                                   int(pool_low), int(drain_at))


def cow_pool_add(blocks) -> None:
    """Lend the threads free blocks to break into (a buffer of uint64 block numbers, e.g. a
    numpy uint64 array; each inside the image and outside the ring, else ValueError and none
    is added). They are used in the order given."""
    _fusehook.cow_pool_add(blocks)


def cow_pool_take() -> bytes:
    """Take back every block still in the pool (packed uint64s); the pool is empty after."""
    return _fusehook.cow_pool_take()


def cow_take() -> bytes:
    """Every break done since the last call: their ring records (64 bytes each, seq order),
    and the eventfd drained. b"" at once when there is nothing. After revoke(ino) returns, the
    next call holds every break of `ino` (a break runs under its map)."""
    return _fusehook.cow_take()


def cow_applied(seq: int) -> None:
    """Every record with seq < `seq` is committed by Python: their ring slots may be reused.
    ValueError if `seq` is past the last record written."""
    _fusehook.cow_applied(int(seq))


def cow_disable() -> None:
    """No break starts after this returns (and none is running). Blocks already moved stay
    served from where they went; cow_take and cow_pool_take keep working."""
    _fusehook.cow_disable()


def cow_status() -> dict:
    """enabled, pool (blocks left), pending (records not yet taken), next_seq, applied_seq,
    breaks, forwarded."""
    return _fusehook.cow_status()


def set_uring(on: bool) -> None:
    """Before mounting: serve through FUSE-over-io_uring (daxfs/_uring.c), if the kernel offers
    FUSE_OVER_IO_URING in its INIT (module parameter enable_uring) and the data plane runs
    (its worker reads the INIT request): one ring per possible CPU, each served by a thread
    pinned to that CPU. Otherwise everything goes through /dev/fuse as before."""
    _fusehook._uring_configure(bool(on))


def uring_status() -> dict:
    """wanted, init_seen (a worker read the INIT request), offered (the kernel offered the
    flag), active (the INIT reply carried it and no ring failed to register), queues, requests
    (received through the rings), errno/error (of the first ring command that failed)."""
    return _fusehook.uring_status()


def stop_data_plane() -> None:
    """Stop and join the threads (also done by fuse_session_destroy); idempotent."""
    _fusehook.dp_stop()
