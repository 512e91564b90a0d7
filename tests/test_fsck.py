"""daxfs fsck: real images on /dev/shm made by mkfs, populated and damaged by writing table
records directly (numpy views over the file), then checked and repaired."""
from __future__ import annotations

import errno
import fcntl
import hashlib
import mmap
import os
import stat
import struct
import time
import uuid

import numpy as np
import pytest

from daxfs import format as fmt
from daxfs import fsck
from daxfs.mkfs import make_image

BS = fmt.BLOCK_SIZE
ROOT = fmt.ROOT_INO
SHM = "/dev/shm" if os.path.isdir("/dev/shm") else None


class Img:
    """A tiny population helper writing records straight into the tables."""

    def __init__(self, path: str, size: int = 64 << 20, inode_count: int | None = None):
        self.path = path
        self.g = make_image(path, size, force=True, inode_count=inode_count)
        self.open()
        self.next_ino = 2
        self.next_dirent = 0
        self.next_extent = 0
        self.next_blk = self.g.data_start

    def open(self) -> None:
        g = self.g
        self.fd = os.open(self.path, os.O_RDWR)
        self.mm = mmap.mmap(self.fd, 0)
        self.inodes = np.frombuffer(self.mm, fmt.INODE_DTYPE, g.inode_count, g.region("inodes")[0])
        self.dirents = np.frombuffer(self.mm, fmt.DIRENT_DTYPE, g.dirent_count, g.region("dirents")[0])
        self.extents = np.frombuffer(self.mm, fmt.EXTENT_DTYPE, g.extent_count, g.region("extents")[0])
        self.refc = np.frombuffer(self.mm, "<u4", g.nblocks, g.region("refcounts")[0])

    def close(self) -> None:
        if self.mm is None:
            return
        self.mm.flush()
        del self.inodes, self.dirents, self.extents, self.refc
        self.mm.close()
        os.close(self.fd)
        self.mm = None

    def reopen(self) -> None:
        self.close()
        self.open()

    # -- population ------------------------------------------------------------------------------
    def new_inode(self, mode: int, nlink: int, size: int = 0) -> int:
        ino = self.next_ino
        self.next_ino += 1
        r = self.inodes[ino:ino + 1]
        r["mode"], r["nlink"], r["size"], r["generation"] = mode, nlink, size, 1
        r["uid"], r["gid"] = 1000, 1000
        return ino

    def add_dirent(self, parent: int, ino: int, name: bytes) -> int:
        slot = self.next_dirent
        self.next_dirent += 1
        r = self.dirents[slot:slot + 1]
        r["parent"], r["ino"], r["namelen"], r["name"] = parent, ino, len(name), name
        return slot

    def add_extent(self, ino: int, lblk: int, pblk: int, length: int, refs: bool = True) -> int:
        slot = self.next_extent
        self.next_extent += 1
        r = self.extents[slot:slot + 1]
        r["ino"], r["lblk"], r["pblk"], r["length"] = ino, lblk, pblk, length
        if refs:
            self.refc[pblk:pblk + length] += 1
        return slot

    def alloc(self, n: int) -> int:
        b = self.next_blk
        self.next_blk += n
        return b

    def mkdir(self, parent: int, name: bytes) -> int:
        ino = self.new_inode(stat.S_IFDIR | 0o755, 2)
        self.add_dirent(parent, ino, name)
        self.inodes["nlink"][parent] += 1
        return ino

    def mkfile(self, parent: int, name: bytes, nblocks: int = 1, size: int | None = None,
               mode: int = stat.S_IFREG | 0o644) -> int:
        size = nblocks * BS if size is None else size
        ino = self.new_inode(mode, 1, size)
        self.add_dirent(parent, ino, name)
        if nblocks:
            b = self.alloc(nblocks)
            self.mm[b * BS:b * BS + 16] = b"data of %8d" % ino
            self.add_extent(ino, 0, b, nblocks)
        return ino

    def mknod(self, parent: int, name: bytes, mode: int) -> int:
        ino = self.new_inode(mode, 1)
        self.add_dirent(parent, ino, name)
        return ino

    def symlink(self, parent: int, name: bytes, target: bytes) -> int:
        return self.mkfile(parent, name, 1, len(target), stat.S_IFLNK | 0o777)

    def link(self, parent: int, ino: int, name: bytes) -> None:
        self.add_dirent(parent, ino, name)
        self.inodes["nlink"][ino] += 1

    def set_xattrs(self, ino: int, attrs: dict[bytes, bytes]) -> int:
        b = self.alloc(1)
        raw = bytearray(len(attrs).to_bytes(2, "little"))
        for k, v in attrs.items():
            raw += struct.pack("<BH", len(k), len(v)) + k + v
        self.mm[b * BS:b * BS + len(raw)] = bytes(raw)
        self.inodes["xattr_blk"][ino] = b
        self.refc[b] += 1
        return b

    # -- inspection ------------------------------------------------------------------------------
    def extents_of(self, ino: int) -> list[tuple]:
        e = self.extents[self.extents["ino"] == ino]
        return sorted(zip(e["lblk"].tolist(), e["pblk"].tolist(), e["length"].tolist()))

    def entries(self, parent: int) -> dict[bytes, int]:
        d = self.dirents[self.dirents["parent"] == parent]
        return {bytes(n[:k]): int(i) for n, k, i in zip(d["name"], d["namelen"], d["ino"])}

    def snapshot(self, ino: int):
        """Everything that belongs to one file: inode record, its dirents, its extents, the
        refcounts and bytes of its blocks."""
        rec = self.inodes[ino].tobytes()
        ds = sorted(self.dirents[self.dirents["ino"] == ino].tobytes() for _ in [0])
        exts = self.extents_of(ino)
        blocks = [(int(self.refc[p + k]), bytes(self.mm[(p + k) * BS:(p + k + 1) * BS]))
                  for _l, p, n in exts for k in range(n)]
        slots = np.flatnonzero(self.extents["ino"] == ino).tolist()
        dslots = np.flatnonzero(self.dirents["ino"] == ino).tolist()
        return rec, ds, exts, blocks, slots, dslots


