"""kill -9 harness, one kill point and the scenarios: a point is a directory outside the mount
(image, mountpoint, logs); a scenario prepares the fresh mount, starts its workload child, stops
it after the kill and checks the remounted image against what the workload logged."""
from __future__ import annotations

import dataclasses
import os
import random
import signal
import subprocess
import time
from pathlib import Path

from .kill_models import (byte_mix_ok, check_model, check_partial_copy, listing,
                          make_small_tree, read_ops)
from .kill_mount import BS, MiB, CheckFailed, mount, require, write_fsync
from .kill_workloads import blob, workload_argv

CHILD_TIMEOUT = 30             # for a workload to notice its dead filesystem and exit


@dataclasses.dataclass
class Point:
    """One kill point: its own directory (outside the mount), image, mountpoint and logs."""
    scenario: str
    seed: int
    dir: Path
    rng: random.Random
    state: dict = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    logs: list[Path] = dataclasses.field(default_factory=list)

    @property
    def image(self) -> Path:
        return self.dir / "daxfs.img"

    @property
    def mnt(self) -> Path:
        return self.dir / "mnt"

    @property
    def oplog(self) -> Path:
        return self.dir / "ops.log"

    def mount(self) -> None:
        """Mount with a fresh daemon log per mount (all are checked at the end)."""
        self.logs.append(self.dir / f"daemon{len(self.logs)}.log")
        mount(self.image, self.mnt, self.logs[-1])


def start_child(pt: Point, kind: str, **params: object) -> subprocess.Popen:
    """Start a workload child in its own session; returns once it logged `ready`."""
    params["log"] = str(pt.oplog)
    with open(pt.dir / "child.err", "wb") as err:
        proc = subprocess.Popen(workload_argv(kind, params), stdout=subprocess.DEVNULL,
                                stderr=err, start_new_session=True)
    deadline = time.monotonic() + 30
    while not (pt.oplog.exists() and pt.oplog.read_text().startswith("ready\n")):
        require(proc.poll() is None, f"{kind} workload died at start: {child_err(pt)}")
        require(time.monotonic() < deadline, f"{kind} workload not ready after 30 s")
        time.sleep(0.01)
    return proc


def child_err(pt: Point) -> str:
    try:
        return (pt.dir / "child.err").read_text(errors="replace")[-2000:]
    except FileNotFoundError:
        return ""


def end_child(proc: subprocess.Popen, timeout: float = CHILD_TIMEOUT) -> None:
    """Wait for a workload to exit (it gets ENOTCONN once the daemon is gone); if it does not,
    SIGKILL its session (itself and what it started, e.g. a cp), while it is still unreaped so
    the group id cannot name anybody else."""
    try:
        proc.wait(timeout)
        return
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


class Scenario:
    """prepare() on the fresh mount (all it writes is fsync'd) -> start() the workload ->
    the kill -> stop() -> check() on the remounted image."""
    name = ""
    image_size = "256M"

    def prepare(self, pt: Point) -> None:
        pass

    def start(self, pt: Point) -> subprocess.Popen:
        raise NotImplementedError

    def stop(self, pt: Point, proc: subprocess.Popen) -> None:
        end_child(proc)

    def check(self, pt: Point) -> None:
        raise NotImplementedError


class CpTree(Scenario):
    """(a) `cp -a` of a tree, looping, with `rm -r` of the copy before last."""
    name = "cp"

    def prepare(self, pt: Point) -> None:
        src = pt.dir / "src"
        make_small_tree(src, pt.rng, dirs=8, per_dir=60)
        (src / "big").mkdir()
        for i in range(2):
            (src / f"big/b{i}").write_bytes(pt.rng.randbytes(pt.rng.randrange(MiB, 3 * MiB)))
        os.chmod(src / "d00", 0o750)
        pt.state.update(src=src, want=listing(src), counts=check_partial_copy(src, src))

    def start(self, pt: Point) -> subprocess.Popen:
        return start_child(pt, "cp", src=str(pt.state["src"]), dst=str(pt.mnt))

    def check(self, pt: Point) -> None:
        """Completed copies are whole, removed ones gone, the one in flight a partial copy."""
        ops = read_ops(pt.oplog)
        require(ops, "the cp workload logged no operation")
        done = {int(o[1]) for o in ops[:-1] if o[0] == "c"}
        gone = {int(o[1]) for o in ops[:-1] if o[0] == "r"}
        what, busy = {"c": "cp -a", "r": "rm -r"}[ops[-1][0]], int(ops[-1][1])
        extra = set(os.listdir(pt.mnt)) - {f"copy{n}" for n in done - gone | {busy}}
        require(not extra, f"names that no completed operation left: {sorted(extra)}")
        for n in done - gone - {busy}:
            self._check_complete(pt, pt.mnt / f"copy{n}")
        left = "nothing"
        if (pt.mnt / f"copy{busy}").exists():
            c, p, _ = check_partial_copy(pt.state["src"], pt.mnt / f"copy{busy}")
            left = f"{c} whole + {p} partial files"
        pt.notes.append(f"{len(done)} copies, {len(gone)} removed, in flight: {what} "
                        f"copy{busy} ({left} left)")

    def _check_complete(self, pt: Point, dst: Path) -> None:
        require(dst.is_dir(), f"{dst.name}: cp -a completed but the copy is missing")
        got = check_partial_copy(pt.state["src"], dst)
        require(got == pt.state["counts"], f"{dst.name}: cp -a completed but (complete, partial,"
                f" dirs) = {got}, source {pt.state['counts']}")
        have, want = listing(dst), pt.state["want"]
        bad = sorted(k for k in want.keys() | have.keys() if have.get(k) != want.get(k))
        require(not bad, f"{dst.name}: cp -a completed but differs from the source: "
                f"{[(k, have.get(k), want.get(k)) for k in bad[:3]]}")


