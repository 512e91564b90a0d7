"""kill -9 of the daemon at random moments of real workloads (issue "Prove crash consistency"):
a CI sample of tests/harness/kill_explore.py -- one kill point per scenario (cp -a, fio randwrite,
mmap + msync, cp reflinks + COW breaks) with fixed seeds, each on a fresh image: stale mount,
lazy unmount, fsck of the crashed image, remount, everything completed/fsync'ed/msync'ed before
the kill intact, the source of every reflink untouched, the filesystem still working, all space
back after deleting everything, clean unmount and fsck. `make kill-test` runs many more.

The checker itself is tested too: a point whose recovered file is damaged on purpose (an
fsync'ed fio write undone, an msync'ed page reverted) must fail, and the byte models must
accept exactly old-or-new bytes for the write in flight.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import have_fuse
from harness import kill_explore as ke

pytestmark = pytest.mark.skipif(not have_fuse() or shutil.which("fio") is None,
                                reason="needs /dev/fuse, fusermount3 and fio")

SEED = 7          # point seeds: one per scenario, as `kill_explore.py --seed 7 --points 4`


@pytest.fixture
def workdir(tmp_path_factory) -> Path:
    """Where the points put images and mountpoints: /dev/shm like the script (tmp otherwise)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 2 << 30:
        return shm
    return tmp_path_factory.mktemp("kill")


@pytest.mark.parametrize("scenario, seed", ke.plan(len(ke.SCENARIOS), SEED, "all"))
def test_kill_point(scenario, seed, workdir):
    summary = ke.run_point(scenario, seed, workdir)
    print(f"{scenario} seed={seed}: {summary}")
    assert not list(workdir.glob(f"kill-{scenario}-*")), "run_point left files behind"


class _UndoOneFioWrite(ke.FioRandwrite):
    """Damages the recovered file before the check: the first completed write's block gets
    its pre-fill bytes back, as if a completed (and fsync'ed) write had been lost."""

    def check(self, pt):
        lines = (pt.dir / "fio.iolog").read_text().splitlines()
        off = next(int(ln.split()[3]) for ln in lines if " write " in ln)
        with open(pt.state["path"], "r+b") as f:
            f.seek(off)
            f.write(pt.state["data"][off:off + ke.BS])
        super().check(pt)


class _RevertOneMsyncedPage(ke.MmapWriter):
    """Damages the recovered file before the check: one page msync'ed before the kill (and not
    stored again afterwards) gets its initial bytes back."""

    def check(self, pt):
        ops = ke.read_ops(pt.oplog)
        durable, later = self._model(ops)
        pg = next(p for p, v in durable.items() if not later[p]
                  and self._page(pt, p, v) != self._page(pt, p, None))
        with open(pt.state["path"], "r+b") as f:
            f.seek(pg * ke.BS)
            f.write(self._page(pt, pg, None))
        super().check(pt)


@pytest.mark.parametrize("name, damaged, message", [
    ("fio", _UndoOneFioWrite, "differs at byte"),
    ("mmap", _RevertOneMsyncedPage, "msync'd version"),
])
def test_the_checker_notices_lost_data(monkeypatch, workdir, name, damaged, message):
    monkeypatch.setitem(ke.SCENARIO_TYPES, name, damaged)
    monkeypatch.setattr(ke, "KILL_WINDOW", (0.5, 0.6))     # some work done and synced
    with pytest.raises(ke.CheckFailed, match=message):
        ke.run_point(name, SEED, workdir)
    assert not list(workdir.glob(f"kill-{name}-*")), "a failed point left files behind"


def test_byte_model_accepts_old_or_new_bytes_only_in_the_write_in_flight():
    old = bytes(range(256)) * 16
    new = b"\xee" * 4096
    want = bytearray(old * 3)
    inflight = (4096, new, old)
    assert ke.check_model(bytes(want), bytes(want), "f", inflight) is False
    got = bytearray(want)
    got[4096:8192] = new
    assert ke.check_model(bytes(got), bytes(want), "f", inflight) is False
    got[4096 + 100:8192] = old[100:]                        # torn: 100 new bytes, then old
    assert ke.check_model(bytes(got), bytes(want), "f", inflight) is True
    got[5000] ^= 0x5A                                       # neither old nor new
    with pytest.raises(ke.CheckFailed, match="neither old nor new"):
        ke.check_model(bytes(got), bytes(want), "f", inflight)
    got = bytearray(want)
    got[9000] ^= 1                                          # outside the write in flight
    with pytest.raises(ke.CheckFailed, match="differs at byte 9000"):
        ke.check_model(bytes(got), bytes(want), "f", inflight)
    with pytest.raises(ke.CheckFailed, match="size"):
        ke.check_model(bytes(want[:-1]), bytes(want), "f")


def test_mmap_model_msync_makes_the_latest_store_durable():
    ops = [["w", "1", "0"], ["w", "2", "1"], ["s", "1"], ["w", "1", "2"], ["w", "3", "3"],
           ["S"], ["w", "2", "4"], ["s", "2"]]                      # the last msync in flight
    durable, later = ke.MmapWriter._model(ops)
    assert durable == {1: 2, 2: 1, 3: 3}
    assert later == {1: [], 2: [4], 3: []}


def test_plan_spreads_points_and_seeds():
    assert ke.plan(6, 10, "all") == [("cp", 10), ("fio", 11), ("mmap", 12), ("reflink", 13),
                                     ("cp", 14), ("fio", 15)]
    assert ke.plan(2, 5, "mmap") == [("mmap", 5), ("mmap", 6)]
