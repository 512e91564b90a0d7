"""POSIX semantics on a real mount, as a second user.

The mount has `-o allow_other`; operations run as uid 65534 (`nobody`) or another unprivileged
uid in a forked child that drops to that user (so it has no capabilities: no CAP_FSETID,
CAP_FOWNER, CAP_DAC_OVERRIDE). Where Linux's exact behaviour matters, the same operation runs on
a tmpfs directory (/dev/shm, the same kernel) and the results are compared; ext4 applies the same
VFS rules (setattr_should_drop_suidgid, file_remove_privs, may_delete).

Timestamps are read with statx(AT_STATX_FORCE_SYNC), so the kernel asks the daemon instead of
answering from its attribute cache.
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import pickle
import shutil
import stat
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from conftest import (check_daemon_log, check_fsck, force_cleanup, fresh_image, have_fuse,
                      have_root, is_mounted, mount, umount)

pytestmark = pytest.mark.skipif(not (have_root() and have_fuse()),
                                reason="needs root (to switch users) and FUSE")

NOBODY, NOGROUP = 65534, 65534
OTHER = 23456            # a second unprivileged user (no passwd entry needed)
OTHER_GROUP = 23457
CAP_XATTR = "security.capability"
# a valid VFS_CAP_REVISION_2 value: cap_net_raw in permitted and effective
CAP_VALUE = bytes.fromhex("0100000200200000000000000000000000000000")
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


# ---------------------------------------------------------------------------------- helpers
def as_user(fn, *args, uid=NOBODY, gid=NOGROUP, groups=(), umask=0o022):
    """Run fn(*args) in a forked child that switched to uid/gid/groups (no capabilities left)
    and return its result; an OSError in the child is raised here with the same errno."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                    # child: never returns into pytest
        try:
            os.close(r)
            try:
                os.setgroups(list(groups))
                os.setgid(gid)
                os.setuid(uid)
                os.umask(umask)
                out = ("ok", fn(*args))
            except OSError as e:
                out = ("oserror", e.errno)
            except BaseException as e:              # noqa: BLE001
                out = ("exc", repr(e))
            with os.fdopen(w, "wb") as f:
                f.write(pickle.dumps(out))
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    kind, value = pickle.loads(data)
    if kind == "oserror":
        raise OSError(value, os.strerror(value))
    if kind == "exc":
        raise AssertionError(f"child failed: {value}")
    return value


def user_errno(fn, *args, **kw) -> int:
    """0 if fn succeeds as the user, else the errno it failed with."""
    try:
        as_user(fn, *args, **kw)
    except OSError as e:
        return e.errno
    return 0


class _Ts(ctypes.Structure):
    _fields_ = [("sec", ctypes.c_int64), ("nsec", ctypes.c_uint32), ("pad", ctypes.c_int32)]


class _Statx(ctypes.Structure):
    _fields_ = [("mask", ctypes.c_uint32), ("blksize", ctypes.c_uint32),
                ("attributes", ctypes.c_uint64), ("nlink", ctypes.c_uint32),
                ("uid", ctypes.c_uint32), ("gid", ctypes.c_uint32), ("mode", ctypes.c_uint16),
                ("pad1", ctypes.c_uint16), ("ino", ctypes.c_uint64), ("size", ctypes.c_uint64),
                ("blocks", ctypes.c_uint64), ("attributes_mask", ctypes.c_uint64),
                ("atime", _Ts), ("btime", _Ts), ("ctime", _Ts), ("mtime", _Ts),
                ("rest", ctypes.c_uint8 * 128)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint,
                        ctypes.POINTER(_Statx)]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
AT_FDCWD, AT_SYMLINK_NOFOLLOW, AT_STATX_FORCE_SYNC = -100, 0x100, 0x2000


class St:
    def __init__(self, b: _Statx):
        self.mode, self.uid, self.gid, self.size = b.mode, b.uid, b.gid, b.size
        self.nlink = b.nlink
        self.mtime = b.mtime.sec * 10**9 + b.mtime.nsec
        self.ctime = b.ctime.sec * 10**9 + b.ctime.nsec

    @property
    def perm(self) -> int:
        return stat.S_IMODE(self.mode)