@pytest.fixture
def img(request):
    if SHM is None:
        pytest.skip("no /dev/shm")
    path = os.path.join(SHM, f"daxfs-fsck-{uuid.uuid4().hex[:12]}.img")
    image = Img(path)
    yield image
    image.close()
    os.unlink(path)


def populated(img: Img) -> dict[str, int]:
    """A small tree with every kind of object; returns name -> inode."""
    r = {}
    r["d1"] = img.mkdir(ROOT, b"d1")
    r["d2"] = img.mkdir(r["d1"], b"d2")
    r["f1"] = img.mkfile(ROOT, b"f1", 3)
    r["f2"] = img.mkfile(r["d1"], b"f2", 2, size=2 * BS - 100)
    r["keep"] = img.mkfile(r["d2"], b"keep", 4)
    img.set_xattrs(r["keep"], {b"user.a": b"1", b"user.bb": b"xyz"})
    r["sym"] = img.symlink(ROOT, b"sym", b"d1/f2")
    r["fifo"] = img.mknod(r["d1"], b"fifo", stat.S_IFIFO | 0o644)
    r["empty"] = img.mkfile(ROOT, b"empty", 0, 0)
    img.link(r["d2"], r["f1"], b"f1-link")
    # a reflinked file sharing f1's blocks
    r["clone"] = img.new_inode(stat.S_IFREG | 0o644, 1, 3 * BS)
    img.add_dirent(ROOT, r["clone"], b"clone")
    (_l, p, n), = img.extents_of(r["f1"])
    img.add_extent(r["clone"], 0, p, n)
    # a file with two extents and a hole
    r["sparse"] = img.new_inode(stat.S_IFREG | 0o600, 1, 10 * BS)
    img.add_dirent(r["d2"], r["sparse"], b"sparse")
    img.add_extent(r["sparse"], 0, img.alloc(2), 2)
    img.add_extent(r["sparse"], 7, img.alloc(3), 3)
    img.reopen()
    return r


def run(path: str, repair: bool = False, capsys=None):
    code = fsck.main_check(path, repair)
    out = err = ""
    if capsys is not None:
        out, err = capsys.readouterr()
    return code, out, err


def checks_found(path: str) -> set[str]:
    return {p.check for p in fsck.check(path).problems if p.severity == fsck.ERROR}


def repair_and_verify(img: Img, keep: int, capsys) -> str:
    """--repair exits 1, a second check exits 0, `keep` untouched; returns repair output."""
    before = img.snapshot(keep)
    img.close()
    code, out, err = run(img.path, True, capsys)
    assert code == 1, out + err
    assert "[repaired]" in out
    code2, out2, _ = run(img.path, False, capsys)
    assert code2 == 0, out2
    img.open()
    assert img.snapshot(keep) == before
    return out


def digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# ------------------------------------------------------------------------------------ clean
def test_fresh_image_is_clean(img, capsys):
    img.close()
    code, out, err = run(img.path, False, capsys)
    assert code == 0
    assert err == ""
    assert out.strip().count("\n") == 0 and "clean" in out
    code, out, _ = run(img.path, True, capsys)
    assert code == 0


def test_populated_image_is_clean(img, capsys):
    populated(img)
    img.close()
    rep = fsck.check(img.path)
    assert rep.problems == [], [p.line() for p in rep.problems]
    assert rep.clean and rep.exit_code == 0
    assert rep.counts["directories"] == 3 and rep.counts["symlinks"] == 1
    h = digest(img.path)
    code, out, _ = run(img.path, True, capsys)      # repair of a clean image changes nothing
    assert code == 0, out
    assert digest(img.path) == h


def test_plain_check_never_writes(img, capsys):
    r = populated(img)
    img.inodes["nlink"][r["f2"]] = 7
    img.refc[img.next_blk + 5] = 1
    img.dirents["ino"][0] = 4000
    img.close()
    h = digest(img.path)
    code, out, _ = run(img.path, False, capsys)
    assert code == 4
    assert "[repairable" in out
    assert digest(img.path) == h


