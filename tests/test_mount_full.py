"""Image full under load (issue "Prove crash consistency"), on a 64 MiB image:

* concurrent writers (three dd's: 1 MiB buffered, 4 KiB O_DIRECT, 64 KiB with conv=fsync; a
  Python writer of 10000-byte records with fsync; a `cp` of a file bigger than the image) fill
  it: each must stop with ENOSPC, never EIO; statvfs then reports ~0 free; the daemon log holds
  no ERROR/Traceback; files written and fsync'ed before are intact and every acknowledged byte
  of the writers reads back; deleting the fill gives back every block and inode; a new file
  can be written; the `mounted` fixture unmounts and requires `daxfs fsck` to exit 0;
* the image fills during COW breaks: two processes write into disjoint blocks of a fresh clone
  (cp = reflink) until ENOSPC; the clone holds exactly the writes that succeeded, the source is
  unchanged, an overwrite of a block the clone already owns still works on the full image, a
  COW break does not, and once the fill is deleted COW breaks work again.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import daemon_log, fresh_image, have_fuse
from harness.kill_mount import fsync_path, log_problems, wait_free, write_fsync

pytestmark = pytest.mark.skipif(not have_fuse(), reason="needs /dev/fuse and fusermount3")

BS = 4096
MiB = 1 << 20
IMAGE_SIZE = "64M"
ENOSPC_TEXT = "No space left on device"
EIO_TEXT = "Input/output error"

# A writer process: `fill PATH` appends 10000-byte records (fsync every 8th) until an error;
# `cow PATH PARITY SEED NBLOCKS` overwrites, in a seeded order, every block of PATH whose index
# has that parity until an error. Prints {"errno": name or null, "done": [...]}: the byte
# counts write(2) acknowledged, or the blocks pwrite(2) wrote.
WRITER = r"""
import errno, hashlib, json, os, random, sys
mode, path = sys.argv[1], sys.argv[2]
done, err = [], None
try:
    if mode == "fill":
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        rec = bytes(range(250)) * 40
        for i in range(10**9):
            done.append(os.write(fd, rec))
            if i % 8 == 7:
                os.fsync(fd)
    else:
        parity, seed, nblocks = map(int, sys.argv[3:])
        fd = os.open(path, os.O_WRONLY)
        blocks = [b for b in range(nblocks) if b % 2 == parity]
        random.Random(seed).shuffle(blocks)
        for b in blocks:
            data = hashlib.shake_128(repr((seed, b)).encode()).digest(4096)
            assert os.pwrite(fd, data, b * 4096) == 4096
            done.append(b)
except OSError as e:
    err = errno.errorcode.get(e.errno, str(e.errno))
