"""Corrupt images (issue "Prove crash consistency"): a CI sample of the image fuzzer
(tests/harness/fuzz_images.py) with a fixed seed, plus targeted corruptions of one field each.

Known engine/fsck bugs found by the fuzzer are kept as `xfail(strict=True)` tests (the sample's
failing cases, and one targeted test per bug), so each one turns into a failure ("XPASS
strict") the day it is fixed: then delete its entry here.
"""
from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from conftest import daemon_log, daxfs_cli, force_cleanup, have_fuse, is_mounted
from daxfs import format as fmt
from daxfs import fsck
from daxfs.errors import FsError, MountError
from daxfs.fs import FileSystem
from harness import fuzz_images as fz

BS = fmt.BLOCK_SIZE
ROOT = fmt.ROOT_INO
SEED = 1
CASES = 400          # ~15 s on two cores (in-process fsck and engine; fsck via the CLI every 100th)
CLI_EVERY = 100

# Cases of the sample (seed 1) that fail today: case index -> the bug (see the targeted tests).
KNOWN_FAILING: dict[int, str] = {}      # every case the fuzzer found so far is fixed

pytestmark = pytest.mark.skipif(fz.SHM is None, reason="needs a writable /dev/shm")


# ----------------------------------------------------------------------------- the CI sample
@pytest.fixture(scope="module")
def sample():
    return fz.run(CASES, SEED, jobs=2, mounts=0, cli_every=CLI_EVERY)


def _bad(cats) -> bool:
    return any(c in ("traceback", "hang", "not_repaired") for c in cats)


def test_sample_no_new_tracebacks_or_unrepaired_images(sample):
    """0 tracebacks and 0 not-repaired images, but for the known bugs listed above."""
    failing = {int(k): v for k, v in sample["per_case"].items() if _bad(v)}
    new = sorted(set(failing) - set(KNOWN_FAILING))
    details = [b for b in sample["bugs"] if set(b["cases"]) & set(new)]
    assert not new, (f"new failing cases {new} (replay one with: scripts/fuzz_images.py --seed "
                     f"{SEED} --case N):\n" + "\n".join(
                         f"{b['category']} {b['summary']}: {b['first']['desc']}\n"
                         f"{b['first']['detail']}\n{b['first']['traceback']}" for b in details))
    assert sample["cases"] == CASES
    print(f"{sample['cases']} images tried, {sample['tracebacks']} tracebacks, "
          f"{sample['not_repaired']} not repaired (known: {len(KNOWN_FAILING)} cases)")


def test_sample_fsck_reports_all_meaningful_damage(sample):
    assert sample["undetected"] == 0, [b for b in sample["bugs"] if b["category"] == "undetected"]


def test_sample_covers_every_region(sample):
    regions = {k.split("/")[1] for k in sample["by_region"]}
    assert regions == set(fz.REGIONS)
    assert {"clean", "live", "crash"} == {k.split("/")[0] for k in sample["by_region"]}
    assert set(sample["fsck_exits"]) <= {"0", "1", "4", "8"}


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def bases():
    work = tempfile.mkdtemp(prefix="daxfs-fuzz-test-", dir=fz.SHM)
    fz._quiet_logging()
    try:
        yield fz.build_bases(work, SEED)
    finally:
        import shutil
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def img_path(tmp_path):
    path = Path(fz.SHM) / f"daxfs-fuzz-{os.getpid()}-{tmp_path.name}.img"
    yield str(path)
    force_cleanup(str(path))
    path.unlink(missing_ok=True)


def ino_of(base: fz.Base, path: str) -> int:
    return base.ident[path][0]


def inode_off(g: fmt.Geometry, ino: int, field: str | None = None) -> int:
    off = g.region("inodes")[0] + ino * fmt.INODE_DTYPE.itemsize
    return off + (fmt.INODE_DTYPE.fields[field][1] if field else 0)


def extent_slots(data: bytes, g: fmt.Geometry, ino: int) -> list[int]:
    """Slots of the inode's extents, by file block."""
    e = np.frombuffer(data, fmt.EXTENT_DTYPE, g.extent_count, g.region("extents")[0])
    slots = np.flatnonzero(e["ino"] == ino)
    return sorted(slots.tolist(), key=lambda s: int(e["lblk"][s]))