def fresh_stat(path) -> St:
    """stat that bypasses the kernel's attribute cache (the daemon answers)."""
    buf = _Statx()
    if _libc.statx(AT_FDCWD, os.fsencode(str(path)), AT_SYMLINK_NOFOLLOW | AT_STATX_FORCE_SYNC,
                   0x7FF, ctypes.byref(buf)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(path))
    return St(buf)


def server_bytes(path) -> bytes:
    """The file's bytes as the daemon has them: an O_DIRECT read is sent to the daemon as is,
    not cut at the size the kernel has cached."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        out = b""
        while chunk := os.pread(fd, 1 << 20, len(out)):
            out += chunk
        return out
    finally:
        os.close(fd)


def has_cap(path) -> bool:
    try:
        os.getxattr(path, CAP_XATTR)
        return True
    except OSError as e:
        assert e.errno == errno.ENODATA, e
        return False


def tick():
    """Let the clock move past the coarse timestamp granularity of tmpfs."""
    time.sleep(0.02)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A daxfs mount (allow_other) and a tmpfs reference directory, both world-traversable.
    Each test works in its own subdirectory (`Env.dirs(name)`)."""
    base = Path("/dev/shm") / f"daxfs-posix-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    base.mkdir(mode=0o755)
    os.chmod(base, 0o755)
    mnt, ref = base / "mnt", base / "ref"
    mnt.mkdir()
    ref.mkdir()
    gen = fresh_image(tmp_path_factory, tag="posix")
    image = next(gen)
    try:
        mount(image, mnt, "-o", "allow_other")
        yield Env(image, mnt, ref)
        if is_mounted(mnt):
            umount(mnt)
        check_daemon_log(mnt)
        check_fsck(image)
    finally:
        if is_mounted(mnt):
            force_cleanup(image, mnt)
        gen.close()
        shutil.rmtree(base, ignore_errors=True)


class Env:
    def __init__(self, image, mnt: Path, ref: Path):
        self.image, self.mnt, self.ref = image, mnt, ref

    def dirs(self, name: str, mode: int = 0o777) -> tuple[Path, Path]:
        """(daxfs dir, tmpfs dir), fresh, with `mode` (root-owned)."""
        out = []
        for root in (self.mnt, self.ref):
            d = root / name
            d.mkdir()
            os.chmod(d, mode)
            out.append(d)
        return out[0], out[1]


def _write_file(path, data: bytes, mode: int, uid: int = NOBODY, gid: int = NOGROUP,
                cap: bool = False) -> None:
    with open(path, "wb") as f:
        f.write(data)
    os.chown(path, uid, gid)
    os.chmod(path, mode)
    if cap:
        os.setxattr(path, CAP_XATTR, CAP_VALUE)


# ---------------------------------------------------------------------------------- O_TRUNC
def _shell(cmd: str, cwd) -> None:
    subprocess.run(["/bin/sh", "-c", cmd], cwd=cwd, check=True)


def test_shell_redirection_truncates(env):
    """Issue 9.1: `echo 'hello world' > f; echo hi > f` must leave 3 bytes, as root and as
    another user (open(O_WRONLY|O_CREAT|O_TRUNC) of an existing file)."""
    d, ref = env.dirs("redir")
    for root in (d, ref):
        _shell("echo 'hello world' > f; echo hi > f", root)
        as_user(_shell, "echo 'hello world' > g; echo hi > g", str(root))
    for name in ("f", "g"):
        assert server_bytes(d / name) == b"hi\n" == (ref / name).read_bytes()
        assert fresh_stat(d / name).size == 3


def _open_close(path, flags):
    os.close(os.open(path, flags))


