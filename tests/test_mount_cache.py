"""The kernel's page cache on a daxfs mount (issue 12; daxfs/daemon/kcache.py), in both the
default mode and `-o writeback`: data written through write(2) stays cached (page residency read
with mincore(2) by a child process that maps the file: no timing), across attribute refreshes
and reopens; the cache stays coherent where the daemon changes data (copy_file_range into a file
another process has mapped, PUNCH_HOLE / ZERO_RANGE under a second cached descriptor, dedupe, an
O_DIRECT writer under a child's mapping) and where it changes attributes behind the kernel's
back (setuid cleared by a direct write); the mount's bdi limits; in writeback mode buffered
writes are merged, and a kill -9 of the daemon keeps what fsync flushed."""
from __future__ import annotations

import ctypes
import json
import mmap
import os
import stat
import subprocess
import shutil
import sys
import uuid
from pathlib import Path

import pytest

from conftest import (check_fsck, daxfs_cli, finish_mount, force_cleanup, have_fuse, have_root,
                      is_mounted, mount, remount, umount)
from test_mount_mmap import Agent, apply, assert_bytes, clone_range, kill9_daemon, pread_all
from test_dataplane import stats
from test_posix import CAP_VALUE, as_user

pytestmark = pytest.mark.skipif(not have_fuse(), reason="needs /dev/fuse and fusermount3")

BS = 4096
MiB = 1 << 20
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10
STATX_MODE = 0x2
MODES = ["default", "writeback"]

# A child maps the file and asks mincore(2) which pages are resident: mapping alone faults
# nothing in, so the answer is the page cache as it was.
RESIDENT = r"""
import ctypes, mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
n = os.fstat(fd).st_size
pages = -(-n // mmap.PAGESIZE)
if not n:
    print(0); sys.exit()
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
addr = libc.mmap(None, n, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
vec = (ctypes.c_ubyte * pages)()
assert libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(n), vec) == 0, ctypes.get_errno()
print(sum(v & 1 for v in vec))
"""