def extent_off(g: fmt.Geometry, slot: int, field: str) -> int:
    return g.region("extents")[0] + slot * fmt.EXTENT_DTYPE.itemsize + \
        fmt.EXTENT_DTYPE.fields[field][1]


def dirent_slot(data: bytes, g: fmt.Geometry, parent: int, name: bytes) -> int:
    d = np.frombuffer(data, fmt.DIRENT_DTYPE, g.dirent_count, g.region("dirents")[0])
    hit = np.flatnonzero((d["parent"] == parent) & (d["name"] == name))
    assert hit.size == 1
    return int(hit[0])


def put(img: bytearray, off: int, value: int, size: int) -> None:
    img[off:off + size] = value.to_bytes(size, "little")


def write(path: str, img) -> None:
    fz._write(path, bytes(img))


def state_of(path: str, *, readonly: bool = True):
    fs = FileSystem.open(path, readonly=readonly)
    try:
        return fz.walk_engine(fs, forget=False)
    finally:
        fs.close()


def repair_ok(path: str) -> None:
    """fsck --repair, then a second fsck must exit 0 (through the real CLI)."""
    p = daxfs_cli("fsck", "--repair", path, check=False)
    assert p.returncode in (0, 1), p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    p = daxfs_cli("fsck", path, check=False)
    assert p.returncode == 0, p.stdout + p.stderr


# ----------------------------------------------------------------------------- superblock
def test_superblock_checksum_flip_refused_with_one_line(bases, img_path, tmp_path):
    c = bases["clean"]
    img = bytearray(c.data)
    img[fmt.SUPERBLOCK_DTYPE.fields["nblocks"][1]] ^= 0x04
    write(img_path, img)
    with pytest.raises(fmt.FormatError, match="superblock checksum mismatch"):
        FileSystem.open(img_path)
    for args in (("fsck", img_path), ("fsck", "--repair", img_path)):
        p = daxfs_cli(*args, check=False)
        assert p.returncode == 8, p.stdout + p.stderr
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and "superblock checksum mismatch" in lines[0], p.stderr
        assert "Traceback" not in p.stderr
    if not have_fuse():
        return
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    p = daxfs_cli("mount", img_path, mnt, "-o", f"log={daemon_log(mnt)}", check=False)
    assert p.returncode == 1, p.stdout + p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("daxfs:"), p.stderr
    assert "superblock checksum mismatch" in lines[0]
    assert not is_mounted(mnt)


# ----------------------------------------------------------------------------- journal
def _txn(base: fz.Base, m: int) -> tuple[int, int]:
    log_off = (base.g.journal_start + 1) * BS
    s, e = base.txn_spans[m]
    return log_off + s, log_off + e


