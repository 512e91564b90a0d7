"""`daxfs stat` (space and sharing counters of a mount or image; the shared ranges of a file)
and `daxfs reflink` (a clone that must share).

copy_file_range cannot tell its caller whether blocks were shared or copied; the counters can.
A running daemon serves them as the read-only virtual xattr `user.daxfs.stats` of the root;
for an unmounted image they are computed from the tables (clone and COW counters are per mount
and read 0 there)."""
from __future__ import annotations

import errno
import json
import os

from .. import daemon
from .. import format as fmt
from ..errors import MountError, UsageError
from ..format import FormatError
from ..fs import FileSystem
from ..xattrs import SHARING_XATTR, STATS_XATTR

ROWS = [("logical_bytes", "logical bytes (file sizes)"), ("physical_bytes", "physical bytes in use"),
        ("free_bytes", "free bytes"), ("files", "inodes in use"),
        ("shared_blocks", "shared blocks (refcount > 1)"), ("aliases", "alias descriptors"),
        ("bytes_saved", "bytes saved by sharing"), ("clones", "clones (since mount)"),
        ("cloned_blocks", "blocks cloned (since mount)"), ("cow_breaks", "COW breaks (since mount)"),
        ("dp_cow_breaks", "  of them done by the C threads"),
        ("fast_requests", "reads/writes answered in C"), ("drained_requests", "requests served by polling")]


def read_stats(target: str) -> dict:
    if os.path.isdir(target):
        try:
            return json.loads(os.getxattr(target, STATS_XATTR.decode()))
        except OSError:
            raise UsageError(f"{target} is not the root of a daxfs mount") from None
    if not os.path.exists(target):
        raise UsageError(f"{target}: no such image or mountpoint")
    if daemon.is_locked(target):
        raise UsageError(daemon.describe_lock(target) + "; run daxfs stat on its mountpoint")
    try:
        fs = FileSystem.open(target, readonly=True)
    except (FormatError, MountError) as e:
        raise UsageError(f"{target}: {e}") from None
    try:
        return fs.stats()
    finally:
        fs.close()


def read_sharing(path: str) -> dict | None:
    """The sharing report of a file on a daxfs mount, or None for anything else."""
    if not os.path.isfile(path):
        return None
    try:
        raw = os.getxattr(path, SHARING_XATTR.decode())
    except OSError:
        return None                              # not on daxfs (an image, say)
    return {"path": path, **json.loads(raw)}


def print_sharing(rep: dict, as_json: bool) -> None:
    if as_json:
        shared = [{k: r[k] for k in ("offset", "length", "other", "other_offset")}
                  | {"other_ino": r["other_ino"]} for r in rep["shared"]]
        print(json.dumps({"path": rep["path"], "size": rep["size"], "shared": shared},
                         indent=2))
        return
    total = sum(r["length"] for r in rep["shared"])
    print(f"{rep['path']}: {rep['size']} bytes, {len(rep['shared'])} shared range(s), "
          f"{total} bytes shared")
    for r in rep["shared"]:
        other = r["other"] if r["other"] is not None else f"inode {r['other_ino']}"
        print(f"  offset {r['offset']}, {r['length']} bytes: shared with {other} "
              f"at offset {r['other_offset']}")


def main_stat(target: str, as_json: bool) -> int:
    rep = read_sharing(target)
    if rep is not None:
        print_sharing(rep, as_json)
        return 0
    st = read_stats(target)
    if as_json:
        print(json.dumps(st, indent=2, sort_keys=True))
        return 0
    for key, label in ROWS:
        if key in st:
            value = st[key]
            extra = f"  ({_human(value)})" if key.endswith("bytes") else ""
            print(f"{label:32} {value}{extra}")
    return 0


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def _mount_root(path: str) -> str:
    path = os.path.realpath(path)
    while not os.path.ismount(path):
        path = os.path.dirname(path)
    return path


def mapped_blocks(fd: int, size: int) -> int:
    """Blocks of the file below `size` that hold data (SEEK_DATA/SEEK_HOLE), i.e. what a
    clone can share; a sparse file's holes are not counted."""
    n, pos = 0, 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:          # no data past pos
                break
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                return fmt.blocks_for(size - pos) + n   # no SEEK_DATA: all data
            raise
        if data >= size:
            break
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
        n += fmt.blocks_for(hole) - data // fmt.BLOCK_SIZE
        pos = fmt.blocks_for(hole) * fmt.BLOCK_SIZE
    return n


def main_reflink(src: str, dst: str) -> int:
    """Clone SRC to DST through copy_file_range and fail unless every whole block is shared."""
    try:
        sfd = os.open(src, os.O_RDONLY)
    except OSError as e:
        raise UsageError(f"cannot open {src}: {e.strerror}") from None
    try:
        size = os.fstat(sfd).st_size
        want_blocks = mapped_blocks(sfd, size)      # holes are not shared: do not count them
        root = _mount_root(src)
        entry = daemon.find_mount(root)
        if entry is None or entry.fstype != daemon.FSTYPE:
            raise UsageError(f"{src} is not on a daxfs mount")
        if _mount_root(os.path.dirname(os.path.abspath(dst)) or ".") != root:
            raise UsageError("SRC and DST must be on the same daxfs mount")
        before = read_stats(root)
        try:
            dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as e:
            raise UsageError(f"cannot create {dst}: {e.strerror}") from None
        try:
            done = 0
            while done < size:
                n = os.copy_file_range(sfd, dfd, size - done, done, done)
                if n == 0:
                    break
                done += n
        except OSError as e:
            raise UsageError(f"copy_file_range {src} -> {dst}: {e.strerror}") from None
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)
    after = read_stats(root)
    want = want_blocks
    got = after.get("cloned_blocks", 0) - before.get("cloned_blocks", 0)
    if got < want:
        raise UsageError(f"{dst}: only {got} of {want} blocks were shared (not a reflink)")
    print(f"{dst}: {want} blocks shared with {src}")
    return 0
