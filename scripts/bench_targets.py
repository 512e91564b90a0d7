"""The targets of scripts/bench.py: how each is set up, mounted, torn down.

- a directory (tmpfs at /dev/shm/daxfs-bench, or --target NAME=PATH);
- daxfs: a fresh image on /dev/shm, `daxfs mount` (-o dax for daxfs-dax);
- peers built from the package registries:
  - passthrough_ll: the C example of Debian's libfuse3-dev (/usr/share/doc/libfuse3-dev/examples),
    compiled with gcc -O2, run over a directory on tmpfs, once with the kernel's writeback cache
    (-o writeback) and once without;
  - pyfuse3-passthroughfs: examples/passthroughfs.py from the sdist of the installed pyfuse3
    (pip download), run with this Python over a directory on tmpfs.

Peer builds and downloads are cached in build/bench-peers/ (not committed). Each peer runs in the
foreground as a child of the bench, so its pid is known (daemon CPU) and it is stopped by pid:
fusermount3 -u, then SIGKILL and fusermount3 -u -z if it does not go away. Every failure is a
BenchError with a one-line message: the bench reports it and goes on with the other targets.
"""
from __future__ import annotations

import contextlib
import gzip
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench_common import BENCH_FILES, BenchError, Target, log, oneline, run

ROOT = Path(__file__).resolve().parent.parent
PEER_CACHE = ROOT / "build" / "bench-peers"
EXAMPLES = Path("/usr/share/doc/libfuse3-dev/examples")
MOUNT_TIMEOUT = 30


# --------------------------------------------------------------------------
# daxfs image + mount

def find_daxfs() -> Path:
    exe = Path(sys.executable).parent / "daxfs"
    if exe.exists():
        return exe
    found = shutil.which("daxfs")
    if not found:
        raise BenchError("daxfs executable not found next to "
                         f"{sys.executable} nor on PATH; run `make setup` (pip install -e .)")
    return Path(found)


class DaxfsMount:
    def __init__(self, exe: Path, image: Path, mnt: Path, logfile: Path, opts: str = ""):
        self.exe, self.image, self.mnt, self.logfile = exe, image, mnt, logfile
        self.opts = opts

    def mount(self) -> None:
        """Return once the mountpoint answers stat() as a mount."""
        opts = f"log={self.logfile}" + (f",{self.opts}" if self.opts else "")
        run([self.exe, "mount", "-o", opts, self.image, self.mnt], timeout=300)
        deadline = time.monotonic() + 30
        while not os.path.ismount(self.mnt):
            if time.monotonic() > deadline:
                raise BenchError(f"`daxfs mount` returned but {self.mnt} is not a mountpoint")
            time.sleep(0.001)
        os.stat(self.mnt)
        # the daemon maps the image's pages from a thread after mounting: let it finish, or
        # the first job (seq write) measures it too
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if not json.loads(os.getxattr(self.mnt, "user.daxfs.stats")).get("prefaulting"):
                    break
            except (OSError, ValueError):
                break
            time.sleep(0.1)

    def umount(self) -> None:
        run([self.exe, "umount", self.mnt], timeout=600)

    def pid(self) -> int | None:
        try:
            from daxfs.daemon import lock_holder   # the daemon holds the image's flock
            return lock_holder(str(self.image))
        except Exception:                         # CPU per op is optional
            return None


@contextlib.contextmanager
def daxfs_target(image_size: str, outdir: Path, name: str = "daxfs", opts: str = ""):
    exe = find_daxfs()
    image = Path(f"/dev/shm/daxfs-bench-{os.getpid()}.img")
    mnt = Path(tempfile.mkdtemp(prefix="daxfs-bench-mnt-"))
    m = DaxfsMount(exe, image, mnt, outdir / f"{name}-daemon.log", opts)
    try:
        run([exe, "mkfs", image, "--size", image_size], timeout=300)
        m.mount()
        yield Target(name, mnt, m, m.pid, f"`daxfs mount{' -o ' + opts if opts else ''}` "
                     f"of a fresh {image_size} image on /dev/shm")
    finally:
        for attempt in range(5):  # EBUSY while killed processes exit: retry, then lazy
            if not os.path.ismount(mnt):
                break
            try:
                m.umount()
            except BenchError as e:
                if attempt == 4:
                    log.error("%s; falling back to fusermount3 -u -z", e)
                    subprocess.run(["fusermount3", "-u", "-z", str(mnt)])
                time.sleep(1)
        with contextlib.suppress(OSError):
            mnt.rmdir()
        image.unlink(missing_ok=True)


