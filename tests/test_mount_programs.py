"""Ordinary programs on a real daxfs mount: cp -a, diff -r, tar, mv, ln, chmod, chown, touch,
truncate, dd, rm -r, stat, du, df. Wherever a program's result is not fixed by the program alone
(tar, dd, chown side effects ...) the same commands run on a reference directory on the host
filesystem and the two trees are compared by manifest: (path, type, mode, size, nlink, owner,
rdev, symlink target, sha256, user.* xattrs, and mtime_ns where the program sets it). Every test
also unmounts and remounts and compares again; the `mounted` fixture runs `daxfs fsck` at the end.

`mount -t fuse.daxfs` is covered by test_cli.py::test_mount_helper_form and not repeated here.
"""
from __future__ import annotations

import calendar
import errno
import os
import random
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

from conftest import check_fsck, daxfs_cli, have_fuse, have_root, mount, sha256, umount

pytestmark = pytest.mark.skipif(not have_fuse(), reason="needs /dev/fuse and fusermount3")

MiB = 1 << 20
UTC_ENV = dict(os.environ, TZ="UTC", LC_ALL="C")


# ---------------------------------------------------------------------------------------------
# helpers

def sh(*cmd, cwd=None, ok=(0,), env=UTC_ENV, timeout=120) -> subprocess.CompletedProcess:
    """Run a program (no shell); its exit status must be in `ok`."""
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, env=env,
                       timeout=timeout)
    if p.returncode not in ok:
        raise AssertionError(f"{' '.join(map(str, cmd))} (cwd={cwd}) exited {p.returncode}\n"
                             f"--- stdout:\n{p.stdout.decode(errors='replace')}"
                             f"--- stderr:\n{p.stderr.decode(errors='replace')}")
    return p


def pipe(left: list, right: list, timeout=120) -> None:
    """`left | right`; both must exit 0."""
    a = subprocess.Popen([str(c) for c in left], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=UTC_ENV)
    b = subprocess.Popen([str(c) for c in right], stdin=a.stdout, stderr=subprocess.PIPE,
                         env=UTC_ENV)
    a.stdout.close()
    _, berr = b.communicate(timeout=timeout)
    aerr = a.stderr.read()
    a.wait(timeout)
    assert a.returncode == 0 and b.returncode == 0, (
        f"{left} | {right}: exit {a.returncode}/{b.returncode}\n{aerr!r}\n{berr!r}")


def diff_r(a, b, *flags) -> None:
    """`diff -r FLAGS a b` must find no difference. diff has no way to compare fifos or devices
    and says "File X is a fifo while file Y is a fifo" (exit 1) for them: those lines, when both
    sides are of the same special type, are the only output allowed."""
    p = sh("diff", "-r", *flags, a, b, ok=(0, 1))
    out = p.stdout.decode(errors="replace")
    bad = []
    for line in out.splitlines():
        ok = False
        for kind in ("fifo", "character special file", "block special file", "socket"):
            if line.startswith("File ") and line.endswith(f" is a {kind}") \
                    and f" is a {kind} while file " in line:
                ok = True
        if not ok:
            bad.append(line)
    assert not bad and not p.stderr, (f"diff -r {' '.join(flags)} {a} {b}:\n" + out
                                      + p.stderr.decode(errors="replace"))


def manifest(root, *, times: bool = True) -> dict[str, dict]:
    """path -> attributes of everything under `root` (root itself as '.'), never following
    symlinks. Directory sizes are left out (they differ between filesystems by design)."""
    root = str(root)
    out: dict[str, dict] = {}

    def onerror(e):
        raise e

    def add(p):
        st = os.lstat(p)
        kind = stat.S_IFMT(st.st_mode)
        e = {"type": stat.filemode(st.st_mode)[0], "mode": oct(st.st_mode), "uid": st.st_uid,
             "gid": st.st_gid, "nlink": st.st_nlink}
        if times:
            e["mtime_ns"] = st.st_mtime_ns
        if kind == stat.S_IFREG:
            e["size"] = st.st_size
            e["sha256"] = sha256(p)
        elif kind == stat.S_IFLNK:
            e["size"] = st.st_size
            e["target"] = os.readlink(p)
        elif kind in (stat.S_IFCHR, stat.S_IFBLK):
            e["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
        if kind != stat.S_IFLNK:
            names = sorted(n for n in os.listxattr(p, follow_symlinks=False)
                           if n.startswith("user."))
            e["xattrs"] = {n: os.getxattr(p, n, follow_symlinks=False) for n in names}
        out[os.path.relpath(p, root)] = e

    add(root)
    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror):
        for name in dirnames + filenames:
            add(os.path.join(dirpath, name))
    return out