def test_o_trunc_sizes_and_times(env):
    d, ref = env.dirs("otrunc")
    results = []
    for root in (d, ref):
        _write_file(root / "f", b"hello world\n", 0o666)
        _write_file(root / "empty", b"", 0o666)
        _write_file(root / "ro", b"hello world\n", 0o666)
        _write_file(root / "noperm", b"hello world\n", 0o644, uid=OTHER)
        before = {n: fresh_stat(root / n) for n in ("f", "empty", "ro")}
        tick()
        as_user(_open_close, root / "f", os.O_WRONLY | os.O_TRUNC)
        as_user(_open_close, root / "empty", os.O_WRONLY | os.O_TRUNC)
        as_user(_open_close, root / "ro", os.O_RDONLY | os.O_TRUNC)   # Linux truncates this too
        denied = user_errno(_open_close, root / "noperm", os.O_RDONLY | os.O_TRUNC)
        isdir = user_errno(_open_close, root, os.O_RDONLY | os.O_TRUNC)
        after = {n: fresh_stat(root / n) for n in ("f", "empty", "ro")}
        results.append({
            "sizes": {n: after[n].size for n in after},
            "mtime": {n: after[n].mtime > before[n].mtime for n in after},
            "ctime": {n: after[n].ctime > before[n].ctime for n in after},
            "denied": denied, "isdir": isdir,
            "noperm": fresh_stat(root / "noperm").size})
    assert results[0] == results[1]
    assert results[0]["sizes"] == {"f": 0, "empty": 0, "ro": 0}
    assert all(results[0]["mtime"].values()) and all(results[0]["ctime"].values())
    assert results[0]["denied"] == errno.EACCES and results[0]["isdir"] == errno.EISDIR
    assert server_bytes(d / "f") == b""