@contextlib.contextmanager
def dir_target(name: str, path: Path):
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BenchError(f"cannot create {path}: {e}")
    try:
        yield Target(name, path, desc=f"directory `{path}`")
    finally:
        if created:
            shutil.rmtree(path, ignore_errors=True)
        else:
            for f in BENCH_FILES:
                (path / f).unlink(missing_ok=True)


# --------------------------------------------------------------------------
# build / fetch

def build_passthrough_ll(cache: Path = PEER_CACHE) -> Path:
    """Compile libfuse's passthrough_ll.c (gcc -O2) once; the binary is reused while the
    source is unchanged."""
    src = EXAMPLES / "passthrough_ll.c"
    if not src.exists() and (EXAMPLES / "passthrough_ll.c.gz").exists():
        cache.mkdir(parents=True, exist_ok=True)
        unpacked = cache / "passthrough_ll.c"
        unpacked.write_bytes(gzip.decompress((EXAMPLES / "passthrough_ll.c.gz").read_bytes()))
        src = unpacked
    if not src.exists():
        raise BenchError(f"{src} not found: apt-get install libfuse3-dev (see `make setup`)")
    exe = cache / "passthrough_ll"
    if exe.exists() and exe.stat().st_mtime >= src.stat().st_mtime:
        return exe
    cache.mkdir(parents=True, exist_ok=True)
    flags = run(["pkg-config", "--cflags", "--libs", "fuse3"]).stdout.split()
    tmp = exe.with_suffix(".tmp")
    run(["gcc", "-O2", "-o", tmp, src, *flags], timeout=300)
    tmp.rename(exe)
    return exe


def fetch_passthroughfs(cache: Path = PEER_CACHE) -> Path:
    """examples/passthroughfs.py of the installed pyfuse3 version, from its sdist."""
    try:
        version = importlib.metadata.version("pyfuse3")
    except importlib.metadata.PackageNotFoundError:
        raise BenchError(f"pyfuse3 is not installed for {sys.executable}") from None
    script = cache / f"pyfuse3-{version}-passthroughfs.py"
    if script.exists():
        return script
    sdist_dir = cache / "sdist"
    sdist = sdist_dir / f"pyfuse3-{version}.tar.gz"
    if not sdist.exists():
        # --no-binary pyfuse3 (not :all:): the sdist of pyfuse3 itself, while pip may still take
        # wheels of the build requirements it installs to read the sdist's metadata (with
        # :all: it compiles Cython from source first, ~4 minutes here)
        run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
             "--no-binary", "pyfuse3", f"pyfuse3=={version}", "-d", sdist_dir], timeout=900)
    if not sdist.exists():
        raise BenchError(f"pip download pyfuse3=={version} left no {sdist.name} in {sdist_dir}")
    try:
        with tarfile.open(sdist) as tar:
            member = tar.getmember(f"pyfuse3-{version}/examples/passthroughfs.py")
            data = tar.extractfile(member).read()
    except (KeyError, OSError, tarfile.TarError) as e:
        raise BenchError(f"no examples/passthroughfs.py in {sdist}: {e}") from None
    script.write_bytes(data)
    return script


# --------------------------------------------------------------------------
# peers

