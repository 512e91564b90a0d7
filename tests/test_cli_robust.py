"""Issue 9 #17 and "no traceback for a bad input": reflink of sparse files, no stacked mounts,
a daemon killed by SIGBUS leaves a line in its log, `daxfs stat | head` exits quietly, a
corrupt field fsck now knows about, and a sweep of bad inputs that must each give one line."""
from __future__ import annotations

import os
import subprocess
import time

import pytest

from conftest import (DAXFS, daemon_log, daxfs_cli, force_cleanup, have_fuse, have_root, mount,
                      umount)
from daxfs import format as fmt
from test_cli import one_line_error, tmpfs_at, wait_stale

needs_fuse = pytest.mark.skipif(not have_fuse(), reason="needs /dev/fuse and fusermount3")
needs_root = pytest.mark.skipif(not have_root(), reason="needs root")
BS = fmt.BLOCK_SIZE


@needs_fuse
def test_reflink_of_a_sparse_source(mounted):
    """9 blocks of size, 2 of them data: holes are not counted as 'not shared'."""
    src = mounted / "sparse"
    with open(src, "wb") as f:
        f.write(b"a" * BS)
        f.seek(5 * BS)
        f.write(b"b" * 100)
        f.truncate(9 * BS - 10)
    p = daxfs_cli("reflink", src, mounted / "dst")
    assert "2 blocks shared" in p.stdout, p.stdout
    assert (mounted / "dst").read_bytes() == src.read_bytes()
    empty = mounted / "holes-only"
    with open(empty, "wb") as f:
        f.truncate(5 * BS)
    daxfs_cli("reflink", empty, mounted / "dst2")
    assert (mounted / "dst2").stat().st_size == 5 * BS


@needs_fuse
@needs_root
def test_mount_refuses_a_mountpoint_that_is_already_one(image, tmp_path):
    with tmpfs_at(tmp_path / "t", "size=1M") as t:
        one_line_error(daxfs_cli("mount", image, t, check=False), "already a mount point")
        assert not any(e.fstype == "fuse.daxfs" for e in _mounts_on(t))


def _mounts_on(path):
    from daxfs.daemon import proc_mounts
    return [e for e in proc_mounts() if e.target == os.path.realpath(path)]


