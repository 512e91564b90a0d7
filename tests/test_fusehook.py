"""Real-mount tests for daxfs._fusehook (copy_file_range / lseek / fallocate for pyfuse3).

A tiny pyfuse3 filesystem (files in bytearrays) runs in a subprocess; every call
of a hook handler is appended as a JSON line to a log file, so the test can
check what reached Python after each syscall returns (handlers are synchronous).
The mount is always removed with ``fusermount3 -u``.
"""
from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger(__name__)

pytestmark = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
    reason="needs /dev/fuse and fusermount3")

MiB = 1 << 20
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

SERVER = textwrap.dedent(r'''
    import errno, json, logging, os, stat, sys
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(name)s %(levelname)s %(message)s")

    from daxfs import fusehook      # must come before pyfuse3
    import pyfuse3, trio

    mnt, log_path, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    conn_opts = json.loads(sys.argv[4])
    logf = open(log_path, "a", buffering=1)

    def rec(**kw):
        logf.write(json.dumps(kw) + "\n")

    HOLE = 4096   # "holey" pretends its first 4 KiB are a hole (and they are zeros)
    pattern = bytes((i * 7 + 3) % 251 for i in range(256 * 1024))
    names = {b"src": bytearray(pattern), b"dst": bytearray(), b"xdev": bytearray(),
             b"boom": bytearray(), b"holey": bytearray(HOLE) + bytearray(pattern[:60000]),
             b"falloc": bytearray(b"x" * 20000), b"big": bytearray()}
    ino_of = {}
    data = {}
    name_of = {}
    for i, (n, b) in enumerate(names.items()):
        ino_of[n] = i + 2
        data[i + 2] = b
        name_of[i + 2] = n
    fh_ino = {}
    next_fh = [100]

    def new_fh(ino):
        fh = next_fh[0]; next_fh[0] += 1
        fh_ino[fh] = ino
        return fh

    def attrs(ino):
        e = pyfuse3.EntryAttributes()
        e.st_ino = ino
        e.entry_timeout = 0
        e.attr_timeout = 0
        if ino == pyfuse3.ROOT_INODE:
            e.st_mode = stat.S_IFDIR | 0o755
            e.st_nlink = 2
        elif ino == 999:
            e.st_mode = stat.S_IFREG | 0o444
            e.st_nlink = 1
            e.st_size = 4096
        else:
            e.st_mode = stat.S_IFREG | 0o644
            e.st_nlink = 1
            e.st_size = len(data[ino])
            blocks = (len(data[ino]) + 511) // 512
            if name_of[ino] == b"holey":
                blocks -= HOLE // 512    # looks sparse, so cp uses SEEK_DATA
            e.st_blocks = blocks
        e.st_blksize = 4096
        return e

    def conninfo():
        c = fusehook.conn_info()
        return json.dumps({"hooked": fusehook.hooked(), "conn": c,
                           "want_names": fusehook.cap_names(c["want"])}).encode().ljust(4096)

    class Ops(pyfuse3.Operations):
        async def lookup(self, parent, name, ctx):
            if parent == pyfuse3.ROOT_INODE and name == b".conninfo":
                return attrs(999)
            if parent != pyfuse3.ROOT_INODE or name not in ino_of:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return attrs(ino_of[name])
        async def getattr(self, ino, ctx):
            return attrs(ino)
        async def setattr(self, ino, attr, fields, fh, ctx):
            if fields.update_size:
                b = data[ino]
                if attr.st_size < len(b):
                    del b[attr.st_size:]
                else:
                    b.extend(bytes(attr.st_size - len(b)))
            return attrs(ino)
        async def opendir(self, ino, ctx):
            return ino
        async def readdir(self, fh, start, token):
            for i, (n, ino) in enumerate(sorted(ino_of.items())):
                if i >= start and not pyfuse3.readdir_reply(token, n, attrs(ino), i + 1):
                    break
        async def releasedir(self, fh):
            pass
        async def open(self, ino, flags, ctx):
            return pyfuse3.FileInfo(fh=new_fh(ino), keep_cache=False)
        async def create(self, parent, name, mode, flags, ctx):
            ino = max(data) + 1
            ino_of[name] = ino; data[ino] = bytearray(); name_of[ino] = name
            return pyfuse3.FileInfo(fh=new_fh(ino), keep_cache=False), attrs(ino)
        async def read(self, fh, off, size):
            ino = fh_ino[fh]
            if ino == 999:
                return conninfo()[off:off + size]
            return bytes(data[ino][off:off + size])
        async def write(self, fh, off, buf):
            ino = fh_ino[fh]
            b = data[ino]
            if off > len(b):
                b.extend(bytes(off - len(b)))
            b[off:off + len(buf)] = buf
            if name_of[ino] == b"big":
                rec(op="write", ino=ino, off=off, len=len(buf))
            return len(buf)
        async def flush(self, fh):
            pass
        async def release(self, fh):
            fh_ino.pop(fh, None)
        async def statfs(self, ctx):
            s = pyfuse3.StatvfsData()
            s.f_bsize = s.f_frsize = 4096
            s.f_blocks = s.f_bfree = s.f_bavail = 1 << 20
            s.f_files = s.f_ffree = s.f_favail = 1000
            s.f_namemax = 255
            return s

    # ---- the hook handlers (synchronous) ----
    def copy_file_range(ino_in, fh_in, off_in, ino_out, fh_out, off_out, length, flags):
        rec(op="copy_file_range", ino_in=ino_in, fh_in_ok=fh_ino.get(fh_in) == ino_in,
            off_in=off_in, ino_out=ino_out, fh_out_ok=fh_ino.get(fh_out) == ino_out,
            off_out=off_out, length=length, flags=flags,
            name_in=name_of[ino_in].decode(), name_out=name_of[ino_out].decode())
        if name_of[ino_out] == b"xdev":
            raise OSError(errno.EXDEV, "pretend cross-device")
        if name_of[ino_out] == b"boom":
            raise RuntimeError("boom from copy handler")
        src, dst = data[ino_in], data[ino_out]
        chunk = src[off_in:off_in + length]
        if off_out > len(dst):
            dst.extend(bytes(off_out - len(dst)))
        dst[off_out:off_out + len(chunk)] = chunk
        return len(chunk)

    def lseek(ino, fh, off, whence):
        rec(op="lseek", ino=ino, fh_ok=fh_ino.get(fh) == ino, off=off, whence=whence)
        size = len(data[ino])
        start = HOLE if name_of[ino] == b"holey" else 0
        if off >= size:
            raise OSError(errno.ENXIO, "past EOF")
        if whence == os.SEEK_DATA:
            return max(off, start)
        if whence == os.SEEK_HOLE:
            return off if off < start else size
        raise OSError(errno.EINVAL, "bad whence")

    def fallocate(ino, fh, mode, off, length):
        rec(op="fallocate", ino=ino, fh_ok=fh_ino.get(fh) == ino, mode=mode, off=off,
            length=length)
        b = data[ino]
        if mode == 0:
            if off + length > len(b):
                b.extend(bytes(off + length - len(b)))
        elif mode == 3:   # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
            end = min(len(b), off + length)
            if end > off:
                b[off:end] = bytes(end - off)
        else:
            raise OSError(errno.EOPNOTSUPP, "mode")

    if mode == "handlers":
        fusehook.set_handlers(copy_file_range=copy_file_range, lseek=lseek,
                              fallocate=fallocate)
    if conn_opts:
        fusehook.set_conn_options(**conn_opts)

    pyfuse3.init(Ops(), mnt, set(pyfuse3.default_options) | {"fsname=hooktest"})
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)
''')