print(json.dumps({"errno": err, "done": done}))
"""
FILL_RECORD = bytes(range(250)) * 40


def cow_block(seed: int, b: int) -> bytes:
    return hashlib.shake_128(repr((seed, b)).encode()).digest(BS)


@pytest.fixture
def image(tmp_path_factory):
    """A fresh 64 MiB image (overrides conftest's 256 MiB one, so `mounted` mounts it)."""
    yield from fresh_image(tmp_path_factory, IMAGE_SIZE, "full")


def free(mnt) -> tuple[int, int]:
    st = os.statvfs(mnt)
    return st.f_bfree, st.f_ffree


def wait_room(mnt, timeout: float = 10.0) -> None:
    """Wait until statvfs shows free blocks again after an unlink: the blocks of an unlinked
    file come back when its last handle is released, and FUSE sends RELEASE after close(2)
    of a writer's fd returned (asynchronously), so a write right after can still get ENOSPC."""
    deadline = time.monotonic() + timeout
    while os.statvfs(mnt).f_bavail == 0:
        assert time.monotonic() < deadline, f"no free block {timeout} s after the unlink"
        time.sleep(0.005)


def start_writer(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(procs: dict[str, subprocess.Popen], timeout: float = 180) -> dict[str, tuple]:
    """Wait for every program: name -> (exit status, stdout, stderr)."""
    deadline = time.monotonic() + timeout
    out = {}
    for name, p in procs.items():
        try:
            so, se = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            so, se = p.communicate()
            raise AssertionError(f"{name} did not finish in {timeout} s (hung on a full image?)")
        out[name] = (p.returncode, so, se)
    return out


def assert_enospc(name: str, result: tuple) -> dict | None:
    """A program stopped by the full image: ENOSPC, never EIO. Returns a writer's report."""
    rc, so, se = result
    assert EIO_TEXT not in se and "Traceback" not in se, f"{name}: {se}"
    if name.startswith("python"):
        rep = json.loads(so.strip().splitlines()[-1])
        assert rep["errno"] == "ENOSPC", f"{name}: stopped by {rep['errno']}"
        return rep
    assert rc != 0, f"{name} finished without running out of space: {se}"
    assert ENOSPC_TEXT in se, f"{name}: exit {rc}, stderr: {se}"
    return None


def assert_clean_log(mnt) -> None:
    bad = log_problems(daemon_log(mnt))
    assert not bad, "daemon log reports errors:\n" + "\n".join(bad[:20])


def test_concurrent_writers_fill_the_image_enospc_never_eio(mounted, image, tmp_path):
    m = mounted
    assert os.statvfs(m).f_blocks * BS <= 64 * MiB, "not the small image"
    fresh = free(m)
    (m / "kept").mkdir()
    kept = {f"kept/f{i}": os.urandom(n) for i, n in enumerate([0, 4097, 100_000, 3 * MiB])}
    for rel, data in kept.items():
        write_fsync(m / rel, data)
    fsync_path(m / "kept")
    before_fill = free(m)
    big = tmp_path / "bigger-than-the-image"
    big.write_bytes(os.urandom(72 * MiB))

    procs = {
        "dd bs=1M": ["dd", "if=/dev/zero", f"of={m}/dd-1M", "bs=1M"],
        "dd bs=4k oflag=direct": ["dd", "if=/dev/zero", f"of={m}/dd-4k", "bs=4k", "oflag=direct"],
        "dd bs=64k conv=fsync": ["dd", "if=/dev/urandom", f"of={m}/dd-64k", "bs=64k",
                                 "conv=fsync"],
        "cp": ["cp", str(big), f"{m}/cp-copy"],
    }
    procs = {n: subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n, c in procs.items()}
    procs["python fill"] = start_writer("fill", m / "py-fill")
    results = finish(procs)
    reports = {n: assert_enospc(n, r) for n, r in results.items()}

    st = os.statvfs(m)
    assert st.f_bavail <= 8, f"the writers stopped, yet {st.f_bavail} blocks are free"
    assert_clean_log(m)
    for rel, data in kept.items():
        assert (m / rel).read_bytes() == data, f"{rel}: fsync'ed before the fill, now differs"
    # every byte the writers were told was written is there
    want = b"".join(FILL_RECORD[:n] for n in reports["python fill"]["done"])
    assert (m / "py-fill").read_bytes() == want
    got = (m / "cp-copy").read_bytes()
    assert got == big.read_bytes()[:len(got)], "cp-copy is not a prefix of its source"
    for name in ("dd-1M", "dd-4k"):
        data = (m / name).read_bytes()
        assert len(data) == os.stat(m / name).st_size and not any(data), name
    assert len((m / "dd-64k").read_bytes()) == os.stat(m / "dd-64k").st_size

    for name in ("dd-1M", "dd-4k", "dd-64k", "cp-copy", "py-fill"):
        os.unlink(m / name)
    wait_free(m, before_fill)
    write_fsync(m / "after", b"written after the image was full\n" * 1000)
    assert (m / "after").read_bytes() == b"written after the image was full\n" * 1000
    for rel in [*kept, "after"]:
        os.unlink(m / rel)
    os.rmdir(m / "kept")
    wait_free(m, fresh)
    assert_clean_log(m)


def test_image_fills_during_cow_breaks_of_a_clone(mounted, image):
    m = mounted
    fresh = free(m)
    src = os.urandom(24 * MiB)
    write_fsync(m / "src", src)
    subprocess.run(["cp", str(m / "src"), str(m / "clone")], check=True, timeout=60)
    nblocks = len(src) // BS
    model = bytearray(src)
    owned = [3, 1000, 4001]                     # broken out (owned by the clone) before the fill
    with open(m / "clone", "r+b") as f:
        for b in owned:
            f.seek(b * BS)
            f.write(b"o" * BS)
            model[b * BS:(b + 1) * BS] = b"o" * BS
        f.flush()
        os.fsync(f.fileno())
    # fill all but ~2 MiB, then let COW breaks of the clone take the rest
    room = os.statvfs(m).f_bavail * BS // MiB - 2
    subprocess.run(["dd", "if=/dev/zero", f"of={m}/fill", "bs=1M", f"count={room}",
                    "conv=fsync"], check=True, capture_output=True, timeout=120)
    left = os.statvfs(m).f_bavail
    writers = {f"python cow {par}": start_writer("cow", m / "clone", par, 11 + par, nblocks)
               for par in (0, 1)}
    results = finish(writers)
    for name, r in results.items():
        rep = assert_enospc(name, r)
        par = int(name[-1])
        for b in rep["done"]:
            model[b * BS:(b + 1) * BS] = cow_block(11 + par, b)
    broken = sum(len(json.loads(r[1])["done"]) for r in results.values())
    assert broken == left, f"{left} free blocks, but {broken} COW breaks succeeded"
    assert os.statvfs(m).f_bavail == 0
    assert_clean_log(m)

    assert (m / "src").read_bytes() == src, "the source of the clone changed"
    assert (m / "clone").read_bytes() == bytes(model), "the clone is not exactly its writes"
    fd = os.open(m / "clone", os.O_WRONLY)
    try:
        # a block the clone owns is overwritten in place: no allocation, works on a full image
        assert os.pwrite(fd, b"in place" * 512, owned[1] * BS) == BS
        model[owned[1] * BS:(owned[1] + 1) * BS] = b"in place" * 512
        shared = next(b for b in range(nblocks) if model[b * BS:(b + 1) * BS]
                      == src[b * BS:(b + 1) * BS] and b not in owned)
        with pytest.raises(OSError) as ei:
            os.pwrite(fd, b"c" * BS, shared * BS)
        assert ei.value.errno == 28, f"COW break on a full image: {ei.value}"
        os.unlink(m / "fill")
        wait_room(m)
        assert os.pwrite(fd, b"c" * BS, shared * BS) == BS     # room again: the break works
        model[shared * BS:(shared + 1) * BS] = b"c" * BS
        os.fsync(fd)
    finally:
        os.close(fd)
    assert (m / "clone").read_bytes() == bytes(model)
    assert (m / "src").read_bytes() == src
    os.unlink(m / "clone")
    os.unlink(m / "src")
    wait_free(m, fresh)
    assert_clean_log(m)


def test_unlink_gives_space_back_before_the_kernel_forgets(mounted, image):
    """df is exact right after unlink(2)/close(2) returns: the kernel's lookup reference lives
    a few ms longer (until FUSE_FORGET), but with no open handle the data is unreachable, so
    its blocks are freed at once; an open handle keeps them until its close."""
    m = mounted
    fresh = free(m)[0]
    for name in ("a", "b"):
        write_fsync(m / name, os.urandom(4 << 20))
    used = fresh - free(m)[0]
    assert used >= 2048
    os.unlink(m / "a")
    assert fresh - free(m)[0] <= used - 1024, "unlink of a closed file freed nothing yet"
    fd = os.open(m / "b", os.O_RDONLY)
    os.unlink(m / "b")
    assert fresh - free(m)[0] >= 1024, "an open file's blocks were freed before its close"
    assert len(os.pread(fd, 4096, 0)) == 4096
    os.close(fd)
    # FUSE sends RELEASE asynchronously after close(2) returns: allow it a moment
    deadline = time.monotonic() + 5
    while free(m)[0] < fresh - 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert free(m)[0] >= fresh - 4, "close of the last handle of an unlinked file freed nothing"
