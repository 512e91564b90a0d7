"""Mounting, serving and unmounting a daxfs image (the machinery behind `daxfs mount/umount`).

Life of a mount (`daxfs mount IMAGE MNT`):

1. The CLI process checks what it can cheaply (image exists and its superblock parses, image not
   locked, mountpoint an empty directory, stale FUSE mount cleaned up), opens the log file, then
   forks. Nothing here imports trio or pyfuse3: they are imported only in the child.
2. The child calls setsid(), points stdin at /dev/null and stdout/stderr at the log file, takes an
   exclusive `flock` on the image (the authoritative "is it mounted" test: a second daemon fails
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
"""
from __future__ import annotations

import dataclasses
import errno
import fcntl
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time

from . import format as fmt
from .errors import FsError, UsageError

log = logging.getLogger("daxfs.daemon")

FSTYPE = "fuse.daxfs"
SUBTYPE = "daxfs"
DEFAULT_MIN_TASKS = 2
DEFAULT_MAX_TASKS = 32
# After a read or write, the C hook keeps polling /dev/fuse this long and serves what comes in
# place, skipping a trio round trip per request (2-3x the 4 KiB IOPS). Costs at most this much
# CPU per request, nothing while idle. `-o spin_us=0` turns it off.
DEFAULT_SPIN_US = 50
UMOUNT_TIMEOUT = 60.0
LOG_FORMAT = "%(asctime)s daxfs[%(process)d] %(levelname)s %(name)s: %(message)s"

# Options mount(8)/mount.fuse3 may hand us that are accepted and ignored (a FUSE mount is always
# nosuid,nodev; `noexec` / `exec` are honoured, see MountOptions.noexec).
IGNORED_OPTIONS = frozenset({
    "rw", "dev", "suid", "nodev", "nosuid", "auto", "noauto", "user", "nouser",
    "users", "_netdev", "nofail", "defaults", "default_permissions",
})


def default_log_path(image: str) -> str:
    return os.path.join(tempfile.gettempdir(), f"daxfs-{os.path.basename(image) or 'image'}.log")


# ---------------------------------------------------------------------------------------------
# options

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
            elif key in ("noexec", "exec") and not eq:
                mo.noexec = key == "noexec"
            elif key == "nodefault_permissions" and not eq:
                mo.default_permissions = False
            elif key == "log" and eq:
                if not value:
                    raise UsageError("mount option log= needs a file name")
                mo.log = os.path.abspath(value)
            elif key in ("min_tasks", "max_tasks", "spin_us") and eq:
                try:
                    n = int(value)
                except ValueError:
                    raise UsageError(f"mount option {key} needs a number, not {value!r}") from None
                lo, hi = (0, 1_000_000) if key == "spin_us" else (1, 1 << 20)
                if not lo <= n <= hi:
                    raise UsageError(f"mount option {key} must be between {lo} and {hi}")
                setattr(mo, key, n)
            elif (key in IGNORED_OPTIONS and not eq) or key.startswith("x-") or key == "comment":
                continue
            else:
                raise UsageError(f"unknown mount option {opt!r} (known: allow_other, ro, debug, "
                                 f"noexec, default_permissions, log=FILE, min_tasks=N, "
                                 f"max_tasks=N, spin_us=N)")
    if mo.min_tasks > mo.max_tasks:
        raise UsageError(f"mount option min_tasks={mo.min_tasks} exceeds max_tasks={mo.max_tasks}")
    return mo


def fuse_opt_escape(text: str) -> str:
    """Escape a value for libfuse's option parser (',' and '\\' and non-ASCII as \\ooo)."""
    out = []
    for b in os.fsencode(text):
        if b < 0x20 or b >= 0x7F or b in b",\\":
            out.append("\\%03o" % b)
        else:
            out.append(chr(b))
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# the mount table and the image lock

@dataclasses.dataclass(frozen=True)
class MountEntry:
    source: str
    target: str
    fstype: str
    options: str