def fio_block(pattern: bytes, off: int) -> bytes:
    """What fio's --verify_pattern=0x<pattern>%o puts into the 4 KiB block at `off`."""
    unit = pattern + off.to_bytes(8, "little")
    return (unit * (BS // len(unit) + 1))[:BS]


class FioRandwrite(Scenario):
    """(b) fio randwrite 4k psync: buffered, --fsync=N, --direct=1 or --direct=1 --fsync=N.
    fio logs each I/O as it issues it (--write_iolog); once the daemon is gone it gets
    ENOTCONN/ECONNABORTED, exits and flushes that log."""
    name = "fio"
    MODES = ("buffered", "fsync", "direct", "direct+fsync")

    def prepare(self, pt: Point) -> None:
        rng = pt.rng
        size = rng.choice([32, 48, 64]) * MiB
        sparse = rng.random() < 0.3
        data = bytes(size) if sparse else rng.randbytes(size)
        path = pt.mnt / "fio.dat"
        if sparse:
            with open(path, "wb") as f:
                f.truncate(size)
                os.fsync(f.fileno())
        else:
            write_fsync(path, data)
        mode = rng.choice(self.MODES)
        opts = ["--direct=1"] if "direct" in mode else []
        if "fsync" in mode:
            opts.append(f"--fsync={rng.choice([1, 4, 16, 64])}")
        pattern = (rng.getrandbits(32) | 1 << 31).to_bytes(4, "big")
        pt.state.update(path=path, data=data, opts=opts, pattern=pattern,
                        fioseed=rng.getrandbits(31))
        pt.notes.append(f"{' '.join(opts) or 'buffered'}, {'sparse' if sparse else 'prefilled'}"
                        f" {size // MiB} MiB")

    def start(self, pt: Point) -> subprocess.Popen:
        s = pt.state
        iolog = pt.dir / "fio.iolog"
        cmd = ["fio", "--name=kill", f"--filename={s['path']}", f"--size={len(s['data'])}",
               "--rw=randwrite", "--bs=4k", "--ioengine=psync", "--iodepth=1", "--time_based",
               "--runtime=120", "--verify=pattern", "--do_verify=0",
               f"--verify_pattern=0x{s['pattern'].hex()}%o", f"--write_iolog={iolog}",
               f"--randseed={s['fioseed']}", "--output=/dev/null", *s["opts"]]
        with open(pt.dir / "child.err", "wb") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err,
                                    start_new_session=True, cwd=pt.dir)
        deadline = time.monotonic() + 30
        while not iolog.exists():
            require(proc.poll() is None, f"fio died at start: {child_err(pt)}")
            require(time.monotonic() < deadline, "fio did not start in 30 s")
            time.sleep(0.01)
        return proc

    def check(self, pt: Point) -> None:
        s = pt.state
        text = (pt.dir / "fio.iolog").read_text()
        require(text.rstrip().endswith("close"), "fio's iolog is incomplete (fio killed?)")
        ios = [ln.split()[2:] for ln in text.splitlines()[1:]]
        ios = [(a[0], int(a[1])) for a in ios if a[0] in ("write", "sync", "datasync")]
        want = bytearray(s["data"])
        for kind, off in ios[:-1]:
            if kind == "write":
                want[off:off + BS] = fio_block(s["pattern"], off)
        inflight = None
        if ios and ios[-1][0] == "write":
            off = ios[-1][1]
            inflight = (off, fio_block(s["pattern"], off), bytes(want[off:off + BS]))
        torn = check_model(s["path"].read_bytes(), bytes(want), "fio.dat", inflight)
        writes = sum(k == "write" for k, _ in ios)
        pt.notes.append(f"{writes} writes, {len(ios) - writes} syncs, in flight: "
                        f"{ios[-1][0] if ios else '-'}{' (torn)' if torn else ''}")


class MmapWriter(Scenario):
    """(c) whole-page stores into a MAP_SHARED mapping, msync of one page or all of it."""
    name = "mmap"

    def prepare(self, pt: Point) -> None:
        rng = pt.rng
        npages = rng.choice([256, 1024, 4096])
        init = rng.choice(["prefilled", "sparse", "half"])
        size = npages * BS
        filled = {"prefilled": size, "sparse": 0, "half": size // 2}[init]
        data = rng.randbytes(filled) + bytes(size - filled)
        path = pt.mnt / "mmap.dat"
        write_fsync(path, data[:filled])
        with open(path, "r+b") as f:                 # the rest is a hole
            f.truncate(size)
            os.fsync(f.fileno())
        pt.state.update(path=path, data=data, npages=npages, wseed=rng.getrandbits(31))
        pt.notes.append(f"{npages} pages {init}")

    def start(self, pt: Point) -> subprocess.Popen:
        s = pt.state
        return start_child(pt, "mmap", path=str(s["path"]), npages=s["npages"], seed=s["wseed"])

    def stop(self, pt: Point, proc: subprocess.Popen) -> None:
        end_child(proc, timeout=0)      # only msync can have made its stores durable

    def check(self, pt: Point) -> None:
        s = pt.state
        ops = read_ops(pt.oplog)
        durable, later = self._model(ops)
        got = s["path"].read_bytes()
        require(len(got) == len(s["data"]), f"mmap.dat: size {len(got)}, was {len(s['data'])}")
        newer = torn = 0
        for pg in range(s["npages"]):
            g = got[pg * BS:(pg + 1) * BS]
            base = self._page(pt, pg, durable.get(pg))
            if g == base:
                continue
            cands = [self._page(pt, pg, v) for v in later.get(pg, [])]
            if g in cands:
                newer += 1
            elif byte_mix_ok(g, [base, *cands]):
                torn += 1
            else:
                raise CheckFailed(self._explain(pt, pg, g, durable.get(pg), ops))
        syncs = sum(o[0] in "sS" for o in ops[:-1])
        pt.notes.append(f"{len(ops)} ops, {syncs} msync; after the kill {newer} pages newer "
                        f"than msync'd, {torn} torn, in flight: {ops[-1][0] if ops else '-'}")

    @staticmethod
    def _model(ops: list[list[str]]) -> tuple[dict[int, int], dict[int, list[int]]]:
        """Per page: the version a completed msync made durable, and the versions stored
        after it (any of which the kernel may have written back by the kill)."""
        durable: dict[int, int] = {}
        later: dict[int, list[int]] = {}
        latest: dict[int, int] = {}
        for i, op in enumerate(ops):
            if op[0] == "w":
                pg, v = int(op[1]), int(op[2])
                latest[pg] = v
                later.setdefault(pg, []).append(v)
            elif i < len(ops) - 1:          # a completed msync
                pages = [int(op[1])] if op[0] == "s" else list(latest)
                for pg in pages:
                    durable[pg], later[pg] = latest[pg], []
        return durable, later

    @staticmethod
    def _page(pt: Point, pg: int, v: int | None) -> bytes:
        if v is None:
            return pt.state["data"][pg * BS:(pg + 1) * BS]
        return blob(BS, "mmap", pt.state["wseed"], pg, v)

    def _explain(self, pt: Point, pg: int, g: bytes, v: int | None, ops: list) -> str:
        versions = [int(o[2]) for o in ops if o[0] == "w" and int(o[1]) == pg]
        which = next((u for u in versions if g == self._page(pt, pg, u)), None)
        holds = ("the initial content" if g == self._page(pt, pg, None) else
                 f"version {which}" if which is not None else "bytes never stored there")
        return (f"mmap.dat page {pg}: msync'd version {v if v is not None else '(initial)'} "
                f"lost; the page holds {holds} (versions stored: {versions[-6:]})")


@dataclasses.dataclass
class Clone:
    """A clone in the reflink workload: cloned, cloning (cp in flight), unlinking or gone; its
    byte model after every logged write, and the write in flight (offset, new, old bytes)."""
    state: str
    model: bytearray
    inflight: tuple[int, bytes, bytes] | None = None


class ReflinkCow(Scenario):
    """(d) cp clones (copy_file_range) of big and fragmented files, COW breaks into the
    fresh clone, unlink of older clones."""
    name = "reflink"
    image_size = "512M"

    def prepare(self, pt: Point) -> None:
        rng = pt.rng
        (pt.mnt / "src").mkdir()
        (pt.mnt / "clones").mkdir()
        big = rng.randbytes(rng.randrange(20, 40) * MiB + rng.randrange(BS))
        write_fsync(pt.mnt / "src/big", big)
        nfrag = rng.randrange(256, 768)
        frags = [rng.randbytes(nfrag * BS) for _ in range(2)]
        self._write_interleaved([pt.mnt / "src/frag0", pt.mnt / "src/frag1"], frags)
        srcs = {"big": big, "frag0": frags[0], "frag1": frags[1]}
        pt.state.update(srcs=srcs, wseed=rng.getrandbits(31))
        pt.notes.append(f"big {len(big) / MiB:.1f} MiB, fragmented 2x{nfrag} blocks")

    @staticmethod
    def _write_interleaved(paths: list[Path], datas: list[bytes]) -> None:
        """Block by block in turn, so neither file gets two adjacent blocks: one extent per
        block, the costly case for a clone."""
        fds = [os.open(p, os.O_WRONLY | os.O_CREAT, 0o644) for p in paths]
        try:
            for off in range(0, len(datas[0]), BS):
                for fd, d in zip(fds, datas):
                    os.pwrite(fd, d[off:off + BS], off)
            for fd in fds:
                os.fsync(fd)
        finally:
            for fd in fds:
                os.close(fd)

    def start(self, pt: Point) -> subprocess.Popen:
        srcs = pt.state["srcs"]
        return start_child(pt, "reflink", srcs=[str(pt.mnt / "src" / n) for n in srcs],
                           sizes=[len(d) for d in srcs.values()], clones=str(pt.mnt / "clones"),
                           seed=pt.state["wseed"])

    def check(self, pt: Point) -> None:
        srcs = pt.state["srcs"]
        for name, data in srcs.items():
            require((pt.mnt / "src" / name).read_bytes() == data,
                    f"src/{name}: the source of the clones changed")
        ops = read_ops(pt.oplog)
        clones = self._replay(pt, ops, list(srcs.values()))
        have = set(os.listdir(pt.mnt / "clones"))
        extra = have - set(clones)
        require(not extra, f"clones/: names no completed operation left: {sorted(extra)}")
        torn = sum(self._check_clone(pt, name, c, name in have) for name, c in clones.items())
        require(ops, "the reflink workload logged no operation")
        what = {"c": "clone", "w": "COW write", "p": "COW write (short)", "f": "fsync",
                "r": "unlink"}[ops[-1][0]]
        pt.notes.append(f"{sum(o[0] == 'c' for o in ops)} clones, "
                        f"{sum(o[0] == 'w' for o in ops)} COW writes, in flight: {what}"
                        f"{' (torn)' if torn else ''}")

    @staticmethod
    def _check_clone(pt: Point, name: str, c: Clone, present: bool) -> bool:
        """One clone against its model; returns True when the write in flight is torn."""
        path = pt.mnt / "clones" / name
        if c.state == "gone":
            require(not present, f"clones/{name}: unlinked before the kill, but back")
        elif c.state == "cloning":
            if present:
                got = path.read_bytes()
                require(got == c.model[:len(got)], f"clones/{name}: the clone in flight is not "
                        f"a prefix of its source ({len(got)} of {len(c.model)} bytes)")
        elif present or c.state == "cloned":
            require(present, f"clones/{name}: cloned before the kill, but missing")
            return check_model(path.read_bytes(), bytes(c.model), f"clones/{name}", c.inflight)
        return False

    @staticmethod
    def _replay(pt: Point, ops: list[list[str]], datas: list[bytes]) -> dict[str, Clone]:
        """Per clone name, what the logged operations left (the last one in flight; a short
        write, `p`, completed its first bytes and left the rest in flight)."""
        clones: dict[str, Clone] = {}
        last_write = None
        for i, op in enumerate(ops):
            done = i < len(ops) - 1
            name = f"c{op[1]}"
            if op[0] == "c":
                clones[name] = Clone("cloned" if done else "cloning", bytearray(datas[int(op[2])]))
            elif op[0] == "w":
                k, j, off, n = map(int, op[1:])
                c, new = clones[name], blob(n, "cow", pt.state["wseed"], k, j)
                last_write = (c, off, new, bytes(c.model[off:off + n]))
                c.model[off:off + n] = new
                if not done:
                    c.inflight = last_write[1:]
            elif op[0] == "p":
                c, off, new, old = last_write
                m = int(op[3])
                c.inflight = (off + m, new[m:], old[m:])
            elif op[0] == "r":
                clones[name].state = "gone" if done else "unlinking"
        return clones


SCENARIO_TYPES: dict[str, type[Scenario]] = {
    s.name: s for s in (CpTree, FioRandwrite, MmapWriter, ReflinkCow)}
