"""The FUSE daemon proper (`Server`): take the image lock, open the engine, import
daxfs.fusehook and then pyfuse3 (only here, in the daemon), mount, serve under trio until
unmounted or signalled, and shut down cleanly."""
from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile

from .. import format as fmt
from ..errors import EXIT_CLOSE_FAILED, EXIT_ERROR, EXIT_OK, FsError, MountError, UsageError
from . import kcache
from .mounttab import describe_lock, exposed_image_warning, mounts_below, try_lock
from .options import MountOptions

log = logging.getLogger("daxfs.daemon")


class Server:
    """The FUSE daemon proper: start() mounts (UsageError on failure), run() serves until
    unmounted or signalled and shuts down cleanly (returns the exit code)."""

    def __init__(self, image: str, mountpoint: str, opts: MountOptions, display_image: str = ""):
        self.image = image
        self.display = display_image or image
        self.mountpoint = mountpoint
        self.opts = opts
        self.lock_fd: int | None = None
        self.fs = None
        self.pyfuse3 = None
        self.fusehook = None
        self.plane = None                   # dataplane.DataPlane, when C threads serve
        self.mounted = False
        self.pending_signal: int | None = None
        self._old_handlers: dict[int, object] = {}

    # signals that arrive before trio runs are remembered and acted on once it does
    def _early_signal(self, signum, frame):         # noqa: ARG002
        log.info("got signal %d during startup", signum)
        self.pending_signal = signum

    def start(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, self._early_signal)
        try:
            self._start()
        except BaseException:
            self._abort()
            raise

    def _start(self) -> None:
        self._lock_image()
        self._open_engine()
        ops = self._load_hook()
        self._mount(ops)
        ops.invalidator = kcache.Invalidator(self.pyfuse3)
        if not self.opts.ro:
            kcache.set_bdi_limits(self.mountpoint, self.opts.bdi_max_ratio)
        if self.opts.writeback:
            log.info("writeback mode: the kernel's writeback cache absorbs buffered writes; "
                     "data is stored at fsync/msync/close or the kernel's writeback")
        if not self.opts.ro:
            data = self.fs.g.data_start * fmt.BLOCK_SIZE
            if self.fs.pm.prefault(data, self.fs.pm.size - data):
                log.info("mapping the data area's pages in the background (first writes "
                         "then take no page faults)")
        if self.opts.dax:
            log.info("dax mode: every open is direct I/O (no page-cache copy per file); "
                     "MAP_SHARED %s", "through FUSE_DIRECT_IO_ALLOW_MMAP (kernel >= 6.6)"
                     if self.fusehook is not None else "fails with ENODEV (no libfuse hook)")
        if self.fusehook is not None:
            if self.fusehook.hooked():
                log.info("libfuse hook active: copy_file_range (reflink), lseek, fallocate")
            else:
                log.warning("libfuse hook did not take effect: cp will copy bytes, not share")

    def _lock_image(self) -> None:
        try:
            fd = try_lock(self.image)
        except PermissionError as e:
            raise UsageError(f"cannot open {self.display} for writing ({e.strerror}): the image "
                             f"lock needs write access, also for a read-only mount") from None
        except OSError as e:
            raise UsageError(f"cannot open {self.display}: {e.strerror}") from None
        if fd is None:
            raise UsageError(describe_lock(self.display))
        self.lock_fd = fd
        warning = exposed_image_warning(self.image)
        if warning:
            log.warning("%s", warning)

    def _open_engine(self) -> None:
        # the lock is ours: from here on nobody else touches the image
        from ..fs import FileSystem
        try:
            self.fs = FileSystem.open(self.image, readonly=self.opts.ro)
        except (fmt.FormatError, MountError) as e:
            raise UsageError(f"{self.display}: {e}") from None
        except FsError as e:
            raise UsageError(f"{self.display}: cannot open the filesystem: {e} "
                             f"(run daxfs fsck)") from None
        except OSError as e:
            raise UsageError(f"cannot open {self.display}: {e.strerror or e}") from None
        log.info("opened %s%s", self.image, " read-only" if self.opts.ro else "")

    def _load_hook(self):
        """Import daxfs.fusehook, then pyfuse3, and wire the hook to the engine: the
        adapter's Operations (returned)."""
        try:
            from .. import fusehook          # must precede pyfuse3: it wraps fuse_session_new
        except ImportError as e:
            # not a missing module: the extension's init refuses when it cannot find or
            # re-open libfuse (dladdr/dlopen); serve without the hook then
            fusehook = None
            log.warning("daxfs.fusehook not available (%s): no copy_file_range (reflink), "
                        "lseek or fallocate", e)
        import pyfuse3
        self.pyfuse3 = pyfuse3
        self.fusehook = fusehook
        from ..fuse_ops import Operations
        ops = Operations(self.fs, dax=self.opts.dax, writeback=self.opts.writeback,
                         timeout=self.opts.attr_timeout)
        if fusehook is not None:
            # dax: every open is direct I/O; mmap then needs FUSE_DIRECT_IO_ALLOW_MMAP
            fusehook.set_direct_io_mmap(self.opts.dax)
            fusehook.set_handlers(**ops.hook_handlers())
            fusehook.set_fast_path(read=ops.read_sync, write=ops.write_sync,
                                   spin_us=self.opts.spin_us)
            self.fs.extra_stats = lambda: {**fusehook.fast_stats(),
                                           **{f"dp_{k}": v for k, v in
                                              fusehook.data_plane_stats().items()},
                                           "prefaulting": int(self.fs.pm.prefaulting),
                                           "uring": int(fusehook.uring_status()["active"]),
                                           "killpriv_v2": int(fusehook.killpriv_v2_sent()),
                                           **{f"cow_plane_{k}": int(v) for k, v in
                                              fusehook.cow_status().items()
                                              if k not in ("breaks", "forwarded")}}
            self._start_data_plane(fusehook, ops)
            # we clear setuid/setgid/capability (FUSE_HANDLE_KILLPRIV_V2, see fuse_ops), not
            # FUSE_HANDLE_KILLPRIV's v1 rules; O_TRUNC arrives as SETATTR(size); and the page
            # cache stays across attribute refreshes (kcache)
            fusehook.set_killpriv_v2(True)
            cache = kcache.conn_options(fusehook)
            fusehook.set_conn_options(want_flags_off=fusehook.FUSE_CAP_HANDLE_KILLPRIV
                                      | fusehook.FUSE_CAP_ATOMIC_O_TRUNC
                                      | cache["want_flags_off"],
                                      want_flags_on=cache["want_flags_on"])
            fusehook.set_capability_xattrs(bool(self.fs.xattrs.capability_inodes))
            self.fs.xattrs.capability_listener = fusehook.set_capability_xattrs
        return ops

    def _start_data_plane(self, fusehook, ops) -> None:
        """C threads serve reads and in-place overwrites (daxfs/_dataplane.c, dataplane.py)."""
        if self.opts.threads <= 0:
            return
        from ..dataplane import DataPlane
        pm = self.fs.pm
        persist = {"nothing": fusehook.PERSIST_NONE, "msync": fusehook.PERSIST_MSYNC}.get(
            pm.store_needs, fusehook.PERSIST_READS_ONLY)
        fusehook.set_data_plane(threads=self.opts.threads, base=pm.address, size=pm.size,
                                persist=persist, writes=not self.fs.readonly,
                                spin_us=self.opts.spin_us)
        ops.plane = DataPlane(self.fs, fusehook)
        self.plane = ops.plane
        cow = persist != fusehook.PERSIST_READS_ONLY and not self.fs.readonly and self.opts.cow
        if cow:
            ops.plane.enable_cow()
        log.info("data plane: %d threads, %s", self.opts.threads,
                 "reads only" if persist == fusehook.PERSIST_READS_ONLY or self.fs.readonly
                 else "reads, in-place writes" + (" and COW breaks" if cow else ""))
        if self.opts.uring:
            fusehook.set_uring(enable_fuse_uring())


    def _mount(self, ops) -> None:
        pyfuse3 = self.pyfuse3
        options = self.opts.fuse_options(self.image)
        log.debug("pyfuse3.init(%s, %s)", self.mountpoint, sorted(options))
        failure = None
        with _CaptureStderr() as cap:
            try:
                pyfuse3.init(ops, self.mountpoint, options)
            except Exception as e:              # RuntimeError('fuse_session_mount failed') etc.
                failure = e
        if failure is not None:
            detail = cap.last_line() or str(failure)
            raise UsageError(f"cannot mount {self.display} on {self.mountpoint}: "
                             f"{detail.removeprefix('fuse: ')}")
        self.mounted = True
        below = mounts_below(self.mountpoint, self.image)
        if below is not None:
            # another mount of MNT won the race with our preflight check: do not stack on it
            raise UsageError(f"cannot mount {self.display} on {self.mountpoint}: it became a "
                             f"mount point (of {below.source}) while mounting")
        log.info("mounted %s on %s", self.image, self.mountpoint)

    def run(self) -> int:
        import trio
        pyfuse3 = self.pyfuse3

        async def watch_signals(cancel_scope):
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
                if self.pending_signal is None:
                    async for signum in sigs:
                        self.pending_signal = signum
                        break
                log.info("signal %d: unmounting", self.pending_signal)
                pyfuse3.terminate()

        async def log_conn():
            # the kernel's INIT arrives once the loop runs; report what was negotiated
            await trio.sleep(1)
            if self.fusehook is not None and self.fusehook.conn_info():
                info = self.fusehook.conn_info()
                log.info("negotiated: max_write=%d max_readahead=%d proto=%s.%s",
                         info["max_write"], info["max_readahead"], info.get("proto_major"),
                         info.get("proto_minor"))
            if self.fusehook is not None and self.opts.uring:
                log_uring(self.fusehook.uring_status())

        async def serve():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch_signals, nursery.cancel_scope)
                nursery.start_soon(log_conn)
                if self.plane is not None and self.plane.cow_fd is not None:
                    nursery.start_soon(self.plane.cow_task)
                await pyfuse3.main(min_tasks=self.opts.min_tasks, max_tasks=self.opts.max_tasks)
                nursery.cancel_scope.cancel()

        code = EXIT_OK
        try:
            trio.run(serve)
            log.info("main loop ended")
        except BaseException:                       # noqa: BLE001
            log.exception("FUSE main loop failed")
            code = EXIT_ERROR
        return self._shutdown(code)

    def _shutdown(self, code: int) -> int:
        if self.mounted:
            try:
                self.pyfuse3.close(unmount=True)
                log.info("unmounted %s", self.mountpoint)
            except BaseException:                   # noqa: BLE001
                log.exception("pyfuse3.close failed")
                code = code or EXIT_ERROR
            self.mounted = False
        if self.fusehook is not None:
            self.fusehook.stop_data_plane()     # no thread may touch the mapping past here
        if self.plane is not None and self.fs is not None:
            try:
                self.plane.shutdown()           # the last COW breaks C did, and its pool
            except BaseException:               # noqa: BLE001
                log.exception("applying the data plane's last COW breaks failed: they are "
                              "applied at the next mount")
            self.plane = None
        if self.fs is not None:
            try:
                self.fs.close()
                log.info("closed %s cleanly", self.image)
            except BaseException:                   # noqa: BLE001
                log.exception("closing the filesystem failed: the image is left dirty and will "
                              "be recovered at the next mount")
                code = code or EXIT_CLOSE_FAILED
            self.fs = None
        self._release()
        log.info("daemon exiting with status %d", code)
        return code

    def _abort(self) -> None:
        """Undo a partial start()."""
        if self.mounted:
            try:
                self.pyfuse3.close(unmount=True)
            except BaseException:                   # noqa: BLE001
                log.exception("pyfuse3.close failed")
            self.mounted = False
        if self.fs is not None:
            try:
                self.fs.close()
            except BaseException:                   # noqa: BLE001
                log.exception("closing the filesystem failed")
            self.fs = None
        self._release()

    def _release(self) -> None:
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None
        for sig, h in self._old_handlers.items():
            try:
                signal.signal(sig, h)
            except (TypeError, ValueError):
                pass
        self._old_handlers.clear()