# ------------------------------------------------------------------------------------ damage
def test_nlink_wrong(img, capsys):
    r = populated(img)
    img.inodes["nlink"][r["f2"]] = 5
    img.inodes["nlink"][r["d1"]] = 2          # has 1 subdirectory: should be 3
    img.close()
    rep = fsck.check(img.path)
    objs = {p.obj for p in rep.problems if p.check == "links"}
    assert objs == {f"inode {r['f2']}", f"inode {r['d1']}"}
    assert rep.exit_code == 4
    img.open()
    out = repair_and_verify(img, r["keep"], capsys)
    assert "expected 3" in out
    assert img.inodes["nlink"][r["f2"]] == 1 and img.inodes["nlink"][r["d1"]] == 3


def test_dangling_dirent(img, capsys):
    r = populated(img)
    img.add_dirent(ROOT, 3000, b"ghost")               # target is a free inode
    img.add_dirent(r["f1"], r["f2"], b"under-file")    # parent is not a directory
    img.add_dirent(9999999, r["f2"], b"far")           # parent out of range
    img.add_dirent(r["d1"], ROOT, b"rootlink")         # names root
    img.inodes["nlink"][r["f2"]] += 2
    img.close()
    rep = fsck.check(img.path)
    bad = [p for p in rep.problems if p.check == "dirents"]
    assert len(bad) == 4, [p.line() for p in rep.problems]
    img.open()
    repair_and_verify(img, r["keep"], capsys)
    assert b"ghost" not in img.entries(ROOT) and b"rootlink" not in img.entries(r["d1"])
    assert img.inodes["nlink"][r["f2"]] == 1


def test_duplicate_name(img, capsys):
    r = populated(img)
    other = img.mkfile(r["d1"], b"other", 1)
    slot = np.flatnonzero(img.dirents["ino"] == other)[0]
    img.dirents["name"][slot] = b"f2"                  # same name as f2 in d1, other inode
    img.dirents["namelen"][slot] = 2
    img.add_dirent(r["d1"], r["f2"], b"f2")             # exact duplicate of f2's entry
    img.close()
    assert "dirents" in checks_found(img.path)
    img.open()
    out = repair_and_verify(img, r["keep"], capsys)
    assert "duplicate" in out
    names = img.entries(r["d1"])
    assert names[b"f2"] == r["f2"]
    assert other in names.values() and len(names) == 4  # d2, f2, fifo, renamed other
    assert img.inodes["nlink"][r["f2"]] == 1


def test_bad_name(img, capsys):
    r = populated(img)
    slot = np.flatnonzero(img.dirents["ino"] == r["f2"])[0]
    img.dirents["name"][slot] = b"a/b"
    img.dirents["namelen"][slot] = 3
    img.close()
    assert "dirents" in checks_found(img.path)
    img.open()
    repair_and_verify(img, r["keep"], capsys)
    assert img.entries(r["d1"]).get(b"a_b") == r["f2"]


def test_directory_cycle(img, capsys):
    r = populated(img)
    a = img.mkdir(ROOT, b"a")
    b = img.mkdir(a, b"b")
    inner = img.mkfile(b, b"inner", 2)
    # cut `a` from root and hang it under `b`: a -> b -> a, unreachable
    slot = np.flatnonzero(img.dirents["ino"] == a)[0]
    img.dirents["parent"][slot] = b
    img.inodes["nlink"][ROOT] -= 1
    img.inodes["nlink"][b] += 1
    img.close()
    rep = fsck.check(img.path)
    tree = [p for p in rep.errors if p.check == "tree"]
    assert len(tree) == 1 and "cycle" in tree[0].message, [p.line() for p in rep.problems]
    assert rep.exit_code == 4
    img.open()
    before_inner = img.extents_of(inner)
    repair_and_verify(img, r["keep"], capsys)
    lf = img.entries(ROOT)[b"lost+found"]
    assert img.inodes["mode"][lf] == stat.S_IFDIR | 0o700
    assert img.entries(lf) == {b"#%d" % a: a}
    assert img.entries(a) == {b"b": b} and img.entries(b) == {b"inner": inner}
    assert img.extents_of(inner) == before_inner


def test_unreachable_directory_and_file(img, capsys):
    r = populated(img)
    # d2 loses its only name: d2 (and keep, sparse, f1-link below it) become unreachable
    slot = np.flatnonzero(img.dirents["ino"] == r["d2"])[0]
    img.dirents[slot] = np.zeros(1, fmt.DIRENT_DTYPE)[0]
    img.inodes["nlink"][r["d1"]] -= 1
    # a file named by nothing, no orphan flag
    lone = img.new_inode(stat.S_IFREG | 0o644, 1, BS)
    img.add_extent(lone, 0, img.alloc(1), 1)
    img.close()
    rep = fsck.check(img.path)
    found = {(p.check, p.obj) for p in rep.problems if p.severity == fsck.ERROR}
    assert ("tree", f"inode {r['d2']}") in found and ("links", f"inode {lone}") in found
    img.open()
    repair_and_verify(img, r["f1"], capsys)
    lf = img.entries(ROOT)[b"lost+found"]
    assert img.entries(lf) == {b"#%d" % r["d2"]: r["d2"], b"#%d" % lone: lone}
    assert img.inodes["nlink"][lf] == 3 and img.inodes["nlink"][ROOT] == 4
    assert img.entries(r["d2"])[b"keep"] == r["keep"]


def test_directory_with_two_names(img, capsys):
    r = populated(img)
    img.add_dirent(ROOT, r["d2"], b"d2-again")
    img.close()
    assert "tree" in checks_found(img.path)
    img.open()
    repair_and_verify(img, r["keep"], capsys)
    assert b"d2-again" not in img.entries(ROOT)