def _unmangle(field: str) -> str:
    """Undo the octal escapes of /proc/mounts (space, tab, newline, backslash, ...)."""
    if "\\" not in field:
        return field
    raw = bytearray()
    b = os.fsencode(field)
    i = 0
    while i < len(b):
        digits = b[i + 1:i + 4]
        if b[i] == 0x5C and len(digits) == 3 and all(0x30 <= c <= 0x37 for c in digits):
            raw.append(int(digits, 8) & 0xFF)
            i += 4
        else:
            raw.append(b[i])
            i += 1
    return os.fsdecode(bytes(raw))


def proc_mounts() -> list[MountEntry]:
    try:
        with open("/proc/self/mounts", "rb") as f:
            lines = f.read().decode("utf-8", "surrogateescape").splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split(" ")
        if len(parts) >= 4:
            out.append(MountEntry(_unmangle(parts[0]), _unmangle(parts[1]), parts[2], parts[3]))
    return out


def find_mount(mountpoint: str) -> MountEntry | None:
    """The topmost mount on `mountpoint` (an absolute, symlink-free path), or None."""
    hit = None
    for e in proc_mounts():
        if e.target == mountpoint:
            hit = e
    return hit


def mounts_of_image(image: str) -> list[MountEntry]:
    image = os.path.abspath(image)
    return [e for e in proc_mounts() if e.fstype == FSTYPE and e.source == image]


def lock_holder(path: str) -> int | None:
    """Pid holding a flock on `path` according to /proc/locks (None if unknown / unlocked)."""
    try:
        st = os.stat(path)
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split()
        if len(parts) < 6 or parts[1] == "->" or parts[1] != "FLOCK":
            continue
        try:
            pid = int(parts[4])
            maj, mnr, ino = parts[5].split(":")
            if (int(maj, 16), int(mnr, 16), int(ino)) == (os.major(st.st_dev), os.minor(st.st_dev),
                                                         st.st_ino):
                return pid if pid > 0 else None
        except ValueError:
            continue
    return None