def test_o_trunc_with_o_creat_of_existing_file(env):
    d, _ref = env.dirs("otrunc_creat")
    _write_file(d / "f", b"0123456789" * 1000, 0o666)
    fd = as_user(lambda: os.open(d / "f", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
    assert isinstance(fd, int)
    assert server_bytes(d / "f") == b""
    assert fresh_stat(d / "f").perm == 0o666          # an existing file keeps its mode


# ---------------------------------------------------------------------------------- open flags
def _append_twice(path):
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, b"AB")
        os.pwrite(fd, b"CD", 0)        # Linux: pwrite on O_APPEND appends too
        return os.lseek(fd, 0, os.SEEK_CUR)
    finally:
        os.close(fd)


def test_o_append(env):
    d, ref = env.dirs("append")
    out = []
    for root in (d, ref):
        _write_file(root / "f", b"12345", 0o666)
        pos = as_user(_append_twice, root / "f")
        out.append((pos, (root / "f").read_bytes()))
    assert out[0] == out[1] == (7, b"12345ABCD")      # pwrite does not move the offset
    assert server_bytes(d / "f") == b"12345ABCD"


def test_o_excl(env):
    d, _ref = env.dirs("excl")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    assert user_errno(lambda: os.close(os.open(d / "f", flags, 0o644))) == 0
    assert user_errno(lambda: os.close(os.open(d / "f", flags, 0o644))) == errno.EEXIST
    os.symlink("dangling", d / "link")
    # O_EXCL|O_CREAT never follows a symlink, not even a dangling one
    assert user_errno(lambda: os.close(os.open(d / "link", flags, 0o644))) == errno.EEXIST
    assert not (d / "dangling").exists()
    os.mkdir(d / "sub")
    assert user_errno(lambda: os.close(os.open(d / "sub", flags, 0o644))) == errno.EEXIST


def _create_things(root):
    os.close(os.open(root / "file", os.O_WRONLY | os.O_CREAT, 0o777))
    os.mkdir(root / "dir", 0o777)
    os.mknod(root / "fifo", stat.S_IFIFO | 0o666)
    os.symlink("file", root / "sym")
    return True


def _creations(root) -> dict:
    return {n: (fresh_stat(root / n).perm, fresh_stat(root / n).uid, fresh_stat(root / n).gid)
            for n in ("file", "dir", "fifo", "sym")}


def test_o_creat_mode_umask_owner(env):
    for umask in (0o022, 0o077, 0o002):
        d, ref = env.dirs(f"creat_{umask:o}")
        out = []
        for root in (d, ref):
            as_user(_create_things, root, umask=umask)
            out.append(_creations(root))
        assert out[0] == out[1]
        assert out[0]["file"] == (0o777 & ~umask, NOBODY, NOGROUP)
        assert out[0]["dir"] == (0o777 & ~umask, NOBODY, NOGROUP)


def test_setgid_directory_inheritance(env):
    d, ref = env.dirs("sgid_dir")
    out = []
    for root in (d, ref):
        for who, groups in (("member", [OTHER_GROUP]), ("outsider", [])):
            sub = root / who
            sub.mkdir()
            os.chown(sub, 0, OTHER_GROUP)
            os.chmod(sub, 0o2777)
            as_user(_create_things, sub, groups=groups)
            # mkdir with the setgid bit asked for explicitly, by someone outside the group
            as_user(os.mkdir, sub / "asked", 0o2777, groups=groups)
            res = _creations(sub)
            res["asked"] = fresh_stat(sub / "asked").perm, fresh_stat(sub / "asked").gid
            out.append(res)
    assert out[:2] == out[2:]
    member = out[0]
    assert member["file"][2] == member["dir"][2] == OTHER_GROUP        # group of the directory
    assert member["dir"][0] & stat.S_ISGID                            # subdirectories inherit


# ---------------------------------------------------------------------------------- timestamps
def _fallocate(path, mode, off, length):
    fd = os.open(path, os.O_RDWR)
    try:
        if _libc.fallocate(fd, mode, off, length) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
    finally:
        os.close(fd)


def _copy_into(src, dst):
    fi, fo = os.open(src, os.O_RDONLY), os.open(dst, os.O_WRONLY)
    try:
        n = os.copy_file_range(fi, fo, 8192, 0, 0)
        assert n == 8192, n
    finally:
        os.close(fi)
        os.close(fo)


def _pwrite(path, data, off, flags=0):
    fd = os.open(path, os.O_WRONLY | flags)
    try:
        return os.pwrite(fd, data, off)
    finally:
        os.close(fd)


def _mmap_store(path):
    fd = os.open(path, os.O_RDWR)
    try:
        with mmap.mmap(fd, 4096) as m:
            m[0:4] = b"mmap"
            m.flush()
    finally:
        os.close(fd)


TIME_OPS = {
    # name: (operation as the user, in directory d with file f (8 KiB), source s)
    "write": lambda d: _pwrite(d / "f", b"x", 10),
    "write_extend": lambda d: _pwrite(d / "f", b"x", 9000),
    "truncate_shrink": lambda d: os.truncate(d / "f", 100),
    "truncate_same": lambda d: os.truncate(d / "f", 8192),
    "o_trunc": lambda d: _open_close(d / "f", os.O_WRONLY | os.O_TRUNC),
    "chmod": lambda d: os.chmod(d / "f", 0o640),
    "link": lambda d: os.link(d / "f", d / "f2"),
    "unlink_one_of_two": lambda d: (os.link(d / "f", d / "f2"), tick(), os.unlink(d / "f2")),
    "rename": lambda d: os.rename(d / "f", d / "g"),
    "rename_over": lambda d: os.rename(d / "s", d / "f"),
    "setxattr": lambda d: os.setxattr(d / "f", "user.k", b"v"),
    "fallocate_extend": lambda d: _fallocate(d / "f", 0, 0, 20000),
    "fallocate_keep_size": lambda d: _fallocate(d / "f", FALLOC_FL_KEEP_SIZE, 0, 20000),
    "punch_hole": lambda d: _fallocate(d / "f", FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                       0, 4096),
    "copy_file_range_target": lambda d: _copy_into(d / "s", d / "f"),
    "mkdir": lambda d: os.mkdir(d / "newdir"),
    "create": lambda d: os.close(os.open(d / "new", os.O_WRONLY | os.O_CREAT, 0o644)),
}


def _time_changes(env, name, op, as_root=False):
    d, ref = env.dirs(f"times_{name}")
    out = []
    for root in (d, ref):
        os.chown(root, NOBODY, NOGROUP)
        _write_file(root / "f", os.urandom(8192), 0o644)
        _write_file(root / "s", os.urandom(8192), 0o644)
        f0, d0 = fresh_stat(root / "f"), fresh_stat(root)
        tick()
        if as_root:
            op(root)
        else:
            as_user(op, root)
        fpath = root / "f" if (root / "f").exists() else root / "g"
        f1, d1 = fresh_stat(fpath), fresh_stat(root)
        out.append({"file_mtime": f1.mtime != f0.mtime, "file_ctime": f1.ctime != f0.ctime,
                    "dir_mtime": d1.mtime != d0.mtime, "dir_ctime": d1.ctime != d0.ctime})
    return out


@pytest.mark.parametrize("name", sorted(TIME_OPS))
def test_mtime_ctime_after_change(env, name):
    daxfs, tmpfs = _time_changes(env, name, TIME_OPS[name])
    assert daxfs == tmpfs


def test_mtime_ctime_after_chown(env):
    daxfs, tmpfs = _time_changes(env, "chown", lambda d: os.chown(d / "f", OTHER, OTHER_GROUP),
                                 as_root=True)
    assert daxfs == tmpfs == {"file_mtime": False, "file_ctime": True, "dir_mtime": False,
                              "dir_ctime": False}


# ---------------------------------------------------------------------------------- kill privs
def _direct_write(path):
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, 4096)
        buf.write(b"d" * 4096)
        return os.pwritev(fd, [buf], 0)
    finally:
        os.close(fd)