def resident_pages(path) -> int:
    p = subprocess.run([sys.executable, "-c", RESIDENT, str(path)], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return int(p.stdout)


def pages_of(path) -> int:
    return -(-os.stat(path).st_size // BS)


def fast_requests(mnt) -> int:
    """Reads and writes the daemon served: the fast path's counter in user.daxfs.stats, plus
    the C data plane's (dp_reads_served, dp_writes_served) where the daemon has one."""
    st = json.loads(os.getxattr(str(mnt), "user.daxfs.stats"))
    return st["fast_requests"] + st.get("dp_reads_served", 0) + st.get("dp_writes_served", 0)


def statx_mode(path) -> int:
    """st_mode by statx(STATX_MODE) alone: the kernel refreshes only attributes it knows stale,
    so this shows what it has cached for the mode."""
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(256)
    AT_FDCWD = -100
    r = libc.syscall(332, AT_FDCWD, os.fsencode(str(path)), 0, STATX_MODE, buf)   # SYS_statx
    assert r == 0, os.strerror(ctypes.get_errno())
    return int.from_bytes(buf.raw[28:30], "little")


def fallocate(fd: int, mode: int, off: int, length: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    if libc.fallocate(fd, mode, off, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def write_file(path, data: bytes, chunk: int = 64 * 1024) -> None:
    """Many write(2) calls, as programs write."""
    with open(path, "wb", buffering=0) as f:
        for i in range(0, len(data), chunk):
            f.write(data[i:i + chunk])


@pytest.fixture(params=MODES)
def cmount(request, image):
    """(mountpoint, mode, options, agents) of a live mount in each mode (allow_other, in a
    world-traversable directory, for the tests that write as another user); unmounted and
    fsck'ed afterwards."""
    mode = request.param
    base = Path("/dev/shm") / f"daxfs-cache-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    base.mkdir(mode=0o755)
    os.chmod(base, 0o755)
    mnt = base / "mnt"
    mnt.mkdir()
    opts = ("-o", "allow_other" + (",writeback" if mode == "writeback" else ""))
    try:
        mount(image, mnt, *opts)
    except BaseException:
        force_cleanup(image, mnt)
        shutil.rmtree(base, ignore_errors=True)
        raise
    started: list[Agent] = []
    try:
        yield mnt, mode, opts, started
        for a in started:
            a.kill()
        finish_mount(image, mnt)
    finally:
        for a in started:
            a.kill()
        if is_mounted(mnt):
            force_cleanup(image, mnt)
        shutil.rmtree(base, ignore_errors=True)


def agent(cm, path) -> Agent:
    a = Agent(path)
    cm[3].append(a)
    return a


# ---------------------------------------------------------------------------------------------
# kept

def test_written_data_stays_cached_across_stat_and_reopen(cmount):
    """What write(2) stored is in the page cache afterwards, still after the attribute refresh
    that stat makes (it used to drop every page: FUSE_CAP_AUTO_INVAL_DATA saw a new mtime) and
    after close + open (keep_cache); reading it back and mapping it ask the daemon nothing.
    Anyone's `echo 3 > /proc/sys/vm/drop_caches` (the exerciser does it) empties the cache
    between two steps, so a failed round is tried again, three rounds in all: the old behaviour
    fails every round."""
    mnt, mode, _, _ = cmount
    failures = []
    for attempt in range(3):
        why = _cached_round(mnt, mnt / f"f{attempt}")
        if why is None:
            return
        failures.append(why)
    raise AssertionError("; ".join(failures))


def _cached_round(mnt, p) -> str | None:
    data = os.urandom(16 * MiB)
    write_file(p, data)
    pages = len(data) // BS
    assert os.stat(p).st_size == len(data)              # an attribute refresh (GETATTR)
    if (n := resident_pages(p)) != pages:
        return f"{n} of {pages} pages cached after write + stat"
    with open(p, "rb") as f:                            # a new open
        os.fstat(f.fileno())
    if (n := resident_pages(p)) != pages:
        return f"{n} of {pages} pages cached after a new open"
    before = fast_requests(mnt)
    assert_bytes(p.read_bytes(), data, "read(2) after writing")
    a = Agent(p)
    try:
        assert_bytes(a.read(0, len(data)), data, "a child's mapping after writing")
    finally:
        a.kill()
    if (n := fast_requests(mnt) - before):
        return f"reading just-written data took {n} reads from the daemon"
    # a second write changes the size and mtime again: the pages stay (the new partial page
    # is cached only in writeback mode: write-through caches whole pages only)
    with open(p, "ab") as f:
        f.write(b"tail")
    assert os.stat(p).st_size == len(data) + 4
    if (n := resident_pages(p)) < pages:
        return f"{n} of {pages} pages cached after an append"
    return None


# ---------------------------------------------------------------------------------------------
# coherent where the daemon changes data

def test_copy_file_range_into_a_cached_file_mapped_by_another_process(cmount):
    mnt, mode, _, _ = cmount
    src, dst = mnt / "src", mnt / "dst"
    sdata, ddata = os.urandom(64 * BS), os.urandom(64 * BS)
    write_file(src, sdata)
    write_file(dst, ddata)
    assert resident_pages(dst) == 64                    # the destination is cached
    a = agent(cmount, dst)
    assert a.read(0, len(ddata)) == ddata
    model = bytearray(ddata)
    cases = [(0, 8 * BS, 16 * BS), (BS + 100, 30 * BS + 7, 5 * BS + 3), (40 * BS, 50 * BS, 8 * BS)]
    fd = os.open(dst, os.O_RDWR)
    try:
        for off_in, off_out, n in cases:
            clone_range(src, fd, off_in, off_out, n)
            apply(model, off_out, sdata[off_in:off_in + n])
            assert_bytes(a.read(0, len(model)), bytes(model),
                         f"the child's mapping after copy_file_range {off_in}->{off_out}+{n}")
            assert_bytes(pread_all(fd, len(model)), bytes(model), "read(2) on the same fd")
    finally:
        os.close(fd)
    assert_bytes(dst.read_bytes(), bytes(model), "a new open")


@pytest.mark.parametrize("kind", ["punch", "zero", "zero-extend"])
def test_punch_and_zero_under_a_second_cached_descriptor(cmount, kind):
    mnt, mode, _, _ = cmount
    p = mnt / "f"
    data = os.urandom(32 * BS)
    write_file(p, data)
    model = bytearray(data)
    reader = os.open(p, os.O_RDONLY)
    writer = os.open(p, os.O_RDWR)
    try:
        assert pread_all(reader, len(data)) == data
        assert resident_pages(p) == 32
        flags = {"punch": FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                 "zero": FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
                 "zero-extend": FALLOC_FL_ZERO_RANGE}[kind]
        ranges = [(3 * BS, 4 * BS), (9 * BS + 100, 2 * BS + 50), (20 * BS + 5, 10)]
        if kind == "zero-extend":
            ranges.append((30 * BS + 1, 4 * BS))        # past EOF: the file grows
        for off, n in ranges:
            # unflushed data next to the range (writeback mode: dirty pages)
            os.pwrite(writer, b"next-to-it", off + n)
            apply(model, off + n, b"next-to-it")
            fallocate(writer, flags, off, n)
            apply(model, off, bytes(n))
            assert os.fstat(reader).st_size == len(model)
            assert_bytes(pread_all(reader, len(model)), bytes(model),
                         f"the second descriptor after {kind} {off}+{n}")
    finally:
        os.close(reader)
        os.close(writer)
    assert_bytes(p.read_bytes(), bytes(model), "a new open")


def test_dedupe_keeps_cached_and_mapped_data_right(cmount):
    """dedupe remaps blocks of equal bytes behind the kernel's back: nothing it caches changes;
    afterwards a write to one file (a COW break) is seen there and not in the other."""
    mnt, mode, _, _ = cmount
    data = os.urandom(MiB)
    a_path, b_path = mnt / "a", mnt / "b"
    write_file(a_path, data)
    write_file(b_path, data)
    os.sync()                                           # writeback mode: flush for dedupe
    assert resident_pages(b_path) == MiB // BS
    m = agent(cmount, b_path)
    assert m.read(0, MiB) == data
    p = daxfs_cli("dedupe", mnt)
    assert int(p.stdout.split()[-2]) == MiB, p.stdout
    assert_bytes(m.read(0, MiB), data, "b's mapping after dedupe")
    with open(a_path, "r+b", buffering=0) as f:
        f.seek(5 * BS + 3)
        f.write(b"only-in-a")
        os.fsync(f.fileno())
    model = bytearray(data)
    apply(model, 5 * BS + 3, b"only-in-a")
    m.write(9 * BS, b"only-in-b")
    m.call("msync")
    bmodel = bytearray(data)
    apply(bmodel, 9 * BS, b"only-in-b")
    assert_bytes(a_path.read_bytes(), bytes(model), "a after its write")
    assert_bytes(b_path.read_bytes(), bytes(bmodel), "b after the write to a")
    for path in (a_path, b_path):
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)    # what the daemon holds
        os.close(fd)
    assert_bytes(a_path.read_bytes(), bytes(model), "a from the daemon")
    assert_bytes(b_path.read_bytes(), bytes(bmodel), "b from the daemon")


def test_o_direct_writer_under_a_childs_mapping(cmount):
    mnt, mode, _, _ = cmount
    p = mnt / "f"
    data = os.urandom(16 * BS)
    write_file(p, data)
    model = bytearray(data)
    m = agent(cmount, p)
    assert m.read(0, len(data)) == data
    m.write(2 * BS + 1, b"dirty-in-map")            # unsynced store next to the direct write
    apply(model, 2 * BS + 1, b"dirty-in-map")
    buf = mmap.mmap(-1, 2 * BS)
    fd = os.open(p, os.O_WRONLY | os.O_DIRECT)
    try:
        for off in (4 * BS, 10 * BS, 15 * BS):
            new = os.urandom(2 * BS)
            buf[:] = new
            assert os.pwrite(fd, buf, off) == 2 * BS
            apply(model, off, new)
            assert_bytes(m.read(0, len(data)), bytes(model[:len(data)]),
                         f"the mapping after an O_DIRECT write at {off}")
    finally:
        os.close(fd)
        buf.close()
    assert_bytes(p.read_bytes(), bytes(model), "read(2) after the direct writes")
    m.call("msync")
    dfd = os.open(p, os.O_RDONLY | os.O_DIRECT)
    rbuf = mmap.mmap(-1, len(model))
    try:
        assert os.preadv(dfd, [rbuf], 0) == len(model)
        assert_bytes(bytes(rbuf), bytes(model), "an O_DIRECT read of it all")
    finally:
        os.close(dfd)
        rbuf.close()


# ---------------------------------------------------------------------------------------------
# attributes the daemon changes behind the kernel's back

@pytest.mark.skipif(not have_root(), reason="needs root (a write as another user)")
@pytest.mark.parametrize("direct", [True, False], ids=["o_direct", "buffered"])
def test_setuid_cleared_by_a_write_is_seen_by_statx_mode(cmount, direct):
    """A write by a user without CAP_FSETID clears setuid. On the direct path the daemon does it
    (FUSE_WRITE_KILL_SUIDGID) and must tell the kernel, which only marks size and times stale:
    statx(STATX_MODE) would show the old mode until the attribute timeout (an hour)."""
    mnt, mode, _, _ = cmount
    p = mnt / "suid"
    write_file(p, os.urandom(4 * BS))
    os.chmod(p, 0o4777)
    assert statx_mode(p) & stat.S_ISUID

    def write_as_user():
        fd = os.open(p, os.O_WRONLY | (os.O_DIRECT if direct else 0))
        b = mmap.mmap(-1, BS)
        b[:] = b"x" * BS
        try:
            return os.pwrite(fd, b, BS)
        finally:
            os.close(fd)

    assert as_user(write_as_user) == BS
    assert not statx_mode(p) & stat.S_ISUID, oct(statx_mode(p))
    assert not os.stat(p).st_mode & stat.S_ISUID


def test_buffered_writes_ask_for_no_capability_each(cmount):
    """FUSE_HANDLE_KILLPRIV_V2 (_fusehook.c): the superblock is SB_NOSEC, so the kernel asks
    getxattr("security.capability") once per inode, not before every write through its page
    cache (a second round trip per write(2) in the default mode, the only one with -o writeback)."""
    mnt, mode, _, _ = cmount
    assert stats(mnt)["killpriv_v2"] == 1
    before = stats(mnt)["dp_capability_getxattrs"]
    fd = os.open(mnt / "f", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        for i in range(200):
            assert os.pwrite(fd, b"x" * BS, (i * 7 % 200) * BS) == BS
        os.fsync(fd)
    finally:
        os.close(fd)
    assert stats(mnt)["dp_capability_getxattrs"] - before <= 2
    assert (mnt / "f").read_bytes() == b"x" * (200 * BS)


NOSEC_OPS = {
    "write": lambda fd, src: os.pwrite(fd, b"z", 0),
    "ftruncate": lambda fd, src: os.ftruncate(fd, 100),
    "fallocate": lambda fd, src: os.posix_fallocate(fd, 0, 5 * BS),
    "copy_file_range_target": lambda fd, src: os.copy_file_range(src, fd, BS, 0, 0),
}


@pytest.mark.skipif(not have_root(), reason="needs root (security.capability, another user)")
def test_capability_set_on_a_checked_inode_still_goes(cmount):
    """With SB_NOSEC (above) an inode the kernel once checked is not checked again: a
    security.capability set afterwards must still go at the next write, truncate, fallocate
    or copy into the file by another user, as on ext4. Two guards overlap here: the VFS ends
    S_NOSEC on a security.* setxattr, and the daemon drops the xattr on each of these requests
    (FUSE_HANDLE_KILLPRIV_V2's contract, which a kernel may rely on alone)."""
    mnt, mode, _, _ = cmount
    kept = []
    for op, fn in sorted(NOSEC_OPS.items()):
        p, src = mnt / f"nosec_{op}", mnt / f"src_{op}"
        write_file(src, os.urandom(2 * BS))
        write_file(p, os.urandom(2 * BS))
        os.chmod(p, 0o666)
        fd = os.open(p, os.O_WRONLY)
        os.pwrite(fd, b"y", 0)              # a write after the chmod: the inode is S_NOSEC now
        os.close(fd)
        os.setxattr(p, "security.capability", CAP_VALUE)

        def as_other():
            fd, s = os.open(p, os.O_WRONLY), os.open(src, os.O_RDONLY)
            try:
                fn(fd, s)
                os.fsync(fd)
            finally:
                os.close(fd)
                os.close(s)

        as_user(as_other)
        if "security.capability" in os.listxattr(p):
            kept.append(op)
    assert kept == []


# ---------------------------------------------------------------------------------------------
# the bdi

@pytest.mark.skipif(not have_root(), reason="needs root (sysfs)")
def test_bdi_limits_raised_at_mount(cmount):
    mnt = cmount[0]
    dev = os.stat(mnt).st_dev
    bdi = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}")
    assert int((bdi / "max_ratio").read_text()) == 50
    if (bdi / "strict_limit").exists():
        assert int((bdi / "strict_limit").read_text()) == 0


@pytest.mark.skipif(not have_root(), reason="needs root (sysfs)")
def test_bdi_max_ratio_option(image, mnt):
    mount(image, mnt, "-o", "bdi_max_ratio=0")
    try:
        dev = os.stat(mnt).st_dev
        bdi = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}")
        assert int((bdi / "max_ratio").read_text()) == 1          # the kernel's FUSE default
        remount(image, mnt, "-o", "bdi_max_ratio=20")
        dev = os.stat(mnt).st_dev
        bdi = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}")
        assert int((bdi / "max_ratio").read_text()) == 20
    finally:
        umount(mnt)


@pytest.mark.skipif(not have_root(), reason="needs root (to become another user)")
def test_bdi_without_root_logs_what_it_costs(cmount):
    """A daemon that is not root cannot write the bdi's sysfs files: one warning line that says
    so and what it costs."""
    mnt = cmount[0]
    if cmount[1] != "default":
        pytest.skip("one mode is enough")

    def as_nobody():
        import logging
        from daxfs.daemon import kcache
        lines = []
        h = logging.Handler()
        h.emit = lambda r: lines.append((r.levelname, r.getMessage()))
        logging.disable(logging.NOTSET)             # whatever earlier tests left configured
        kcache.log.disabled = False
        kcache.log.setLevel(logging.INFO)
        kcache.log.addHandler(h)
        return kcache.set_bdi_limits(str(mnt), 50), lines

    ok, lines = as_user(as_nobody)
    assert ok is False
    assert len(lines) == 1 and lines[0][0] == "WARNING", lines
    assert "not root" in lines[0][1] and "throttled to the daemon's request rate" in lines[0][1]


# ---------------------------------------------------------------------------------------------
# writeback mode

def test_writeback_merges_buffered_writes(image, mnt):
    mount(image, mnt, "-o", "writeback")
    try:
        before = fast_requests(mnt)
        with open(mnt / "f", "wb", buffering=0) as f:
            for i in range(256):
                f.write(os.urandom(BS))              # 256 write(2) calls of 4 KiB
            os.fsync(f.fileno())
        requests = fast_requests(mnt) - before
        assert requests <= 16, f"256 writes of 4 KiB became {requests} WRITE requests"
        assert os.stat(mnt / "f").st_size == MiB
    finally:
        umount(mnt)
    check_fsck(image)


def test_default_mode_writes_through(image, mnt):
    """The counterpart of the test above: without -o writeback each write(2) is one request."""
    mount(image, mnt)
    try:
        before = fast_requests(mnt)
        with open(mnt / "f", "wb", buffering=0) as f:
            for i in range(64):
                f.write(os.urandom(BS))
        assert fast_requests(mnt) - before >= 64
    finally:
        umount(mnt)


def test_writeback_kill9_keeps_fsynced_data(image, mnt):
    """kill -9 of the daemon in writeback mode: what fsync (and close) flushed survives; what was
    only in the page cache may be lost, but nothing else is damaged and fsck is clean."""
    mount(image, mnt, "-o", "writeback")
    synced, closed = os.urandom(2 * MiB), os.urandom(MiB)
    late = os.urandom(MiB)
    try:
        with open(mnt / "closed", "wb") as f:
            f.write(closed)                             # close flushes (FUSE flush)
        fd = os.open(mnt / "f", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, synced, 0)
            os.fsync(fd)
            os.pwrite(fd, late, MiB // 2)                # not flushed: may be lost
            kill9_daemon(image, mnt)
        finally:
            try:
                os.close(fd)
            except OSError:
                pass                                    # ENOTCONN: the daemon is gone
    finally:
        if is_mounted(mnt):
            force_cleanup(image, mnt)
    check_fsck(image)
    mount(image, mnt, "-o", "writeback")
    try:
        assert (mnt / "closed").read_bytes() == closed
        got = (mnt / "f").read_bytes()
        assert len(got) == len(synced)
        assert got[:MiB // 2] == synced[:MiB // 2] and got[3 * MiB // 2:] == synced[3 * MiB // 2:]
        mid = got[MiB // 2:3 * MiB // 2]
        for i in range(0, MiB, BS):                     # each page: the old or the new bytes
            assert mid[i:i + BS] in (synced[MiB // 2 + i:MiB // 2 + i + BS], late[i:i + BS]), i
    finally:
        umount(mnt)
    check_fsck(image)


def test_mount_options_writeback_and_dax_exclude_each_other(image, mnt):
    p = daxfs_cli("mount", image, mnt, "-o", "writeback,dax", check=False)
    assert p.returncode != 0 and "exclude" in p.stderr
    assert not is_mounted(mnt)
