"""Crash-state harness, logical state: what a mounted engine holds, read through its in-memory
indexes (`extract`), and a readable difference of two such states. Also the page and image
constants the other crashsim modules share."""
from __future__ import annotations

import dataclasses
import hashlib
import stat

from daxfs import format as fmt
from daxfs.fs import FileSystem

BS = fmt.BLOCK_SIZE
PAGE = 4096
ZERO_PAGE = bytes(PAGE)
HOLE = -1
IMAGE_SIZE = 8 << 20

@dataclasses.dataclass
class State:
    meta: dict          # path -> (mode, size, nlink, link group, xattrs, symlink target)
    sha: dict           # path -> content digest (regular files)
    data: dict          # path -> content bytes (regular files)
    fid: dict           # path -> (ino, generation)                      [live states only]
    pblk: dict          # fid -> tuple of physical block per file block   [live states only]

    def same(self, other: "State") -> bool:
        return self.meta == other.meta and self.sha == other.sha


class ExtractError(Exception):
    pass


def extract(fs: FileSystem, live: bool = False) -> State:
    """The logical state of a mounted engine, read through its in-memory indexes (no stores,
    no lookup counts). `live` also records file ids and block maps (for the power oracle)."""
    meta: dict = {}
    sha: dict = {}
    data: dict = {}
    fid: dict = {}
    pblk: dict = {}
    first_path: dict[int, bytes] = {}
    pending: list[tuple[bytes, int]] = []     # (path, ino) of non-directories, for link groups
    stack = [(b"/", fmt.ROOT_INO)]
    seen_dirs = {fmt.ROOT_INO}
    while stack:
        dpath, d = stack.pop()
        node = fs.inodes.get(d)
        meta[dpath] = (node.mode, 0, node.nlink, None, _xattr_tuple(fs, node), None)
        if live:
            fid[dpath] = (d, node.generation)
        for name, (ino, _slot) in sorted(fs.dirs.entries(d).items()):
            path = (dpath if dpath == b"/" else dpath + b"/") + name
            node = fs.inodes.get(ino)
            if node.is_dir:
                if ino in seen_dirs:
                    raise ExtractError(f"directory inode {ino} reachable twice ({path!r})")
                seen_dirs.add(ino)
                stack.append((path, ino))
                continue
            if ino not in first_path or path < first_path[ino]:
                first_path[ino] = path
            pending.append((path, ino))
    for path, ino in pending:
        node = fs.inodes.get(ino)
        target = None
        if stat.S_ISLNK(node.mode):
            target = fs.readlink(ino)
        elif node.is_reg:
            content = fs.read(ino, 0, node.size)
            if len(content) != node.size:
                raise ExtractError(f"{path!r}: read {len(content)} of {node.size} bytes")
            data[path] = content
            sha[path] = hashlib.blake2b(content, digest_size=16).digest()
        meta[path] = (node.mode, node.size, node.nlink, first_path[ino], _xattr_tuple(fs, node),
                      target)
        if live:
            f = (ino, node.generation)
            fid[path] = f
            if node.is_reg and f not in pblk:
                nb = max(-(-node.size // BS), node.extents.end_block())
                blocks = []
                for _l, n, p in node.extents.segments(0, nb):
                    blocks.extend([HOLE] * n if p < 0 else range(p, p + n))
                pblk[f] = tuple(blocks)
    return State(meta, sha, data, fid, pblk)


def _xattr_tuple(fs: FileSystem, node) -> tuple:
    return tuple(sorted(fs.xattrs.load(node).items()))


def diff_states(got: State, want: State, limit: int = 6) -> str:
    out = []
    for path in sorted(set(got.meta) | set(want.meta)):
        g, w = got.meta.get(path), want.meta.get(path)
        if g != w:
            out.append(f"{path.decode(errors='replace')}: got {_fmt_meta(g)} want {_fmt_meta(w)}")
        elif got.sha.get(path) != want.sha.get(path):
            out.append(f"{path.decode(errors='replace')}: content differs "
                       f"({_content_diff(got.data.get(path, b''), want.data.get(path, b''))})")
        if len(out) >= limit:
            out.append("...")
            break
    return "; ".join(out) or "(no difference)"


def _fmt_meta(m) -> str:
    if m is None:
        return "absent"
    mode, size, nlink, group, xattrs, target = m
    s = f"mode={mode:o} size={size} nlink={nlink}"
    if group is not None:
        s += f" group={group.decode(errors='replace')}"
    if xattrs:
        s += " xattrs={" + ",".join(f"{k.decode()}:{len(v)}B" for k, v in xattrs) + "}"
    if target is not None:
        s += f" -> {target!r}"
    return s


def _content_diff(a: bytes, b: bytes) -> str:
    n = min(len(a), len(b))
    bad = [p for p in range(-(-max(len(a), len(b)) // PAGE))
           if a[p * PAGE:(p + 1) * PAGE] != b[p * PAGE:(p + 1) * PAGE]]
    first = next((i for i in range(n) if a[i] != b[i]), n)
    return f"pages {bad}, first differing byte {first}"
