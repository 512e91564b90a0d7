"""Image fuzzer, the base images every case damages a copy of: `clean` (populated, closed),
`live` (reopened, more operations, copied while open) and `crash` (clean's tables, live's
journal), with their logical states, journal transaction spans and clean fsck reports."""
from __future__ import annotations

import dataclasses
import os
import random
import stat

import numpy as np

from daxfs import format as fmt
from daxfs import fsck
from daxfs import journal as jmod
from daxfs.fs import FileSystem
from daxfs.mkfs import make_image

from .fuzz_common import BS, IMAGE_BYTES, ROOT, _MemPM, _read, _write
from .fuzz_state import state_of_image


# =============================================================================== base images
def _data(rng: random.Random, n: int) -> bytes:
    return rng.randbytes(n)


def populate(fs: FileSystem, rng: random.Random) -> None:
    """A few dozen objects of every kind; some names deleted again so the tables have holes."""
    def mkdir(parent, name):
        return fs.mkdir(parent, name, 0o755, 1000, 1000).ino

    def mkfile(parent, name, size, mode=0o644, chunk=64 << 10):
        ino = fs.create(parent, name, mode, 1000, 1000).ino
        off = 0
        while off < size:
            n = min(chunk, size - off)
            fs.write(ino, off, _data(rng, n))
            off += n
        return ino

    docs = mkdir(ROOT, b"docs")
    deep = mkdir(docs, b"deep")
    deeper = mkdir(deep, b"deeper")
    src = mkdir(ROOT, b"src")
    mkdir(ROOT, b"empty-dir")
    media = mkdir(ROOT, b"media")
    sizes = [0, 1, 100, 4095, 4096, 4097, 8192, 12345, 40000, 65536, 100000, 250000]
    dirs = [ROOT, docs, deep, deeper, src, media]
    files = []
    for i, size in enumerate(sizes):
        files.append(mkfile(dirs[i % len(dirs)], b"file-%02d-%d" % (i, size), size,
                            mode=(0o644, 0o600, 0o755, 0o640)[i % 4]))
    files.append(mkfile(media, b"big.bin", (1 << 20) + 17))
    # multi-extent files: b is written from its last block down (each block its own extent,
    # whatever the allocator's placement), interleaved with appends to a
    a = fs.create(src, b"interleaved-a", 0o644, 1000, 1000).ino
    b = fs.create(src, b"interleaved-b", 0o644, 1000, 1000).ino
    for k in range(12):
        fs.write(a, k * BS, _data(rng, BS))
        fs.write(b, (11 - k) * BS, _data(rng, BS if k else 777))
    # sparse file: data, hole, data, hole, tail
    sp = fs.create(docs, b"sparse", 0o644, 1000, 1000).ino
    fs.write(sp, 0, _data(rng, 5000))
    fs.write(sp, 200 << 10, _data(rng, 3 * BS))
    fs.write(sp, 1 << 20, _data(rng, 123))
    # reflinks: whole-file clone, partial clone at another offset, clone then COW break
    big = files[-1]
    c1 = fs.create(media, b"big-clone", 0o644, 1000, 1000).ino
    fs.clone_range(big, 0, c1, 0, (1 << 20) + 17)
    c2 = fs.create(docs, b"partial-clone", 0o644, 1000, 1000).ino
    fs.write(c2, 0, _data(rng, 3 * BS))
    fs.clone_range(big, 16 * BS, c2, 2 * BS, 20 * BS)
    c3 = fs.create(deep, b"cow-clone", 0o644, 1000, 1000).ino
    fs.clone_range(a, 0, c3, 0, 12 * BS)
    fs.write(c3, 3 * BS + 10, _data(rng, 2 * BS))       # breaks sharing of blocks 3..5
    # symlinks: relative, absolute, dangling, long
    fs.symlink(ROOT, b"link-to-big", b"media/big.bin", 1000, 1000)
    fs.symlink(docs, b"up", b"../src", 1000, 1000)
    fs.symlink(deeper, b"dangling", b"/nonexistent/target", 1000, 1000)
    fs.symlink(src, b"long-link", b"x/" * 1500, 1000, 1000)
    # hard links
    fs.link(files[7], deeper, b"hardlink-7")
    fs.link(files[7], ROOT, b"hardlink-7b")
    fs.link(files[10], src, b"hardlink-10")
    # xattrs on files, a directory, a symlink
    fs.setxattr(files[3], b"user.color", b"blue")
    fs.setxattr(files[3], b"user.big", _data(rng, 1500))
    fs.setxattr(files[8], b"user.a", b"1")
    fs.setxattr(files[8], b"trusted.b", b"2")
    fs.setxattr(docs, b"user.dir", b"dir-attr")
    fs.setxattr(a, b"user.frag", b"yes")
    fs.setxattr(c1, b"user.clone", b"of big")
    # special files
    fs.mknod(src, b"fifo", stat.S_IFIFO | 0o644, 0, 1000, 1000)
    fs.mknod(src, b"chardev", stat.S_IFCHR | 0o600, os.makedev(1, 3), 1000, 1000)
    # holes in the tables: created and deleted again, plus a rename
    for k in range(4):
        t = mkfile(ROOT, b"tmp-%d" % k, 3000 * (k + 1))
        fs.setxattr(t, b"user.tmp", b"x")
    for k in (0, 2):
        fs.unlink(ROOT, b"tmp-%d" % k)
    fs.rename(ROOT, b"tmp-1", deep, b"renamed-tmp-1")
    fs.mkdir(media, b"sub", 0o700, 0, 0)


