"""Progress of a long command on a terminal: one line on stderr, rewritten in place, only
when stderr is a terminal (never in logs, pipes or tests that capture output)."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, what: str, stream=None, every: float = 0.2):
        self.what = what
        self.stream = sys.stderr if stream is None else stream
        self.on = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = every
        self._last = 0.0
        self._shown = False

    def show(self, done: int, total: int, detail: str = "") -> None:
        """`done` of `total` steps; shown at most every `every` seconds."""
        now = time.monotonic()
        if not self.on or (now - self._last < self.every and done < total):
            return
        self._last = now
        pct = 100 * done // total if total else 100
        self.stream.write(f"\r{self.what}: {pct:3d}% {detail}\033[K")
        self.stream.flush()
        self._shown = True

    def done(self) -> None:
        if self._shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
