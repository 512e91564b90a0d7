"""Crash consistency (tests/harness/crashsim*.py): a bounded sample of the exploration that
scripts/crash_explore.py runs in full. Every length-1 sequence of the operation catalog, a few
length-2 and seeded random sequences, in both crash models (daemon killed: every store; power
loss: every fence x in-flight page subsets), plus crashes during recovery. Each crash image is
mounted (journal replay, orphan reclaim), read, unmounted, fsck'd and judged by the oracle.

Engine bugs the harness found and that are still open are listed in crashsim.KNOWN_ISSUES;
the sample test tolerates only those, and each has a strict-xfail reproducer below that starts
passing (and so fails, being strict) once the bug is fixed: then delete the KNOWN_ISSUES entry
and the xfail mark. Bugs already fixed keep their reproducer as a regression test.
"""
from __future__ import annotations

import os
import random

import pytest

from daxfs import journal as jmod
from harness import crashsim as cs

SEED = 20240611
PAIRS = [
    [("write", "/A", 2 * 4096, 4096, 1), ("fsync", "/A")],
    [("write", "/A", 9000, 100, 2), ("remount",)],
    [("create", "/N"), ("rename", "/N", "/A", 0)],
    [("link", "/A", "/N"), ("unlink", "/A")],
    [("clone", "/A", 0, "/Z", 0, cs.A_SIZE), ("write", "/Z", 100, 200, 5)],
    [("unlink_open", "/X"), ("remount",)],
    [("rename", "/A", "/D", 2), ("rename", "/D", "/A", 2)],
    [("mkdir", "/N"), ("rename", "/C", "/N/C", 0)],
    [("truncate", "/A", 0), ("write", "/A", 0, 5000, 14)],
    [("setxattr", "/Z", "user.k", 100, 12), ("unlink", "/Z")],
]


@pytest.fixture
def explorer():
    ex = cs.Explorer("/dev/shm" if os.path.isdir("/dev/shm") else "/tmp", seed=SEED,
                     verify_every=97)
    yield ex
    ex.close()


def _unknown(ex):
    return [f for f in ex.failures if not f.known]


def test_crash_states_sample(explorer):
    ex = explorer
    for op in cs.CATALOG:
        ex.run_sequence([op])
    rng = random.Random(SEED)
    sampled = rng.sample([[a, b] for a in cs.CATALOG for b in cs.CATALOG], 40)
    for ops in PAIRS + sampled:
        ex.run_sequence(ops)
    for i in range(3):
        ex.run_sequence(None, n_random=5, rng_seed=SEED + i, prefix_closed=False)
    st = ex.stats
    new = _unknown(ex)
    assert not new, f"{len(new)} crash states failed:\n" + "\n".join(f.text() for f in new[:8])
    assert st.states["kill"] > 500 and st.states["power"] > 500, st
    assert st.recovery_states["kill"] > 50 and st.recovery_states["power"] > 50, st
    ex.scratch.verify()
    print(f"{st.total} crash states checked ({st.states}), {st.total_failed} failed, all known: "
          f"{ {k: n for k, n in st.by_issue.items()} }")


def test_crash_states_small_transactions(explorer):
    """fs.TXN_BLOCKS = 1: big-truncate (IFLAG_TRIM), chunked reclaim and chunked clone paths."""
    ex = explorer
    ex.txn_blocks = 1
    for op in cs.CATALOG:
        if op[0] in ("truncate", "unlink", "unlink_open", "rename", "clone", "punch", "remount"):
            ex.run_sequence([op])
    ex.run_sequence([("truncate", "/A", 0), ("remount",)])
    ex.run_sequence([("unlink_open", "/A"), ("remount",)])
    new = _unknown(ex)
    assert not new, f"{len(new)} crash states failed:\n" + "\n".join(f.text() for f in new[:8])
    assert ex.stats.total > 300, ex.stats


def _apply_before_commit(monkeypatch):
    orig = jmod.Journal.commit

    def commit(self, writes):
        for off, data in writes:          # tables updated before the transaction is durable
            self.pm.store(off, data)
        orig(self, writes)

    monkeypatch.setattr(jmod.Journal, "commit", commit)


def test_replay_reproduces_a_failure(explorer, monkeypatch):
    """A failure's printed trace rebuilds the same crash image and the same verdict."""
    _apply_before_commit(monkeypatch)
    ex = explorer
    ex.recovery_crashes = False
    # (a rename to a new name rewrites one dirent in place: no intermediate state to see)
    ex.run_sequence([("rename", "/C", "/A", 0)])
    assert ex.failures
    for f in ex.failures[:5]:
        _obs, v = ex.replay(f.model, f.ops, f.point)
        assert v is not None and v.message == f.message


# ------------------------------------------------------------------ the harness has teeth
# Break the journal on purpose (monkeypatch, in this test only): the harness must notice.