class Mount:
    def __init__(self, tmp: Path, mode: str, conn_opts: dict | None = None):
        self.dir = tmp / "mnt"
        self.dir.mkdir()
        self.log_path = tmp / "calls.jsonl"
        self.log_path.touch()
        self.err_path = tmp / "server.err"
        script = tmp / "server.py"
        script.write_text(SERVER)
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self._err = open(self.err_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(script), str(self.dir), str(self.log_path), mode,
             json.dumps(conn_opts or {})],
            stdout=self._err, stderr=self._err, env=env)
        try:
            deadline = time.monotonic() + 20
            while not os.path.ismount(self.dir):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited {self.proc.returncode}: {self.stderr()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"mount did not appear: {self.stderr()}")
                time.sleep(0.05)
        except BaseException:
            self.close()
            raise

    def p(self, name: str) -> str:
        return str(self.dir / name)

    def calls(self, op: str | None = None) -> list[dict]:
        with open(self.log_path) as f:
            recs = [json.loads(line) for line in f if line.strip()]
        return [r for r in recs if op is None or r["op"] == op]

    def mark(self) -> int:
        return len(self.calls())

    def calls_since(self, mark: int, op: str) -> list[dict]:
        return [r for r in self.calls()[mark:] if r["op"] == op]

    def stderr(self) -> str:
        self._err.flush()
        return self.err_path.read_text()

    def conninfo(self) -> dict:
        with open(self.p(".conninfo"), "rb") as f:
            return json.loads(f.read().rstrip())

    def close(self) -> None:
        if os.path.ismount(self.dir):
            subprocess.run(["fusermount3", "-u", str(self.dir)], check=False)
            if os.path.ismount(self.dir):
                subprocess.run(["fusermount3", "-u", "-z", str(self.dir)], check=False)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._err.close()