@pytest.mark.parametrize("which", ["first", "middle", "last"])
def test_journal_record_corruption_stops_replay_at_the_torn_transaction(bases, img_path, which):
    """Crash image (tables as of the checkpoint, k committed transactions in the log): a damaged
    record in transaction m ends replay there, for the engine and for fsck --repair: the result
    is exactly the state after m transactions."""
    cb = bases["crash"]
    k = len(cb.txn_spans)
    assert k >= 5 and len(cb.prefix_states) == k + 1
    m = {"first": 0, "middle": k // 2, "last": k - 1}[which]
    a, e = _txn(cb, m)
    img = bytearray(cb.data)
    img[a + fmt.TXN_HEADER.size + fmt.TXN_RECORD.size + 3] ^= 0x20   # a byte of the first record's data
    write(img_path, img)
    state, _ident, events = state_of(img_path)
    assert not events
    assert state == cb.prefix_states[m]
    assert state != cb.prefix_states[k]
    repair_ok(img_path)
    state, _ident, events = state_of(img_path, readonly=False)
    assert not events
    assert state == cb.prefix_states[m]


def test_journal_commit_word_damage_stops_replay(bases, img_path):
    cb = bases["crash"]
    m = len(cb.txn_spans) // 3
    _a, e = _txn(cb, m)
    img = bytearray(cb.data)
    img[e - 3] ^= 0x01                               # inside the commit word
    write(img_path, img)
    assert state_of(img_path)[0] == cb.prefix_states[m]


def test_journal_header_magic_damage(bases, img_path):
    """Bad journal magic: the engine refuses (one line); repair resets the header, losing the
    committed transactions (the state as of the checkpoint)."""
    cb = bases["crash"]
    img = bytearray(cb.data)
    img[cb.g.journal_start * BS + 2] ^= 0x10
    write(img_path, img)
    with pytest.raises(fmt.FormatError) as ei:
        FileSystem.open(img_path)
    assert "\n" not in str(ei.value)
    p = daxfs_cli("fsck", img_path, check=False)
    assert p.returncode == 4 and "journal" in p.stdout
    repair_ok(img_path)
    assert state_of(img_path, readonly=False)[0] == cb.prefix_states[0]


def test_journal_nrec_damage_is_not_a_partial_transaction(bases, img_path):
    cb = bases["crash"]
    img = bytearray(cb.data)
    for m in range(len(cb.txn_spans)):
        a, _e = _txn(cb, m)
        nrec = struct.unpack_from("<I", img, a + 4)[0]
        if nrec >= 2:
            break
    struct.pack_into("<I", img, a + 4, nrec - 1)
    write(img_path, img)
    state = state_of(img_path)[0]
    assert state in cb.prefix_states, "replay applied part of a transaction"


# ----------------------------------------------------------------------------- refcounts
def test_refcount_damage_is_repaired(bases, img_path):
    c = bases["clean"]
    g = c.g
    img = bytearray(c.data)
    rc = g.region("refcounts")[0]
    big = ino_of(c, "/media/big.bin")
    t = fz.Tables(c.data, g)
    (_l, pblk, n), = t.extents_of(big)
    put(img, rc + 4 * pblk, 0, 4)                   # in use, marked free
    put(img, rc + 4 * (pblk + 1), 7, 4)             # count too high
    put(img, rc + 4 * (g.nblocks - 1), 1, 4)        # a free block marked used (leak)
    put(img, rc + 4 * 3, 0, 4)                      # a metadata block not marked reserved
    write(img_path, img)
    p = daxfs_cli("fsck", img_path, check=False)
    assert p.returncode == 4
    assert p.stdout.count("error: refcounts:") >= 4, p.stdout
    repair_ok(img_path)
    state, _ident, events = state_of(img_path, readonly=False)
    assert not events
    assert state == c.state
    r = np.frombuffer(fz._read(img_path), "<u4", g.nblocks, rc)
    assert r[pblk] == 2 and r[pblk + 1] == 2          # big.bin and big-clone share them
    assert r[g.nblocks - 1] == 0 and r[3] == fmt.REFCOUNT_RESERVED


def test_refcount_zero_on_block_in_use_never_overwrites_a_file(bases, img_path):
    c = bases["clean"]
    g = c.g
    img = bytearray(c.data)
    t = fz.Tables(c.data, g)
    first = min(p for ino in range(g.inode_count) for _l, p, _n in t.extents_of(ino))
    put(img, g.region("refcounts")[0] + 4 * first, 0, 4)
    write(img_path, img)
    # was a bug: the allocator trusted the table and handed the block out again; now the
    # mount cross-checks the counts against the extent maps and refuses to write
    with pytest.raises(MountError, match="undercounts 1 block"):
        FileSystem.open(img_path)
    fs = FileSystem.open(img_path, readonly=True)      # reading is still safe
    try:
        assert fz.walk_engine(fs)[0]
    finally:
        fs.close()
    assert fsck.check(img_path, repair=True).clean
    fs = FileSystem.open(img_path)
    try:
        before = fz.walk_engine(fs)[0]
        try:
            ino = fs.create(ROOT, b"new", 0o644, 0, 0).ino
            fs.write(ino, 0, b"x" * (64 * BS))
        except FsError as e:
            assert e.errno in (errno.EIO, errno.EROFS)
        after = fz.walk_engine(fs)[0]
        assert {p: v for p, v in after.items() if p in before} == before
    finally:
        fs.close()


# ----------------------------------------------------------------------------- extents
def _extent_outside(bases, img_path, where: str) -> tuple[str, int]:
    """Point the second extent of /docs/sparse outside the data region."""
    c = bases["clean"]
    g = c.g
    img = bytearray(c.data)
    ino = ino_of(c, "/docs/sparse")
    slot = extent_slots(c.data, g, ino)[1]            # file blocks 50..52
    pblk = {"metadata": g.inode_start, "beyond": g.nblocks + 100}[where]
    put(img, extent_off(g, slot, "pblk"), pblk, 8)
    write(img_path, img)
    return "/docs/sparse", 50 * BS


@pytest.mark.parametrize("where", ["metadata", "beyond"])
def test_extent_outside_data_region_fsck_repairs(bases, img_path, where):
    c = bases["clean"]
    _extent_outside(bases, img_path, where)
    rep = fsck.check(img_path)
    assert not rep.clean
    assert any(p.check == "extents" and "outside the data region" in p.message
               for p in rep.problems)
    repair_ok(img_path)
    state, _ident, events = state_of(img_path, readonly=False)
    assert not events
    good = {p: v for p, v in c.state.items() if p != "/docs/sparse"}
    assert {p: v for p, v in state.items() if p in good} == good


@pytest.mark.parametrize("where", ["metadata", "beyond"])
def test_extent_outside_data_region_read_gives_eio_and_failsafe(bases, img_path, where):
    path, off = _extent_outside(bases, img_path, where)
    fs = FileSystem.open(img_path)
    try:
        with pytest.raises(FsError) as ei:      # the extent map is checked when first loaded
            ino = fs.lookup(fs.lookup(ROOT, b"docs").ino, b"sparse").ino
            fs.read(ino, off, BS)
        assert ei.value.errno == errno.EIO
        assert fs.failed, "the engine must turn read-only (failsafe)"
        with pytest.raises(FsError) as ei:
            fs.create(ROOT, b"after", 0o644, 0, 0)
        assert ei.value.errno in (errno.EROFS, errno.EIO)
    finally:
        fs.close()


@pytest.mark.skipif(not have_fuse(), reason="needs /dev/fuse and fusermount3")
def test_extent_outside_data_region_daemon_keeps_serving(bases, img_path, tmp_path):
    """A real mount of the damaged image: the daemon survives reading the damaged file and
    serves every other file unchanged, with no traceback in its log."""
    c = bases["clean"]
    _extent_outside(bases, img_path, "metadata")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = daemon_log(mnt)
    try:
        daxfs_cli("mount", img_path, mnt, "-o", f"log={log}")
        try:
            with open(mnt / "docs" / "sparse", "rb") as f:
                f.read()
        except OSError as e:
            assert e.errno == errno.EIO
        walked = subprocess.run(fz.walk_mount_argv(mnt), capture_output=True, text=True,
                                timeout=120)
        res = json.loads(walked.stdout.strip().splitlines()[-1])
        assert all(err == errno.EIO for _p, _op, err in res["errors"] if _op != "short-read")
        for p, v in c.state.items():
            if v[0] == "f" and p != "/docs/sparse":
                assert res["state"][p] == ["f", v[3]], p
        from daxfs.daemon import lock_holder
        pid = lock_holder(img_path)
        assert pid and os.kill(pid, 0) is None, "the daemon must keep running"
        p = daxfs_cli("umount", mnt, check=False)
        assert "Traceback" not in p.stderr
        assert not fz._log_problems(str(log)), fz._log_tail(str(log))
    finally:
        force_cleanup(img_path, mnt)


@pytest.mark.skipif(not have_fuse(), reason="needs /dev/fuse and fusermount3")
def test_extent_outside_data_region_mount_read_is_eio(bases, img_path, tmp_path):
    _extent_outside(bases, img_path, "metadata")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        daxfs_cli("mount", img_path, mnt, "-o", f"log={daemon_log(mnt)}")
        with pytest.raises(OSError) as ei:
            with open(mnt / "docs" / "sparse", "rb") as f:
                f.read()
        assert ei.value.errno == errno.EIO
    finally:
        force_cleanup(img_path, mnt)


@pytest.mark.parametrize("how", ["overlap", "lblk-over-2**63", "fuzz-case-904"])
def test_corrupt_extent_lblk_read_is_consistent_or_eio(bases, img_path, how):
    c = bases["clean"]
    g = c.g
    if how == "fuzz-case-904":
        _case, img = fz.make_case(bases, SEED, 904)
        path = "/src/interleaved-b"
    else:
        img = bytearray(c.data)
        path, k, lblk = {"overlap": ("/docs/sparse", 2, 51),            # inside blocks 50..52
                         "lblk-over-2**63": ("/src/interleaved-b", 4, (1 << 64) - 2)}[how]
        slot = extent_slots(c.data, g, ino_of(c, path))[k]
        put(img, extent_off(g, slot, "lblk"), lblk, 8)
    write(img_path, img)
    ino = ino_of(c, path)
    try:
        fs = FileSystem.open(img_path)
    except MountError as e:                 # the damaged record now covers blocks it does not own
        assert "refcount table undercounts" in str(e)
        fs = FileSystem.open(img_path, readonly=True)       # reading must still be safe
    try:
        try:
            size = fs.getattr(ino).size
            data = fs.read(ino, 0, 1 << 20)
        except FsError as e:                    # the failsafe: EIO, and read-only from now on
            assert e.errno == errno.EIO
            with pytest.raises(FsError) as ei:
                fs.create(1, b"after", 0o644, 0, 0)
            assert ei.value.errno == errno.EROFS
        else:
            assert len(data) == min(size, 1 << 20), f"read returned {len(data)} bytes"
    finally:
        fs.close()


# ----------------------------------------------------------------------------- inodes
@pytest.mark.parametrize("size", [1 << 62, (1 << 64) - 5])
def test_symlink_with_corrupt_size(bases, img_path, size):
    c = bases["clean"]
    img = bytearray(c.data)
    ino = ino_of(c, "/link-to-big")
    put(img, inode_off(c.g, ino, "size"), size, 8)
    write(img_path, img)
    fs = FileSystem.open(img_path)
    try:
        with pytest.raises(FsError) as ei:
            fs.readlink(ino)
        assert ei.value.errno == errno.EIO
    finally:
        fs.close()
    assert not fsck.check(img_path).clean


def test_xattr_block_out_of_range_turns_on_failsafe(bases, img_path):
    c = bases["clean"]
    img = bytearray(c.data)
    ino = ino_of(c, "/docs")
    put(img, inode_off(c.g, ino, "xattr_blk"), c.g.nblocks + 5, 8)
    write(img_path, img)
    fs = FileSystem.open(img_path)
    try:
        with pytest.raises(FsError) as ei:
            fs.listxattr(ino)
        assert ei.value.errno == errno.EIO
        assert fs.failed
        with pytest.raises(FsError) as ei:
            fs.mkdir(ROOT, b"after-eio", 0o755, 0, 0)
        assert ei.value.errno in (errno.EROFS, errno.EIO)
    finally:
        fs.close()


def test_nlink_zero_on_a_named_file_is_not_reclaimed(bases, img_path):
    c = bases["clean"]
    img = bytearray(c.data)
    ino = ino_of(c, "/media/big.bin")
    put(img, inode_off(c.g, ino, "nlink"), 0, 4)
    write(img_path, img)
    fs = FileSystem.open(img_path)
    try:
        media = fs.lookup(ROOT, b"media").ino
        try:
            a = fs.lookup(media, b"big.bin")
            fs.forget(a.ino, 1)
        except FsError as e:
            assert e.errno == errno.EIO
        try:
            fs.lookup(media, b"big.bin")
        except FsError as e:
            assert e.errno == errno.EIO, "the file was destroyed"
    finally:
        fs.close()
    # the file's data must survive for fsck --repair to restore it
    repair_ok(img_path)
    assert state_of(img_path)[0]["/media/big.bin"] == c.state["/media/big.bin"]


def test_orphan_with_bad_xattr_block(bases, img_path):
    c = bases["clean"]
    g = c.g
    img = bytearray(c.data)
    ino = ino_of(c, "/docs/deep/deeper/file-03-4095")       # has an xattr block
    d = dirent_slot(c.data, g, ino_of(c, "/docs/deep/deeper"), b"file-03-4095")
    doff = g.region("dirents")[0] + d * fmt.DIRENT_DTYPE.itemsize
    img[doff:doff + 4] = bytes(4)                           # the entry is gone: unnamed
    put(img, inode_off(g, ino, "nlink"), 0, 4)
    put(img, inode_off(g, ino, "flags"), fmt.IFLAG_ORPHAN, 4)
    put(img, inode_off(g, ino, "xattr_blk"), 1 << 40, 8)
    write(img_path, img)
    try:
        FileSystem.open(img_path).close()
    except (fmt.FormatError, MountError, FsError):
        pass


def test_flags_in_a_free_inode_slot(bases, img_path):
    c = bases["clean"]
    g = c.g
    img = bytearray(c.data)
    modes = np.frombuffer(c.data, fmt.INODE_DTYPE, g.inode_count, g.region("inodes")[0])["mode"]
    free = int(np.flatnonzero(modes[2:] == 0)[0]) + 2
    put(img, inode_off(g, free, "flags"), fmt.IFLAG_ORPHAN, 4)
    write(img_path, img)
    repair_ok(img_path)
    FileSystem.open(img_path).close()


# ----------------------------------------------------------------------------- dirents
def test_dirent_name_padding_does_not_rename(bases, img_path):
    c = bases["clean"]
    g = c.g
    img = bytearray(c.data)
    slot = dirent_slot(c.data, g, ino_of(c, "/media"), b"big-clone")
    img[g.region("dirents")[0] + slot * fmt.DIRENT_DTYPE.itemsize + 9 + 200] = ord("q")
    write(img_path, img)
    repair_ok(img_path)
    assert state_of(img_path)[0]["/media/big-clone"] == c.state["/media/big-clone"]


def test_dirent_pointing_to_a_free_inode(bases, img_path):
    """A name whose target is a free inode: the engine hides it (readdir skips what getattr
    refuses), fsck removes the entry, the rest is untouched."""
    c = bases["clean"]
    g = c.g
    img = bytearray(c.data)
    slot = dirent_slot(c.data, g, ROOT, b"link-to-big")
    off = g.region("dirents")[0] + slot * fmt.DIRENT_DTYPE.itemsize + 4
    modes = np.frombuffer(c.data, fmt.INODE_DTYPE, g.inode_count, g.region("inodes")[0])["mode"]
    put(img, off, int(np.flatnonzero(modes[2:] == 0)[0]) + 2, 4)
    write(img_path, img)
    state, _ident, events = state_of(img_path, readonly=False)
    assert not [e for e in events if e.kind == "exception"]
    assert "/link-to-big" not in state
    repair_ok(img_path)
    state = state_of(img_path)[0]
    want = {p: v for p, v in c.state.items() if p not in ("/", "/link-to-big")}
    assert {p: v for p, v in state.items() if p in want} == want


# ----------------------------------------------------------------------------- CLI
def test_cli_sample_never_prints_a_traceback(bases, img_path):
    """fsck, fsck --repair, info and stat through the real CLI on a few damaged images of each
    region: exit codes in range, never a traceback."""
    seen = set()
    for i in range(400):
        case, img = fz.make_case(bases, SEED + 1, i)
        key = (case.base, case.region)
        if key in seen:
            continue
        seen.add(key)
        write(img_path, img)
        for args, ok in ((("info", img_path), (0, 1)), (("stat", img_path), (0, 1)),
                         (("fsck", img_path), (0, 4, 8)), (("fsck", "--repair", img_path),
                                                           (0, 1, 4, 8))):
            p = daxfs_cli(*args, check=False)
            assert p.returncode in ok, (case.desc, args, p.stdout, p.stderr)
            assert "Traceback" not in p.stderr and "internal error" not in p.stderr, \
                (case.desc, args, p.stderr)
    assert len(seen) >= 10
