"""`daxfs dedupe` (issue 11): identical blocks of separately written files come to share one
frame; `df` gains the space, both files read back unchanged, a write breaks sharing for one
block only, fsck is clean after a remount; a request the daemon cannot verify changes nothing."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import daxfs_cli, have_fuse, remount, sha256

pytestmark = pytest.mark.skipif(not have_fuse(), reason="needs /dev/fuse and fusermount3")

BS = 4096
MiB = 1 << 20


def test_two_identical_files_share_after_dedupe(mounted, image):
    size = 64 * MiB
    data = os.urandom(MiB)
    for name in ("a", "b"):
        with open(mounted / name, "wb") as f:
            for _ in range(size // MiB):
                f.write(data + b"")                    # two separate writes of the same bytes
    (mounted / "d").mkdir()
    with open(mounted / "d" / "c", "wb") as f:         # partly equal: half of a, then noise
        f.write(data * 4 + os.urandom(4 * MiB))
    sums = {n: sha256(mounted / n) for n in ("a", "b", "d/c")}
    used0 = os.statvfs(mounted)
    p = daxfs_cli("dedupe", mounted)
    assert p.stdout.strip().splitlines()[-1].startswith("deduplicated ")
    gained = int(p.stdout.split()[-2])
    st = os.statvfs(mounted)
    assert (st.f_bfree - used0.f_bfree) * BS == gained
    # every 1 MiB chunk repeats: all of a but one chunk's 256 blocks, b and c's first 4 MiB
    assert gained >= (size + size + 4 * MiB - MiB) - MiB, gained
    assert {n: sha256(mounted / n) for n in sums} == sums
    with open(mounted / "b", "r+b") as f:              # a COW break of one block
        f.seek(10 * BS)
        f.write(b"z" * BS)
    assert (os.statvfs(mounted).f_bfree - st.f_bfree) == -1
    assert sha256(mounted / "a") == sums["a"]
    remount(image, mounted)
    assert sha256(mounted / "a") == sums["a"] and sha256(mounted / "d/c") == sums["d/c"]


def test_dedupe_request_of_different_bytes_changes_nothing(mounted):
    (mounted / "x").write_bytes(b"x" * (4 * BS))
    (mounted / "y").write_bytes(b"y" * (4 * BS))
    free = os.statvfs(mounted).f_bfree
    ino = os.stat(mounted / "x").st_ino
    os.setxattr(mounted / "y", "user.daxfs.dedupe", json.dumps([[ino, 0, 0, 4 * BS]]).encode())
    assert (mounted / "y").read_bytes() == b"y" * (4 * BS)
    assert os.statvfs(mounted).f_bfree == free
    with pytest.raises(OSError):                       # unaligned: EINVAL, one line, no trace
        os.setxattr(mounted / "y", "user.daxfs.dedupe", json.dumps([[ino, 1, 0, BS]]).encode())
    p = subprocess.run([str(daxfs_cli.__globals__["DAXFS"]), "dedupe", "/nonexistent"],
                       capture_output=True, text=True)
    assert p.returncode != 0 and "Traceback" not in p.stderr