@pytest.fixture(scope="module")
def mnt(tmp_path_factory):
    m = Mount(tmp_path_factory.mktemp("hook"), "handlers",
              {"max_readahead": 64 * 1024, "max_background": 32})
    try:
        yield m
    finally:
        m.close()
    assert m.proc.returncode == 0, m.stderr()


@pytest.fixture()
def bare_mnt(tmp_path):
    m = Mount(tmp_path, "nohandlers")
    try:
        yield m
    finally:
        m.close()


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_import_after_pyfuse3_is_refused():
    r = subprocess.run([sys.executable, "-c", "import pyfuse3; import daxfs.fusehook"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode != 0
    assert "RuntimeError" in r.stderr and "before pyfuse3" in r.stderr


def test_set_conn_options_validation():
    code = textwrap.dedent("""
        from daxfs import fusehook
        for bad in ({"nope": 1}, {"max_write": 100}, {"max_readahead": -1}):
            try:
                fusehook.set_conn_options(**bad)
            except (TypeError, ValueError):
                pass
            else:
                raise SystemExit(f"accepted {bad}")
        fusehook.set_conn_options(max_readahead=None)
        assert fusehook.conn_info() == {} and not fusehook.hooked()
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr


def test_hooked_and_negotiated_conn_info(mnt):
    info = mnt.conninfo()
    assert info["hooked"] is True
    conn = info["conn"]
    log.warning("negotiated fuse_conn_info: %s want=%s", conn, info["want_names"])
    assert conn["max_write"] == MiB            # libfuse 3.14 default bufsize
    assert conn["max_readahead"] == 64 * 1024  # requested (kernel offered more)
    assert conn["max_background"] == 32
    splice = (1 << 7) | (1 << 8) | (1 << 9)
    assert conn["want"] & splice == 0
    assert not [n for n in info["want_names"] if "SPLICE" in n]
    assert conn["want"] & ~conn["capable"] == 0
    # The kernel really took the readahead setting: bdi read_ahead_kb.
    st = os.stat(mnt.dir)
    bdi = Path(f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb")
    if bdi.exists():
        assert int(bdi.read_text()) == 64


def test_big_write_is_split_at_max_write(mnt):
    m = mnt.mark()
    fd = os.open(mnt.p("big"), os.O_WRONLY)
    try:
        assert os.write(fd, b"\xab" * (4 * MiB)) == 4 * MiB
    finally:
        os.close(fd)
    sizes = [r["len"] for r in mnt.calls_since(m, "write")]
    assert sum(sizes) == 4 * MiB
    assert max(sizes) == MiB, sizes


def test_copy_file_range_reaches_handler(mnt):
    src = read(mnt.p("src"))
    m = mnt.mark()
    fin = os.open(mnt.p("src"), os.O_RDONLY)
    fout = os.open(mnt.p("dst"), os.O_WRONLY)
    try:
        n = os.copy_file_range(fin, fout, 100_000, 1000, 0)
    finally:
        os.close(fin)
        os.close(fout)
    assert n == 100_000
    calls = mnt.calls_since(m, "copy_file_range")
    assert len(calls) == 1
    c = calls[0]
    assert (c["name_in"], c["name_out"], c["off_in"], c["off_out"], c["length"], c["flags"]) == (
        "src", "dst", 1000, 0, 100_000, 0)
    assert c["fh_in_ok"] and c["fh_out_ok"]
    assert read(mnt.p("dst")) == src[1000:101_000]


def test_copy_file_range_exdev_falls_back_to_kernel_copy(mnt):
    # Observed on Linux 6.x: fuse turns EXDEV (and EOPNOTSUPP) from the server
    # into a splice copy through read/write, so the caller sees success.
    src = read(mnt.p("src"))
    m = mnt.mark()
    fin = os.open(mnt.p("src"), os.O_RDONLY)
    fout = os.open(mnt.p("xdev"), os.O_WRONLY)
    try:
        n = os.copy_file_range(fin, fout, 50_000, 0, 0)
    finally:
        os.close(fin)
        os.close(fout)
    calls = mnt.calls_since(m, "copy_file_range")
    assert [c["name_out"] for c in calls] == ["xdev"]
    assert n == 50_000
    assert read(mnt.p("xdev")) == src[:50_000]


def test_copy_file_range_handler_bug_gives_eio_and_is_logged(mnt):
    fin = os.open(mnt.p("src"), os.O_RDONLY)
    fout = os.open(mnt.p("boom"), os.O_WRONLY)
    try:
        with pytest.raises(OSError) as ei:
            os.copy_file_range(fin, fout, 4096, 0, 0)
    finally:
        os.close(fin)
        os.close(fout)
    assert ei.value.errno == errno.EIO
    err = mnt.stderr()
    assert "daxfs.fusehook ERROR copy_file_range handler failed" in err
    assert "RuntimeError: boom from copy handler" in err
    assert read(mnt.p("boom")) == b""


def test_lseek_data_hole_reaches_handler(mnt):
    size = os.stat(mnt.p("holey")).st_size
    m = mnt.mark()
    fd = os.open(mnt.p("holey"), os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_DATA) == 4096
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 0
        assert os.lseek(fd, 5000, os.SEEK_HOLE) == size
        with pytest.raises(OSError) as ei:
            os.lseek(fd, size + 10, os.SEEK_DATA)
        assert ei.value.errno == errno.ENXIO
        assert os.lseek(fd, 123, os.SEEK_SET) == 123   # handled by the kernel
    finally:
        os.close(fd)
    calls = mnt.calls_since(m, "lseek")
    assert [(c["off"], c["whence"]) for c in calls] == [
        (0, os.SEEK_DATA), (0, os.SEEK_HOLE), (5000, os.SEEK_HOLE), (size + 10, os.SEEK_DATA)]
    assert all(c["fh_ok"] for c in calls)


def test_fallocate_reaches_handler(mnt):
    path = mnt.p("falloc")
    before = read(path)
    assert len(before) == 20000
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    m = mnt.mark()
    fd = os.open(path, os.O_RDWR)
    try:
        rc = libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4096, 8192)
        assert rc == 0, os.strerror(ctypes.get_errno())
        assert os.fstat(fd).st_size == 20000
        os.posix_fallocate(fd, 0, 65536)
        assert os.fstat(fd).st_size == 65536
    finally:
        os.close(fd)
    calls = mnt.calls_since(m, "fallocate")
    assert [(c["mode"], c["off"], c["length"]) for c in calls] == [
        (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4096, 8192), (0, 0, 65536)]
    assert all(c["fh_ok"] for c in calls)
    after = read(path)
    assert after == before[:4096] + bytes(8192) + before[12288:] + bytes(65536 - 20000)


def test_gnu_cp_uses_copy_file_range(mnt):
    m = mnt.mark()
    subprocess.run(["cp", mnt.p("src"), mnt.p("cp_src")], check=True)
    subprocess.run(["cp", mnt.p("holey"), mnt.p("cp_holey")], check=True)
    assert read(mnt.p("cp_src")) == read(mnt.p("src"))
    assert read(mnt.p("cp_holey")) == read(mnt.p("holey"))
    cfr = mnt.calls_since(m, "copy_file_range")
    # Dense file: cp (coreutils 9.1, reflink=auto) tries FICLONE (EOPNOTSUPP on
    # FUSE), then copies with copy_file_range.
    assert {c["name_in"] for c in cfr} == {"src"}
    assert {c["name_out"] for c in cfr} == {"cp_src"}
    assert sum(c["length"] for c in cfr) >= 256 * 1024
    # "holey" looks sparse (st_blocks), so cp maps it with SEEK_DATA/SEEK_HOLE
    # (our lseek handler) and, in coreutils 9.1, copies the extents with read/write.
    seeks = [(c["off"], c["whence"]) for c in mnt.calls_since(m, "lseek")]
    assert (0, os.SEEK_DATA) in seeks and (4096, os.SEEK_HOLE) in seeks


def test_without_handlers_kernel_falls_back(bare_mnt):
    mnt = bare_mnt
    assert mnt.conninfo()["hooked"] is True
    src = read(mnt.p("src"))
    fin = os.open(mnt.p("src"), os.O_RDONLY)
    fout = os.open(mnt.p("dst"), os.O_RDWR)
    try:
        # EOPNOTSUPP from the hook: kernel splice-copies, the caller sees success.
        assert os.copy_file_range(fin, fout, 10_000, 0, 0) == 10_000
        # Not ENOSYS, so copy_file_range stays enabled: a second call behaves the same.
        assert os.copy_file_range(fin, fout, 10_000, 10_000, 10_000) == 10_000
        # ENOSYS for lseek: generic_file_llseek, i.e. all data and a hole at EOF.
        assert os.lseek(fin, 0, os.SEEK_DATA) == 0
        assert os.lseek(fin, 0, os.SEEK_HOLE) == len(src)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        assert libc.fallocate(fout, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4096) == -1
        assert ctypes.get_errno() == errno.EOPNOTSUPP
    finally:
        os.close(fin)
        os.close(fout)
    assert read(mnt.p("dst")) == src[:20_000]
    assert mnt.calls() == []