def live_ops(fs: FileSystem, rng: random.Random) -> None:
    """Operations after the checkpoint that never free or overwrite a block, so any prefix of
    them is a consistent state on its own (each one is one or a few transactions)."""
    docs = fs.lookup(ROOT, b"docs").ino
    media = fs.lookup(ROOT, b"media").ino
    big = fs.lookup(media, b"big.bin").ino
    new = fs.mkdir(ROOT, b"after-checkpoint", 0o755, 0, 0).ino
    n1 = fs.create(new, b"new-file", 0o644, 0, 0).ino
    fs.write(n1, 0, _data(rng, 3 * BS + 5))
    fs.write(n1, 3 * BS + 5, _data(rng, 2 * BS))            # append (grows the extent)
    fs.setxattr(n1, b"user.new", b"fresh")
    n2 = fs.create(docs, b"new-small", 0o600, 0, 0).ino
    fs.write(n2, 0, b"hello after the checkpoint\n")
    fs.symlink(new, b"new-link", b"new-file", 0, 0)
    fs.link(n1, docs, b"new-hardlink")
    n3 = fs.create(new, b"new-clone", 0o644, 0, 0).ino
    fs.clone_range(big, 0, n3, 0, 64 * BS)
    fs.rename(docs, b"new-small", new, b"moved-small")
    f0 = fs.lookup(ROOT, b"file-00-0").ino
    fs.write(f0, 0, _data(rng, 2 * BS + 1))                  # an empty file gets data
    fs.mkdir(new, b"new-sub", 0o755, 0, 0)


@dataclasses.dataclass
class Base:
    name: str
    data: bytes                        # the image
    g: fmt.Geometry
    state: dict                        # logical state as served (path -> tuple)
    ident: dict                        # path -> (ino, chain [(parent, name, ino), ...])
    log_used: int                      # bytes of the log worth damaging
    txn_spans: list                    # [(start, end)] log offsets of current transactions
    prefix_states: list | None = None  # crash base: state after m transactions, m = 0..k
    fsck_lines: tuple = ()             # problem lines of a plain fsck of the undamaged image
    fsck_exit: int = 0


def _scan_spans(data: bytes, g: fmt.Geometry) -> list[tuple[int, int]]:
    pm = _MemPM(bytearray(data))
    j = jmod.Journal(pm, g)
    spans, start = [], 0
    for _recs, end in j._scan():
        spans.append((start, end))
        start = end
    return spans


def _log_extent(data: bytes, g: fmt.Geometry) -> int:
    """Bytes from the log start to the last non-zero byte of the log."""
    lo = (g.journal_start + 1) * BS
    hi = (g.journal_start + g.journal_blocks) * BS
    nz = np.flatnonzero(np.frombuffer(data, np.uint8, hi - lo, lo))
    return int(nz[-1]) + 1 if nz.size else 0


def build_bases(workdir: str, seed: int) -> dict[str, Base]:
    rng = random.Random(f"daxfs-fuzz-content-{seed}")
    p = os.path.join(workdir, "base-clean.img")
    g = make_image(p, IMAGE_BYTES, force=True, inode_count=512)
    fs = FileSystem.open(p)
    populate(fs, rng)
    fs.close()
    clean = _read(p)
    # live: reopen, more operations, copy while the engine is open
    q = os.path.join(workdir, "base-live-work.img")
    _write(q, clean)
    fs = FileSystem.open(q)
    cps = fs.journal.checkpoints
    live_ops(fs, rng)
    assert fs.journal.checkpoints == cps, "the live phase must not checkpoint"
    fs.tx.flush_times()
    live = _read(q)
    fs.pm.observer = None
    fs.close()
    os.unlink(q)
    # crash: tables as of the checkpoint, everything else as in live
    t0, t1 = g.inode_start * BS, g.data_start * BS
    crash = live[:t0] + clean[t0:t1] + live[t1:]
    bases = {}
    for name, data in (("clean", clean), ("live", live), ("crash", crash)):
        state, ident, events = state_of_image(data, workdir)
        if events:
            raise RuntimeError(f"base image {name} does not read back cleanly: {events[:3]}")
        spans = _scan_spans(data, g)
        b = Base(name, data, g, state, ident, _log_extent(data, g), spans)
        path = os.path.join(workdir, f"base-{name}.img")
        _write(path, data)
        rep = fsck.check(path)
        if not rep.clean:
            raise RuntimeError(f"base image {name} is not clean: {[str(x) for x in rep.problems]}")
        b.fsck_lines = tuple(sorted(x.line() for x in rep.problems))
        b.fsck_exit = rep.exit_code
        bases[name] = b
    # prefix states of the crash image: invalidate transaction m, replay the rest
    cb = bases["crash"]
    cb.prefix_states = []
    log_off = (g.journal_start + 1) * BS
    for m in range(len(cb.txn_spans) + 1):
        d = bytearray(crash)
        if m < len(cb.txn_spans):
            at = log_off + cb.txn_spans[m][0]
            d[at:at + 4] = b"\0\0\0\0"
        st, _ident, ev = state_of_image(bytes(d), workdir)
        assert not ev, ev
        cb.prefix_states.append(st)
    assert cb.prefix_states[-1] == bases["live"].state, "crash image replays to the live state"
    return bases
