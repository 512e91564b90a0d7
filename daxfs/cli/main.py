"""The `daxfs` command: mkfs, mount, umount, fsck, info, stat, reflink.

Every user error ends as ONE line on stderr ("daxfs: ...") and a non-zero exit status, never a
traceback. Exit statuses (named in errors.py): 0 ok, 1 error, 2 bad command line, 8 internal
error; `daxfs fsck` uses the fsck(8) convention (0 clean, 1 corrected, 4 uncorrected, 8
operational error).

Mount-helper form: `mount -t fuse.daxfs IMAGE MNT -o OPTS` makes mount.fuse3 run
`daxfs IMAGE MNT -o OPTS`, which is taken as `daxfs mount IMAGE MNT -o OPTS`.

trio and pyfuse3 are NOT imported here: the mount daemon imports them after forking.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from .. import __version__
from ..errors import (EXIT_BROKEN_PIPE, EXIT_ERROR, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK,
                      EXIT_OPERATIONAL, EXIT_USAGE, MountError, UsageError)
from ..format import FormatError

log = logging.getLogger("daxfs.cli")

COMMANDS = ("mkfs", "mount", "umount", "unmount", "fsck", "info", "stat", "reflink", "dedupe")
CRASH_LOG_NAME = "daxfs-cli.log"        # in the private log directory (daemon/safefiles.py)


class CliExit(Exception):
    """Raised by the argument parser instead of printing usage + exiting."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


class Parser(argparse.ArgumentParser):
    def error(self, message):               # one line, no usage dump
        raise CliExit(f"{message} (see '{self.prog} --help')")


def build_parser() -> Parser:
    p = Parser(prog="daxfs", description="daxfs: a DAX + reflink filesystem in one image file")
    p.add_argument("--version", action="version", version=f"daxfs {__version__}")
    p.add_argument("--debug", action="store_true", help="debug logging on stderr")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="debug logging on stderr")
    for add in (_add_mkfs, _add_mount, _add_umount, _add_fsck, _add_stat, _add_reflink,
                _add_dedupe, _add_info):
        add(sub, common)
    return p


