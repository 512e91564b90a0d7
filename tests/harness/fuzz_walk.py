"""Image fuzzer, the walk of a mounted tree (ls -R, cat, readlink, xattrs) that runs in a child
process: `python fuzz_walk.py MOUNTPOINT` prints its result as one JSON line. Standard library
only and no package-relative import, so the child runs it as a plain file."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import sys

READ_CAP = 8 << 20             # never read more than this of one (possibly damaged) file


def walk_mount(root: str) -> dict:
    """ls -R + cat + readlink + xattrs of a mounted tree (child process). Errors recorded."""
    errors, state = [], {}
    eio = False

    def err(path, op, e):
        nonlocal eio
        errors.append((path, op, e.errno))
        eio = eio or e.errno == errno.EIO

    def rec(d, rel):
        try:
            names = sorted(os.listdir(d))
        except OSError as e:
            err(rel or "/", "listdir", e)
            return
        for n in names:
            p = os.path.join(d, n)
            r = f"{rel}/{n}"
            try:
                st = os.lstat(p)
            except OSError as e:
                err(r, "lstat", e)
                continue
            try:
                for x in os.listxattr(p, follow_symlinks=False):
                    os.getxattr(p, x, follow_symlinks=False)
            except OSError as e:
                err(r, "xattr", e)
            if stat.S_ISDIR(st.st_mode):
                state[r] = ["d", None]
                rec(p, r)
            elif stat.S_ISREG(st.st_mode):
                h = hashlib.sha256()
                try:
                    with open(p, "rb") as f:
                        left = min(st.st_size, READ_CAP)
                        while left > 0:
                            chunk = f.read(min(left, 1 << 20))
                            if not chunk:
                                break
                            h.update(chunk)
                            left -= len(chunk)
                    if left > 0:
                        errors.append((r, "short-read", 0))
                    state[r] = ["f", h.hexdigest()]
                except OSError as e:
                    err(r, "read", e)
                    state[r] = ["f", None]
            elif stat.S_ISLNK(st.st_mode):
                try:
                    state[r] = ["l", os.readlink(p)]
                except OSError as e:
                    err(r, "readlink", e)
    rec(root, "")
    write_after = 0
    if eio:
        try:
            with open(os.path.join(root, "fuzz-after-eio"), "w") as f:
                f.write("x")
        except OSError as e:
            write_after = e.errno
    return {"errors": errors, "state": state, "eio": eio, "write_after": write_after}


def walk_mount_argv(root: str) -> list[str]:
    """The command that walks `root` in a child process (its last stdout line is the JSON)."""
    return [sys.executable, os.path.abspath(__file__), str(root)]


if __name__ == "__main__":
    print(json.dumps(walk_mount(sys.argv[1])))
