"""util-linux conventions: `mkfs -t daxfs` and `fsck -t daxfs` run mkfs.daxfs / fsck.daxfs
with mkfs(8)'s and fsck(8)'s arguments and exit codes; progress shows on a terminal only."""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from daxfs.progress import Progress

BIN = Path(sys.executable).parent
ENV = dict(os.environ, PATH=f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}")


def run(*cmd) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=ENV,
                          timeout=120)


@pytest.fixture
def img(tmp_path):
    p = Path("/dev/shm") / f"daxfs-fstools-{os.getpid()}-{tmp_path.name}.img"
    yield p
    p.unlink(missing_ok=True)


@pytest.mark.skipif(not shutil.which("mkfs") or not shutil.which("fsck"),
                    reason="needs util-linux mkfs and fsck")
def test_mkfs_t_and_fsck_t_find_daxfs(img):
    subprocess.run(["truncate", "-s", "64M", str(img)], check=True)
    p = run("mkfs", "-t", "daxfs", img)                  # keeps the file's size
    assert p.returncode == 0, p.stderr
    assert img.stat().st_size == 64 << 20
    p = run("fsck", "-t", "daxfs", img)
    assert p.returncode == 0, p.stdout + p.stderr
    p = run("fsck", "-t", "daxfs", "-a", img)            # automatic repair: nothing to do
    assert p.returncode == 0, p.stdout + p.stderr
    img.write_bytes(b"not an image")                     # fsck(8) status 8: operational error
    p = run("fsck", "-t", "daxfs", "-n", img)
    assert p.returncode == 8 and "Traceback" not in p.stderr


def test_mkfs_daxfs_takes_a_size_in_blocks(img):
    p = run(BIN / "mkfs.daxfs", img, str(32 * 1024))      # 32 MiB in 1 KiB blocks
    assert p.returncode == 0, p.stderr
    assert img.stat().st_size == 32 << 20
    assert run(BIN / "fsck.daxfs", "-n", img).returncode == 0
    assert run(BIN / "fsck.daxfs", "-y", img).returncode == 0


@pytest.mark.parametrize("cmd,args,code", [
    ("mkfs.daxfs", ["--bogus", "x"], 2), ("mkfs.daxfs", [], 2),
    ("mkfs.daxfs", ["x", "lots"], 2), ("fsck.daxfs", ["-Q", "x"], 16),
    ("fsck.daxfs", [], 16), ("fsck.daxfs", ["--nope", "x"], 16)])
def test_bad_command_lines_are_one_line_and_fsck_usage_code(cmd, args, code):
    p = run(BIN / cmd, *args)
    assert p.returncode == code
    assert "Traceback" not in p.stderr and p.stderr.strip()


def test_progress_only_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True
    quiet, tty = io.StringIO(), Tty()
    for stream in (quiet, tty):
        p = Progress("fsck", stream, every=0)
        p.show(1, 4, "inodes")
        p.done()
    assert quiet.getvalue() == ""
    assert "fsck:  25% inodes" in tty.getvalue() and tty.getvalue().endswith("\r\033[K")
