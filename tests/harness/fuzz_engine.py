"""Image fuzzer, the engine on a damaged image: open (or refuse in one line), walk and read
everything (EIO only), a second walk, a little write work, and the failsafe (writes refused,
the image unchanged) once anything gave EIO."""
from __future__ import annotations

import errno
import hashlib
import traceback

from daxfs import format as fmt
from daxfs.errors import FsError, MountError
from daxfs.fs import FileSystem

from .fuzz_bases import Base
from .fuzz_common import ROOT, _CaseTimeout, _read
from .fuzz_damage import Case
from .fuzz_findings import (Finding, Result, _clean_path, _compare, _ev_summary, _ev_text,
                            _tb_summary)
from .fuzz_state import walk_engine


def _engine_check(b: Base, case: Case, epath: str, d_t, good_paths, expect_state, sb_broken,
                  magic_broken, res: Result, verbose: bool) -> None:
    F = res.findings
    try:
        fs = FileSystem.open(epath)
    except (fmt.FormatError, MountError) as e:
        res.mount = f"refused: {e}"
        if "\n" in str(e) or not str(e):
            F.append(Finding("mount", "open", "refusal is not one line", repr(str(e))))
        return
    except FsError as e:
        res.mount = f"refused (FsError): {e}"
        return
    except _CaseTimeout:
        raise
    except Exception as e:      # noqa: BLE001
        res.mount = f"crashed: {type(e).__name__}"
        F.append(Finding("traceback", "open", _tb_summary(e), f"{type(e).__name__}: {e}",
                         traceback.format_exc()))
        return
    res.mount = "opened"
    if sb_broken:
        F.append(Finding("mount", "open", "engine opened an image whose superblock is damaged"))
    if magic_broken:
        F.append(Finding("mount", "open", "engine opened an image whose journal magic is damaged"))
    try:
        failed_at_open = fs.failed
        state, _ident, events = walk_engine(fs, forget=True, tables=d_t)
        eio = [ev for ev in events if ev.kind == "eio"]
        for ev in events:
            if ev.kind == "exception":
                F.append(Finding("traceback", "walk", f"{ev.op}: {_ev_summary(ev)}",
                                 f"{_clean_path(ev.path)}: {ev.detail[:300]}", ev.tb))
            elif ev.kind != "eio":
                F.append(Finding("mount", "walk", _ev_text(ev),
                                 f"{_clean_path(ev.path)}: {ev.detail[:300]}"))
        if eio and not fs.failed:
            # (then every later write is accepted too: reported once, here)
            ev = eio[0]
            F.append(Finding("mount", "walk", f"EIO from {ev.op} but the failsafe is not on "
                             "(writes still accepted)", f"{_clean_path(ev.path)}: {ev.detail}"))
        _compare(F, "mount", "mount", b.state, state, good_paths, expect_state)
        # a second walk (after the forgets) must see the same thing
        state2, _i2, events2 = walk_engine(fs, forget=True, tables=d_t)
        if state2 != state or [(e.path, e.op, e.kind) for e in events2] != \
                [(e.path, e.op, e.kind) for e in events]:
            diff = sorted(p for p in set(state) | set(state2) if state.get(p) != state2.get(p))
            gone = [p for p in diff if p not in state2 and state[p][5] == 0]
            if gone:
                F.append(Finding("mount", "walk", "a named inode with (corrupt) nlink 0 is "
                                 "reclaimed when the kernel forgets it: file destroyed while only "
                                 "reading", f"paths {[_clean_path(p) for p in gone[:5]]}"))
            else:
                F.append(Finding("mount", "walk", "second walk differs from the first (the engine "
                                 "changed the tree while only reading)",
                                 f"paths {[_clean_path(p) for p in diff[:5]]}"))
        if not eio and not fs.failed:
            _smoke_writes(fs, F)
            if not fs.failed:
                # writing must not have touched any other file (a corrupt refcount of 0 on a
                # block in use hands that block out again)
                state3, _i3, _e3 = walk_engine(fs, forget=True)
                changed = sorted(p for p in state2 if p in state3 and state2[p][0] == "f"
                                 and state2[p][3] != state3[p][3])
                if changed:
                    F.append(Finding("mount", "smoke", "writing a new file changed the data of "
                                     "existing files (allocator reused blocks in use)",
                                     f"{len(changed)} file(s), first {_clean_path(changed[0])}"))
        if fs.failed:
            # the failsafe is on: every write is refused and the image does not change any more
            res.notes.append(f"failsafe: {fs.failed}")
            snap = hashlib.sha256(fs.pm.buf).hexdigest()
            for what, outcome in _writes_after_failsafe(fs, state):
                if outcome == "ok":
                    F.append(Finding("mount", "write-after-eio", f"{what} succeeded after "
                                     "the failsafe triggered"))
                elif outcome.startswith("exception"):
                    F.append(Finding("traceback", "write-after-eio", f"{what}: {outcome}"))
            _close(fs, F)
            if hashlib.sha256(_read(epath)).hexdigest() != snap:
                F.append(Finding("mount", "write-after-eio", "the image changed after the "
                                 "failsafe triggered"))
        else:
            _close(fs, F)
        if verbose:
            print(f"engine: failed={fs.failed!r} at_open={failed_at_open!r} events="
                  f"{[(e.path, e.op, e.kind, e.detail) for e in events][:10]}")
    except _CaseTimeout:
        raise
    except Exception as e:      # noqa: BLE001
        F.append(Finding("traceback", "engine", _tb_summary(e), f"{type(e).__name__}: {e}",
                         traceback.format_exc()))
        try:
            fs.close()
        except Exception:       # noqa: BLE001
            pass