def _rename_seq():
    return [("rename", "/A", "/B", 0)]


def test_detects_apply_before_commit(explorer, monkeypatch):
    _apply_before_commit(monkeypatch)
    explorer.models = ("kill",)
    explorer.recovery_crashes = False
    explorer.run_sequence(_rename_seq())
    assert any(f.model == "kill" for f in explorer.failures)


def test_detects_unpersisted_commit(explorer, monkeypatch):
    orig_persist = cs.RecordingPMem.persist

    def persist(self, offset, length):    # never persist a commit word (8 bytes in the log)
        if length == 8 and offset >= 2 * 4096:
            return
        orig_persist(self, offset, length)

    monkeypatch.setattr(cs.RecordingPMem, "persist", persist)
    explorer.models = ("power",)
    explorer.recovery_crashes = False
    explorer.run_sequence([("rename", "/C", "/N", 0)])     # one transaction
    assert any(f.model == "power" and f.point[0] == "power-end" for f in explorer.failures)


def test_detects_lost_fsync(explorer, monkeypatch):
    """An fsync that persists nothing: overwritten data must be new after fsync returned."""
    from daxfs.fs import FileSystem
    monkeypatch.setattr(FileSystem, "sync", lambda self: self.tx.flush_times())
    explorer.models = ("power",)
    explorer.recovery_crashes = False
    explorer.run_sequence([("write", "/A", 2 * 4096, 4096, 1), ("fsync", "/A")])
    assert any("page" in f.message for f in explorer.failures)


# ------------------------------------------------------------------ engine bugs found
# Fixed in c8a59d7 (regression tests): each of these sequences produced failing crash states.

def _run(ex, model, ops, recovery=False):
    ex.models = (model,)
    ex.recovery_crashes = recovery
    ex.run_sequence(ops)
    assert ex.stats.total > 0
    return [f.text() for f in ex.failures]


def test_fixed_stale_tail_after_truncate_grow(explorer):
    """zero_tail zeroed the old EOF block's tail in place without persisting it before the
    growing commit: after power loss, bytes cut off by an earlier truncate reappeared."""
    fails = _run(explorer, "power", [("truncate", "/T", 2 * 4096)])
    assert not fails, "\n".join(fails[:3])


def test_fixed_stale_tail_after_extending_write(explorer):
    fails = _run(explorer, "power", [("write", "/T", 6000, 100, 10)])
    assert not fails, "\n".join(fails[:3])


def test_fixed_xattr_lost_after_checkpoint(explorer):
    """Journal.checkpoint persisted only [0, meta_len) but xattr blocks (data region) are
    journaled and applied in place: after the epoch bump a power loss lost the change."""
    fails = _run(explorer, "power", [("setxattr", "/A", "user.new", 20, 11), ("checkpoint",)])
    assert not fails, "\n".join(fails[:3])


def test_fixed_xattr_block_garbage_after_checkpoint(explorer):
    """Same, when the new xattr block reused a freed data block: EIO and an fsck error."""
    fails = _run(explorer, "power", [("truncate", "/A", 0), ("setxattr", "/Z", "user.k", 100, 12)])
    assert not fails, "\n".join(fails[:3])


def test_fixed_xattr_lost_in_recovery(explorer):
    """Same at mount: replay applied the xattr record, the replay checkpoint did not persist it."""
    fails = _run(explorer, "power", [("setxattr", "/Z", "user.k", 100, 12)], recovery=True)
    assert not fails, "\n".join(fails[:3])


def test_fixed_clone_past_eof_atomic(explorer):
    """clone_range past dst EOF committed dst.size before the shared blocks."""
    fails = _run(explorer, "kill", [("clone", "/A", 4096, "/C", 2 * 4096, 2 * 4096)])
    fails += _run(explorer, "power", [("clone", "/A", 4096, "/C", 2 * 4096, 2 * 4096)])
    assert not fails, "\n".join(fails[:3])


def test_torn_in_place_write_is_the_contract(explorer):
    """README: file data is not journaled; a write killed before its commit may already show
    bytes it stored into owned blocks, but never its size change or newly mapped blocks."""
    ex = explorer
    fails = _run(ex, "kill", [("write", "/A", 14000, 6000, 3)])     # in place + extension
    fails += _run(ex, "kill", [("write", "/F", 4000, 200, 8)])      # two extents, in place
    assert not fails, "\n".join(fails[:3])


def test_unaligned_punch_is_one_transaction(explorer):
    """Was "punch-multi-txn": the head write (here a COW of a shared block), the unmap and the
    tail write were three transactions, so a crash could show a partly punched range."""
    fails = _run(explorer, "kill", [("punch", "/B", 100, 2 * 4096)])
    fails += _run(explorer, "power", [("punch", "/B", 100, 2 * 4096)])
    assert not fails, "\n".join(fails[:3])
