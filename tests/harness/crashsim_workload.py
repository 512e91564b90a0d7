"""Crash-state harness, workloads: operations as JSON-friendly tuples run on a live engine
(`Workload`), the pre-populated template image they start from, the operation catalog of the
systematic exploration and a generator of random operations."""
from __future__ import annotations

import errno
import random

from daxfs import format as fmt
from daxfs.errors import FsError
from daxfs.fs import FileSystem
from daxfs.mkfs import make_image

from .crashsim_state import BS, IMAGE_SIZE

def payload(seed: int, n: int) -> bytes:
    return random.Random(seed * 7919 + n).randbytes(n)


def _b(path: str) -> bytes:
    return path.encode()


class Workload:
    """Runs operations (JSON-friendly tuples) on a live engine, resolving paths itself."""

    def __init__(self, fs: FileSystem):
        self.fs = fs
        self.open_inos: list[int] = []

    def resolve(self, path: str) -> int:
        ino = fmt.ROOT_INO
        for part in _b(path).strip(b"/").split(b"/"):
            if not part:
                continue
            nxt = self.fs.dirs.lookup(ino, part)
            if nxt is None:
                raise FsError(errno.ENOENT)
            ino = nxt
        return ino

    def split(self, path: str) -> tuple[int, bytes]:
        head, _, name = path.rpartition("/")
        return self.resolve(head or "/"), name.encode()

    def apply(self, op: tuple) -> int:
        """Run one operation; returns 0 or the errno it failed with."""
        try:
            self._apply(op)
            return 0
        except FsError as e:
            return e.errno

    def _apply(self, op: tuple) -> None:
        fs = self.fs
        kind, args = op[0], op[1:]
        if kind in ("create", "mkdir", "symlink"):
            parent, name = self.split(args[0])
            if kind == "create":
                a = fs.create(parent, name, 0o644, 0, 0)
            elif kind == "mkdir":
                a = fs.mkdir(parent, name, 0o755, 0, 0)
            else:
                a = fs.symlink(parent, name, _b(args[1]), 0, 0)
            fs.forget(a.ino, 1)
        elif kind == "write":
            path, off, n, seed = args
            fs.write(self.resolve(path), off, payload(seed, n))
        elif kind == "truncate":
            fs.setattr(self.resolve(args[0]), size=args[1])
        elif kind == "chmod":
            fs.setattr(self.resolve(args[0]), mode=args[1])
        elif kind == "clone":
            src, soff, dst, doff, n = args
            fs.clone_range(self.resolve(src), soff, self.resolve(dst), doff, n)
        elif kind == "punch":
            path, off, n = args
            fs.fallocate(self.resolve(path), 0x01 | 0x02, off, n)
        elif kind == "falloc":
            path, off, n, keep = args
            fs.fallocate(self.resolve(path), 0x01 if keep else 0, off, n)
        elif kind == "unlink":
            parent, name = self.split(args[0])
            fs.unlink(parent, name)
        elif kind == "unlink_open":        # unlink while open: an orphan until close / mount
            ino = self.resolve(args[0])
            parent, name = self.split(args[0])
            fs.open_file(ino)
            self.open_inos.append(ino)
            fs.unlink(parent, name)
        elif kind == "rmdir":
            parent, name = self.split(args[0])
            fs.rmdir(parent, name)
        elif kind == "rename":
            src, dst, flags = args
            op_, on = self.split(src)
            np_, nn = self.split(dst)
            fs.rename(op_, on, np_, nn, flags)
        elif kind == "link":
            ino = self.resolve(args[0])
            parent, name = self.split(args[1])
            a = fs.link(ino, parent, name)
            fs.forget(a.ino, 1)
        elif kind == "setxattr":
            path, name, n, seed = args
            fs.setxattr(self.resolve(path), _b(name), payload(seed, n))
        elif kind == "removexattr":
            fs.removexattr(self.resolve(args[0]), _b(args[1]))
        elif kind == "fsync":
            fs.fsync(self.resolve(args[0]))
        elif kind == "checkpoint":         # what Journal.commit does when the log is full
            fs.journal.checkpoint()
        else:
            raise ValueError(f"unknown operation {op!r}")


# The pre-populated template: a few files, one pair sharing blocks, a hard link, a symlink,
# xattrs, a fragmented file and one with stale bytes past EOF (written, then truncated).
A_SIZE = 14436