@needs_fuse
def test_concurrent_mounts_of_two_images_do_not_stack(tmp_path, mnt, tmp_path_factory):
    imgs = []
    for i in range(2):
        p = tmp_path / f"i{i}.img"
        daxfs_cli("mkfs", p, "--size", "16M")
        imgs.append(str(p))
    try:
        for _round in range(3):
            procs = [subprocess.Popen([str(DAXFS), "mount", img, str(mnt), "-o",
                                       f"log={tmp_path}/log{k}"], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
                     for k, img in enumerate(imgs)]
            results = [(p.wait(60), p.stderr.read()) for p in procs]
            for p in procs:
                p.stdout.close()
                p.stderr.close()
            ok = [r for r in results if r[0] == 0]
            assert len(ok) == 1, results
            assert len(_mounts_on(mnt)) == 1, _mounts_on(mnt)
            for code, err in results:
                if code:
                    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
            umount(mnt)
    finally:
        for img in imgs:
            force_cleanup(img, mnt)


@needs_fuse
def test_daemon_killed_by_sigbus_leaves_a_log_line(image, mnt):
    """Shrink the image under the daemon: its next store into the mapping is a SIGBUS."""
    mount(image, mnt)
    try:
        g = fmt.parse_superblock(open(image, "rb").read(BS), os.path.getsize(image))[1]
        os.truncate(image, g.data_start * BS)
        try:
            with open(mnt / "f", "wb") as f:
                f.write(os.urandom(1 << 20))
                f.flush()
                os.fsync(f.fileno())
        except OSError:
            pass
        assert wait_stale(mnt), "the daemon survived a store past the end of its image"
        deadline = time.monotonic() + 10
        text = ""
        while time.monotonic() < deadline and "Bus error" not in text:
            text = daemon_log(mnt).read_text(errors="replace")
            time.sleep(0.1)
        assert "Fatal Python error: Bus error" in text, text[-2000:]
    finally:
        force_cleanup(image, mnt)


def test_stat_into_a_closed_pipe_exits_quietly(tmp_path):
    img = tmp_path / "a.img"
    daxfs_cli("mkfs", img, "--size", "16M")
    r, w = os.pipe()
    os.close(r)
    try:
        p = subprocess.run([str(DAXFS), "stat", str(img)], stdout=w, stderr=subprocess.PIPE,
                           text=True, timeout=60)
    finally:
        os.close(w)
    assert p.stderr == "", p.stderr
    assert p.returncode != 0


@needs_fuse
def test_huge_directory_size_found_by_fsck_and_the_mount_gives_a_clean_eio(image, mnt):
    """The root's size field >= 2**63: fsck said clean and every access gave EIO with a
    traceback in the daemon's log. Now fsck finds and repairs it; before the repair the
    mount answers EIO without a traceback."""
    g = fmt.parse_superblock(open(image, "rb").read(BS), os.path.getsize(image))[1]
    off = g.region("inodes")[0] + fmt.ROOT_INO * fmt.INODE_DTYPE.itemsize \
        + fmt.INODE_DTYPE.fields["size"][1]
    with open(image, "r+b") as f:
        f.seek(off)
        f.write((1 << 63).to_bytes(8, "little"))
    assert daxfs_cli("fsck", image, check=False).returncode == 4
    mount(image, mnt)
    try:
        with pytest.raises(OSError):
            os.listdir(mnt)
        daxfs_cli("umount", mnt, check=False)     # the failsafe leaves it not marked clean
    finally:
        force_cleanup(image, mnt)
    assert "Traceback" not in daemon_log(mnt).read_text()
    assert daxfs_cli("fsck", image, "--repair", check=False).returncode == 1
    daxfs_cli("fsck", image)
    mount(image, mnt)
    try:
        assert os.listdir(mnt) == [] and os.stat(mnt).st_size == 0
        umount(mnt)
    finally:
        force_cleanup(image, mnt)


BAD_INPUTS = [
    ("stat", "{plain}"), ("stat", "{dir}"), ("stat", "{missing}"), ("stat", "/dev/null"),
    ("info", "{dir}"), ("info", "{plain}"), ("info", "/dev/null"), ("fsck", "{dir}"),
    ("reflink", "{dir}", "{tmp}/x"), ("reflink", "{plain}", "/nonexistent/x"),
    ("reflink", "{missing}", "{tmp}/x"), ("mkfs", "{tmp}/x.img", "--size", "-1"),
    ("mkfs", "{tmp}/x.img", "--size", "1e400"), ("mkfs", "{tmp}/x.img", "--size", "16M",
                                                   "--inodes", "99999999999999"),
    ("mkfs", "{tmp}/x.img", "--size", "99999T", "--sparse"), ("mkfs", "{dir}", "--size", "16M"),
    ("mount", "{plain}", "{dir}"), ("mount", "{missing}", "{dir}"),
    ("mount", "{image}", "{dir}", "-o", "log=/nonexistent/d/x.log"),
    ("mount", "{image}", "{dir}", "-o", "max_tasks=abc"), ("mount", "{image}", "{plain}"),
    ("umount", ""), ("umount", "{plain}"), ("umount", "{missing}"),
]


@pytest.mark.parametrize("args", BAD_INPUTS, ids=lambda a: " ".join(a))
def test_bad_input_gives_one_line_and_no_traceback(tmp_path, args):
    (tmp_path / "plain").write_text("hello\n")
    (tmp_path / "dir").mkdir()
    img = tmp_path / "image.img"
    daxfs_cli("mkfs", img, "--size", "16M")
    subs = {"plain": tmp_path / "plain", "dir": tmp_path / "dir", "tmp": tmp_path,
            "missing": tmp_path / "missing", "image": img}
    argv = [a.format(**subs) for a in args]
    p = daxfs_cli(*argv, check=False, timeout=60)
    assert p.returncode != 0
    assert "Traceback" not in p.stderr + p.stdout
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert not (tmp_path / "x.img").exists(), "a failed mkfs left a file behind"