def test_extent_out_of_bounds(img, capsys):
    r = populated(img)
    img.add_extent(r["f2"], 5, img.g.nblocks - 1, 4, refs=False)   # runs past the end
    img.add_extent(r["f2"], 9, 3, 1, refs=False)                     # in the metadata area
    img.add_extent(r["f2"], 12, img.alloc(1), 0, refs=False)         # empty
    img.inodes["size"][r["f2"]] = 20 * BS
    img.close()
    rep = fsck.check(img.path)
    ext = [p for p in rep.problems if p.check == "extents"]
    assert len(ext) == 1 and ext[0].message.startswith("3 extent(s)")
    img.open()
    before = img.extents_of(r["f2"])[:1]
    repair_and_verify(img, r["keep"], capsys)
    assert img.extents_of(r["f2"]) == before


def test_extent_bad_owner(img, capsys):
    r = populated(img)
    b = img.alloc(2)
    img.add_extent(r["d1"], 0, b, 1)          # a directory owns none
    img.add_extent(4000, 0, b + 1, 1)         # a free inode
    img.close()
    assert "extents" in checks_found(img.path)
    img.open()
    repair_and_verify(img, r["keep"], capsys)
    assert img.refc[b] == 0 and img.refc[b + 1] == 0


def test_overlapping_extents(img, capsys):
    r = populated(img)
    f = img.new_inode(stat.S_IFREG | 0o644, 1, 20 * BS)
    img.add_dirent(ROOT, f, b"ovl")
    p1, p2, p3 = img.alloc(8), img.alloc(4), img.alloc(2)
    img.add_extent(f, 0, p1, 8)      # file blocks 0-7
    img.add_extent(f, 6, p2, 4)      # 6-9: 6,7 overlap -> cut to 8-9
    img.add_extent(f, 2, p3, 2)      # 2-3: wholly inside the first -> removed
    img.close()
    rep = fsck.check(img.path)
    ext = [p for p in rep.problems if p.check == "extents"]
    assert len(ext) == 1 and "overlap" in ext[0].message
    img.open()
    repair_and_verify(img, r["keep"], capsys)
    assert img.extents_of(f) == [(0, p1, 8), (8, p2 + 2, 2)]
    assert list(img.refc[p2:p2 + 4]) == [0, 0, 1, 1]
    assert list(img.refc[p3:p3 + 2]) == [0, 0]


def test_extent_past_eof_and_trim(img, capsys):
    r = populated(img)
    f = img.mknod(ROOT, b"link", stat.S_IFLNK | 0o777)
    img.inodes["size"][f] = 10
    img.add_extent(f, 0, img.alloc(1), 1)
    img.add_extent(f, 5, img.alloc(2), 2)            # wholly past a symlink's EOF
    pre = img.mkfile(ROOT, b"prealloc", 2)
    img.add_extent(pre, 5, img.alloc(2), 2)          # fallocate KEEP_SIZE: legal
    t = img.mkfile(ROOT, b"trimming", 6)
    img.inodes["size"][t] = BS + 1                   # EOF in block 1: blocks 2.. must go
    img.inodes["flags"][t] = fmt.IFLAG_TRIM
    img.close()
    rep = fsck.check(img.path)
    errs = [p for p in rep.problems if p.severity == fsck.ERROR]
    assert [p.obj for p in errs] == [f"inode {f}"]
    assert any(p.obj == f"inode {t}" and p.severity == fsck.INFO for p in rep.problems)
    img.open()
    pt = img.extents_of(t)[0][1]
    repair_and_verify(img, r["keep"], capsys)
    assert len(img.extents_of(f)) == 1 and len(img.extents_of(pre)) == 2
    assert img.extents_of(t) == [(0, pt, 2)] and img.inodes["flags"][t] == 0
    assert list(img.refc[pt:pt + 6]) == [1, 1, 0, 0, 0, 0]


def test_refcount_too_high_leak(img, capsys):
    r = populated(img)
    leak = img.alloc(3)
    img.refc[leak:leak + 3] = 1                          # allocated, mapped by nothing
    (_l, p, _n), = img.extents_of(r["f2"])
    img.refc[p] += 2                                      # 3 for a block mapped once
    img.close()
    rep = fsck.check(img.path)
    rc = [p_ for p_ in rep.problems if p_.check == "refcounts"]
    assert len(rc) == 2 and any("leak" in p_.message for p_ in rc)
    img.open()
    repair_and_verify(img, r["keep"], capsys)
    assert list(img.refc[leak:leak + 3]) == [0, 0, 0] and img.refc[p] == 1


def test_refcount_too_low(img, capsys):
    r = populated(img)
    (_l, p, n), = img.extents_of(r["f1"])                 # shared with clone: count 2
    img.refc[p:p + n] = 1
    img.refc[img.g.data_start - 1] = 0                    # metadata block not reserved
    img.close()
    rep = fsck.check(img.path)
    rc = [p_ for p_ in rep.problems if p_.check == "refcounts"]
    assert len(rc) == 2 and any("too low" in p_.message for p_ in rc)
    img.open()
    repair_and_verify(img, r["keep"], capsys)
    assert list(img.refc[p:p + n]) == [2] * n
    assert img.refc[img.g.data_start - 1] == fmt.REFCOUNT_RESERVED


