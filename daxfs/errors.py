"""Error types shared by all layers, and every exit status. Errors become errno values in
exactly one place (`fuse_ops.py`) and exit statuses in exactly one place for each program
(`cli/main.py` for the `daxfs` command, `daemon/` for the mount daemon, `fsck/run.py` for the
fsck(8) convention); the statuses themselves are all named here."""
from __future__ import annotations

import errno
import os

EXIT_OK = 0
EXIT_ERROR = 1              # a user error, one line on stderr; the daemon: mount or serving failed
EXIT_USAGE = 2              # a bad command line
EXIT_CLOSE_FAILED = 3       # the daemon: closing the filesystem failed (image left dirty)
EXIT_INTERNAL = 8           # an unexpected error (a bug): traceback in the crash log
EXIT_INTERRUPTED = 130      # 128 + SIGINT
EXIT_BROKEN_PIPE = 141      # 128 + SIGPIPE: stdout's reader went away
# `daxfs fsck`, fsck(8)'s convention (EXIT_OK: no errors)
EXIT_CORRECTED = 1          # errors corrected, or the image otherwise modified
EXIT_UNCORRECTED = 4        # errors left uncorrected
EXIT_OPERATIONAL = 8        # cannot check: cannot open / lock, not a usable daxfs image


class FsError(Exception):
    """A POSIX error the engine returns to a caller: `errno` is the value to report."""

    def __init__(self, err: int, detail: str = ""):
        super().__init__(err, detail or os.strerror(err))
        self.errno = err

    def __str__(self) -> str:
        return f"[{errno.errorcode.get(self.errno, self.errno)}] {self.args[1]}"


class CorruptionError(FsError):
    """Metadata found inconsistent at run time: the engine turns read-only (failsafe)."""

    def __init__(self, detail: str):
        super().__init__(errno.EIO, detail)


class MountError(Exception):
    """The engine refuses to mount an image for a reason found while mounting that is not a
    format problem (format.FormatError): the file cannot be opened, or writing would be unsafe
    (a read-only mount may still work); str() is a one-line reason."""


class UsageError(Exception):
    """A bad command-line input or environment; str() is the one line shown to the user."""
