"""scripts/bench.py in a tiny mode (16 MiB file, 1 s jobs): every target of `make bench` builds,
mounts, gives a number and goes away; a peer that cannot be built costs one line, not the run."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import have_fuse

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "scripts" / "bench.py"
TINY = ["--short", "--runtime", "1", "--size", "16M", "--no-extras"]

pytestmark = pytest.mark.skipif(
    not have_fuse() or not shutil.which("fio") or not shutil.which("gcc"),
    reason="needs /dev/fuse, fusermount3, fio and gcc")


def bench(tmp_path: Path, *args, env=None) -> tuple[subprocess.CompletedProcess, dict, str]:
    p = subprocess.run([sys.executable, str(BENCH), *TINY, "--out", str(tmp_path), *args],
                       capture_output=True, text=True, timeout=300, env=env)
    out = p.stdout + p.stderr
    assert "Traceback" not in out, out
    runs = list(tmp_path.iterdir())
    assert len(runs) == 1, (runs, out)
    results = json.loads((runs[0] / "results.json").read_text())["results"]
    return p, results, (runs[0] / "results.md").read_text()


def leftover_mounts() -> list[str]:
    return [l for l in Path("/proc/mounts").read_text().splitlines() if "daxfs-bench-" in l]


def test_bench_all_targets_tiny(tmp_path):
    p, results, md = bench(tmp_path, "--jobs", "seqW,rr4k-buf,cow-storm", "--daxfs",
                           "--writeback", "--peers")
    names = ["tmpfs", "daxfs", "daxfs-writeback", "passthrough_ll", "passthrough_ll-writeback",
             "pyfuse3-passthroughfs"]
    assert list(results) == names, p.stdout + p.stderr
    for n in names:
        assert not results[n]["errors"], (n, results[n]["errors"])
        for job in ("seqW", "rr4k-buf", "cow-storm"):
            assert results[n]["jobs"][job]["value"] > 0, (n, job)
    assert p.returncode == 0, p.stdout + p.stderr
    # the daemons' CPU is measured for every FUSE target
    assert "daemon_cpu_us_per_op" in results["daxfs"]["jobs"]["rr4k-buf"]
    assert "daemon_cpu_us_per_op" in results["passthrough_ll"]["jobs"]["rr4k-buf"]
    header = next(l for l in md.splitlines() if l.startswith("| job | unit |"))
    for col in names + ["daxfs/tmpfs", "daxfs/ll", "daxfs/ll-wb", "daxfs/py", "wb/tmpfs",
                        "wb/ll"]:
        assert f"| {col} " in header, header
    assert not leftover_mounts()


def test_bench_peer_that_cannot_be_fetched_is_one_line(tmp_path):
    """An empty peer cache and an unreachable package index: pyfuse3's example cannot be
    fetched; passthrough_ll is built into the empty cache and still runs."""
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": "http://127.0.0.1:9/",
           "PIP_EXTRA_INDEX_URL": "", "PIP_FIND_LINKS": "", "PIP_RETRIES": "0",
           "PIP_DEFAULT_TIMEOUT": "2"}
    p, results, md = bench(tmp_path / "out", "--no-tmpfs", "--jobs", "seqW",
                           "--peer", "pyfuse3-passthroughfs", "--peer", "passthrough_ll",
                           "--peer-cache", str(tmp_path / "cache"), env=env)
    assert p.returncode == 1, p.stdout + p.stderr
    assert results["passthrough_ll"]["jobs"]["seqW"]["value"] > 0
    err = results["pyfuse3-passthroughfs"]["errors"]["setup"]
    assert "\n" not in err and "pip" in err, err
    lines = [l for l in p.stderr.splitlines() if "target pyfuse3-passthroughfs skipped" in l]
    assert len(lines) == 1, p.stderr
    assert not leftover_mounts()