KILL_PATHS = {
    "write": lambda p, s: _pwrite(p, b"w", 0),
    "o_direct_write": lambda p, s: _direct_write(p),
    "copy_file_range_target": lambda p, s: _copy_into(s, p),
    "truncate": lambda p, s: os.truncate(p, 100),
    "ftruncate": lambda p, s: (lambda fd: (os.ftruncate(fd, 100), os.close(fd)))(
        os.open(p, os.O_WRONLY)),
    "o_trunc": lambda p, s: _open_close(p, os.O_WRONLY | os.O_TRUNC),
    "fallocate": lambda p, s: _fallocate(p, 0, 0, 20000),
    "fallocate_keep_size": lambda p, s: _fallocate(p, FALLOC_FL_KEEP_SIZE, 0, 20000),
    "punch_hole": lambda p, s: _fallocate(p, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4096),
    "mmap_store": lambda p, s: _mmap_store(p),
}
# (mode, with security.capability, writer uid): files owned by OTHER, group NOGROUP; the user
# writer is in that group, so only the group-exec rule decides about setgid.
KILL_CASES = [
    ("setuid", 0o4777, False, NOBODY),
    ("setgid_gx", 0o2777, False, NOBODY),
    ("setgid_no_gx", 0o2767, False, NOBODY),
    ("both", 0o6777, False, NOBODY),
    ("capability", 0o777, True, NOBODY),
    ("root_writer", 0o6777, True, 0),
]


def _kill_result(env, path_name, op):
    d, ref = env.dirs(f"kill_{path_name}")
    out = []
    for root in (d, ref):
        _write_file(root / "src", os.urandom(8192), 0o644)
        res = {}
        for case, mode, cap, writer in KILL_CASES:
            p = root / case
            _write_file(p, os.urandom(8192), mode, uid=OTHER, gid=NOGROUP, cap=cap)
            if writer == 0:
                op(p, root / "src")
            else:
                as_user(op, p, root / "src", uid=writer)
            res[case] = (oct(fresh_stat(p).perm), has_cap(p))
        out.append(res)
    return out


@pytest.mark.parametrize("path_name", sorted(KILL_PATHS))
def test_setuid_setgid_capability_cleared_like_ext4(env, path_name):
    """Issue 9.6: every write path clears what ext4 clears: setuid always, setgid when group
    execute is set (for a writer without CAP_FSETID), security.capability on every write,
    truncate, fallocate and copy_file_range target (root's too); an mmap store clears nothing."""
    daxfs, tmpfs = _kill_result(env, path_name, KILL_PATHS[path_name])
    assert daxfs == tmpfs
    if path_name != "mmap_store":
        assert daxfs["setuid"] == (oct(0o777), False)
        assert daxfs["setgid_gx"] == (oct(0o777), False)
        assert daxfs["setgid_no_gx"] == (oct(0o2767), False)
        assert daxfs["capability"] == (oct(0o777), False)
        assert daxfs["root_writer"] == (oct(0o6777), False)


def test_chown_clears_setuid_setgid_and_capability(env):
    d, ref = env.dirs("kill_chown")
    out = []
    for root in (d, ref):
        res = {}
        for case, mode, cap, _writer in KILL_CASES:
            p = root / case
            _write_file(p, b"x", mode, uid=OTHER, gid=NOGROUP, cap=cap)
            os.chown(p, NOBODY, NOGROUP)                  # root changes the owner
            q = root / f"{case}_chgrp"
            _write_file(q, b"x", mode, uid=NOBODY, gid=NOGROUP, cap=cap)
            as_user(os.chown, q, -1, OTHER_GROUP, groups=[NOGROUP, OTHER_GROUP])  # owner chgrp
            res[case] = (oct(fresh_stat(p).perm), has_cap(p), oct(fresh_stat(q).perm), has_cap(q))
        out.append(res)
    assert out[0] == out[1]