def _close(fs: FileSystem, F: list) -> None:
    try:
        fs.close()
    except _CaseTimeout:
        raise
    except Exception as e:      # noqa: BLE001
        F.append(Finding("traceback", "close", "close: " + _tb_summary(e),
                         f"{type(e).__name__}: {e}", traceback.format_exc()))
        try:
            fs.pm.close()
        except Exception:       # noqa: BLE001
            pass


def _writes_after_failsafe(fs: FileSystem, state: dict) -> list[tuple[str, str]]:
    some_file = None
    for path, v in state.items():
        if v[0] == "f":
            some_file = path
            break
    attempts = [("create", lambda: fs.create(ROOT, b"fuzz-after-eio", 0o644, 0, 0)),
                ("mkdir", lambda: fs.mkdir(ROOT, b"fuzz-dir-after-eio", 0o755, 0, 0)),
                ("setxattr", lambda: fs.setxattr(ROOT, b"user.fuzz", b"1"))]
    if some_file is not None:
        parts = some_file.strip("/").split("/")

        def write_existing():
            ino = ROOT
            for p in parts:
                ino = fs.lookup(ino, p.encode("utf-8", "surrogateescape")).ino
            fs.write(ino, 0, b"overwrite after failsafe")
        attempts.append(("write", write_existing))
    out = []
    for what, fn in attempts:
        try:
            fn()
            out.append((what, "ok"))
        except FsError as e:
            out.append((what, "refused" if e.errno in (errno.EROFS, errno.EIO) else f"errno {e}"))
        except _CaseTimeout:
            raise
        except Exception as e:      # noqa: BLE001
            out.append((what, f"exception {_tb_summary(e)}: {e}"))
    return out


_SMOKE = b"".join(b"smoke %08d\n" % i for i in range(40000))      # 600 KB: ~150 blocks


def _smoke_writes(fs: FileSystem, F: list) -> None:
    """The engine served everything: it must also take a little write work without crashing
    (FsError, e.g. ENOSPC or a failsafe, is fine; a Python exception is not)."""
    data = _SMOKE
    steps = [("create", lambda: fs.create(ROOT, b"fuzz-smoke", 0o644, 0, 0).ino)]
    ino = None
    try:
        ino = steps[0][1]()
        fs.write(ino, 0, data)
        fs.setxattr(ino, b"user.smoke", b"1")
        back = fs.read(ino, 0, len(data))
        if bytes(back) != data and not fs.failed:
            F.append(Finding("mount", "smoke", "a file written on the damaged image reads back "
                             "differently"))
        fs.unlink(ROOT, b"fuzz-smoke")
        fs.forget(ino, 1)
    except FsError:
        pass
    except _CaseTimeout:
        raise
    except Exception as e:      # noqa: BLE001
        F.append(Finding("traceback", "smoke-write", _tb_summary(e), f"{type(e).__name__}: {e}",
                         traceback.format_exc()))