def test_orphan_inode(img, capsys):
    r = populated(img)
    o = img.new_inode(stat.S_IFREG | 0o644, 0, 2 * BS)
    img.inodes["flags"][o] = fmt.IFLAG_ORPHAN
    b = img.alloc(2)
    img.add_extent(o, 0, b, 2)
    img.set_xattrs(o, {b"user.x": b"y"})
    od = img.new_inode(stat.S_IFDIR | 0o755, 0)           # an rmdir'ed directory still open
    img.inodes["flags"][od] = fmt.IFLAG_ORPHAN
    img.close()
    code, out, _ = run(img.path, False, capsys)
    assert code == 0, out                                  # orphans are expected: info only
    assert out.count("info: orphans:") == 2
    img.open()
    xb = int(img.inodes["xattr_blk"][o])
    repair_and_verify(img, r["keep"], capsys)
    assert img.inodes["mode"][o] == 0 and img.inodes["mode"][od] == 0
    assert img.inodes["generation"][o] == 1
    assert img.extents_of(o) == [] and list(img.refc[b:b + 2]) == [0, 0] and img.refc[xb] == 0


def test_orphan_flag_on_linked_file(img, capsys):
    r = populated(img)
    img.inodes["flags"][r["f2"]] = fmt.IFLAG_ORPHAN
    img.close()
    assert "orphans" in checks_found(img.path)
    img.open()
    repair_and_verify(img, r["keep"], capsys)
    assert img.inodes["flags"][r["f2"]] == 0 and img.inodes["mode"][r["f2"]] != 0


def test_bad_xattr_block(img, capsys):
    r = populated(img)
    xb = img.set_xattrs(r["f2"], {b"user.k": b"v"})
    img.mm[xb * BS + 2:xb * BS + 5] = struct.pack("<BH", 10, 5000)   # value runs off the block
    img.inodes["xattr_blk"][r["sym"]] = img.g.nblocks + 5            # out of range
    img.close()
    assert "xattrs" in checks_found(img.path)
    img.open()
    repair_and_verify(img, r["keep"], capsys)
    assert img.inodes["xattr_blk"][r["f2"]] == 0 and img.refc[xb] == 0
    assert img.inodes["xattr_blk"][r["sym"]] == 0


def test_invalid_inode_and_flags(img, capsys):
    r = populated(img)
    img.inodes["mode"][r["fifo"]] = 0o050644                # no such file type
    img.inodes["flags"][r["f2"]] = 0x80
    img.close()
    rep = fsck.check(img.path)
    assert {p.check for p in rep.errors} == {"inodes", "dirents"}
    img.open()
    repair_and_verify(img, r["keep"], capsys)
    assert b"fifo" not in img.entries(r["d1"]) and img.inodes["flags"][r["f2"]] == 0


def test_root_not_a_directory(img, capsys):
    r = populated(img)
    img.inodes["mode"][ROOT] = stat.S_IFREG | 0o644
    img.close()
    assert "inodes" in checks_found(img.path)
    img.open()
    repair_and_verify(img, r["keep"], capsys)
    assert img.inodes["mode"][ROOT] == stat.S_IFDIR | 0o644
    assert img.entries(ROOT)[b"d1"] == r["d1"]


def test_journal_header_corrupt(img, capsys):
    r = populated(img)
    off = img.g.journal_start * BS
    img.mm[off:off + 8] = b"garbage!"
    img.close()
    assert "journal" in checks_found(img.path)
    img.open()
    repair_and_verify(img, r["keep"], capsys)
    assert img.mm[off:off + 8] == fmt.JOURNAL_MAGIC


def test_many_problems_repair_converges(img, capsys):
    """Everything at once, plus random garbage in the tables: repair must end clean."""
    r = populated(img)
    rng = np.random.default_rng(7)
    for _ in range(200):
        i = int(rng.integers(2, img.next_ino + 30))
        field = str(rng.choice(["nlink", "mode", "size", "flags", "xattr_blk"]))
        img.inodes[field][i] = int(rng.integers(0, 1 << 16))
    for _ in range(100):
        s = int(rng.integers(0, img.next_dirent + 20))
        field = str(rng.choice(["parent", "ino", "namelen"]))
        img.dirents[field][s] = int(rng.integers(0, 40))
    for _ in range(100):
        s = int(rng.integers(0, img.next_extent + 20))
        field = str(rng.choice(["ino", "lblk", "pblk", "length"]))
        img.extents[field][s] = int(rng.integers(0, img.g.nblocks + 100))
    img.refc[img.g.data_start:img.g.data_start + 500] = rng.integers(0, 4, 500)
    img.close()
    code, out, err = run(img.path, False, capsys)
    assert code == 4 and not err
    code, out, err = run(img.path, True, capsys)
    assert code == 1, out + err
    code, out, err = run(img.path, False, capsys)
    assert code == 0, out
    img.open()