# ---------------------------------------------------------------------------------- sticky dirs
def test_sticky_directory(env):
    d, ref = env.dirs("sticky", 0o1777)
    out = []
    for root in (d, ref):
        as_user(lambda: (root / "mine").write_bytes(b"x"))
        as_user(lambda: (root / "mine2").write_bytes(b"x"))
        as_user(lambda: (root / "mine3").write_bytes(b"x"))
        res = {
            "other_unlink": user_errno(os.unlink, root / "mine", uid=OTHER, gid=OTHER_GROUP),
            "other_rename": user_errno(os.rename, root / "mine", root / "stolen", uid=OTHER,
                                       gid=OTHER_GROUP),
            "other_replace": user_errno(
                lambda: ((root / "theirs").write_bytes(b"y"),
                         os.rename(root / "theirs", root / "mine")), uid=OTHER, gid=OTHER_GROUP),
            "owner_rename": user_errno(os.rename, root / "mine2", root / "renamed"),
            "owner_unlink": user_errno(os.unlink, root / "renamed"),
        }
        os.unlink(root / "mine3")                       # root may
        res["left"] = sorted(os.listdir(root))
        out.append(res)
    assert out[0] == out[1]
    assert out[0]["other_unlink"] == out[0]["other_rename"] == errno.EPERM
    assert out[0]["other_replace"] == errno.EPERM
    assert out[0]["owner_rename"] == out[0]["owner_unlink"] == 0


# ---------------------------------------------------------------------------------- names
def test_names_of_255_and_256_bytes(env):
    d, _ref = env.dirs("names")
    ok, long = "n" * 255, "n" * 256
    utf8_ok = "é" * 127 + "x"            # 255 bytes in UTF-8
    for name in (ok, utf8_ok):
        as_user(lambda: (d / name).write_bytes(b"x"))
        assert (d / name).read_bytes() == b"x"
        assert name in os.listdir(d)
    as_user(os.mkdir, d / ("d" * 255))
    as_user(os.symlink, "t", d / ("s" * 255))
    as_user(os.link, d / ok, d / ("l" * 255))
    as_user(os.rename, d / ("l" * 255), d / ("r" * 255))
    too_long = [
        lambda: os.close(os.open(d / long, os.O_WRONLY | os.O_CREAT, 0o644)),
        lambda: os.mkdir(d / long),
        lambda: os.symlink("t", d / long),
        lambda: os.link(d / ok, d / long),
        lambda: os.rename(d / ok, d / long),
        lambda: os.stat(d / long),
        lambda: os.unlink(d / long),
        lambda: os.mknod(d / long, stat.S_IFIFO | 0o644),
    ]
    for fn in too_long:
        assert user_errno(fn) == errno.ENAMETOOLONG
    assert (d / ok).exists()


# ---------------------------------------------------------------------------------- EACCES
def test_permission_denials(env):
    d, ref = env.dirs("perms", 0o755)
    out = []
    for root in (d, ref):
        _write_file(root / "secret", b"s", 0o600, uid=0, gid=0)
        _write_file(root / "readonly", b"r", 0o644, uid=0, gid=0)
        (root / "closed").mkdir(mode=0o700)
        (root / "closed" / "inner").write_bytes(b"i")
        (root / "noread").mkdir()
        os.chmod(root / "noread", 0o711)
        (root / "noread" / "known").write_bytes(b"k")
        os.chmod(root / "noread" / "known", 0o644)
        (root / "nowrite").mkdir()
        os.chmod(root / "nowrite", 0o755)
        (root / "nowrite" / "f").write_bytes(b"f")
        res = {
            "read_secret": user_errno(lambda: open(root / "secret", "rb").read()),
            "write_readonly": user_errno(lambda: open(root / "readonly", "r+b").close()),
            "lookup_closed": user_errno(os.stat, root / "closed" / "inner"),
            "list_closed": user_errno(os.listdir, root / "closed"),
            "list_noread": user_errno(os.listdir, root / "noread"),
            "lookup_noread": user_errno(os.stat, root / "noread" / "known"),
            "create_nowrite": user_errno(lambda: (root / "nowrite" / "g").write_bytes(b"")),
            "unlink_nowrite": user_errno(os.unlink, root / "nowrite" / "f"),
            "mkdir_nowrite": user_errno(os.mkdir, root / "nowrite" / "d"),
            "rename_nowrite": user_errno(os.rename, root / "nowrite" / "f", root / "nowrite" / "h"),
            "chmod_not_owner": user_errno(os.chmod, root / "readonly", 0o666),
            "chown_not_root": user_errno(os.chown, root / "readonly", NOBODY, -1),
            "utime_not_owner": user_errno(os.utime, root / "readonly", (1, 1)),
            "utime_now_readonly": user_errno(os.utime, root / "readonly", None),
            "setxattr_not_owner": user_errno(os.setxattr, root / "readonly", "user.k", b"v"),
            "truncate_readonly": user_errno(os.truncate, root / "readonly", 0),
        }
        out.append(res)
    assert out[0] == out[1]
    r = out[0]
    assert r["lookup_noread"] == 0
    assert all(v == errno.EACCES for k, v in r.items()
               if k not in ("lookup_noread", "chmod_not_owner", "chown_not_root",
                            "utime_not_owner")), r
    assert r["chmod_not_owner"] == r["chown_not_root"] == r["utime_not_owner"] == errno.EPERM


