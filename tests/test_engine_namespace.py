"""Engine tests for names: directories, rename variants, links, orphans, xattrs, limits.
In-process (no FUSE); every test ends with fsck of the image."""
from __future__ import annotations

import errno
import stat

import pytest

from daxfs.errors import FsError
from daxfs.fs import RENAME_EXCHANGE, RENAME_NOREPLACE, FileSystem

from enginetools import fsck_clean


@pytest.fixture
def fs(tmp_image):
    f = FileSystem.open(tmp_image)
    yield f
    f.close()
    fsck_clean(tmp_image)


def err(fn, *a, **kw) -> int:
    with pytest.raises(FsError) as ei:
        fn(*a, **kw)
    return ei.value.errno


def test_mkdir_nlink_and_rmdir(fs):
    d = fs.mkdir(1, b"d", 0o755, 0, 0)
    assert fs.getattr(1).nlink == 3
    fs.mkdir(d.ino, b"sub", 0o700, 0, 0)
    assert fs.getattr(d.ino).nlink == 3
    assert err(fs.rmdir, 1, b"d") == errno.ENOTEMPTY
    assert err(fs.unlink, 1, b"d") == errno.EISDIR
    fs.rmdir(d.ino, b"sub")
    fs.rmdir(1, b"d")
    assert fs.getattr(1).nlink == 2
    assert err(fs.lookup, 1, b"d") == errno.ENOENT


def test_name_rules(fs):
    assert err(fs.create, 1, b"x" * 256, 0o644, 0, 0) == errno.ENAMETOOLONG
    fs.create(1, b"y" * 255, 0o644, 0, 0)
    assert err(fs.create, 1, b"a/b", 0o644, 0, 0) == errno.EINVAL
    name = bytes(range(1, 47)) + bytes(range(48, 256))[:100]   # any bytes but '/' and NUL
    fs.create(1, name, 0o644, 0, 0)
    assert fs.lookup(1, name).mode & 0o777 == 0o644
    assert err(fs.create, 1, name, 0o644, 0, 0) == errno.EEXIST


def test_rename_directory_moves_and_loops(fs):
    a = fs.mkdir(1, b"a", 0o755, 0, 0)
    b = fs.mkdir(a.ino, b"b", 0o755, 0, 0)
    assert err(fs.rename, 1, b"a", b.ino, b"a2") == errno.EINVAL          # into own subtree
    assert err(fs.rename, 1, b"a", a.ino, b"self") == errno.EINVAL
    fs.rename(a.ino, b"b", 1, b"b")
    assert fs.getattr(a.ino).nlink == 2 and fs.getattr(1).nlink == 4
    fs.rename(1, b"a", b.ino, b"a")                                    # now legal
    assert fs.lookup(b.ino, b"a").ino == a.ino


def test_rename_over_and_flags(fs):
    f = fs.create(1, b"f", 0o644, 0, 0)
    g = fs.create(1, b"g", 0o644, 0, 0)
    fs.write(f.ino, 0, b"F")
    fs.write(g.ino, 0, b"G")
    assert err(fs.rename, 1, b"f", 1, b"g", RENAME_NOREPLACE) == errno.EEXIST
    fs.rename(1, b"f", 1, b"g", RENAME_EXCHANGE)
    assert fs.read(fs.lookup(1, b"g").ino, 0, 9) == b"F"
    assert fs.read(fs.lookup(1, b"f").ino, 0, 9) == b"G"
    assert err(fs.rename, 1, b"f", 1, b"nope", RENAME_EXCHANGE) == errno.ENOENT
    fs.rename(1, b"f", 1, b"g")                    # replaces g; old g inode becomes orphan
    assert fs.read(fs.lookup(1, b"g").ino, 0, 9) == b"G"
    assert err(fs.lookup, 1, b"f") == errno.ENOENT
    d = fs.mkdir(1, b"d", 0o755, 0, 0)
    assert err(fs.rename, 1, b"g", 1, b"d") == errno.EISDIR
    assert err(fs.rename, 1, b"d", 1, b"g") == errno.ENOTDIR
    fs.mkdir(1, b"e", 0o755, 0, 0)
    fs.create(d.ino, b"child", 0o644, 0, 0)
    assert err(fs.rename, 1, b"e", 1, b"d") == errno.ENOTEMPTY
    fs.rename(1, b"d", 1, b"e")                    # over an empty directory
    assert fs.lookup(1, b"e").ino == d.ino
    assert fs.getattr(1).nlink == 3


def test_exchange_dir_and_file_across_parents(fs):
    d1 = fs.mkdir(1, b"d1", 0o755, 0, 0)
    d2 = fs.mkdir(1, b"d2", 0o755, 0, 0)
    sub = fs.mkdir(d1.ino, b"sub", 0o755, 0, 0)
    f = fs.create(d2.ino, b"file", 0o644, 0, 0)
    fs.rename(d1.ino, b"sub", d2.ino, b"file", RENAME_EXCHANGE)
    assert fs.lookup(d1.ino, b"sub").ino == f.ino
    assert fs.lookup(d2.ino, b"file").ino == sub.ino
    assert fs.getattr(d1.ino).nlink == 2 and fs.getattr(d2.ino).nlink == 3


