"""The COW intent ring (format.py, cowlog.py): what the C data plane leaves in the image when
the daemon dies after breaking COW itself, and what the next mount makes of it.

Each test builds the crash state by hand, byte for byte as daxfs/_cowplane.c stores it: a
clone whose blocks are all shared, new bytes in a block that is free on the image, and a ring
record naming it (format.pack_cow_record). Mounting must apply every record that counts, once,
and none that does not (torn, stale, or naming a block the file no longer maps), and leave an
image fsck passes, with refcounts and the frame index equal to what the tables imply."""
from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from daxfs import format as fmt
from daxfs import fsck
from daxfs.errors import FsError
from daxfs.fs import FileSystem

from enginetools import fsck_clean
from test_cow_break import _refcounts_match_maps

BS = 4096
NBLK = 16


def _setup(path: str) -> tuple[int, int, bytes]:
    """orig and its clone (every block shared), unmounted cleanly: (orig, clone, bytes)."""
    fs = FileSystem.open(path)
    a = fs.create(1, b"orig", 0o644, 0, 0).ino
    b = fs.create(1, b"clone", 0o644, 0, 0).ino
    data = os.urandom(NBLK * BS)
    fs.write(a, 0, data)
    fs.clone_range(a, 0, b, 0, NBLK * BS)
    assert fs.stats()["shared_blocks"] == NBLK
    fs.close()
    return a, b, data


def _crash_breaks(path: str, ino: int, blocks: list[int], first_seq: int = 0,
                  torn: int | None = None) -> tuple[dict[int, bytes], list[int]]:
    """What C leaves after breaking file blocks `blocks` of `ino` and dying: the new bytes in
    free blocks and a ring record for each (record `torn` with a bad check). Returns the new
    bytes by file block and the blocks used."""
    fs = FileSystem.open(path, readonly=True)
    node = fs.inodes.get(ino)
    old = [node.extents.lookup(l) for l in blocks]
    free = np.flatnonzero(fs.alloc.rc[fs.g.data_start:] == 0) + fs.g.data_start
    ring_off, slots = fs.g.cow_ring()
    fs.close()
    new = {}
    used = []
    with open(path, "r+b") as f:
        for i, (l, p) in enumerate(zip(blocks, old)):
            q = int(free[-1 - i])                      # far from the cursor, like a pool's
            new[l] = os.urandom(BS)
            os.pwrite(f.fileno(), new[l], q * BS)
            seq = first_seq + i
            rec = bytearray(fmt.pack_cow_record(seq, ino, l, q, p, 10**18 + i))
            if i == torn:
                rec[-1] ^= 1
            os.pwrite(f.fileno(), bytes(rec), ring_off + (seq % slots) * 64)
            used.append(q)
    return new, used


def _expect(data: bytes, new: dict[int, bytes]) -> bytes:
    out = bytearray(data)
    for l, b in new.items():
        out[l * BS:(l + 1) * BS] = b
    return bytes(out)


def _check(path: str, a: int, b: int, data: bytes, want_b: bytes) -> FileSystem:
    fs = FileSystem.open(path)
    assert fs.read(a, 0, NBLK * BS) == data
    assert fs.read(b, 0, NBLK * BS) == want_b
    assert fs.frames_match_tables() and _refcounts_match_maps(fs)
    return fs


def test_mount_applies_the_breaks_a_crash_left(tmp_image):
    a, b, data = _setup(tmp_image)
    new, _ = _crash_breaks(tmp_image, b, [3, 0, 15, 7])
    report = fsck.check(tmp_image, repair=False)    # consistent without them; it says so
    assert report.clean and any(p.obj == "COW ring" and "4 COW break" in p.message
                                for p in report.problems)
    fs = _check(tmp_image, a, b, data, _expect(data, new))
    assert fs.stats()["shared_blocks"] == NBLK - 4
    assert fs.stats()["cow_ring_applied"] == 4
    assert fs.inodes.get(b).mtime >= 10**18             # the write's time, from the record
    fs.close()
    fsck_clean(tmp_image)
    fs = _check(tmp_image, a, b, data, _expect(data, new))   # applied once: nothing left
    assert fs.stats()["cow_ring_applied"] == 0 and not fs.cow.pending().size
    fs.close()


def test_torn_record_is_not_applied_and_its_block_stays_free(tmp_image):
    a, b, data = _setup(tmp_image)
    new, used = _crash_breaks(tmp_image, b, [1, 2, 3], torn=1)
    del new[2]                                          # the torn one: its write was never acked
    fs = _check(tmp_image, a, b, data, _expect(data, new))
    assert fs.alloc.count(used[1]) == 0
    assert fs.stats()["shared_blocks"] == NBLK - 2
    fs.close()
    fsck_clean(tmp_image)


