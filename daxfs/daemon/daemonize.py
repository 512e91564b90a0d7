"""`daxfs mount`: logging set-up, the fork into a daemon (setsid, log file as stdout/stderr) and
the pipe on which the child reports "ok" or "error <reason>" to the waiting parent."""
from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
import time

from ..errors import EXIT_ERROR, EXIT_OK, UsageError
from .options import MountOptions
from .preflight import check_image, check_mountpoint
from .mounttab import exposed_image_warning, notice
from .safefiles import open_log, private_dir
from .server import Server

log = logging.getLogger("daxfs.daemon")

LOG_FORMAT = "%(asctime)s daxfs[%(process)d] %(levelname)s %(name)s: %(message)s"


def default_log_path(image: str) -> str:
    """daxfs-<image name>.log in our private directory (/run/daxfs for root; see safefiles)."""
    return os.path.join(private_dir(), f"daxfs-{os.path.basename(image) or 'image'}.log")


def enable_fault_log(stream) -> None:
    """A daemon killed by SIGBUS/SIGSEGV (a store into a hole the host filesystem could not
    fill, the image truncated under the mapping) leaves a line and a Python traceback in its
    log instead of vanishing silently."""
    try:
        faulthandler.enable(file=stream, all_threads=True)
    except (OSError, ValueError, RuntimeError) as e:
        log.warning("cannot enable the fault handler: %s", e)


def setup_logging(*, debug: bool, log_path: str | None, to_stderr: bool) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    formatter = logging.Formatter(LOG_FORMAT)
    if log_path:
        h = logging.StreamHandler(open(open_log(log_path), "a", buffering=1))
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
        enable_fault_log(sys.stderr)
        server = Server(image_abs, mnt, opts, display_image=image)
        server.start()
        _warn_if_exposed(image)
        return server.run()

    log_path = opts.log or default_log_path(image_abs)
    log_fd = open_log(log_path)
    rfd, wfd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:                                       # the daemon
        code = EXIT_ERROR
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
        _warn_if_exposed(image)
        return EXIT_OK
    # the child exits right after reporting a failure; reap it
    status = _reap(pid, timeout=10.0)
    if text.startswith("error "):
        raise UsageError(text[len("error "):])
    raise UsageError(f"the mount daemon died during startup ({status}); see {log_path}")


def _warn_if_exposed(image: str) -> None:
    """Once mounted (so that a failure stays one line): warn about a group/world-accessible
    image (the daemon logs the same)."""
    warning = exposed_image_warning(image)
    if warning:
        notice(warning)


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
    enable_fault_log(sys.stderr)
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
            return EXIT_ERROR
        except BaseException as e:                     # noqa: BLE001
            log.exception("mount failed")
            report(f"error unexpected failure while mounting ({type(e).__name__}: {e}); "
                   f"see {log_path}")
            return EXIT_ERROR
        report("ok")
    finally:
        os.close(wfd)
    return server.run()