def _add_mkfs(sub, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("mkfs", parents=[common], help="create an empty daxfs image",
                       description="Create (or with --force overwrite) a daxfs image file.")
    s.add_argument("image", metavar="IMAGE")
    s.add_argument("-s", "--size", default="1G", help="image size, e.g. 256M, 4G (default 1G)")
    s.add_argument("--force", action="store_true", help="overwrite an existing image or file")
    s.add_argument("--inodes", type=int, metavar="N",
                   help="number of inodes (default: one per 16 KiB)")
    s.add_argument("--extents", type=int, metavar="N",
                   help="extent records (default: one per block; reflinking fragmented files "
                        "needs more)")
    s.add_argument("--sparse", action="store_true",
                   help="do not reserve the image's space on the host filesystem (the daemon "
                        "then dies of SIGBUS if that filesystem fills up)")


def _add_mount(sub, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser(
        "mount", parents=[common], help="mount an image (daemon in the background)",
        description="Mount IMAGE on MOUNTPOINT and return once it is mounted; the daemon keeps "
                    "running in the background until `daxfs umount` (or SIGTERM). Options for -o "
                    "(comma-separated): allow_other, ro, debug, noexec, default_permissions "
                    "(always on), log=FILE (daemon log; default daxfs-<image name>.log in "
                    "/run/daxfs for root, else $XDG_RUNTIME_DIR/daxfs or /tmp/daxfs-<uid>), "
                    "min_tasks=N, max_tasks=N (FUSE worker tasks, default 2 and 32), spin_us=N "
                    "(after each read/write, poll for the next request this long before "
                    "returning to the event loop; default 50, 0 = off); mount(8) "
                    "options such as rw, exec, nosuid, nodev, auto, user, _netdev, nofail, "
                    "defaults, x-* are accepted and ignored (FUSE mounts are always nosuid,nodev).")
    s.add_argument("image", metavar="IMAGE")
    s.add_argument("mountpoint", metavar="MOUNTPOINT")
    s.add_argument("-f", "--foreground", action="store_true",
                   help="stay in the foreground (log to stderr)")
    s.add_argument("-o", dest="options", action="append", metavar="OPTS",
                   help="comma-separated mount options")


def _add_umount(sub, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("umount", aliases=["unmount"], parents=[common],
                       help="unmount and wait for the daemon to finish",
                       description="Unmount a daxfs mount (given its mountpoint or its image) and "
                                   "wait until its daemon has written everything back and exited.")
    s.add_argument("target", metavar="MOUNTPOINT")
    s.add_argument("-z", "--lazy", action="store_true",
                   help="detach now even if busy; the daemon exits when the last file closes")
    s.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                   help="how long to wait for the daemon to exit (default 60)")


def _add_fsck(sub, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("fsck", parents=[common], help="check (and repair) an unmounted image",
                       description="Check an unmounted image. Exit status: 0 clean, 1 errors "
                                   "corrected, 4 errors left uncorrected, 8 operational error.")
    s.add_argument("image", metavar="IMAGE")
    # one spelling, --repair, and -y: what util-linux fsck(8) passes for "answer yes" (the
    # same as `python -m daxfs.fsck`)
    s.add_argument("--repair", "-y", action="store_true",
                   help="repair what can be repaired (-y: as util-linux fsck passes it)")


def _add_stat(sub, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("stat", parents=[common], help="space and sharing counters",
                       description="Logical/physical bytes, shared blocks, aliases, clones, COW "
                                   "breaks and bytes saved, of a mount (live) or an image; for a "
                                   "FILE on a mount, which of its ranges share blocks with which "
                                   "other files, at which offsets.")
    s.add_argument("target", metavar="MOUNTPOINT|IMAGE|FILE")
    s.add_argument("--json", action="store_true", help="machine-readable output")


def _add_reflink(sub, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("reflink", parents=[common], help="clone SRC to DST; fail unless shared",
                       description="Clone a file on a daxfs mount through copy_file_range and "
                                   "fail if the result does not share every block.")
    s.add_argument("src", metavar="SRC")
    s.add_argument("dst", metavar="DST")


def _add_dedupe(sub, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("dedupe", parents=[common], help="share identical blocks of files",
                       description="Find blocks with identical content in files on a mounted "
                                   "daxfs (directories recursed) and make them share one frame; "
                                   "the daemon compares the bytes before it remaps.")
    s.add_argument("paths", metavar="PATH", nargs="+")


def _add_info(sub, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("info", parents=[common], help="show geometry, state and usage",
                       description="Show an image's geometry, state and usage (read-only; "
                                   "works on a mounted image too).")
    s.add_argument("image", metavar="IMAGE")
    s.add_argument("--json", action="store_true", help="machine-readable output")


def _mount_helper_form(argv: list[str]) -> bool:
    """`daxfs IMAGE MNT [-o OPTS]...`, as run by mount.fuse3 for `mount -t fuse.daxfs`."""
    if not argv or argv[0] in COMMANDS or argv[0].startswith("-"):
        return False
    positionals = 0
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "-o":
            i += 2
            continue
        if not a.startswith("-"):
            positionals += 1
        i += 1
    return positionals == 2


# ---------------------------------------------------------------------------------------------
# commands

def cmd_mkfs(a) -> int:
    from ..mkfs import make_image, parse_size
    from .. import daemon
    size = parse_size(a.size)
    if a.inodes is not None and a.inodes < 2:
        raise UsageError("--inodes must be at least 2")
    if a.extents is not None and a.extents < 64:
        raise UsageError("--extents must be at least 64")
    if a.force and os.path.isfile(a.image):
        try:
            locked = daemon.is_locked(a.image)
        except OSError:
            locked = False
        if locked:
            raise UsageError(daemon.describe_lock(a.image) + "; unmount it first")
    g = make_image(a.image, size, force=a.force, inode_count=a.inodes, extent_count=a.extents,
                   sparse=a.sparse)
    from ..format import BLOCK_SIZE
    print(f"daxfs: created {a.image}: {g.nblocks * BLOCK_SIZE} bytes, {g.nblocks} blocks of "
          f"{BLOCK_SIZE}, {g.data_blocks} data blocks, {g.inode_count - 1} inodes")
    return EXIT_OK


def cmd_mount(a) -> int:
    from .. import daemon
    opts = daemon.parse_mount_options(a.options, debug=a.debug)
    return daemon.mount(a.image, a.mountpoint, opts, foreground=a.foreground)


def cmd_umount(a) -> int:
    from .. import daemon
    return daemon.umount(a.target, lazy=a.lazy, timeout=a.timeout)


def cmd_fsck(a) -> int:
    from .. import daemon
    image = a.image
    if not os.path.exists(image):
        raise UsageError(f"{image}: no such image file")
    if os.path.isdir(image):
        raise UsageError(f"{image} is a directory, not an image file")
    try:
        locked = daemon.is_locked(image)
    except OSError as e:
        raise UsageError(f"cannot open {image}: {e.strerror}") from None
    if locked:
        raise UsageError(daemon.describe_lock(image) + "; unmount it before running fsck")
    from ..fsck import main_check
    code = int(main_check(image, a.repair) or EXIT_OK)
    if code < EXIT_OPERATIONAL:         # checked: a failure stays one line
        from ..daemon.mounttab import exposed_image_warning
        warning = exposed_image_warning(image)
        if warning:
            daemon.notice(warning)
    return code


def cmd_info(a) -> int:
    from .info import main_info
    return main_info(a.image, as_json=a.json)


def cmd_stat(a) -> int:
    from .stat import main_stat
    return main_stat(a.target, as_json=a.json)


def cmd_reflink(a) -> int:
    from .stat import main_reflink
    return main_reflink(a.src, a.dst)


def cmd_dedupe(a) -> int:
    from .dedupe import main_dedupe
    return main_dedupe(a.paths)


HANDLERS = {"stat": cmd_stat, "reflink": cmd_reflink, "dedupe": cmd_dedupe, "mkfs": cmd_mkfs, "mount": cmd_mount, "umount": cmd_umount, "unmount": cmd_umount,
            "fsck": cmd_fsck, "info": cmd_info}


# ---------------------------------------------------------------------------------------------

def _error(msg: str) -> None:
    try:
        print(f"daxfs: {msg}", file=sys.stderr, flush=True)
    except OSError:
        pass


def _silence_stdout() -> None:
    """Point fd 1 at /dev/null so the interpreter's final flush of stdout does not print an
    'Exception ignored ... BrokenPipeError' line."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _crash_log(exc: BaseException) -> str:
    """Append the traceback to the CLI crash log; its path (or '' if not writable)."""
    text = "".join(traceback.format_exception(exc))
    log.debug("unexpected error:\n%s", text)
    try:
        from ..daemon.safefiles import open_private_append, private_dir
        path = os.path.join(private_dir(), CRASH_LOG_NAME)
        with open(open_private_append(path), "a") as f:
            f.write(f"--- pid {os.getpid()}: daxfs {' '.join(sys.argv[1:])}\n{text}")
        return path
    except (OSError, UsageError):
        return ""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if _mount_helper_form(argv):
        argv = ["mount", *argv]
    error_code = EXIT_OPERATIONAL if argv[:1] == ["fsck"] else EXIT_ERROR
    debug = "--debug" in argv
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="daxfs: %(levelname)s %(name)s: %(message)s")
    log.debug("daxfs %s", " ".join(argv))
    try:
        a = build_parser().parse_args(argv)
        if a.command is None:
            raise CliExit("no command given (one of mkfs, mount, umount, fsck, info, stat, reflink, dedupe; "
                          "see 'daxfs --help')")
        if "debug" in ",".join(getattr(a, "options", None) or []).split(","):
            a.debug = True
        if a.debug:
            logging.getLogger().setLevel(logging.DEBUG)
        code = HANDLERS[a.command](a)
        sys.stdout.flush()                  # a closed pipe shows here, not at exit
        return code
    except BrokenPipeError:
        # `daxfs stat MNT | head`: the reader went away; stop quietly like a SIGPIPE death
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except CliExit as e:
        _error(str(e))
        return e.code
    except UsageError as e:
        _error(str(e))
        return error_code
    except (FormatError, MountError) as e:
        _error(str(e))
        return error_code
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        _error(f"{where}{e.strerror or e}")
        return error_code
    except KeyboardInterrupt:
        _error("interrupted")
        return EXIT_INTERRUPTED
    except SystemExit:
        raise
    except BaseException as e:                         # noqa: BLE001
        path = _crash_log(e)
        where = f"see {path}" if path else "run with --debug for details"
        _error(f"internal error: {type(e).__name__}: {e} ({where})")
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
