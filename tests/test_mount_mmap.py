"""mmap from ordinary programs on a real daxfs mount.

The mapping always lives in ANOTHER process: a child Python (the "agent", `AGENT` below) that
maps the file with `mmap` and obeys one JSON command per line on its stdin (write / read /
msync / munmap / fsync / touch / raw access past EOF inside the EOF page), answering one JSON
line each. Every answer is a handshake: when `call()` returns, the child has done the access.
Meanwhile this process uses read(2)/write(2), truncate, copy_file_range and fallocate through
its own descriptors.

Covered: MAP_SHARED coherence both ways; msync / munmap+fsync durability (across a clean
remount and across a SIGKILL of the daemon while the writer still holds its mapping);
MAP_PRIVATE writes never reaching the file; truncation under a mapping (SIGBUS past EOF, zeroed
tail, regrown part reads zeros); COW breaks from mmap writes into a reflinked file (1000 random
pages, exact byte model and exact `shared_blocks` drop); page cache invalidation after
server-side changes (copy_file_range into a cached / mapped file, PUNCH_HOLE) and clones FROM a
file with unsynced mapped stores (copy_file_range, cp); a store into the shared EOF block of a
cp'd file, then growing both; fio's mmap engine (randwrite/randread, verify across remount).
The `mounted` fixture unmounts and runs `daxfs fsck` after every test; the daemon log must hold
no ERROR/CRITICAL/Traceback.
"""
from __future__ import annotations

import base64
import ctypes
import json
import mmap
import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import daemon_log, have_fuse, is_mounted, mount, remount, wait_unlocked
from daxfs.daemon import lock_holder

pytestmark = pytest.mark.skipif(not have_fuse(), reason="needs /dev/fuse and fusermount3")

BS = 4096
assert mmap.PAGESIZE == BS
MiB = 1 << 20
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
OLD_MTIME_NS = 946684800 * 10**9                    # 2000-01-01, far before any write here


# ---------------------------------------------------------------------------------------------
# the child that holds the mapping

AGENT = r"""
import base64, json, mmap, os, sys
path, kind, length = sys.argv[1], sys.argv[2], int(sys.argv[3])
fd = os.open(path, os.O_RDWR)
flags = mmap.MAP_PRIVATE if kind == "private" else mmap.MAP_SHARED
m = mmap.mmap(fd, length, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
def reply(**kw):
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()
reply(ok=True, pid=os.getpid(), size=len(m))
for line in sys.stdin:
    c = json.loads(line)
    op = c["op"]
    if op == "write":
        for off, b64 in c["w"]:
            data = base64.b64decode(b64)
            m[off:off + len(data)] = data
        reply(ok=True)
    elif op == "read":
        reply(ok=True, data=base64.b64encode(m[c["off"]:c["off"] + c["n"]]).decode())
    elif op in ("rawwrite", "rawread"):  # past len(m), i.e. past EOF, inside the EOF page
        import ctypes
        base = ctypes.addressof(ctypes.c_char.from_buffer(m))
        n = len(base64.b64decode(c["data"])) if op == "rawwrite" else c["n"]
        eop = -(-len(m) // mmap.PAGESIZE) * mmap.PAGESIZE
        assert 0 <= c["off"] and c["off"] + n <= eop, (c["off"], n, eop)
        if op == "rawwrite":
            ctypes.memmove(base + c["off"], base64.b64decode(c["data"]), n)
            reply(ok=True)
        else:
            reply(ok=True, data=base64.b64encode(ctypes.string_at(base + c["off"], n)).decode())
    elif op == "touch":                 # one load from the mapping: may die of SIGBUS
        reply(ok=True, byte=m[c["off"]])
    elif op == "msync":
        m.flush()                       # msync(MS_SYNC) over the whole mapping
        reply(ok=True)
    elif op == "munmap":
        m.close()
        reply(ok=True)
    elif op == "fsync":
        os.fsync(fd)
        reply(ok=True)
    elif op == "exit":
        break
"""