@pytest.mark.parametrize("seed", range(6))
def test_random_garbage_never_crashes(img, capsys, seed):
    populated(img)
    rng = np.random.default_rng(seed)
    g = img.g
    for region in ("inodes", "dirents", "extents"):
        off, length = g.region(region)
        used = {"inodes": 40 * 128, "dirents": 30 * 264, "extents": 30 * 24}[region]
        pos = rng.integers(0, used, 300)
        img.mm[off:off + length]  # noqa: B018 (touch)
        for p in pos.tolist():
            img.mm[off + p] = int(rng.integers(0, 256))
    img.close()
    code, out, err = run(img.path, False, capsys)
    assert code in (0, 4) and "internal error" not in err, err
    code, out, err = run(img.path, True, capsys)
    assert code in (0, 1), out + err
    code, out, err = run(img.path, False, capsys)
    assert code == 0, out
    img.open()


# ------------------------------------------------------------------------------------ unusable images
def test_bad_superblock_exit_8(img, capsys):
    img.mm[0:8] = b"NOTDAXFS"
    img.close()
    code, out, err = run(img.path, False, capsys)
    assert code == 8 and out == ""
    assert err.count("\n") == 1 and err.startswith("cannot check: ") and "bad magic" in err
    img.open()


def test_superblock_checksum_exit_8(img, capsys):
    img.mm[16] ^= 0xFF           # low byte of nblocks: inside the checksummed fields
    img.close()
    code, out, err = run(img.path, True, capsys)
    assert code == 8 and err.count("\n") == 1 and "checksum" in err
    img.open()


def test_truncated_and_missing(img, capsys, tmp_path):
    img.close()
    os.truncate(img.path, 1 << 20)
    code, _out, err = run(img.path, False, capsys)
    assert code == 8 and "truncated" in err and err.count("\n") == 1
    code, _out, err = run(str(tmp_path / "nope.img"), False, capsys)
    assert code == 8 and err.startswith("cannot check: ") and err.count("\n") == 1
    code, _out, err = run(str(tmp_path), False, capsys)
    assert code == 8 and err.count("\n") == 1
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    code, _out, err = run(str(empty), True, capsys)
    assert code == 8 and err.count("\n") == 1
    img.g = make_image(img.path, 64 << 20, force=True)
    img.open()