def link_groups(root) -> list[list[str]]:
    """Groups of paths (relative) that are the same inode, for nlink > 1 non-directories."""
    groups: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if st.st_nlink > 1:
                groups.setdefault(st.st_ino, []).append(os.path.relpath(p, root))
    return sorted(sorted(g) for g in groups.values())


def assert_same(expected: dict, got: dict, what: str) -> None:
    if expected == got:
        return
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    changed = []
    for k in sorted(set(expected) & set(got)):
        if expected[k] != got[k]:
            fields = {f: (expected[k].get(f), got[k].get(f))
                      for f in set(expected[k]) | set(got[k])
                      if expected[k].get(f) != got[k].get(f)}
            changed.append(f"  {k!r}: {fields}")
    pytest.fail(f"{what}: {len(missing)} missing {missing[:10]!r}, {len(extra)} extra "
                f"{extra[:10]!r}, {len(changed)} changed:\n" + "\n".join(changed[:20]))


def wait_bfree(mnt, want: int, timeout: float = 10.0, field: str = "f_bfree") -> int:
    """f_bfree (or `field`) of `mnt` once it equals `want` (freeing an unlinked inode may
    wait for the kernel's FORGET), or its last value after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        v = getattr(os.statvfs(mnt), field)
        if v == want or time.monotonic() > deadline:
            return v
        time.sleep(0.05)


def remount_fsck(image, mnt) -> Path:
    """conftest's remount with a check in the middle: after `daxfs umount` the image must be
    marked clean and `daxfs fsck` must exit 0, then it is mounted again."""
    umount(mnt)
    info = daxfs_cli("info", image).stdout
    assert "state:          clean" in info, info
    check_fsck(image)
    mount(image, mnt)
    return Path(mnt)


# ---------------------------------------------------------------------------------------------
# the source tree

ODD_NAMES = [
    " leading and trailing spaces ",
    "tab\tin name",
    "new\nline",
    "ünïcödé ✓ 日本語 🙂",
    "-leading-dash",
    "quotes ' and \"",
    "back\\slash",
    "*glob?[x]",
    "a" * 255,                                   # 255 bytes, ASCII
    "é" * 127 + "x",                             # 255 bytes, UTF-8
    "日" * 85,                                    # 255 bytes, 3-byte UTF-8
]
SIZES = [0, 1, 4095, 4096, 4097, 8191, 8193, 65535, 131073, MiB + 3]
SPARSE_SIZE = 50 * MiB
SPARSE_OFF = 25 * MiB + 12345
SPARSE_BYTES = b"a few bytes in the middle of nowhere"


def make_tree(root: Path, seed: int = 1234) -> None:
    rng = random.Random(seed)
    root.mkdir()

    def wr(rel: str, data: bytes) -> Path:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        return p

    for s in SIZES:
        wr(f"sizes/f{s}", rng.randbytes(s))
    # sparse: truncate -s 50M, then a few bytes in the middle (dd conv=notrunc)
    sh("truncate", "-s", "50M", root / "sparse")
    (root / "pattern").write_bytes(SPARSE_BYTES)
    sh("dd", f"if={root / 'pattern'}", f"of={root / 'sparse'}", "bs=1", f"seek={SPARSE_OFF}",
       "conv=notrunc", "status=none")
    (root / "pattern").unlink()
    for d in range(6):
        for i in range(25):
            wr(f"many/d{d}/f{i:02}", rng.randbytes(rng.choice([0, 3, 100, 4096, 5000, 20000])))
    deep = "/".join(f"level{i}" for i in range(16))
    wr(f"deep/{deep}/leaf", b"deep leaf\n")
    for n in ODD_NAMES:
        wr(f"names/{n}", (n + "\n").encode())
    (root / "names" / ("dir " + "é" * 60)).mkdir()
    wr(f"names/dir {'é' * 60}/inner", b"inner\n")
    # links
    (root / "links").mkdir()
    os.symlink("../sizes/f1", root / "links/rel")
    os.symlink("../deep", root / "links/reldir")
    os.symlink("/etc/passwd", root / "links/abs")
    os.symlink("../names/" + ODD_NAMES[3], root / "links/odd target")
    os.link(root / "sizes/f4097", root / "links/hard1")
    os.link(root / "sizes/f4097", root / "many/d0/hard2")
    os.link(root / "sizes/f0", root / "links/hard-empty")
    # special files
    os.mkfifo(root / "fifo", 0o640)
    if have_root():
        os.mknod(root / "null-dev", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    # owners then modes (chown clears set-id bits)
    m = root / "modes"
    m.mkdir()
    for name, mode in [("setuid", 0o4755), ("setgid", 0o2750), ("ro", 0o444), ("none", 0o000),
                       ("exec", 0o711), ("private", 0o600)]:
        wr(f"modes/{name}", name.encode())
    (m / "sticky").mkdir()
    wr("modes/sticky/inside", b"t")
    (m / "private-dir").mkdir()
    if have_root():
        os.chown(m / "exec", 1234, 5678)
        os.chown(m / "sticky", 1000, 1000)
        os.lchown(root / "links/rel", 1000, 1001)
    for name, mode in [("setuid", 0o4755), ("setgid", 0o2750), ("ro", 0o444), ("none", 0o000),
                       ("exec", 0o711), ("private", 0o600), ("sticky", 0o1777),
                       ("private-dir", 0o700)]:
        os.chmod(m / name, mode)
    # xattrs: with setfattr(1) when installed, else the syscalls
    x = wr("xattrs/file", b"has xattrs\n")
    (root / "xattrs/dir").mkdir()
    if shutil.which("setfattr"):
        sh("setfattr", "-n", "user.comment", "-v", "hello world", x)
        sh("setfattr", "-n", "user.empty", x)
        sh("setfattr", "-n", "user.dir", "-v", "on a directory", root / "xattrs/dir")
    else:
        os.setxattr(x, "user.comment", b"hello world")
        os.setxattr(x, "user.empty", b"")
        os.setxattr(root / "xattrs/dir", "user.dir", b"on a directory")
    os.setxattr(x, "user.binary", bytes(range(256)) * 8)
    os.setxattr(root / "sizes/f4097", "user.on-hardlink", b"shared by all names")
    # timestamps last (with nanoseconds), children before parents
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            t = 10**18 + rng.randrange(10**17)
            os.utime(os.path.join(dirpath, name), ns=(t, t + 7), follow_symlinks=False)
    os.utime(root, ns=(1_234_567_890_123_456_789, 1_234_567_890_987_654_321))


# ---------------------------------------------------------------------------------------------
# cp -a, diff -r, tar

def test_cp_a_tree_diff_manifest_remount_rm(mounted, image, tmp_path):
    src = tmp_path / "src"
    make_tree(src)
    m_src = manifest(src)
    groups = link_groups(src)
    assert len(groups) == 2 and len(m_src) > 200
    before = os.statvfs(mounted)
    files_before = before.f_ffree

    sh("cp", "-a", src, mounted / "copy")
    copy = mounted / "copy"
    assert_same(m_src, manifest(copy), "cp -a source vs copy on daxfs")
    assert link_groups(copy) == groups
    diff_r(src, copy)
    diff_r(src, copy, "--no-dereference")
    assert sh("stat", "-c", "%h", copy / "links/hard1").stdout.strip() == b"3"
    assert sh("stat", "-c", "%h", copy / "many").stdout.strip() == b"8"   # 2 + 6 subdirs

    # cp does not leave a plain file sparse; the sparse file's holes stay holes
    for s in SIZES:
        st = os.stat(copy / f"sizes/f{s}")
        assert st.st_blocks * 512 >= st.st_size, (s, st.st_blocks)
    st = os.stat(copy / "sparse")
    assert st.st_size == SPARSE_SIZE
    assert st.st_blocks * 512 <= 64 * 1024, f"sparse copy occupies {st.st_blocks * 512} bytes"
    with open(copy / "sparse", "rb") as f:
        f.seek(SPARSE_OFF - 5)
        assert f.read(len(SPARSE_BYTES) + 10) == bytes(5) + SPARSE_BYTES + bytes(5)
    if shutil.which("getfattr"):
        out = sh("getfattr", "--absolute-names", "-n", "user.comment", copy / "xattrs/file").stdout
        assert b'user.comment="hello world"' in out

    m_copy = manifest(copy)
    remount_fsck(image, mounted)
    assert_same(m_copy, manifest(copy), "copy before unmount vs after remount")
    assert link_groups(copy) == groups
    diff_r(src, copy, "--no-dereference")

    # rm -r gives every block and inode back, exactly
    sh("rm", "-r", copy)
    assert os.listdir(mounted) == []
    got = wait_bfree(mounted, before.f_bfree)
    assert got == before.f_bfree, f"f_bfree {got} after rm -r, {before.f_bfree} before cp -a"
    # an empty directory's inode is freed when the kernel FORGETs it, a moment after rmdir
    assert wait_bfree(mounted, files_before, field="f_ffree") == files_before
    remount_fsck(image, mounted)
    st = os.statvfs(mounted)
    assert (st.f_bfree, st.f_ffree) == (before.f_bfree, files_before)


def test_tar_roundtrip_on_mount(mounted, image, tmp_path):
    src = tmp_path / "src"
    make_tree(src, seed=99)
    sh("cp", "-a", src, mounted / "copy")
    tar_c = ["tar", "--format=posix", "--xattrs", "--xattrs-include=user.*", "-S", "-cf", "-",
             "-C"]
    tar_x = ["tar", "--xattrs", "--xattrs-include=user.*", "-xpf", "-", "-C"]
    # reference: the same round trip on the host filesystem
    ref = tmp_path / "ref"
    ref.mkdir()
    pipe(tar_c + [src, "."], tar_x + [ref])
    # on daxfs: read from daxfs, write to daxfs
    (mounted / "tarx").mkdir()
    pipe(tar_c + [mounted / "copy", "."], tar_x + [mounted / "tarx"])
    m_ref = manifest(ref)
    m_tar = manifest(mounted / "tarx")
    assert_same(m_ref, m_tar, "tar round trip: host filesystem vs daxfs")
    assert link_groups(mounted / "tarx") == link_groups(ref)
    diff_r(mounted / "copy", mounted / "tarx", "--no-dereference")
    diff_r(src, mounted / "tarx")
    # and a tarball of the daxfs tree has the same members as one of the source (names only:
    # which name of a hard-linked file is stored as data and which as link follows readdir order)
    t1 = sh("tar", "--format=posix", "-cf", "-", "-C", src, ".").stdout
    t2 = sh("tar", "--format=posix", "-cf", "-", "-C", mounted / "tarx", ".").stdout
    (tmp_path / "t1.tar").write_bytes(t1)
    (tmp_path / "t2.tar").write_bytes(t2)
    l1 = sh("tar", "-tf", tmp_path / "t1.tar").stdout.splitlines()
    l2 = sh("tar", "-tf", tmp_path / "t2.tar").stdout.splitlines()
    assert sorted(l1) == sorted(l2)

    remount_fsck(image, mounted)
    assert_same(m_tar, manifest(mounted / "tarx"), "tar copy before unmount vs after remount")
    diff_r(ref, mounted / "tarx", "--no-dereference")


# ---------------------------------------------------------------------------------------------
# coreutils one by one, compared with the same commands on the host filesystem

def _run_both(roots, *cmd):
    """Run `cmd` in each root (cwd) and return the CompletedProcesses."""
    return [sh(*cmd, cwd=r) for r in roots]


def test_coreutils_namespace_and_attrs(mounted, image, tmp_path):
    ref = tmp_path / "ref"
    ref.mkdir()
    roots = [ref, mounted]
    rng = random.Random(7)
    data = {name: rng.randbytes(n) for name, n in
            [("f", 12345), ("x", 5000), ("y", 1), ("grow", 5000), ("shrink", 10000),
             ("zero", 4096 * 3 + 17)]}
    for r in roots:
        for d in ("a/dir/sub", "b", "c"):
            (r / d).mkdir(parents=True, exist_ok=True)
        for name, blob in data.items():
            (r / ("a/dir/" if name in "xy" else "a/") / name).write_bytes(blob)
    ino_f = os.stat(mounted / "a/f").st_ino
    ino_dir = os.stat(mounted / "a/dir").st_ino

    # mv: a file and a directory across directories
    _run_both(roots, "mv", "a/f", "b/f2")
    _run_both(roots, "mv", "a/dir", "b/")
    assert not (mounted / "a/f").exists() and not (mounted / "a/dir").exists()
    assert os.stat(mounted / "b/f2").st_ino == ino_f
    assert os.stat(mounted / "b/dir").st_ino == ino_dir
    assert (mounted / "b/f2").read_bytes() == data["f"]
    assert (mounted / "b/dir/x").read_bytes() == data["x"]
    assert (mounted / "b/dir/sub").is_dir()
    # ln, ln -s, stat -c %h
    _run_both(roots, "ln", "b/f2", "a/hard")
    _run_both(roots, "ln", "b/f2", "c/hard2")
    _run_both(roots, "ln", "-s", "../b/f2", "a/sym")
    _run_both(roots, "ln", "-s", "../b/dir", "a/symdir")
    sh("ln", "-s", mounted / "b/dir/x", mounted / "a/abssym")
    os.symlink(ref / "b/dir/x", ref / "a/abssym")
    assert sh("stat", "-c", "%h", mounted / "b/f2").stdout.strip() == b"3"
    assert sh("stat", "-c", "%h", mounted / "b").stdout.strip() == b"3"
    assert sh("stat", "-c", "%h", mounted / "a").stdout.strip() == b"2"
    assert (mounted / "a/sym").read_bytes() == data["f"]
    assert (mounted / "a/abssym").read_bytes() == data["x"]
    assert sorted(os.listdir(mounted / "a/symdir")) == ["sub", "x", "y"]
    assert os.readlink(mounted / "a/sym") == "../b/f2"
    # chmod, chown (chown clears set-uid on a regular file)
    _run_both(roots, "chmod", "4751", "b/f2")
    assert stat.S_IMODE(os.stat(mounted / "a/hard").st_mode) == 0o4751
    _run_both(roots, "chmod", "-R", "go-rwx", "b/dir")
    _run_both(roots, "chmod", "1777", "c")
    if have_root():
        _run_both(roots, "chown", "1000:1000", "b/f2")
        st = os.stat(mounted / "b/f2")
        assert (st.st_uid, st.st_gid) == (1000, 1000)
        assert not st.st_mode & stat.S_ISUID, oct(st.st_mode)
        _run_both(roots, "chown", "-h", "1000:1001", "a/sym")
        assert os.lstat(mounted / "a/sym").st_uid == 1000
        assert os.stat(mounted / "a/sym").st_uid == 1000          # the target, via the link
    # truncate: grow reads zeros, shrink then grow must not bring old bytes back
    _run_both(roots, "truncate", "-s", "100000", "a/grow")
    g = (mounted / "a/grow").read_bytes()
    assert g == data["grow"] + bytes(100000 - 5000)
    _run_both(roots, "truncate", "-s", "3001", "a/shrink")
    assert (mounted / "a/shrink").read_bytes() == data["shrink"][:3001]
    _run_both(roots, "truncate", "-s", "9000", "a/shrink")
    assert (mounted / "a/shrink").read_bytes() == data["shrink"][:3001] + bytes(9000 - 3001)
    _run_both(roots, "truncate", "-s", "+4097", "a/shrink")
    assert os.path.getsize(mounted / "a/shrink") == 9000 + 4097
    _run_both(roots, "truncate", "-s", "0", "a/zero")
    _run_both(roots, "truncate", "-s", "8192", "a/zero")
    assert (mounted / "a/zero").read_bytes() == bytes(8192)
    # the same names and attributes as on the host filesystem
    m_mnt = manifest(mounted, times=False)
    m_ref = manifest(ref, times=False)
    # the absolute symlinks name different roots by construction, and the roots' own
    # entries differ (owner/mode of the mountpoint vs a tmp dir)
    for m, r in ((m_mnt, mounted), (m_ref, ref)):
        assert m["a/abssym"]["target"] == str(r / "b/dir/x")
        for k in ("a/abssym", "."):
            del m[k]
    assert_same(m_ref, m_mnt, "coreutils on the host filesystem vs on daxfs")

    # touch -d with nanoseconds (TZ=UTC), also on a symlink itself
    want = calendar.timegm((2001, 2, 3, 4, 5, 6)) * 10**9 + 123456789
    sh("touch", "-d", "2001-02-03 04:05:06.123456789", mounted / "b/f2")
    st = os.stat(mounted / "b/f2")
    assert (st.st_mtime_ns, st.st_atime_ns) == (want, want)
    sh("touch", "-h", "-m", "-d", "2001-02-03 04:05:06.123456789", mounted / "a/sym")
    assert os.lstat(mounted / "a/sym").st_mtime_ns == want
    sh("touch", "-m", "-d", "1970-01-01 00:00:00.000000001", mounted / "b/dir/y")
    assert os.stat(mounted / "b/dir/y").st_mtime_ns == 1

    m_all = manifest(mounted)
    remount_fsck(image, mounted)
    assert os.stat(mounted / "b/f2").st_atime_ns == want           # before anything reads it
    assert_same(m_all, manifest(mounted), "after remount")
    assert os.stat(mounted / "b/f2").st_mtime_ns == want
    assert sh("stat", "-c", "%h", mounted / "a/hard").stdout.strip() == b"3"

    # rm -r of what is left, then the directory is empty and stays so
    sh("rm", "-r", mounted / "a", mounted / "b", mounted / "c")
    assert os.listdir(mounted) == []
    remount_fsck(image, mounted)
    assert os.listdir(mounted) == []


DD_OPS = [
    # (target, dd operands)
    ("t1", ["bs=777", "seek=13", "skip=3", "count=29", "conv=notrunc"]),
    ("t1", ["bs=4096", "seek=7", "count=3", "conv=notrunc"]),
    ("t1", ["bs=1", "seek=199990", "skip=11", "count=50", "conv=notrunc"]),     # past EOF
    ("t1", ["bs=65536", "seek=1", "skip=1", "count=1", "conv=notrunc"]),
    ("t1", ["bs=3", "seek=1001", "count=5", "conv=notrunc", "if=/dev/zero"]),
    ("t1", ["bs=4097", "seek=3", "skip=2", "count=4", "conv=notrunc,fsync"]),
    ("t2", ["bs=1000", "seek=5", "count=2"]),                                 # truncates at 5000
    ("t3", ["bs=4096", "seek=100", "count=1", "conv=notrunc"]),               # leaves a hole
    ("t3", ["bs=513", "seek=10", "count=3", "conv=notrunc"]),                 # fills in the hole
    ("t4", ["bs=1M", "count=3", "iflag=fullblock"]),                          # into a new file
    ("t4", ["bs=100000", "skip=7", "seek=11", "count=9", "conv=notrunc"]),
    ("t5", ["bs=1", "count=0", "seek=123457"]),                               # size only
]


def test_dd_matches_tmpfs(mounted, image, tmp_path):
    """The same dd commands on a host copy and on daxfs give byte-identical files."""
    ref = tmp_path / "ref"
    ref.mkdir()
    rng = random.Random(11)
    pat = tmp_path / "pattern"
    pat.write_bytes(rng.randbytes(4 * MiB))
    bases = {"t1": rng.randbytes(200000), "t2": rng.randbytes(30000), "t3": rng.randbytes(5)}
    for r in (ref, mounted):
        for name, blob in bases.items():
            (r / name).write_bytes(blob)
    for target, ops in DD_OPS:
        operands = list(ops)
        if not any(o.startswith("if=") for o in operands):
            operands.append(f"if={pat}")
        for r in (ref, mounted):
            sh("dd", f"of={r / target}", "status=none", *operands)
        a, b = (r / target for r in (ref, mounted))
        assert os.path.getsize(a) == os.path.getsize(b), (target, ops)
        assert a.read_bytes() == b.read_bytes(), f"dd {ops} into {target}: content differs"
    sums = {t: sha256(mounted / t) for t in ("t1", "t2", "t3", "t4", "t5")}
    assert (mounted / "t5").read_bytes() == bytes(123457)
    remount_fsck(image, mounted)
    for t, s in sums.items():
        assert sha256(mounted / t) == s == sha256(ref / t), t


# ---------------------------------------------------------------------------------------------
# df / du / statvfs

def test_statvfs_df_du(mounted, image, tmp_path):
    st0 = os.statvfs(mounted)
    assert st0.f_bsize == st0.f_frsize == 4096
    assert st0.f_namemax == 255
    assert st0.f_bfree == st0.f_bavail <= st0.f_blocks
    df = sh("df", "-B4096", "--output=size,used,avail", mounted).stdout.split()
    assert [int(v) for v in df[-3:]] == [st0.f_blocks, st0.f_blocks - st0.f_bfree, st0.f_bavail]

    sh("dd", "if=/dev/urandom", f"of={mounted / 'ten'}", "bs=1M", "count=10", "conv=fsync",
       "status=none")
    st1 = os.statvfs(mounted)
    assert st0.f_bfree - st1.f_bfree == 2560, (st0.f_bfree, st1.f_bfree)
    assert st0.f_bavail - st1.f_bavail == 2560
    assert st0.f_ffree - st1.f_ffree == 1
    st = os.stat(mounted / "ten")
    assert (st.st_size, st.st_blocks) == (10 * MiB, 10 * MiB // 512)
    assert sh("du", "-k", mounted / "ten").stdout.split()[0] == b"10240"
    assert sh("du", "-B1", mounted / "ten").stdout.split()[0] == str(10 * MiB).encode()
    assert sh("du", "-b", mounted / "ten").stdout.split()[0] == str(10 * MiB).encode()
    df = sh("df", "-B4096", "--output=used", mounted).stdout.split()
    assert int(df[-1]) == st1.f_blocks - st1.f_bfree

    # copies (within daxfs: maybe shared blocks; from outside: written) never look sparse
    sh("cp", mounted / "ten", mounted / "ten.copy")
    outside = tmp_path / "outside"
    outside.write_bytes(os.urandom(3 * MiB + 5))
    sh("cp", outside, mounted / "outside")
    for name in ("ten.copy", "outside"):
        st = os.stat(mounted / name)
        assert st.st_blocks * 512 >= st.st_size, (name, st.st_size, st.st_blocks)
    assert sha256(mounted / "ten.copy") == sha256(mounted / "ten")
    assert sha256(mounted / "outside") == sha256(outside)
    # a file with a hole: only the written block counts
    with open(mounted / "holey", "wb") as f:
        f.seek(5 * MiB)
        f.write(b"z")
    assert os.stat(mounted / "holey").st_blocks == 8
    assert sh("du", "-k", mounted / "holey").stdout.split()[0] == b"4"

    sums = {n: sha256(mounted / n) for n in ("ten", "ten.copy", "outside", "holey")}
    used = st0.f_bfree - os.statvfs(mounted).f_bfree
    remount_fsck(image, mounted)
    assert st0.f_bfree - os.statvfs(mounted).f_bfree == used
    assert {n: sha256(mounted / n) for n in sums} == sums
    sh("rm", mounted / "ten", mounted / "ten.copy", mounted / "outside", mounted / "holey")
    assert wait_bfree(mounted, st0.f_bfree) == st0.f_bfree
    assert os.statvfs(mounted).f_ffree == st0.f_ffree


# ---------------------------------------------------------------------------------------------
# errors as programs see them

def _errno_of(fn, *args) -> int:
    with pytest.raises(OSError) as ei:
        fn(*args)
    return ei.value.errno


def test_errors_seen_by_programs(mounted, image):
    m = mounted
    assert _errno_of(open, m / ("n" * 256), "w") == errno.ENAMETOOLONG
    assert _errno_of(open, m / ("é" * 128), "w") == errno.ENAMETOOLONG      # 256 bytes
    assert _errno_of(os.mkdir, m / ("d" * 256)) == errno.ENAMETOOLONG
    assert _errno_of(os.stat, m / ("s" * 256)) == errno.ENAMETOOLONG
    p = sh("touch", m / ("t" * 256), ok=(1,))
    assert b"File name too long" in p.stderr
    with open(m / ("n" * 255), "w") as f:                                   # 255 is fine
        f.write("ok")
    assert _errno_of(open, m / "missing" / "f", "w") == errno.ENOENT
    assert _errno_of(os.mkdir, m / "missing" / "d") == errno.ENOENT
    p = sh("cp", "/etc/hostname", m / "missing/x", ok=(1,))
    assert b"No such file or directory" in p.stderr
    (m / "full/sub").mkdir(parents=True)
    (m / "full/file").write_text("x")
    assert _errno_of(os.rmdir, m / "full") == errno.ENOTEMPTY
    p = sh("rmdir", m / "full", ok=(1,))
    assert b"Directory not empty" in p.stderr
    (m / "other").mkdir()
    assert _errno_of(os.rename, m / "other", m / "full") in (errno.ENOTEMPTY, errno.EEXIST)
    assert _errno_of(os.mkdir, m / "full") == errno.EEXIST
    assert _errno_of(os.unlink, m / "full") == errno.EISDIR
    assert _errno_of(open, m / "full/file/below", "w") == errno.ENOTDIR
    assert _errno_of(os.link, m / "full", m / "dirlink") == errno.EPERM
    assert _errno_of(os.rename, m / "full", m / "full/sub/inside") == errno.EINVAL
    assert _errno_of(os.rmdir, m / "full/file") == errno.ENOTDIR
    # the longest symlink target Linux allows (4095 bytes) round-trips
    target = "/".join(["x" * 254] * 16)[:4095]
    os.symlink(target, m / "longlink")
    assert os.readlink(m / "longlink") == target
    remount_fsck(image, m)
    assert os.readlink(m / "longlink") == target
    assert (m / ("n" * 255)).read_text() == "ok"
    assert sorted(os.listdir(m / "full")) == ["file", "sub"]
    assert sorted(os.listdir(m)) == sorted(["n" * 255, "full", "other", "longlink"])


def test_big_directory_ls_find_rm(mounted, image):
    """One directory with 3000 names: listings span many readdir calls (and rm -r unlinks while
    it reads), every name appears exactly once, and all inodes come back."""
    ffree0 = os.statvfs(mounted).f_ffree
    d = mounted / "big"
    d.mkdir()
    names = [f"entry-{i:05}-{'x' * (i % 200)}" for i in range(3000)]
    for n in names:
        (d / n).touch()
    listed = sh("ls", "-f", "-A", d).stdout.decode().splitlines()
    assert sorted(listed) == sorted(names)
    found = sh("find", d, "-type", "f").stdout.decode().splitlines()
    assert len(found) == len(set(found)) == 3000
    assert sh("stat", "-c", "%h", d).stdout.strip() == b"2"
    remount_fsck(image, mounted)
    assert sorted(os.listdir(d)) == sorted(names)
    sh("rm", "-r", d)
    assert not d.exists()
    deadline = time.monotonic() + 10
    while os.statvfs(mounted).f_ffree != ffree0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert os.statvfs(mounted).f_ffree == ffree0


def test_write_drops_security_capability(mounted, image):
    """The kernel asks for security.capability before every write (file_remove_privs); the
    libfuse hook answers that in C while no inode has one. Once one exists the question must
    reach the engine, and a write must drop the capability as on ext4."""
    import struct
    blob = struct.pack("<IIIII", 0x02000000, 1 << 10, 0, 0, 0)   # VFS_CAP_REVISION_2
    plain, capped = mounted / "plain", mounted / "capped"
    plain.write_bytes(b"p" * 100)
    capped.write_bytes(b"c" * 100)
    with pytest.raises(OSError) as ei:
        os.getxattr(plain, "security.capability")
    assert ei.value.errno == errno.ENODATA
    os.setxattr(capped, "security.capability", blob)
    assert os.getxattr(capped, "security.capability") == blob
    remount_fsck(image, mounted)                    # the engine finds it again at mount
    assert os.getxattr(capped, "security.capability") == blob
    with open(capped, "r+b") as f:
        f.write(b"w")
    with pytest.raises(OSError) as ei:
        os.getxattr(capped, "security.capability")
    assert ei.value.errno == errno.ENODATA
    with open(plain, "r+b") as f:
        f.write(b"w")
    assert plain.read_bytes() == b"w" + b"p" * 99


def _fast_counts(mnt) -> tuple[int, int, int]:
    import json
    st = json.loads(daxfs_cli("stat", "--json", mnt).stdout)
    return (st["fast_requests"], st["drained_requests"],
            st["dp_reads_served"] + st["dp_writes_served"])


@pytest.mark.parametrize("opts", ["threads=0", "threads=0,spin_us=0", None],
                         ids=["python-spin", "python-spin-off", "data-plane"])
def test_direct_io_goes_through_the_fast_path_and_the_drain(mounted, image, opts):
    """With the data plane (the default) C threads answer the reads and the in-place writes;
    without it (threads=0) read/write are answered from the hook (no pyfuse3 coroutine), and
    with spinning on, back-to-back requests are served by polling /dev/fuse instead of a trio
    round trip. The data must be exactly what a byte model says, every way, and after a
    remount."""
    if opts is not None:
        umount(mounted)
        mount(image, mounted, "-o", opts)
    f0, d0, c0 = _fast_counts(mounted)
    p = mounted / "direct"
    rng = random.Random(7)
    model = bytearray(os.urandom(256 * 4096))
    p.write_bytes(model)
    import mmap
    buf = mmap.mmap(-1, 4096)
    fd = os.open(p, os.O_RDWR | os.O_DIRECT)
    try:
        for _ in range(1500):
            off = rng.randrange(256) * 4096
            if rng.random() < 0.5:
                buf[:] = os.urandom(4096)
                assert os.pwrite(fd, buf, off) == 4096
                model[off:off + 4096] = buf[:]
            else:
                assert os.preadv(fd, [buf], off) == 4096
                assert buf[:] == model[off:off + 4096], f"direct read at {off}"
    finally:
        os.close(fd)
    f1, d1, c1 = _fast_counts(mounted)
    if opts is None:
        assert c1 - c0 >= 1490, (c0, c1)       # all but the first read and write
    else:
        assert c1 == c0 == 0
        assert f1 - f0 >= 1500, (f0, f1)
        if "spin_us=0" in opts:
            assert d1 == d0 == 0
        else:
            assert d1 - d0 > 300, f"only {d1 - d0} of 1500 requests came in through the drain"
    umount(mounted)
    mount(image, mounted)
    assert p.read_bytes() == model