class Agent:
    """A child process holding `path` mapped (MAP_SHARED, or MAP_PRIVATE with kind="private")."""

    def __init__(self, path, kind: str = "shared", length: int = 0):
        env = {k: v for k, v in os.environ.items() if k != "PYTHONFAULTHANDLER"}
        self.path = path
        self.p = subprocess.Popen([sys.executable, "-c", AGENT, str(path), kind, str(length)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, env=env)
        self.buf = b""
        hello = self._recv()
        if hello is None:
            raise AssertionError(f"mmap agent for {path} failed to start: {self._death()}")
        self.size = hello["size"]

    def _death(self) -> str:
        rc = self.p.wait(10)
        return f"exit status {rc}, stderr: {self.p.stderr.read().decode(errors='replace')!r}"

    def _recv(self, timeout: float = 30.0) -> dict | None:
        """One answer line, or None when the child is gone (EOF)."""
        deadline = time.monotonic() + timeout
        fd = self.p.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise AssertionError(f"mmap agent on {self.path} did not answer in {timeout}s")
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def try_call(self, op: str, **kw) -> dict | None:
        try:
            self.p.stdin.write(json.dumps(dict(op=op, **kw)).encode() + b"\n")
            self.p.stdin.flush()
        except BrokenPipeError:
            return None
        return self._recv()

    def call(self, op: str, **kw) -> dict:
        r = self.try_call(op, **kw)
        if r is None:
            raise AssertionError(f"mmap agent died during {op}: {self._death()}")
        return r

    def write(self, off: int, data: bytes) -> None:
        self.writes([(off, data)])

    def writes(self, pairs) -> None:
        self.call("write", w=[(off, base64.b64encode(d).decode()) for off, d in pairs])

    def read(self, off: int, n: int) -> bytes:
        return base64.b64decode(self.call("read", off=off, n=n)["data"])

    def exit(self) -> int:
        self.try_call("exit")
        return self.p.wait(30)

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait(30)
        for f in (self.p.stdin, self.p.stdout, self.p.stderr):
            try:
                f.close()
            except OSError:
                pass


@pytest.fixture
def agents(mounted):
    """agents(path, kind="shared", length=0) starts a mapping child; all are killed before the
    mount is torn down (a live mapping would keep the unmount busy)."""
    started: list[Agent] = []

    def start(path, kind: str = "shared", length: int = 0) -> Agent:
        a = Agent(path, kind, length)
        started.append(a)
        return a

    yield start
    for a in started:
        a.kill()


# ---------------------------------------------------------------------------------------------
# helpers

def stats(mnt) -> dict:
    return json.loads(os.getxattr(str(mnt), "user.daxfs.stats"))


def assert_clean_log(mnt) -> None:
    log = daemon_log(mnt)
    text = log.read_text(errors="replace")
    bad = [ln for ln in text.splitlines()
           if " ERROR " in ln or " CRITICAL " in ln or "Traceback" in ln]
    assert not bad, f"daemon log {log} reports errors:\n" + "\n".join(bad[:20])


def image_contains(image, needle: bytes) -> bool:
    """Whether `needle` is anywhere in the image: it reached the daemon's mapping."""
    return needle in Path(image).read_bytes()


def pread_all(fd: int, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = os.pread(fd, n - len(out), len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def apply(model: bytearray, off: int, data: bytes) -> None:
    if off + len(data) > len(model):
        model.extend(bytes(off + len(data) - len(model)))
    model[off:off + len(data)] = data


def first_diff(got: bytes, want: bytes) -> str:
    if len(got) != len(want):
        return f"length {len(got)} != {len(want)}"
    i = next(i for i in range(len(got)) if got[i] != want[i])
    return (f"first difference at byte {i} (page {i // BS}): got {got[i:i + 16].hex()} "
            f"want {want[i:i + 16].hex()}")


def assert_bytes(got: bytes, want: bytes, what: str) -> None:
    if got != want:
        raise AssertionError(f"{what}: {first_diff(got, want)}")


def clone_range(src, dst_fd: int, off_in: int, off_out: int, length: int) -> None:
    with open(src, "rb") as s:
        done = 0
        while done < length:
            n = os.copy_file_range(s.fileno(), dst_fd, length - done, off_in + done,
                                   off_out + done)
            assert n > 0, "copy_file_range returned 0 before the end of the source range"
            done += n


def punch_hole(fd: int, off: int, length: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    if libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def kill9_daemon(image, mnt) -> None:
    """SIGKILL the daemon of `image` (the holder of its lock) and lazily detach the dead mount."""
    pid = lock_holder(os.path.realpath(image))
    assert pid and pid != os.getpid()
    os.kill(pid, signal.SIGKILL)
    assert wait_unlocked(image, 15), f"daemon {pid} still holds {image} after SIGKILL"
    p = subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, text=True,
                       timeout=30)
    assert p.returncode == 0, p.stderr
    assert not is_mounted(mnt)


# ---------------------------------------------------------------------------------------------
# MAP_SHARED coherence with read(2)/write(2) in another process

def test_child_mmap_writes_are_seen_by_read_in_parent(mounted, image, agents):
    p = mounted / "f"
    data = os.urandom(8 * BS)
    p.write_bytes(data)
    fd = os.open(p, os.O_RDONLY)
    try:
        assert pread_all(fd, len(data)) == data                 # parent's page cache is warm
        a = agents(p)
        marker = b"MMAP-MARKER-" + os.urandom(52)                # unique in the whole image
        writes = [(0, marker), (BS - 5, b"<cross-page>"), (5 * BS + 123, os.urandom(300)),
                  (3 * BS, os.urandom(BS)), (8 * BS - 7, b"the end")]
        model = bytearray(data)
        for off, d in writes:
            apply(model, off, d)
        a.writes(writes)
        # no msync yet: one kernel inode, one page cache -> read(2) sees the stores at once
        assert_bytes(pread_all(fd, len(data)), bytes(model), "read(2) on the old fd, no msync")
        assert_bytes(p.read_bytes(), bytes(model), "read(2) on a new open, no msync")
        a.call("msync")
        # after msync(MS_SYNC) the daemon has the bytes: they are in the image itself
        assert image_contains(image, marker), "msync returned but the bytes never reached daxfs"
        assert_bytes(pread_all(fd, len(data)), bytes(model), "read(2) after msync")
        assert os.stat(p).st_size == len(data)
        assert a.exit() == 0
    finally:
        os.close(fd)
    remount(image, mounted)
    assert_bytes(p.read_bytes(), bytes(model), "after remount")
    assert_clean_log(mounted)


def test_parent_writes_are_seen_in_child_mapping(mounted, image, agents):
    p = mounted / "f"
    data = os.urandom(6 * BS)
    p.write_bytes(data)
    a = agents(p)
    assert a.read(0, len(data)) == data                         # every page faulted in
    model = bytearray(data)
    fd = os.open(p, os.O_WRONLY)
    try:
        for off, d in [(10, b"pwrite-1"), (2 * BS - 3, b"across-pages"), (4 * BS, os.urandom(BS)),
                       (6 * BS - 1, b"Z")]:
            assert os.pwrite(fd, d, off) == len(d)
            apply(model, off, d)
            # the pipe round trip orders the child's load after our write(2)
            assert_bytes(a.read(0, len(data)), bytes(model), f"mapping after pwrite at {off}")
        # interleaved in one page: child store, parent write, both visible to both sides
        a.write(BS + 100, b"child-store")
        apply(model, BS + 100, b"child-store")
        assert os.pwrite(fd, b"parent-write", BS + 200) == 12
        apply(model, BS + 200, b"parent-write")
        assert_bytes(a.read(0, len(data)), bytes(model), "mapping after interleaving")
        assert_bytes(p.read_bytes(), bytes(model), "read(2) after interleaving")
    finally:
        os.close(fd)
    with open(p, "r+b") as f:                                  # a fresh descriptor
        f.seek(3 * BS + 17)
        f.write(b"through a new fd")
    apply(model, 3 * BS + 17, b"through a new fd")
    assert_bytes(a.read(0, len(data)), bytes(model), "mapping after write on a new fd")
    a.call("msync")
    assert a.exit() == 0
    remount(image, mounted)
    assert_bytes(p.read_bytes(), bytes(model), "after remount")
    assert_clean_log(mounted)


# ---------------------------------------------------------------------------------------------
# durability: msync, munmap + fsync

@pytest.mark.parametrize("end", ["exit-remount", "kill9-while-mapped"])
@pytest.mark.parametrize("how", ["msync", "munmap+fsync"])
def test_mmap_writes_are_durable_after_msync_or_fsync(mounted, image, agents, how, end):
    """Two files: one with allocated blocks (in-place overwrite), one sparse (made by truncate,
    so every mmap store fills a hole in the daemon). With kill9-while-mapped the writer is still
    alive, mapping and descriptor open, when the daemon is SIGKILLed: only msync/fsync can have
    made the bytes durable (no close-time flush happened)."""
    rng = random.Random(f"{how}-{end}")
    full, sparse = mounted / "full", mounted / "sparse"
    data = rng.randbytes(16 * BS)
    full.write_bytes(data)
    with open(sparse, "wb") as f:
        f.truncate(16 * BS)
    models = {full: bytearray(data), sparse: bytearray(16 * BS)}
    kids = {}
    for path in (full, sparse):
        os.utime(path, ns=(OLD_MTIME_NS, OLD_MTIME_NS))
        pages = rng.sample(range(16), 6)
        writes = [(pg * BS + rng.randrange(BS - 300), rng.randbytes(rng.randrange(1, 300)))
                  for pg in pages] + [(15 * BS + BS - 9, b"last-page")]
        for off, d in writes:
            apply(models[path], off, d)
        a = kids[path] = agents(path)
        a.writes(writes)
        if how == "msync":
            a.call("msync")
        else:
            a.call("munmap")
            a.call("fsync")
    if end == "exit-remount":
        for a in kids.values():
            assert a.exit() == 0
        remount(image, mounted)
    else:
        kill9_daemon(image, mounted)
        for a in kids.values():
            a.kill()
        mount(image, mounted)
    for path, model in models.items():
        assert_bytes(path.read_bytes(), bytes(model), f"{path.name} ({how}, {end})")
        st = os.stat(path)
        assert st.st_size == 16 * BS
        # POSIX: a MAP_SHARED store marks mtime for update no later than the next msync
        assert st.st_mtime_ns > OLD_MTIME_NS, f"{path.name}: mtime not updated by mmap stores"
    assert_clean_log(mounted)


def test_map_private_writes_never_reach_the_file(mounted, image, agents):
    p = mounted / "f"
    data = os.urandom(8 * BS)
    p.write_bytes(data)
    os.utime(p, ns=(OLD_MTIME_NS, OLD_MTIME_NS))
    a = agents(p, "private")
    marker = b"PRIVATE-MARKER-" + os.urandom(49)
    writes = [(0, marker), (BS - 2, b"cross"), (7 * BS, os.urandom(BS))]
    mine = bytearray(data)
    for off, d in writes:
        apply(mine, off, d)
    a.writes(writes)
    assert_bytes(a.read(0, len(data)), bytes(mine), "the private mapping sees its own stores")
    assert_bytes(p.read_bytes(), data, "read(2) while the private mapping is dirty")
    a.call("msync")                                             # no effect on MAP_PRIVATE
    a.call("munmap")
    a.call("fsync")
    assert a.exit() == 0
    assert_bytes(p.read_bytes(), data, "read(2) after the private writer exited")
    assert not image_contains(image, marker), "a MAP_PRIVATE store reached the image"
    remount(image, mounted)
    assert_bytes(p.read_bytes(), data, "after remount")
    assert os.stat(p).st_mtime_ns == OLD_MTIME_NS, "MAP_PRIVATE stores changed the mtime"
    assert_clean_log(mounted)


# ---------------------------------------------------------------------------------------------
# truncation under a mapping

def test_truncate_mapped_file_sigbus_past_eof_and_regrow_reads_zeros(mounted, image, agents):
    p = mounted / "f"
    data = os.urandom(4 * BS)
    p.write_bytes(data)
    a = agents(p)
    assert a.read(0, 4 * BS) == data
    os.truncate(p, BS)
    assert_bytes(a.read(0, BS), data[:BS], "page 0 through the mapping after truncate")
    r = a.try_call("touch", off=3 * BS + 5)
    assert r is None, f"load from page 3 of a 1-page file returned {r} instead of SIGBUS"
    rc = a.p.wait(10)
    assert rc == -signal.SIGBUS, f"child ended with {rc}, expected death by SIGBUS (-7)"
    assert os.stat(p).st_size == BS
    assert_bytes(p.read_bytes(), data[:BS], "file after truncate + SIGBUS")
    os.truncate(p, 4 * BS)
    want = data[:BS] + bytes(3 * BS)
    assert_bytes(p.read_bytes(), want, "regrown file")
    b = agents(p)
    assert_bytes(b.read(0, 4 * BS), want, "regrown file through a new mapping")
    assert b.exit() == 0
    remount(image, mounted)
    assert_bytes(p.read_bytes(), want, "regrown file after remount")
    assert_clean_log(mounted)


@pytest.mark.parametrize("sync_before_grow", [True, False], ids=["msync", "dirty"])
def test_truncate_mid_page_mapped_tail_is_zero_and_stores_past_eof_stay_invisible(
        mounted, image, agents, sync_before_grow):
    """ext4 semantics (xfstests generic/363, fsx): after truncating to mid-page, the mapped bytes
    past EOF in the EOF page read zero; stores there (allowed: same page) never become file data,
    not even when the file is grown again afterwards."""
    p = mounted / "f"
    data = os.urandom(4 * BS)
    p.write_bytes(data)
    a = agents(p)
    assert a.read(0, 4 * BS) == data
    size = BS + 100
    os.truncate(p, size)
    assert_bytes(a.read(0, 2 * BS), data[:size] + bytes(2 * BS - size),
                 "EOF page through the mapping after truncate to mid-page")
    a.write(BS + 200, b"G" * 50)                                 # past EOF, inside the EOF page
    a.write(BS + 10, b"in-file")
    model = bytearray(data[:size])
    apply(model, BS + 10, b"in-file")
    if sync_before_grow:
        a.call("msync")
    assert_bytes(p.read_bytes(), bytes(model), "file after stores past EOF")
    os.truncate(p, 3 * BS)
    model.extend(bytes(3 * BS - size))
    assert_bytes(p.read_bytes(), bytes(model), "regrown file (bytes past the old EOF)")
    assert_bytes(a.read(0, 3 * BS), bytes(model), "regrown file through the old mapping")
    r = a.try_call("touch", off=3 * BS + 1)
    assert r is None, f"load from page 3 of a 3-page file returned {r} instead of SIGBUS"
    assert a.p.wait(10) == -signal.SIGBUS
    remount(image, mounted)
    assert_bytes(p.read_bytes(), bytes(model), "regrown file after remount")
    assert_clean_log(mounted)


# ---------------------------------------------------------------------------------------------
# mmap stores into a reflinked file

def test_mmap_stores_into_reflinked_file_break_exactly_the_touched_pages(mounted, image, agents):
    rng = random.Random(1000)
    npages = 16 * MiB // BS
    src, copy = mounted / "src", mounted / "copy"
    payload = rng.randbytes(16 * MiB)
    src.write_bytes(payload)
    subprocess.run(["cp", str(src), str(copy)], check=True)
    st0 = stats(mounted)
    assert st0["shared_blocks"] == npages, st0
    model = bytearray(payload)
    touched: set[int] = set()
    writes = []
    for _ in range(1000):
        pg = rng.randrange(npages)
        if rng.random() < 0.7:
            off, d = pg * BS, rng.randbytes(BS)                   # a whole page
        else:
            off = pg * BS + rng.randrange(BS - 64)
            d = rng.randbytes(rng.randrange(1, 64))               # a few bytes in it
        writes.append((off, d))
        apply(model, off, d)
        touched.add(pg)
    a = agents(copy)
    for i in range(0, len(writes), 250):
        a.writes(writes[i:i + 250])
    a.call("msync")
    st1 = stats(mounted)
    assert st1["cow_breaks"] - st0["cow_breaks"] == len(touched), (len(touched), st0, st1)
    assert st0["shared_blocks"] - st1["shared_blocks"] == len(touched), (len(touched), st0, st1)
    assert_bytes(src.read_bytes(), payload, "the source of the reflink")
    assert_bytes(copy.read_bytes(), bytes(model), "the reflinked copy")
    assert a.exit() == 0
    remount(image, mounted)
    assert_bytes(copy.read_bytes(), bytes(model), "the copy after remount")
    assert_bytes(src.read_bytes(), payload, "the source after remount")
    assert stats(mounted)["shared_blocks"] == npages - len(touched)
    assert_clean_log(mounted)


# ---------------------------------------------------------------------------------------------
# page cache after server-side changes (daxfs changes file bytes in its image directly, the
# kernel's page cache of the destination must be dropped; this mount keeps the page cache across
# opens, so a missing invalidation shows up as stale bytes)

CLONE_CASES = {                           # name: (off_in, off_out, length), in 16-block files
    "aligned": (4 * BS, 8 * BS, 6 * BS),                     # whole blocks: all shared
    "unaligned-shared": (100, 4 * BS + 100, 6 * BS + 1000),  # same in-block offset: middle
                                                             # shared, head and tail copied
    "bytecopy": (100, 3 * BS + 50, 2 * BS + 7),              # different in-block offsets:
}                                                            # daxfs copies the bytes


def expect_shared_blocks(off_in: int, off_out: int, length: int) -> int:
    """Blocks `FileSystem.clone_range` shares for a range inside both 16-block files."""
    if (off_in - off_out) % BS:
        return 0
    return max(0, (off_in + length) // BS - -(-off_in // BS))


def assert_hook_active(mnt) -> None:
    """copy_file_range really reaches daxfs (not the kernel's read/write fallback)."""
    assert "libfuse hook active" in daemon_log(mnt).read_text(errors="replace")


def clone_checked(mnt, src, dst_fd: int, case: tuple[int, int, int]) -> None:
    """clone_range, checking that daxfs shared exactly the blocks it should."""
    st0 = stats(mnt)
    clone_range(src, dst_fd, *case)
    assert (stats(mnt)["cloned_blocks"] - st0["cloned_blocks"]
            == expect_shared_blocks(*case)), case


def test_copy_file_range_into_cached_file_is_seen_by_old_and_new_descriptors(mounted, image):
    assert_hook_active(mounted)
    models = {}
    for name, case in CLONE_CASES.items():
        off_in, off_out, length = case
        src, dst = mounted / f"src-{name}", mounted / f"dst-{name}"
        sdata, ddata = os.urandom(16 * BS), os.urandom(16 * BS)
        src.write_bytes(sdata)
        dst.write_bytes(ddata)
        rfd = os.open(dst, os.O_RDONLY)
        try:
            assert pread_all(rfd, len(ddata)) == ddata            # warm page cache
            model = bytearray(ddata)
            apply(model, off_out, sdata[off_in:off_in + length])
            wfd = os.open(dst, os.O_WRONLY)
            try:
                clone_checked(mounted, src, wfd, case)
            finally:
                os.close(wfd)
            assert_bytes(pread_all(rfd, len(ddata)), bytes(model),
                         f"{name}: read(2) on the descriptor that warmed the cache")
            assert_bytes(dst.read_bytes(), bytes(model), f"{name}: read(2) on a new descriptor")
            # once more, through an r+ descriptor that then reads back what it cloned
            with open(dst, "r+b") as f:
                clone_range(src, f.fileno(), 0, 0, BS)
                apply(model, 0, sdata[:BS])
                f.seek(0)
                assert_bytes(f.read(), bytes(model),
                             f"{name}: read(2) on the copy_file_range descriptor")
            assert_bytes(pread_all(rfd, len(ddata)), bytes(model),
                         f"{name}: old descriptor, second clone")
        finally:
            os.close(rfd)
        models[src], models[dst] = sdata, bytes(model)
    remount(image, mounted)
    for path, model in models.items():
        assert_bytes(path.read_bytes(), model, f"{path.name} after remount")
    assert_clean_log(mounted)


def test_copy_file_range_into_mapped_file_is_seen_by_the_mapping(mounted, image, agents):
    assert_hook_active(mounted)
    models = {}
    for name, case in CLONE_CASES.items():
        off_in, off_out, length = case
        src, dst = mounted / f"src-{name}", mounted / f"dst-{name}"
        sdata, ddata = os.urandom(16 * BS), os.urandom(16 * BS)
        src.write_bytes(sdata)
        dst.write_bytes(ddata)
        a = agents(dst)
        assert a.read(0, len(ddata)) == ddata                   # every page mapped in
        model = bytearray(ddata)
        # dirty mapped pages inside and outside the destination range, not msync'ed: the
        # kernel must write them back before the clone, which then overwrites the inside one
        a.writes([(off_out + 10, b"dirty-inside"), (14 * BS + 5, b"dirty-outside")])
        apply(model, off_out + 10, b"dirty-inside")
        apply(model, 14 * BS + 5, b"dirty-outside")
        apply(model, off_out, sdata[off_in:off_in + length])
        fd = os.open(dst, os.O_WRONLY)
        try:
            clone_checked(mounted, src, fd, case)
        finally:
            os.close(fd)
        assert_bytes(a.read(0, len(ddata)), bytes(model),
                     f"{name}: the child's mapping after the clone")
        assert_bytes(dst.read_bytes(), bytes(model), f"{name}: read(2) after the clone")
        a.call("msync")
        assert a.exit() == 0
        models[src], models[dst] = sdata, bytes(model)
    remount(image, mounted)
    for path, model in models.items():
        assert_bytes(path.read_bytes(), model, f"{path.name} after remount")
    assert_clean_log(mounted)


def test_clone_from_file_with_unsynced_mapped_stores_copies_the_stores(mounted, image, agents):
    """The SOURCE of a clone is being written through a mapping (stores not msync'ed): the copy
    must hold what read(2) of the source shows, as on ext4/xfs. copy_file_range at offsets,
    then a whole-file `cp`."""
    assert_hook_active(mounted)
    models = {}
    for name, case in CLONE_CASES.items():
        off_in, off_out, length = case
        src, dst = mounted / f"src-{name}", mounted / f"dst-{name}"
        sdata, ddata = os.urandom(16 * BS), os.urandom(16 * BS)
        src.write_bytes(sdata)
        dst.write_bytes(ddata)
        a = agents(src)
        smodel = bytearray(sdata)
        stores = [(off_in + 1, b"store-in-range-1"), (off_in + length // 2, b"store-in-range-2"),
                  (off_in + length - 3, b"end")]
        a.writes(stores)
        for off, d in stores:
            apply(smodel, off, d)
        assert_bytes(src.read_bytes(), bytes(smodel), f"{name}: read(2) of the dirty source")
        dmodel = bytearray(ddata)
        apply(dmodel, off_out, bytes(smodel[off_in:off_in + length]))
        fd = os.open(dst, os.O_WRONLY)
        try:
            clone_checked(mounted, src, fd, case)
        finally:
            os.close(fd)
        assert_bytes(dst.read_bytes(), bytes(dmodel), f"{name}: destination of the clone")
        # the same source, more unsynced stores, copied whole by cp (every block shared)
        more = [(pg * BS + 7, b"mapped-store-%d" % pg) for pg in (0, 5, 15)]
        a.writes(more)
        for off, d in more:
            apply(smodel, off, d)
        whole = mounted / f"cp-{name}"
        subprocess.run(["cp", str(src), str(whole)], check=True)
        assert_bytes(whole.read_bytes(), bytes(smodel), f"{name}: cp of the dirty source")
        a.call("msync")
        assert a.exit() == 0
        models[src], models[dst], models[whole] = bytes(smodel), bytes(dmodel), bytes(smodel)
    remount(image, mounted)
    for path, model in models.items():
        assert_bytes(path.read_bytes(), model, f"{path.name} after remount")
    assert_clean_log(mounted)


def test_punch_hole_in_cached_and_mapped_file_reads_zeros(mounted, image, agents):
    p = mounted / "f"
    data = os.urandom(16 * BS)
    p.write_bytes(data)
    a = agents(p)
    assert a.read(0, len(data)) == data
    model = bytearray(data)
    fd = os.open(p, os.O_RDWR)
    try:
        assert pread_all(fd, len(data)) == data
        for off, n in [(2 * BS, 3 * BS), (7 * BS + 100, 2 * BS + 50), (12 * BS + 5, 10)]:
            # unsynced stores through the mapping inside and right after the range: the ones
            # inside must be gone (zeros), the one after it kept
            stores = [(off + n // 2, b"inside"[:n - n // 2]), (off + n, b"after")]
            a.writes(stores)
            for o, d in stores:
                apply(model, o, d)
            punch_hole(fd, off, n)
            apply(model, off, bytes(n))
            assert_bytes(pread_all(fd, len(data)), bytes(model), f"read(2) after punch {off}+{n}")
            assert_bytes(p.read_bytes(), bytes(model), f"new open after punch {off}+{n}")
            assert_bytes(a.read(0, len(data)), bytes(model), f"mapping after punch {off}+{n}")
    finally:
        os.close(fd)
    assert os.stat(p).st_size == len(data)
    assert a.exit() == 0
    remount(image, mounted)
    assert_bytes(p.read_bytes(), bytes(model), "after remount")
    assert_clean_log(mounted)


# ---------------------------------------------------------------------------------------------
# fio's mmap engine

def fio(mnt, *args, size: str = "16M", timeout: float = 60) -> dict:
    cmd = ["fio", "--name=mm", "--ioengine=mmap", "--filename=fio.dat", "--bs=4k",
           f"--size={size}", "--output-format=json", *args]
    p = subprocess.run(cmd, cwd=mnt, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)} exited {p.returncode}\n{p.stdout}\n{p.stderr}"
    out = json.loads(p.stdout[p.stdout.index("{"):])
    job = out["jobs"][0]
    assert job["error"] == 0, job
    return job


def test_fio_mmap_randwrite_then_randread(mounted, image):
    job = fio(mounted, "--rw=randwrite", "--runtime=2", "--time_based", "--end_fsync=1")
    assert job["write"]["iops"] > 0 and job["write"]["total_ios"] > 0, job["write"]
    job = fio(mounted, "--rw=randread", "--runtime=2", "--time_based")
    assert job["read"]["iops"] > 0 and job["read"]["total_ios"] > 0, job["read"]
    remount(image, mounted)
    assert os.stat(mounted / "fio.dat").st_size == 16 * MiB
    assert_clean_log(mounted)


def test_fio_mmap_verify_survives_remount(mounted, image):
    """fio writes checksummed blocks through mmap and verifies them, then (same seed) verifies
    them again from a fresh mount."""
    common = ("--rw=randwrite", "--verify=crc32c", "--end_fsync=1")
    job = fio(mounted, *common, "--do_verify=1", size="4M")
    assert job["write"]["total_ios"] == 1024, job["write"]
    remount(image, mounted)
    job = fio(mounted, *common, "--verify_only", size="4M")
    assert job["read"]["total_ios"] >= 1024, job["read"]
    assert_clean_log(mounted)


def test_mmap_store_into_shared_eof_block_then_grow_both_files(mounted, image, agents):
    """cp shares the source's partial EOF block too; a store through the copy's mapping into
    that page breaks it for the copy only, and growing either file afterwards exposes zeros
    past the old EOF in that file only."""
    size = 5 * BS + 123
    src, copy = mounted / "src", mounted / "copy"
    sdata = os.urandom(size)
    src.write_bytes(sdata)
    subprocess.run(["cp", str(src), str(copy)], check=True)
    st0 = stats(mounted)
    assert st0["shared_blocks"] == 6, st0
    a = agents(copy)
    a.write(5 * BS + 100, b"eof-page")
    # inside the EOF page but past EOF (and past Python's len(mmap)): never file data
    a.call("rawwrite", off=5 * BS + 150, data=base64.b64encode(b"past-eof").decode())
    cmodel = bytearray(sdata)
    apply(cmodel, 5 * BS + 100, b"eof-page")
    a.call("msync")
    st1 = stats(mounted)
    assert (st1["cow_breaks"] - st0["cow_breaks"], st1["shared_blocks"]) == (1, 5), st1
    assert_bytes(copy.read_bytes(), bytes(cmodel), "copy after the store")
    assert_bytes(src.read_bytes(), sdata, "source after the store")
    os.truncate(copy, 7 * BS)
    cmodel.extend(bytes(7 * BS - size))
    got = base64.b64decode(a.call("rawread", off=0, n=6 * BS)["data"])
    assert_bytes(got, bytes(cmodel[:6 * BS]), "copy's old mapping (whole EOF page) after growing")
    with open(src, "ab") as f:                         # append: grows src through its EOF block
        f.write(b"appended")
    smodel = sdata + b"appended"
    assert_bytes(src.read_bytes(), smodel, "source after append")
    assert_bytes(copy.read_bytes(), bytes(cmodel), "grown copy")
    assert a.exit() == 0
    remount(image, mounted)
    assert_bytes(src.read_bytes(), smodel, "source after remount")
    assert_bytes(copy.read_bytes(), bytes(cmodel), "copy after remount")
    assert_clean_log(mounted)



def test_o_direct_writes_reach_cached_descriptors_mappings_and_new_opens(mounted, image, agents):
    """O_DIRECT handles get FOPEN_DIRECT_IO and bypass the kernel's page cache: what buffered
    descriptors and mappings of the same file cached must not outlive such a write."""
    p = mounted / "f"
    data = os.urandom(16 * BS)
    p.write_bytes(data)
    model = bytearray(data)
    rfd = os.open(p, os.O_RDONLY)
    buf = mmap.mmap(-1, 2 * BS)                              # page-aligned for O_DIRECT
    try:
        assert pread_all(rfd, len(data)) == data             # warm page cache
        a = agents(p)
        assert a.read(3 * BS, BS) == data[3 * BS:4 * BS]
        dfd = os.open(p, os.O_RDWR | os.O_DIRECT)
        try:
            new = os.urandom(2 * BS)
            buf[:] = new
            assert os.pwrite(dfd, buf, 3 * BS) == 2 * BS
            apply(model, 3 * BS, new)
            assert_bytes(pread_all(rfd, len(data)), bytes(model), "cached fd after O_DIRECT")
            assert_bytes(a.read(3 * BS, 2 * BS), new, "mapping after O_DIRECT write")
            # and the other way: a buffered write is what a direct read returns
            with open(p, "r+b", buffering=0) as f:
                f.seek(9 * BS + 1)
                f.write(b"buffered")
            apply(model, 9 * BS + 1, b"buffered")
            buf[:BS] = b"\0" * BS
            assert os.preadv(dfd, [memoryview(buf)[:BS]], 9 * BS) == BS
            assert_bytes(bytes(buf[:BS]), bytes(model[9 * BS:10 * BS]), "O_DIRECT read")
        finally:
            os.close(dfd)
        assert a.exit() == 0
    finally:
        os.close(rfd)
    # no buffered handle open now: a direct write, then a new buffered open must not keep
    # the cache it had before
    rfd = os.open(p, os.O_RDONLY)
    assert pread_all(rfd, len(data)) == bytes(model)
    os.close(rfd)
    dfd = os.open(p, os.O_WRONLY | os.O_DIRECT)
    buf[:BS] = os.urandom(BS)
    os.pwrite(dfd, memoryview(buf)[:BS], 12 * BS)
    apply(model, 12 * BS, bytes(buf[:BS]))
    os.close(dfd)
    assert_bytes(p.read_bytes(), bytes(model), "new buffered open after O_DIRECT write")
    remount(image, mounted)
    assert_bytes(p.read_bytes(), bytes(model), "after remount")
    assert_clean_log(mounted)