def test_repair_refuses_locked_image(img, capsys):
    img.close()
    fd = os.open(img.path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, out, err = run(img.path, True, capsys)
        assert code == 8 and "in use" in err and err.count("\n") == 1
        code, out, err = run(img.path, False, capsys)     # a plain check still runs
        assert code == 0 and "locked by another process" in out
    finally:
        os.close(fd)
    img.open()


# ------------------------------------------------------------------------------------ journal
def _journal_available() -> bool:
    try:
        from daxfs import journal  # noqa: F401
    except Exception:   # noqa: BLE001
        return False
    return True


@pytest.mark.skipif(not _journal_available(), reason="daxfs.journal not available")
def test_unclean_image_with_pending_journal(img, capsys):
    """A committed, un-checkpointed transaction that (say) sets f2's nlink correctly over a
    damaged table: a plain check sees the replayed state without writing; --repair replays."""
    from daxfs.journal import Journal
    from daxfs.pmem import PMem
    r = populated(img)
    ino_off = img.g.region("inodes")[0] + r["f2"] * fmt.INODE_DTYPE.itemsize
    good = img.inodes[r["f2"]].tobytes()
    img.close()
    pm = PMem(img.path)
    j = Journal(pm, img.g)
    j.commit([(ino_off, good)])                     # committed and applied ...
    pm.store(ino_off + 12, struct.pack("<I", 9))    # ... then the table copy is damaged
    sb = np.frombuffer(pm.mm, fmt.SUPERBLOCK_DTYPE, 1, 0).copy()[0]
    sb["clean"] = 0
    sb["checksum"] = fmt.superblock_checksum(sb)
    pm.store(0, sb.tobytes())
    pm.close()
    h = digest(img.path)
    code, out, _ = run(img.path, False, capsys)
    assert code == 0, out
    assert "1 committed transaction(s) pending" in out and "not cleanly unmounted" in out
    assert digest(img.path) == h
    code, out, _ = run(img.path, True, capsys)
    assert code == 1, out
    code, out, _ = run(img.path, False, capsys)
    assert code == 0 and "pending" not in out and "not cleanly" not in out, out
    img.open()
    assert img.inodes["nlink"][r["f2"]] == 1


def test_unclean_flag_only(img, capsys):
    populated(img)
    sb = np.frombuffer(img.mm, fmt.SUPERBLOCK_DTYPE, 1, 0)
    sb["clean"] = 0
    sb["checksum"] = fmt.superblock_checksum(sb[0])
    del sb
    img.close()
    code, out, _ = run(img.path, False, capsys)
    assert code == 0 and "not cleanly unmounted" in out
    code, out, _ = run(img.path, True, capsys)
    assert code == 1, out
    code, out, _ = run(img.path, False, capsys)
    assert code == 0 and "not cleanly" not in out
    img.open()


# ------------------------------------------------------------------------------------ scale
def build_big(path: str, nfiles: int = 100_000) -> Img:
    """1 GiB image, 1000 directories under root, `nfiles` one-block files spread over them."""
    im = Img(path, 1 << 30, inode_count=131072)
    g = im.g
    ndirs = 1000
    dirs = np.arange(2, 2 + ndirs)
    files = np.arange(2 + ndirs, 2 + ndirs + nfiles)
    ino = im.inodes
    ino["mode"][dirs] = stat.S_IFDIR | 0o755
    ino["nlink"][dirs] = 2
    ino["nlink"][ROOT] = 2 + ndirs
    ino["mode"][files] = stat.S_IFREG | 0o644
    ino["nlink"][files] = 1
    ino["size"][files] = BS
    ino["generation"][np.concatenate((dirs, files))] = 1
    names = np.array([b"n%d" % i for i in range(ndirs + nfiles)], dtype="S255")
    d = im.dirents
    n = ndirs + nfiles
    d["parent"][:ndirs] = ROOT
    d["parent"][ndirs:n] = dirs[np.arange(nfiles) % ndirs]
    d["ino"][:n] = np.concatenate((dirs, files))
    d["name"][:n] = names
    d["namelen"][:n] = np.char.str_len(names)
    e = im.extents
    pb = g.data_start + np.arange(nfiles)
    e["ino"][:nfiles] = files
    e["lblk"][:nfiles] = 0
    e["pblk"][:nfiles] = pb
    e["length"][:nfiles] = 1
    im.refc[pb] = 1
    im.next_ino = 2 + n
    im.next_dirent = n
    im.next_extent = nfiles
    im.next_blk = g.data_start + nfiles
    del ino, d, e
    im.close()
    return im


def test_scale_100k_files(capsys):
    if SHM is None:
        pytest.skip("no /dev/shm")
    path = os.path.join(SHM, f"daxfs-fsck-big-{uuid.uuid4().hex[:8]}.img")
    try:
        im = build_big(path)
        t = time.perf_counter()
        rep = fsck.check(path)
        dt = time.perf_counter() - t
        assert rep.problems == [], [p.line() for p in rep.problems[:5]]
        assert rep.counts["inodes"] == 101_001 and rep.counts["extents"] == 100_000
        assert dt < 4.0, dt          # target is well under 2 s; slack for loaded CI machines
        # damage a few and repair
        im.open()
        im.inodes["nlink"][5000] = 3
        im.refc[im.next_blk + 10] = 1
        im.close()
        code, out, _ = run(path, True, capsys)
        assert code == 1, out
        assert fsck.check(path).exit_code == 0
    finally:
        os.unlink(path)


# ------------------------------------------------------------------------------------ engine-made images
def _engine():
    try:
        from daxfs.fs import FileSystem
    except Exception:   # noqa: BLE001 (the engine is optional for these tests)
        return None
    return FileSystem


@pytest.mark.skipif(_engine() is None, reason="daxfs.fs not available")
def test_engine_made_image_and_crash_copy(img, capsys, tmp_path):
    """Images the engine writes are clean; a copy taken mid-session (= a crash) checks clean
    with notes (pending journal, orphan), and --repair leaves a mountable, clean image."""
    import shutil
    FileSystem = _engine()
    img.close()
    fs = FileSystem.open(img.path)
    try:
        d = fs.mkdir(ROOT, b"dir", 0o755, 0, 0).ino
        sub = fs.mkdir(d, b"sub", 0o755, 0, 0).ino
        f = fs.create(d, b"file", 0o644, 0, 0).ino
        fs.write(f, 0, b"x" * 50000)
        f2 = fs.create(ROOT, b"f2", 0o644, 0, 0).ino
        fs.write(f2, 0, b"y" * 9000)
        fs.link(f, sub, b"hard")
        fs.symlink(ROOT, b"sym", b"dir/file", 0, 0)
        fs.setxattr(f, b"user.k", b"v")
        fs.clone_range(f, 0, f2, 0, 8192, 0)
        fs.truncate(fs.inodes.get(f), 5000)
        o = fs.create(ROOT, b"open", 0o644, 0, 0).ino
        fs.write(o, 0, b"z" * 10000)
        fs.open_file(o)
        fs.unlink(ROOT, b"open")                  # an orphan while it stays open
        fs.rename(d, b"file", ROOT, b"moved")
        crash = str(tmp_path / "crash.img")
        shutil.copyfile(img.path, crash)
        fs.release_file(o)
    finally:
        fs.close()
    code, out, _ = run(img.path, False, capsys)
    assert code == 0 and out.count("\n") == 1, out
    code, out, _ = run(crash, False, capsys)
    assert code == 0, out
    assert "orphan regular file" in out and "pending" in out
    code, out, _ = run(crash, True, capsys)
    assert code == 1, out
    code, out, _ = run(crash, False, capsys)
    assert code == 0 and out.count("\n") == 1, out
    fs = FileSystem.open(crash)
    try:
        moved = fs.lookup(ROOT, b"moved").ino
        assert fs.read(moved, 0, 10000) == b"x" * 5000
        assert fs.read(f2, 0, 9000) == b"x" * 8192 + b"y" * 808
        with pytest.raises(Exception):
            fs.lookup(ROOT, b"open")
    finally:
        fs.close()
    img.open()


def test_unrepairable_when_no_room_for_lost_found(img, capsys):
    r = populated(img)
    free = np.flatnonzero(img.dirents["parent"] == 0)
    d = img.dirents
    d["parent"][free] = r["d1"]                       # every free entry: another name of f2
    d["ino"][free] = r["f2"]
    names = np.array([b"h%d" % i for i in range(free.size)], dtype="S255")
    d["name"][free] = names
    d["namelen"][free] = np.char.str_len(names)
    img.inodes["nlink"][r["f2"]] += free.size
    lone = img.new_inode(stat.S_IFREG | 0o644, 1, 0)  # unattached: needs /lost+found
    img.inodes["nlink"][r["d1"]] = 9                  # repairable damage alongside
    del d
    img.close()
    code, out, _ = run(img.path, True, capsys)
    assert code == 4, out
    assert f"inode {lone}" in out and "[NOT repairable]" in out
    rep = fsck.check(img.path)
    assert [p.obj for p in rep.errors] == [f"inode {lone}"]
    img.open()


def test_module_entry_point(img):
    import subprocess
    import sys
    img.close()
    ok = subprocess.run([sys.executable, "-m", "daxfs.fsck", img.path], capture_output=True,
                        text=True)
    assert ok.returncode == 0 and "clean" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "daxfs.fsck", "--repair", img.path + ".nope"],
                         capture_output=True, text=True)
    assert bad.returncode == 8 and bad.stdout == "" and bad.stderr.count("\n") == 1
    assert "Traceback" not in bad.stderr
    img.open()