def test_records_below_the_applied_number_are_stale(tmp_image):
    a, b, data = _setup(tmp_image)
    new, _ = _crash_breaks(tmp_image, b, [4, 5])
    _check(tmp_image, a, b, data, _expect(data, new)).close()   # applied: seq 0, 1
    # the same slots rewritten with seq 0 and 1 again (a ring wrapped long ago): not applied
    _crash_breaks(tmp_image, b, [8, 9], first_seq=0)
    fs = _check(tmp_image, a, b, data, _expect(data, new))
    assert fs.stats()["cow_ring_applied"] == 0
    fs.close()
    new2, _ = _crash_breaks(tmp_image, b, [10], first_seq=2)  # the next number counts
    _check(tmp_image, a, b, data, _expect(data, {**new, **new2})).close()
    fsck_clean(tmp_image)


def test_record_for_a_block_the_file_no_longer_maps_is_dropped(tmp_image):
    a, b, data = _setup(tmp_image)
    new, used = _crash_breaks(tmp_image, b, [6])
    fs = FileSystem.open(tmp_image, readonly=True)
    ring_off, slots = fs.g.cow_ring()
    fs.close()
    with open(tmp_image, "r+b") as f:                   # claim it broke block 6 of orig
        rec = fmt.pack_cow_record(0, a, 6, used[0], 12345, 1)
        os.pwrite(f.fileno(), rec, ring_off)
    fs = _check(tmp_image, a, b, data, data)
    assert fs.stats()["cow_ring_dropped"] == 1 and fs.alloc.count(used[0]) == 0
    fs.close()
    fsck_clean(tmp_image)


def test_read_only_mount_shows_the_breaks_without_writing(tmp_image):
    a, b, data = _setup(tmp_image)
    new, _ = _crash_breaks(tmp_image, b, [2])
    before = open(tmp_image, "rb").read()
    fs = FileSystem.open(tmp_image, readonly=True)
    assert fs.read(b, 0, NBLK * BS) == _expect(data, new)
    fs.close()
    assert open(tmp_image, "rb").read() == before
    _check(tmp_image, a, b, data, _expect(data, new)).close()
    fsck_clean(tmp_image)


def test_ring_is_outside_the_log_and_inside_the_journal_region(tmp_image):
    fs = FileSystem.open(tmp_image, readonly=True)
    g, j = fs.g, fs.journal
    ring_off, slots = g.cow_ring()
    assert j.log_off + j.log_len == ring_off
    assert ring_off + slots * 64 == (g.journal_start + g.journal_blocks) * BS
    assert fmt.JOURNAL_HEADER_DTYPE.itemsize <= fmt.COW_APPLIED_OFF < BS
    fs.close()


NO_SUCH_TYPE = (0o030644).to_bytes(4, "little")      # a mode with a file type that does not exist


def swap_mode(path: str, ino: int, mode: bytes) -> bytes:
    """Put `mode` (4 bytes) into inode `ino`'s record on the image, behind whoever has it
    open; returns the bytes that were there."""
    fs = FileSystem.open(path, readonly=True)
    at = fs.g.region("inodes")[0] + ino * fmt.INODE_DTYPE.itemsize + \
        fmt.INODE_DTYPE.fields["mode"][1]
    fs.close()
    with open(path, "r+b") as f:
        old = os.pread(f.fileno(), 4, at)
        os.pwrite(f.fileno(), mode, at)
    return old


def test_failsafe_reads_show_the_breaks_left_in_the_ring(tmp_image):
    """The engine turns read-only (failsafe) while breaks C did after Python last applied wait
    in the ring: no transaction applies them before the next mount, yet reads until then
    must show the bytes C wrote, not the shared block Python's own map still names (they
    showed the old bytes). The next mount applies them as after a crash."""
    a, b, data = _setup(tmp_image)
    fs = FileSystem.open(tmp_image)
    victim = fs.create(1, b"victim", 0o644, 0, 0).ino
    fs.close()
    fs = FileSystem.open(tmp_image)                     # victim not loaded: its record is read
    assert fs.read(b, 0, NBLK * BS) == data             # at its lookup, corrupt by then
    blocks = [9, 0, 14]                                 # what C stores, behind Python's back:
    new, _ = _crash_breaks(tmp_image, b, blocks, first_seq=fs.cow.applied)
    mode = swap_mode(tmp_image, victim, NO_SUCH_TYPE)   # then corrupt metadata is met
    with pytest.raises(FsError) as ei:
        fs.lookup(1, b"victim")
    assert ei.value.errno == errno.EIO and fs.failed
    want = _expect(data, new)
    assert fs.read(b, 0, NBLK * BS) == want
    assert fs.read(b, 9 * BS + 100, 2 * BS) == want[9 * BS + 100:11 * BS + 100]
    assert fs.read(a, 0, NBLK * BS) == data
    fs.close()
    swap_mode(tmp_image, victim, mode)
    fs = _check(tmp_image, a, b, data, want)            # the next mount applies them
    assert fs.stats()["cow_ring_applied"] == len(blocks)
    fs.close()
    fsck_clean(tmp_image)