ENABLE_URING = "/sys/module/fuse/parameters/enable_uring"


def enable_fuse_uring(path: str = ENABLE_URING) -> bool:
    """-o uring: the kernel offers FUSE_OVER_IO_URING only while the fuse module's enable_uring
    is Y; as root, turn it on (one line in the log). False (and one line) if it cannot be."""
    try:
        with open(path) as f:
            if f.read().strip() == "Y":
                return True
    except OSError as e:
        log.warning("-o uring: this kernel has no FUSE-over-io_uring (%s: %s); serving "
                    "through /dev/fuse", path, e.strerror)
        return False
    try:
        with open(path, "w") as f:
            f.write("Y")
    except OSError as e:
        log.warning("-o uring: cannot enable FUSE-over-io_uring (writing Y to %s: %s); serving "
                    "through /dev/fuse", path, e.strerror)
        return False
    log.info("-o uring: wrote Y to %s (FUSE-over-io_uring; it stays on for new mounts)", path)
    return True


def log_uring(st: dict) -> None:
    if st["active"]:
        log.info("io_uring transport: %d queues, one thread pinned to each CPU", st["queues"])
    elif st["wanted"]:
        why = (st["error"] or "?") if st["offered"] else "the kernel did not offer it"
        log.warning("-o uring: not in use (%s); serving through /dev/fuse", why)


class _CaptureStderr:
    """Temporarily point fd 2 at a temp file (libfuse reports mount errors there); the text is
    copied to the real stderr afterwards."""

    def __enter__(self):
        sys.stderr.flush()
        self.tmp = tempfile.TemporaryFile()
        self.saved = os.dup(2)
        os.dup2(self.tmp.fileno(), 2)
        self.text = ""
        return self

    def __exit__(self, *exc):
        try:
            sys.stderr.flush()
        except Exception:                           # noqa: BLE001
            pass
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.tmp.seek(0)
        self.text = self.tmp.read().decode("utf-8", "replace")
        self.tmp.close()
        if self.text:
            os.write(2, self.text.encode())
        return False

    def last_line(self) -> str:
        lines = [ln.strip() for ln in self.text.splitlines() if ln.strip()]
        return lines[-1] if lines else ""