# ------------------------------------------------ fields the engine trusts (issue 9 #12)
# The on-image fields the engine reads, and who guards their range:
#   superblock: geometry (parse_superblock, both), version/magic/checksum (both), clean (fsck),
#     mount_count (any value: the engine wraps it), created_ns (display only: info copes)
#   journal header: magic and epoch != 0 (fsck "journal"; the engine wraps the epoch)
#   inode: mode type (both) and no bits beyond S_IFMT|07777 (fsck), size by type (regular
#     < 2**52, symlink 1..4095, everything else 0; the engine refuses >= 2**63 cleanly),
#     nlink (fsck "links"), flags (fsck), xattr_blk (both), uid/gid/times/generation/rdev
#     (any value can be reported)
#   dirent: parent/ino/name (fsck "dirents"); extent: owner, bounds, overlap (both);
#   refcounts: fsck recomputes, the engine refuses undercounts at mount.
@pytest.mark.parametrize("kind", ["dir", "root", "fifo"])
def test_size_of_a_directory_or_special_file(img, capsys, kind):
    r = populated(img)
    ino = {"dir": r["d1"], "root": ROOT, "fifo": r["fifo"]}[kind]
    img.inodes["size"][ino] = 1 << 63
    img.close()
    rep = fsck.check(img.path)
    assert [p.check for p in rep.errors] == ["inodes"], [p.line() for p in rep.problems]
    assert "must be 0" in rep.errors[0].line()
    img.open()
    repair_and_verify(img, r["keep"], capsys)
    assert img.inodes["size"][ino] == 0 and img.inodes["mode"][ino] != 0


def test_mode_bits_beyond_type_and_permissions(img, capsys):
    r = populated(img)
    img.inodes["mode"][r["f2"]] |= 1 << 20
    img.close()
    assert checks_found(img.path) == {"inodes"}
    img.open()
    repair_and_verify(img, r["keep"], capsys)
    assert img.inodes["mode"][r["f2"]] == stat.S_IFREG | 0o644


@pytest.mark.skipif(_engine() is None, reason="daxfs.fs not available")
def test_engine_refuses_an_unreportable_size_without_a_traceback(img):
    from daxfs.errors import FsError
    r = populated(img)
    img.inodes["size"][r["d1"]] = (1 << 64) - 1
    img.close()
    fs = _engine().open(img.path, readonly=True)
    try:
        with pytest.raises(FsError) as e:
            fs.getattr(r["d1"])
        assert e.value.errno == errno.EIO
    finally:
        fs.close()


@pytest.mark.skipif(_engine() is None, reason="daxfs.fs not available")
def test_mount_count_and_journal_epoch_wrap(img, capsys):
    """A mount counter at 2**32 - 1 and an epoch at 2**64 - 1 wrap instead of raising."""
    img.close()
    with open(img.path, "r+b") as f:
        sb = np.frombuffer(f.read(fmt.SUPERBLOCK_DTYPE.itemsize), fmt.SUPERBLOCK_DTYPE)[0].copy()
        sb["mount_count"] = 0xFFFFFFFF
        sb["checksum"] = fmt.superblock_checksum(sb)
        f.seek(0)
        f.write(sb.tobytes())
        f.seek(img.g.journal_start * BS + 8)
        f.write(((1 << 64) - 1).to_bytes(8, "little"))
    assert run(img.path, False, capsys)[0] == 0
    fs = _engine().open(img.path)
    fs.close()
    with open(img.path, "rb") as f:
        sb = np.frombuffer(f.read(fmt.SUPERBLOCK_DTYPE.itemsize), fmt.SUPERBLOCK_DTYPE)[0]
        f.seek(img.g.journal_start * BS + 8)
        epoch = int.from_bytes(f.read(8), "little")
    assert int(sb["mount_count"]) == 0 and int(sb["clean"]) == 1
    assert 1 <= epoch < 10          # wrapped (open and close each checkpoint)
    assert run(img.path, False, capsys)[0] == 0
    img.open()