@dataclass(frozen=True)
class Peer:
    name: str
    kind: str            # "passthrough_ll" | "passthroughfs"
    options: str = ""    # passthrough_ll -o options besides source=

    def argv(self, source: Path, mnt: Path, cache: Path) -> list[str]:
        if self.kind == "passthrough_ll":
            opts = f"source={source}" + (f",{self.options}" if self.options else "")
            return [str(build_passthrough_ll(cache)), "-f", "-o", opts, str(mnt)]
        return [sys.executable, str(fetch_passthroughfs(cache)), str(source), str(mnt)]

    def describe(self, cache: Path) -> str:
        argv = self.argv(Path("/dev/shm/DIR"), Path("MNT"), cache)
        cmd = " ".join(Path(a).name if i < 2 else a for i, a in enumerate(argv))
        if self.kind == "passthrough_ll":
            what = ("libfuse example, gcc -O2; multi-threaded (default); cache=always: keep_cache "
                    "and 1-day entry/attr timeouts")
            what += ("; writeback: the kernel's writeback cache" if "writeback" in self.options
                     else "; no writeback cache")
            return f"`{cmd}` ({what})"
        return (f"`{cmd}` (pyfuse3 {importlib.metadata.version('pyfuse3')} sdist example, its "
                "defaults: one trio thread, no writeback cache, no keep_cache, 0 s timeouts)")


# The options a user who wants speed would pick from passthrough_ll's --help: cache=always
# (keep the page cache across opens, 86400 s entry and attribute timeouts: nobody else
# changes the source dir), the multi-threaded loop (its default), and writeback on or off.
PEERS = [
    Peer("passthrough_ll", "passthrough_ll", "cache=always"),
    Peer("passthrough_ll-writeback", "passthrough_ll", "cache=always,writeback"),
    Peer("pyfuse3-passthroughfs", "passthroughfs"),
]
PEER_NAMES = [p.name for p in PEERS]


class PeerMount:
    """One peer daemon in the foreground, child of this process."""

    def __init__(self, argv: list[str], mnt: Path, logfile: Path):
        self.argv, self.mnt, self.logfile = argv, mnt, logfile
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.logfile, "ab") as logf:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=logf,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not os.path.ismount(self.mnt):
            if self.proc.poll() is not None:
                raise BenchError(f"{Path(self.argv[0]).name} exited {self.proc.returncode} "
                                 f"before mounting: {self.last_log_line()}")
            if time.monotonic() > deadline:
                raise BenchError(f"{self.mnt} not mounted after {MOUNT_TIMEOUT}s")
            time.sleep(0.01)
        os.stat(self.mnt)

    def last_log_line(self) -> str:
        try:
            return oneline(self.logfile.read_text(errors="replace")) or "(no output)"
        except OSError:
            return "(no log)"

    def stop(self) -> list[str]:
        """Unmount and reap the daemon; returns what went wrong (empty when clean)."""
        problems = []
        for attempt in range(5):       # EBUSY while fio's killed processes exit: retry
            if not os.path.ismount(self.mnt):
                break
            p = subprocess.run(["fusermount3", "-u", str(self.mnt)], capture_output=True,
                               text=True)
            if p.returncode == 0:
                break
            if attempt == 4:
                problems.append(f"fusermount3 -u failed: {oneline(p.stderr)}")
            time.sleep(1)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                problems.append(f"daemon {self.proc.pid} still running after unmount: killed")
                self.proc.kill()
                self.proc.wait()
            if self.proc.returncode not in (0, None) and not problems:
                problems.append(f"daemon exited {self.proc.returncode}: {self.last_log_line()}")
        if os.path.ismount(self.mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)
            problems.append("lazy unmount (fusermount3 -u -z) was needed")
        return problems


@contextlib.contextmanager
def peer_target(peer: Peer, outdir: Path, cache: Path = PEER_CACHE):
    """Build the peer, mount it over a fresh directory on /dev/shm, yield a Target; always
    unmount, stop the daemon and remove the directories."""
    source = Path(tempfile.mkdtemp(prefix=f"daxfs-bench-{peer.name}-", dir="/dev/shm"))
    mnt = Path(tempfile.mkdtemp(prefix=f"daxfs-bench-{peer.name}-mnt-"))
    m = PeerMount([], mnt, outdir / f"{peer.name}-daemon.log")
    try:
        m.argv = peer.argv(source, mnt, cache)
        desc = peer.describe(cache)
        m.start()
        yield Target(peer.name, mnt, pid=lambda: m.proc.pid, desc=desc)
    finally:
        for problem in m.stop():
            log.error("  %s: %s", peer.name, problem)
        if not os.path.ismount(mnt):
            with contextlib.suppress(OSError):
                mnt.rmdir()
        shutil.rmtree(source, ignore_errors=True)
