"""The named checks, in run order (`check_step` registers them into `CHECKS`), and their
private helpers. Each reports problems on the `Context` and repairs its working copies.
Here: the registry, the superblock, the journal and the inode table; checks_names.py and
checks_space.py hold the rest."""
from __future__ import annotations

import stat
from typing import Callable

import numpy as np

from .. import format as fmt
from .context import BS, ROOT, S_IFMT, Context
from .report import INFO, TYPE_NAMES

_VALID_TYPES = np.array(sorted(TYPE_NAMES), np.uint32)
_KNOWN_FLAGS = fmt.IFLAG_ORPHAN | fmt.IFLAG_TRIM
_MODE_BITS = 0o177777              # S_IFMT | 07777
_SIZELESS_TYPES = np.array([stat.S_IFDIR, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO,
                            stat.S_IFSOCK], np.uint32)
MAX_LBLK = fmt.MAX_FILE_BLOCKS     # what the engine addresses (and refuses past)


def fmt_name(name: bytes) -> str:
    return repr(name.decode("utf-8", "backslashreplace"))


def groups(keys: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """[(key, positions)] for the distinct values of `keys` (positions in original order)."""
    if keys.size == 0:
        return []
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    cut = np.flatnonzero(sk[1:] != sk[:-1]) + 1
    starts = np.concatenate(([0], cut))
    ends = np.concatenate((cut, [sk.size]))
    return [(int(sk[s]), order[s:e]) for s, e in zip(starts.tolist(), ends.tolist())]


# ------------------------------------------------------------------------------------ checks
CHECKS: list[tuple[str, Callable[[Context], None]]] = []


def check_step(name: str):
    def deco(fn):
        CHECKS.append((name, fn))
        return fn
    return deco


@check_step("superblock")
def check_superblock(ctx: Context) -> None:
    """The superblock itself parsed (else nothing runs); here: file size, clean flag, use."""
    g, sb = ctx.g, ctx.sb
    extra = ctx.file_size - g.nblocks * BS
    if extra > 0:
        ctx.problem("image", f"file has {extra} bytes past the {g.nblocks} blocks of the "
                    "filesystem (ignored)", repairable=False, severity=INFO)
    clean = int(sb["clean"])
    if clean not in (0, 1):
        ctx.problem("clean flag", f"invalid value {clean}", "set to 1")
        ctx.mark_clean = True
    elif clean == 0:
        ctx.problem("clean flag", "not cleanly unmounted (crash, or mounted right now)",
                    "marked clean", severity=INFO)
        ctx.mark_clean = True
    if ctx.in_use:
        ctx.problem("image", "locked by another process (mounted?): checked a snapshot, "
                    "results may be inconsistent", repairable=False, severity=INFO)


@check_step("journal")
def check_journal(ctx: Context) -> None:
    """Journal header (magic, epoch) and the outcome of replay."""
    js = ctx.journal
    if not js.magic_ok or js.epoch == 0:
        what = "bad magic" if not js.magic_ok else "epoch 0"
        ctx.problem("header", f"{what}: the journal cannot be replayed",
                    "header reset, log emptied (committed transactions in it are lost)")
        ctx.fix_journal_header = True
        return
    if js.error:
        ctx.problem("log", f"replay failed: {js.error}", repairable=False)
    elif js.ran_replay and ctx.repair:
        ctx.problem("log", f"{js.replayed} committed transaction(s) pending",
                    "replayed into the image", severity=INFO)
    elif js.ran_replay:
        ctx.problem("log", f"{js.replayed} committed transaction(s) pending (checked a "
                    "replayed private copy)", "replay into the image", severity=INFO)
    if js.cow_pending:
        ctx.problem("COW ring", f"{js.cow_pending} COW break(s) done by the data plane are not "
                    "applied yet (checked the image without them)", "the next mount applies "
                    "them", repairable=False, severity=INFO)


@check_step("inodes")
def check_inodes(ctx: Context) -> None:
    """Inode records: reserved inode 0, root a directory, valid file type, a size the type
    allows (symlink 1..4095 bytes), known flags."""
    ino = ctx.inodes
    mode = ino["mode"]
    if mode[0] != 0:
        ctx.problem("inode 0", f"reserved inode is in use (mode 0o{int(mode[0]):o})", "freed")
        ctx.free_inode(0)
    if mode[ROOT] & S_IFMT != stat.S_IFDIR:
        old = int(mode[ROOT])
        ctx.problem(f"inode {ROOT}", f"root is not a directory (mode 0o{old:o})",
                    "made a directory")
        r = ino[ROOT:ROOT + 1]
        r["mode"] = stat.S_IFDIR | ((old & 0o7777) if old else 0o755)
        r["size"] = 0
        r["flags"] = 0
        if r["nlink"][0] < 2:
            r["nlink"] = 2
    ft = mode & S_IFMT
    bad = np.flatnonzero((mode != 0) & ~np.isin(ft, _VALID_TYPES))
    for i in bad.tolist():
        ctx.problem(f"inode {i}", f"invalid file type (mode 0o{int(mode[i]):o})", "inode freed")
        ctx.free_inode(i)
    size = ino["size"]
    badlen = np.flatnonzero((ft == stat.S_IFLNK) & ((size == 0) | (size >= BS)))
    badlen = np.union1d(badlen, np.flatnonzero((ft == stat.S_IFREG) & (size >= np.uint64(fmt.MAX_FILE_BYTES))))
    for i in badlen.tolist():
        ctx.problem(f"inode {i}", f"impossible size {int(size[i])} for its type "
                    f"(mode 0o{int(mode[i]):o})", "inode freed")
        ctx.free_inode(i)
    # directories, device nodes, fifos and sockets have size 0 (the engine never sets one; a
    # size it cannot report, >= 2**63, made every access to the inode fail)
    nosize = np.flatnonzero((mode != 0) & np.isin(ft, _SIZELESS_TYPES) & (size != 0))
    for i in nosize.tolist():
        ctx.problem(f"inode {i}", f"{ctx.type_name(i)} has size {int(size[i])} (must be 0)",
                    "size set to 0")
        size[i] = 0
    # mode: type and permission bits only
    extra = np.flatnonzero((mode != 0) & ((mode & ~np.uint32(_MODE_BITS)) != 0))
    for i in extra.tolist():
        ctx.problem(f"inode {i}", f"unknown mode bits 0x{int(mode[i]) & ~_MODE_BITS:x} (mode "
                    f"0o{int(mode[i]):o})", "cleared")
        mode[i] &= np.uint32(_MODE_BITS)
    fl = ino["flags"]
    unknown = np.flatnonzero((mode != 0) & ((fl & ~np.uint32(_KNOWN_FLAGS)) != 0))
    for i in unknown.tolist():
        ctx.problem(f"inode {i}", f"unknown flag bits 0x{int(fl[i]) & ~_KNOWN_FLAGS:x}", "cleared")
        fl[i] &= _KNOWN_FLAGS


# the other checks register in this order when their modules load (run order matters: the
# namespace is settled before space is counted)
from . import checks_names, checks_space  # noqa: E402,F401