def test_hard_links(fs):
    f = fs.create(1, b"f", 0o644, 0, 0)
    d = fs.mkdir(1, b"d", 0o755, 0, 0)
    fs.link(f.ino, d.ino, b"f2")
    assert fs.getattr(f.ino).nlink == 2
    assert err(fs.link, d.ino, 1, b"dl") == errno.EPERM
    fs.rename(1, b"f", d.ino, b"f2")      # same inode: no-op, both names stay
    assert fs.lookup(1, b"f").ino == f.ino
    fs.unlink(1, b"f")
    assert fs.getattr(f.ino).nlink == 1


def test_unlinked_open_file_survives_until_release(tmp_image):
    fs = FileSystem.open(tmp_image)
    a = fs.create(1, b"f", 0o644, 0, 0)
    fs.open_file(a.ino)
    fs.write(a.ino, 0, b"still here" * 1000)
    used = fs.statfs().bfree
    fs.unlink(1, b"f")
    fs.forget(a.ino, 1)
    assert fs.read(a.ino, 0, 10) == b"still here"
    assert fs.statfs().bfree == used
    fs.release_file(a.ino)
    assert err(fs.getattr, a.ino) == errno.ENOENT
    assert fs.statfs().bfree == used + 3
    fs.close()
    fsck_clean(tmp_image)


def test_orphan_reclaimed_after_crash(tmp_image):
    fs = FileSystem.open(tmp_image)
    free0 = fs.statfs().bfree
    a = fs.create(1, b"f", 0o644, 0, 0)
    fs.open_file(a.ino)
    fs.write(a.ino, 0, b"x" * 100_000)
    fs.unlink(1, b"f")
    del fs                      # the daemon dies: no close, no checkpoint
    fs = FileSystem.open(tmp_image)
    assert fs.statfs().bfree == free0
    assert err(fs.getattr, a.ino) == errno.ENOENT
    fs.close()
    fsck_clean(tmp_image)


def test_xattrs(fs):
    f = fs.create(1, b"f", 0o644, 0, 0)
    fs.setxattr(f.ino, b"user.a", b"1")
    fs.setxattr(f.ino, b"trusted.b", b"2" * 1000)
    fs.setxattr(f.ino, b"security.c", b"")
    assert sorted(fs.listxattr(f.ino)) == [b"security.c", b"trusted.b", b"user.a"]
    assert err(fs.setxattr, f.ino, b"user.a", b"x", 1) == errno.EEXIST      # XATTR_CREATE
    assert err(fs.setxattr, f.ino, b"user.z", b"x", 2) == errno.ENODATA     # XATTR_REPLACE
    assert err(fs.setxattr, f.ino, b"bogus.a", b"x") == errno.EOPNOTSUPP
    assert err(fs.setxattr, f.ino, b"user.big", b"x" * 5000) == errno.ENOSPC
    fs.removexattr(f.ino, b"user.a")
    assert err(fs.getxattr, f.ino, b"user.a") == errno.ENODATA
    assert fs.getxattr(f.ino, b"trusted.b") == b"2" * 1000


def test_symlink_and_mknod(fs):
    s = fs.symlink(1, b"s", b"../some/where", 0, 0)
    assert stat.S_ISLNK(s.mode) and s.size == len(b"../some/where")
    assert fs.readlink(s.ino) == b"../some/where"
    assert err(fs.symlink, 1, b"long", b"x" * 4096, 0, 0) == errno.ENAMETOOLONG
    p = fs.mknod(1, b"fifo", stat.S_IFIFO | 0o600, 0, 0, 0)
    assert stat.S_ISFIFO(p.mode)
    c = fs.mknod(1, b"chr", stat.S_IFCHR | 0o600, 0x0501, 0, 0)
    assert c.rdev == 0x0501


def test_large_directory_and_readdir_resume(fs):
    d = fs.mkdir(1, b"big", 0o755, 0, 0)
    for i in range(3000):
        fs.create(d.ino, b"n%05d" % i, 0o644, 0, 0)
    h = fs.opendir(d.ino)
    seen, start = [], 0
    while True:
        batch = fs.readdir(h, start, dots=True)[:97]
        if not batch:
            break
        seen += [name for _c, name, _i in batch]
        start = batch[-1][0]
    fs.releasedir(h)
    assert seen[:2] == [b".", b".."]
    assert sorted(seen[2:]) == [b"n%05d" % i for i in range(3000)]


def test_setattr(fs):
    f = fs.create(1, b"f", 0o4755, 0, 0)
    fs.setattr(f.ino, mode=0o600)
    assert fs.getattr(f.ino).mode == stat.S_IFREG | 0o600
    fs.setattr(f.ino, uid=1000, gid=1000, atime_ns=5, mtime_ns=7)
    a = fs.getattr(f.ino)
    assert (a.uid, a.gid, a.atime_ns, a.mtime_ns) == (1000, 1000, 5, 7)
    fs.setattr(f.ino, size=10_000)
    assert fs.getattr(f.ino).size == 10_000 and fs.getattr(f.ino).blocks == 0
    assert fs.read(f.ino, 0, 20_000) == bytes(10_000)
