"""The racer (tests/harness/racer.py) as a CI sample: writers, a mutator, a cloner and a reader
at once on a real mount, so the C data plane's in-place writes and COW breaks race Python's
reflinks, punches and copies, also across kill -9 of the daemon; and proof that its checks can
fail (the time-window rule on synthetic histories; a run whose model
loses one write must be reported)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import have_fuse, have_root
from harness.racer_model import FileModel, Mismatch, Versions, Write, check_range

ROOT = Path(__file__).resolve().parent.parent
needs_mount = pytest.mark.skipif(not (have_root() and have_fuse()),
                                 reason="needs root and /dev/fuse")


def race(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tests.harness.racer", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


@needs_mount
@pytest.mark.parametrize("seed,opts", [(1, ""), (2, ""), (3, "cow=python"), (4, "threads=0")])
def test_racer_sample(seed, opts):
    p = race("--seed", str(seed), "--phases", "6", "--ops", "400", "--mount-opts", opts)
    assert p.returncode == 0, p.stdout + p.stderr
    m = re.search(r"clones racing (\d+) writes.*C data plane: (\d+) writes, (\d+) COW breaks",
                  p.stdout)
    assert m and "0 mismatches" in p.stdout, p.stdout
    assert int(m[1]) > 0, "no clone overlapped a write: the sample raced nothing"
    if opts == "":
        assert int(m[3]) > 0, "the C data plane broke no COW: the sample missed its target"


@needs_mount
def test_racer_kill9_mid_phase():
    """kill -9 of the daemon while every process is in the middle of its work: fsck finds no
    error, and after the remount every acknowledged write is there and every chunk in flight
    holds its old or its new bytes."""
    p = race("--seed", "6", "--phases", "6", "--ops", "400", "--kill-rate", "0.7")
    assert p.returncode == 0, p.stdout + p.stderr
    m = re.search(r"(\d+) kill -9 \((\d+) chunks in flight", p.stdout)
    assert m and int(m[1]) > 0 and "0 mismatches" in p.stdout, p.stdout


@needs_mount
def test_racer_reports_a_lost_write():
    p = race("--seed", "5", "--phases", "2", "--ops", "200", "--inject")
    assert p.returncode == 1, p.stdout + p.stderr
    assert "differs from the model" in p.stdout, p.stdout


def _history():
    """One 512-byte chunk written twice: v0 -> v1 during [10, 20], v1 -> v2 during [30, 40]."""
    v0, v1, v2 = b"\0" * 512, b"\1" * 512, b"\2" * 512
    start = {"f": FileModel(512, bytearray(v0))}
    return Versions(start, [Write("f", 0, 10, 20, v1), Write("f", 0, 30, 40, v2)]), v0, v1, v2


@pytest.mark.parametrize("window,ok,bad", [
    ((0, 5), ["v0"], ["v1", "v2"]),            # before both writes: only the first version
    ((15, 16), ["v0", "v1"], ["v2"]),          # during the first write: before or after it
    ((22, 28), ["v1"], ["v0", "v2"]),          # between them: v0 is gone, v2 not yet there
    ((25, 35), ["v1", "v2"], ["v0"]),
    ((45, 50), ["v2"], ["v0", "v1"]),          # after both
])
def test_window_rule(window, ok, bad):
    v, *vs = _history()
    named = dict(zip(["v0", "v1", "v2"], vs))
    for n in ok:
        check_range(v, "f", 0, named[n], *window, "clone", tolerate_tear=False)
    for n in bad:
        with pytest.raises(Mismatch):
            check_range(v, "f", 0, named[n], *window, "clone", tolerate_tear=False)


def test_torn_sector_counts_for_reads_only():
    v, v0, v1, _ = _history()
    mixed = v0[:100] + v1[100:]
    assert check_range(v, "f", 0, mixed, 15, 16, "read", tolerate_tear=True) == 1
    with pytest.raises(Mismatch):
        check_range(v, "f", 0, mixed, 15, 16, "clone", tolerate_tear=False)
    with pytest.raises(Mismatch):                      # a byte no version held is never a tear
        check_range(v, "f", 0, b"\7" + v1[1:], 15, 16, "read", tolerate_tear=True)