def try_lock(path: str) -> int | None:
    """Open `path` and take an exclusive flock without blocking: the fd, or None if locked."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise
    return fd


def is_locked(path: str) -> bool:
    fd = try_lock(path)
    if fd is None:
        return True
    os.close(fd)
    return False


def describe_lock(image: str) -> str:
    """'IMAGE is already mounted on MNT (locked by pid N)' with whatever parts are known."""
    where = mounts_of_image(image)
    pid = lock_holder(image)
    msg = f"{image} is already mounted"
    if where:
        msg += f" on {where[-1].target}"
    msg += f" (locked by pid {pid})" if pid else " (locked by another process)"
    return msg


def run_fusermount(mountpoint: str, lazy: bool) -> tuple[bool, str]:
    """Unmount a FUSE mount: (success, one-line error)."""
    if shutil.which("fusermount3"):
        cmd = ["fusermount3", "-u"] + (["-z"] if lazy else []) + ["--", mountpoint]
    else:
        cmd = ["umount"] + (["-l"] if lazy else []) + ["--", mountpoint]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"{cmd[0]} failed: {e}"
    if p.returncode == 0:
        return True, ""
    lines = [ln.strip() for ln in (p.stderr or p.stdout or "").splitlines() if ln.strip()]
    detail = lines[-1] if lines else f"{cmd[0]} exited with status {p.returncode}"
    for prefix in ("fusermount3: ", "umount: "):
        detail = detail.removeprefix(prefix)
    return False, detail


def is_stale(path: str) -> bool:
    try:
        os.stat(path)
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


def notice(msg: str) -> None:
    print(f"daxfs: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# checks before mounting

def check_image(image: str) -> None:
    """UsageError unless `image` is a daxfs image we could mount now (FormatError -> UsageError)."""
    try:
        st = os.stat(image)
    except FileNotFoundError:
        raise UsageError(f"{image}: no such image file") from None
    except OSError as e:
        raise UsageError(f"{image}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{image} is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{image} is not a regular file")
    try:
        with open(image, "rb") as f:
            raw = f.read(fmt.BLOCK_SIZE)
    except OSError as e:
        raise UsageError(f"cannot read {image}: {e.strerror}") from None
    try:
        fmt.parse_superblock(raw, st.st_size)
    except fmt.FormatError as e:
        raise UsageError(f"{image}: {e}") from None
    if is_locked(image):
        raise UsageError(describe_lock(image))


def check_mountpoint(mountpoint: str) -> str:
    """Validate the mountpoint (cleaning up a stale FUSE mount on it): its absolute path."""
    mnt = os.path.realpath(mountpoint)
    if is_stale(mnt):
        ok, err = run_fusermount(mnt, lazy=True)
        if not ok:
            raise UsageError(f"{mountpoint} is a stale FUSE mount and cleaning it up failed: {err}")
        notice(f"{mountpoint} was a stale FUSE mount (its daemon is gone); lazily unmounted it")
    try:
        st = os.stat(mnt)
    except FileNotFoundError:
        raise UsageError(f"mountpoint {mountpoint} does not exist") from None
    except OSError as e:
        raise UsageError(f"mountpoint {mountpoint}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"mountpoint {mountpoint} is not a directory")
    entry = find_mount(mnt)
    if entry is not None and entry.fstype == FSTYPE:
        raise UsageError(f"{mountpoint} is already a daxfs mount point (of {entry.source})")
    try:
        with os.scandir(mnt) as it:
            nonempty = any(True for _ in it)
    except OSError as e:
        raise UsageError(f"mountpoint {mountpoint}: {e.strerror}") from None
    if nonempty:
        raise UsageError(f"mountpoint {mountpoint} is not empty")
    return mnt


# ---------------------------------------------------------------------------------------------
# mount

def setup_logging(*, debug: bool, log_path: str | None, to_stderr: bool) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    formatter = logging.Formatter(LOG_FORMAT)
    if log_path:
        h = logging.FileHandler(log_path)
        h.setFormatter(formatter)
        root.addHandler(h)
    if to_stderr:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(formatter)
        root.addHandler(h)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    logging.getLogger("pyfuse3").setLevel(logging.DEBUG if debug else logging.INFO)


def mount(image: str, mountpoint: str, opts: MountOptions, *, foreground: bool = False) -> int:
    """`daxfs mount`: returns the exit code (0 once mounted, or after unmount with -f)."""
    image_abs = os.path.abspath(image)
    check_image(image)
    mnt = check_mountpoint(mountpoint)
    if foreground:
        setup_logging(debug=opts.debug, log_path=opts.log, to_stderr=True)
        server = Server(image_abs, mnt, opts, display_image=image)
        server.start()
        return server.run()

    log_path = opts.log or default_log_path(image_abs)
    try:
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise UsageError(f"cannot open log file {log_path}: {e.strerror}") from None
    rfd, wfd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:                                       # the daemon
        code = 1
        try:
            os.close(rfd)
            code = _daemon_child(image_abs, mnt, opts, log_fd, log_path, wfd, image)
        except BaseException:                          # noqa: BLE001 - never return into the CLI
            try:
                logging.getLogger("daxfs.daemon").exception("daemon failed")
            except BaseException:                      # noqa: BLE001
                pass
        finally:
            os._exit(code)

    os.close(wfd)
    os.close(log_fd)
    try:
        reply = _read_all(rfd)
    except KeyboardInterrupt:
        os.kill(pid, signal.SIGTERM)
        raise
    finally:
        os.close(rfd)
    text = reply.decode("utf-8", "replace").strip()
    if text == "ok":
        return 0
    # the child exits right after reporting a failure; reap it
    status = _reap(pid, timeout=10.0)
    if text.startswith("error "):
        raise UsageError(text[len("error "):])
    raise UsageError(f"the mount daemon died during startup ({status}); see {log_path}")


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        b = os.read(fd, 4096)
        if not b:
            return b"".join(chunks)
        chunks.append(b)


def _reap(pid: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return "exited"
        if done:
            if os.WIFSIGNALED(status):
                return f"killed by signal {os.WTERMSIG(status)}"
            return f"exit status {os.waitstatus_to_exitcode(status)}"
        if time.monotonic() > deadline:
            return "still running"
        time.sleep(0.05)


def _daemon_child(image: str, mnt: str, opts: MountOptions, log_fd: int, log_path: str,
                  wfd: int, display_image: str) -> int:
    os.setsid()
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    setup_logging(debug=opts.debug, log_path=None, to_stderr=True)   # stderr == the log file
    log.info("daemon starting: image %s, mountpoint %s, log %s (command: %s)", image, mnt,
             log_path, " ".join(sys.argv))

    def report(line: str) -> None:
        try:
            os.write(wfd, (line + "\n").encode("utf-8", "replace"))
        except OSError:
            log.warning("could not report %r to the parent (gone?)", line)

    server = Server(image, mnt, opts, display_image=display_image)
    try:
        try:
            server.start()
        except UsageError as e:
            log.error("mount failed: %s", e)
            report(f"error {e}")
            return 1
        except BaseException as e:                     # noqa: BLE001
            log.exception("mount failed")
            report(f"error unexpected failure while mounting ({type(e).__name__}: {e}); "
                   f"see {log_path}")
            return 1
        report("ok")
    finally:
        os.close(wfd)
    return server.run()


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
        try:
            fd = try_lock(self.image)
        except OSError as e:
            raise UsageError(f"cannot open {self.display}: {e.strerror}") from None
        if fd is None:
            raise UsageError(describe_lock(self.display))
        self.lock_fd = fd
        # the lock is ours: from here on nobody else touches the image
        from .fs import FileSystem
        try:
            self.fs = FileSystem.open(self.image, readonly=self.opts.ro)
        except fmt.FormatError as e:
            raise UsageError(f"{self.display}: {e}") from None
        except FsError as e:
            raise UsageError(f"{self.display}: cannot open the filesystem: {e} "
                             f"(run daxfs fsck)") from None
        except OSError as e:
            raise UsageError(f"cannot open {self.display}: {e.strerror or e}") from None
        log.info("opened %s%s", self.image, " read-only" if self.opts.ro else "")
        try:
            from . import fusehook          # must precede pyfuse3: it wraps fuse_session_new
        except ImportError as e:
            fusehook = None
            log.warning("daxfs.fusehook not available (%s): no copy_file_range (reflink), "
                        "lseek or fallocate", e)
        import pyfuse3
        self.pyfuse3 = pyfuse3
        self.fusehook = fusehook
        from .fuse_ops import Operations
        ops = Operations(self.fs)
        if fusehook is not None:
            fusehook.set_handlers(**ops.hook_handlers())
            fusehook.set_fast_path(read=ops.read_sync, write=ops.write_sync,
                                   spin_us=self.opts.spin_us)
            self.fs.extra_stats = fusehook.fast_stats
            fusehook.set_capability_xattrs(bool(self.fs.capability_inodes))
            self.fs.capability_listener = fusehook.set_capability_xattrs
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
        log.info("mounted %s on %s", self.image, self.mountpoint)
        if fusehook is not None:
            if fusehook.hooked():
                log.info("libfuse hook active: copy_file_range (reflink), lseek, fallocate")
            else:
                log.warning("libfuse hook did not take effect: cp will copy bytes, not share")

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

        async def serve():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch_signals, nursery.cancel_scope)
                nursery.start_soon(log_conn)
                await pyfuse3.main(min_tasks=self.opts.min_tasks, max_tasks=self.opts.max_tasks)
                nursery.cancel_scope.cancel()

        code = 0
        try:
            trio.run(serve)
            log.info("main loop ended")
        except BaseException:                       # noqa: BLE001
            log.exception("FUSE main loop failed")
            code = 1
        return self._shutdown(code)

    def _shutdown(self, code: int) -> int:
        if self.mounted:
            try:
                self.pyfuse3.close(unmount=True)
                log.info("unmounted %s", self.mountpoint)
            except BaseException:                   # noqa: BLE001
                log.exception("pyfuse3.close failed")
                code = code or 1
            self.mounted = False
        if self.fs is not None:
            try:
                self.fs.close()
                log.info("closed %s cleanly", self.image)
            except BaseException:                   # noqa: BLE001
                log.exception("closing the filesystem failed: the image is left dirty and will "
                              "be recovered at the next mount")
                code = code or 3
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


# ---------------------------------------------------------------------------------------------
# umount

def _check_closed_cleanly(target: str, image: str, entry: MountEntry) -> int:
    """After the daemon exited: a read-write mount must have left the image marked clean."""
    if "ro" in entry.options.split(","):
        return 0
    try:
        with open(image, "rb") as f:
            raw = f.read(fmt.SUPERBLOCK_DTYPE.itemsize)
        sb, _ = fmt.parse_superblock(raw + bytes(fmt.BLOCK_SIZE - len(raw)), os.path.getsize(image))
    except (OSError, fmt.FormatError) as e:
        raise UsageError(f"unmounted {target}, but {image} is unreadable afterwards: {e}") from None
    if not int(sb["clean"]):
        raise UsageError(f"unmounted {target}, but the daemon did not close {image} cleanly "
                         f"(see its log; the journal is replayed at the next mount)")
    return 0


def umount(target: str, *, lazy: bool = False, timeout: float = UMOUNT_TIMEOUT) -> int:
    """`daxfs umount MOUNTPOINT|IMAGE`: unmount and wait for the daemon to finish."""
    mnt = os.path.realpath(target)
    stale = is_stale(mnt)
    entry = find_mount(mnt)
    if entry is None and not stale and os.path.isfile(mnt):
        # given the image: find where it is mounted
        found = mounts_of_image(mnt)
        if not found:
            raise UsageError(f"{target} is not mounted")
        entry = found[-1]
        mnt = entry.target
        stale = is_stale(mnt)
    if entry is None:
        if not stale and not os.path.lexists(mnt):
            raise UsageError(f"{target}: no such file or directory")
        raise UsageError(f"{target} is not mounted")
    if entry.fstype != FSTYPE:
        raise UsageError(f"{target} is not a daxfs mount (it is {entry.fstype})")
    image = entry.source
    if stale:
        ok, err = run_fusermount(mnt, lazy=True)
        if not ok:
            raise UsageError(f"cannot clean up the stale mount {target}: {err}")
        notice(f"{target} was a stale mount (its daemon was gone); lazily unmounted it")
        return 0
    pid = lock_holder(image) if os.path.exists(image) else None
    ok, err = run_fusermount(mnt, lazy=lazy)
    if not ok:
        hint = " (files are open on it; close them or use --lazy)" if "busy" in err.lower() else ""
        raise UsageError(f"cannot unmount {target}: {err}{hint}")
    if lazy:
        return 0        # detached; the daemon exits once the last open file on it is closed
    if not os.path.exists(image):
        notice(f"unmounted {target}, but its image {image} is gone; not waiting for the daemon")
        return 0
    deadline = time.monotonic() + timeout
    while True:
        try:
            if not is_locked(image):
                return _check_closed_cleanly(target, image, entry)
        except OSError as e:
            notice(f"unmounted {target}; cannot watch {image} for the daemon to finish: "
                   f"{e.strerror}")
            return 0
        if time.monotonic() > deadline:
            who = f"pid {pid}" if pid else "the daemon"
            raise UsageError(f"unmounted {target}, but {who} still holds {image} after "
                             f"{timeout:.0f} s; see its log")
        time.sleep(0.05)