# ---------------------------------------------------------------------------------- lseek
def _mmap_store_and_wait(path, off, ready_w, go_r):
    fd = os.open(path, os.O_RDWR)
    m = mmap.mmap(fd, os.fstat(fd).st_size)
    m[off:off + 5] = b"dirty"          # no msync: the page stays dirty in the kernel
    os.write(ready_w, b"1")
    os.read(go_r, 1)
    m.close()                          # munmap writes the page back
    os.close(fd)
    return True


def test_seek_data_sees_pages_dirty_in_the_kernel(env):
    """Issue 9.16: a MAP_SHARED store the kernel has not written back yet must be inside a data
    region for SEEK_DATA/SEEK_HOLE (else sparse copies skip it)."""
    d, _ref = env.dirs("seekdirty")
    size, off = 1 << 20, 512 << 10
    p = d / "sparse"
    with open(p, "wb") as f:
        f.truncate(size)
    os.chmod(p, 0o666)
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setgid(NOGROUP)
            os.setuid(NOBODY)
            _mmap_store_and_wait(p, off, ready_w, go_r)
        finally:
            os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"1"
        fd = os.open(p, os.O_RDONLY)
        try:
            data = os.lseek(fd, 0, os.SEEK_DATA)     # ENXIO here means "no data at all"
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            assert data <= off and hole >= off + 5, (data, hole)
        finally:
            os.close(fd)
    finally:
        os.write(go_w, b"1")
        os.waitpid(pid, 0)
    # written back and no writer left: the exact answer again
    fd = os.open(p, os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_DATA) == off
        assert os.lseek(fd, off, os.SEEK_HOLE) == off + 4096
    finally:
        os.close(fd)
    assert server_bytes(p)[off:off + 5] == b"dirty"


def test_seek_data_exact_unless_an_rdwr_open_could_map_it(env):
    """Only an O_RDWR open through the page cache can carry a shared writable mapping: while one
    exists lseek says "all data"; O_WRONLY, O_RDONLY and O_DIRECT opens keep the exact answer."""
    d, _ref = env.dirs("seekexact")
    p = d / "sparse"
    with open(p, "wb") as f:
        f.truncate(1 << 20)
        f.seek(256 << 10)
        f.write(b"x" * 4096)
    exact = (256 << 10, (256 << 10) + 4096)

    def seeks():
        fd = os.open(p, os.O_RDONLY)
        try:
            data = os.lseek(fd, 0, os.SEEK_DATA)
            return data, os.lseek(fd, data, os.SEEK_HOLE)
        finally:
            os.close(fd)

    assert seeks() == exact
    for flags, want in ((os.O_WRONLY, exact), (os.O_RDWR | os.O_DIRECT, exact),
                        (os.O_RDWR, (0, 1 << 20))):
        fd = os.open(p, flags)
        fd2 = os.open(p, flags)
        try:
            assert seeks() == want, flags
            os.close(fd2)
            fd2 = None
            assert seeks() == want, flags
        finally:
            os.close(fd)
            if fd2 is not None:
                os.close(fd2)
        assert seeks() == exact