def build_template(path: str, size: int = IMAGE_SIZE) -> None:
    make_image(path, size, force=True)
    fs = FileSystem.open(path)
    w = Workload(fs)
    for op in [
        ("mkdir", "/D"), ("mkdir", "/M"),
        ("create", "/A"), ("write", "/A", 0, A_SIZE, 100),
        ("setxattr", "/A", "user.a", 5, 101),
        ("create", "/B"), ("clone", "/A", 0, "/B", 0, 2 * BS), ("write", "/B", 2 * BS, 1000, 102),
        ("create", "/C"), ("write", "/C", 0, 100, 103), ("link", "/C", "/D/C2"),
        ("create", "/D/E"), ("write", "/D/E", 0, 5000, 104),
        ("symlink", "/S", "A"),
        ("create", "/T"), ("write", "/T", 0, 2 * BS, 105), ("truncate", "/T", 5000),
        ("create", "/Z"),
        ("create", "/X"), ("write", "/X", 0, BS, 106),
        ("setxattr", "/X", "user.a", 10, 107), ("setxattr", "/X", "user.b", 200, 108),
        ("create", "/F"), ("create", "/G"),
        ("write", "/F", 0, BS, 109), ("write", "/G", 0, BS, 110), ("write", "/F", BS, BS, 111),
    ]:
        err = w.apply(op)
        if err:
            raise RuntimeError(f"template: {op} failed: {errno.errorcode[err]}")
    fs.close()


CATALOG: list[tuple] = [
    ("create", "/N"),
    ("mkdir", "/N"),
    ("symlink", "/N", "D/E"),
    ("write", "/A", 2 * BS, BS, 1),          # aligned overwrite of an owned block (in place)
    ("write", "/A", 9000, 100, 2),           # unaligned overwrite in place
    ("write", "/A", 14000, 6000, 3),         # extending: in place up to EOF, then a new block
    ("write", "/A", 40000, 100, 4),          # past EOF, leaving a hole
    ("write", "/A", 100, 200, 5),            # into a shared block: COW break
    ("write", "/A", 4000, 5000, 6),          # spans shared and owned blocks
    ("write", "/B", 0, BS, 7),               # a whole shared block, from the other sharer
    ("write", "/F", 4000, 200, 8),           # spans two non-contiguous extents
    ("write", "/Z", 0, 10000, 9),            # fill an empty file
    ("write", "/T", 6000, 100, 10),          # extend over stale bytes past EOF
    ("truncate", "/A", 5000),                # shrink into a shared block
    ("truncate", "/A", 0),
    ("truncate", "/A", 30000),               # grow
    ("truncate", "/T", 2 * BS),              # grow over stale bytes past EOF
    ("truncate", "/B", BS),                  # shrink a sharer
    ("clone", "/A", 0, "/Z", 0, A_SIZE),     # whole file incl. EOF block
    ("clone", "/A", BS, "/C", 2 * BS, 2 * BS),   # past the destination's EOF
    ("clone", "/A", 0, "/A", 5 * BS, 2 * BS),    # within one file
    ("clone", "/A", 100, "/Z", 0, 5000),     # unaligned: a copy
    ("unlink", "/B"),                        # a sharer
    ("unlink", "/A"),                        # a sharer with an xattr block
    ("unlink", "/C"),                        # one of two links
    ("unlink_open", "/X"),                   # orphan with an xattr block
    ("rmdir", "/M"),
    ("rename", "/C", "/N", 0),
    ("rename", "/C", "/D/N", 0),
    ("rename", "/A", "/B", 0),               # over an existing file (its sharer)
    ("rename", "/Z", "/A", 0),               # over a file with xattrs
    ("rename", "/A", "/D", 2),               # exchange file <-> directory
    ("rename", "/A", "/D/E", 2),             # exchange across directories
    ("rename", "/M", "/D/M", 0),             # directory move
    ("rename", "/D", "/M", 0),               # directory over an empty directory
    ("rename", "/C", "/Z", 1),               # NOREPLACE onto an existing name (fails)
    ("link", "/A", "/N"),
    ("link", "/C", "/D/N"),
    ("setxattr", "/A", "user.new", 20, 11),
    ("setxattr", "/Z", "user.k", 100, 12),   # first xattr: allocates the block
    ("setxattr", "/X", "user.a", 3000, 13),
    ("removexattr", "/X", "user.b"),
    ("removexattr", "/A", "user.a"),         # last one: frees the block
    ("chmod", "/A", 0o600),
    ("fsync", "/A"),
    ("remount",),
    ("checkpoint",),                         # the log-full checkpoint of Journal.commit
    ("punch", "/A", 2 * BS, BS),
    ("falloc", "/A", 4 * BS, 2 * BS, 0),
    ("falloc", "/Z", 0, 2 * BS, 1),
]


