"""A private daxfs image and mount for the exerciser: mkfs on /dev/shm, `daxfs mount` with a log
file, umount, fsck, and the log's tracebacks. Only ever stops the daemon it started itself."""
from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

DAXFS = str(Path(sys.executable).parent / "daxfs")
TIMEOUT = 120


def _run(*args, check=True) -> subprocess.CompletedProcess:
    p = subprocess.run([DAXFS, *map(str, args)], capture_output=True, text=True, timeout=TIMEOUT)
    if check and p.returncode != 0:
        raise RuntimeError(f"daxfs {' '.join(map(str, args))} exited {p.returncode}: "
                           f"{p.stdout}{p.stderr}")
    return p


class Mount:
    """One image + mountpoint; `log` collects the daemon log of every mount of this image."""

    _templates: dict[str, str] = {}      # size -> a pristine image made once per process

    def __init__(self, size: str, tag: str = "exerciser", options: str = ""):
        self.options = options          # extra `-o` mount options, e.g. "writeback"
        base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
        u = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.dir = Path(tempfile.mkdtemp(prefix=f"daxfs-{tag}-"))
        self.image = f"{base}/daxfs-{tag}-{u}.img"
        self.mnt = self.dir / "mnt"
        self.log = self.dir / "daemon.log"
        self.mnt.mkdir()
        self.mounted = False
        self.log_pos = 0
        # requests the C data plane answered, summed over this image's mounts (so a run shows
        # that its reads and writes did go through C, not only through Python)
        self.served = {"c_reads": 0, "c_writes": 0, "c_cow_breaks": 0}
        tpl = self._templates.get(size)
        if tpl is None or not os.path.exists(tpl):
            _run("mkfs", self.image, "--size", size)
            tpl = self._templates[size] = f"{base}/daxfs-{tag}-{u}-template.img"
            shutil.copyfile(self.image, tpl)
            atexit.register(lambda: Path(tpl).unlink(missing_ok=True))
        else:               # a fresh image is a copy of the freshly made one (mkfs is slower)
            shutil.copyfile(tpl, self.image)
        os.chmod(self.image, 0o600)

    def mount(self) -> None:
        opts = f"log={self.log}" + (f",{self.options}" if self.options else "")
        _run("mount", self.image, self.mnt, "-o", opts)
        self.mounted = True

    def umount(self) -> None:
        try:
            st = json.loads(os.getxattr(self.mnt, "user.daxfs.stats"))
            self.served["c_reads"] += st.get("dp_reads_served", 0)
            self.served["c_writes"] += st.get("dp_writes_served", 0)
            self.served["c_cow_breaks"] += st.get("dp_cow_breaks", 0)
        except (OSError, ValueError):
            pass
        self.mounted = False
        _run("umount", self.mnt)

    def fsck(self) -> str | None:
        """None when `daxfs fsck` exits 0, else its output."""
        p = _run("fsck", self.image, check=False)
        return None if p.returncode == 0 else f"fsck exited {p.returncode}:\n{p.stdout}{p.stderr}"

    def new_tracebacks(self) -> str | None:
        """Log text since the last call, if it holds a traceback."""
        try:
            with open(self.log, "rb") as f:
                f.seek(self.log_pos)
                text = f.read().decode(errors="replace")
                self.log_pos = f.tell()
        except FileNotFoundError:
            return None
        return text if "Traceback" in text else None

    def _daemon_pid(self) -> int | None:
        try:
            from daxfs.daemon import lock_holder
            return lock_holder(self.image)
        except Exception:
            return None

    def destroy(self) -> None:
        """Unmount (forcibly when needed: only our own daemon) and remove everything."""
        try:
            if self.mounted:
                try:
                    self.umount()
                except Exception:
                    subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)
            pid = self._daemon_pid()
            if pid and pid != os.getpid():
                os.kill(pid, signal.SIGTERM)
                for _ in range(100):
                    if not self._daemon_pid():
                        break
                    time.sleep(0.05)
                else:
                    os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        finally:
            Path(self.image).unlink(missing_ok=True)
            shutil.rmtree(self.dir, ignore_errors=True)
