"""Error types shared by all layers. Errors become errno values in exactly one place
(`fuse_ops.py`) and exit codes in exactly one place (`cli/main.py`)."""
from __future__ import annotations

import errno
import os


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