_RAND_NAMES = ["/A", "/B", "/C", "/Z", "/N", "/D/E", "/D/N", "/M/P", "/r1", "/r2"]


def _files_and_dirs(fs: FileSystem) -> tuple[list, list]:
    """([(path, size)] of regular files, [path] of directories, "/" first) of the live tree."""
    files, dirs = [], ["/"]
    stack = [("", fmt.ROOT_INO)]
    while stack:
        dpath, d = stack.pop()
        for name, (ino, _s) in fs.dirs.entries(d).items():
            p = f"{dpath}/{name.decode()}"
            node = fs.inodes.get(ino)
            if node.is_dir:
                dirs.append(p)
                stack.append((p, ino))
            elif node.is_reg:
                files.append((p, node.size))
    return files, dirs


def random_op(w: Workload, rng: random.Random) -> tuple:
    """A random operation, mostly on names that exist (so it does something)."""
    files, dirs = _files_and_dirs(w.fs)
    names = _RAND_NAMES + [p for p, _s in files]
    f, fsize = rng.choice(files) if files else ("/A", 0)
    kind = rng.choices(
        ["write", "truncate", "clone", "create", "mkdir", "unlink", "rename", "link",
         "setxattr", "removexattr", "fsync", "punch", "falloc", "chmod", "symlink", "rmdir",
         "remount", "unlink_open"],
        [10, 4, 4, 2, 1, 2, 3, 2, 2, 1, 2, 1, 1, 1, 1, 1, 1, 1])[0]
    if kind == "write":
        off = rng.choice([0, rng.randrange(0, 6 * BS), fsize, max(0, fsize - 50),
                          rng.randrange(0, 8) * BS])
        n = rng.choice([1, 100, BS, 2 * BS, rng.randrange(1, 3 * BS)])
        return ("write", f, off, n, rng.randrange(1 << 20))
    if kind == "truncate":
        return ("truncate", f, rng.choice([0, rng.randrange(0, fsize + 1), fsize + rng.randrange(
            1, 2 * BS), rng.randrange(0, 6) * BS]))
    if kind == "clone":
        s, ssize = rng.choice(files) if files else ("/A", 0)
        aligned = rng.random() < 0.8
        soff = rng.randrange(0, max(1, ssize // BS + 1)) * BS if aligned else rng.randrange(0, max(1, ssize))
        doff = rng.randrange(0, 6) * BS if aligned else rng.randrange(0, 6 * BS)
        return ("clone", s, soff, f, doff, rng.choice([BS, 2 * BS, ssize, rng.randrange(1, 4 * BS)]) or 1)
    if kind in ("create", "mkdir", "symlink"):
        d = rng.choice(dirs)
        name = (d.rstrip("/") + "/" + rng.choice(["n1", "n2", "n3"]))
        return ("symlink", name, "A") if kind == "symlink" else (kind, name)
    if kind in ("unlink", "unlink_open"):
        return (kind, f)
    if kind == "rmdir":
        return ("rmdir", rng.choice(dirs[1:] or ["/M"]))
    if kind == "rename":
        src = rng.choice(names + dirs[1:])
        dst = rng.choice(names + dirs[1:] + ["/q1", "/D/q2"])
        return ("rename", src, dst, rng.choice([0, 0, 0, 1, 2]))
    if kind == "link":
        return ("link", f, rng.choice(names + ["/l1", "/D/l2"]))
    if kind == "setxattr":
        return ("setxattr", f, rng.choice(["user.a", "user.b", "user.c"]),
                rng.choice([0, 10, 500, 2000]), rng.randrange(1 << 20))
    if kind == "removexattr":
        return ("removexattr", f, rng.choice(["user.a", "user.b"]))
    if kind == "fsync":
        return ("fsync", f)
    if kind == "punch":
        return ("punch", f, rng.randrange(0, 6) * BS + rng.choice([0, 0, 100]), rng.choice([BS, 2 * BS, 300]))
    if kind == "falloc":
        return ("falloc", f, rng.randrange(0, 8) * BS, rng.choice([BS, 3 * BS]), rng.randrange(2))
    if kind == "chmod":
        return ("chmod", f, rng.choice([0o600, 0o755]))
    return ("remount",)
