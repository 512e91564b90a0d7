"""`daxfs info IMAGE`: geometry, identity, state and usage of an image (read-only; works on a
mounted image too, where the usage figures are a live snapshot)."""
from __future__ import annotations

import datetime
import json
import mmap
import os
import uuid as uuidlib

import numpy as np

from .. import daemon
from .. import format as fmt
from ..errors import UsageError
from ..usage import usage as space_usage


def gather(image: str) -> dict:
    fd, st = fmt.open_regular(image, os.O_RDONLY, open_error=lambda e: UsageError(
        f"{image}: no such image file" if isinstance(e, FileNotFoundError)
        else f"cannot open {image}: {e.strerror}"),
        not_regular=UsageError(f"{image} is not a regular file"))
    try:
        try:
            sb, g = fmt.read_superblock(fd)
        except fmt.FormatError as e:
            raise UsageError(f"{image}: {e}") from None
        mm = mmap.mmap(fd, g.nblocks * fmt.BLOCK_SIZE, prot=mmap.PROT_READ, flags=mmap.MAP_SHARED)
    finally:
        os.close(fd)
    try:
        usage = _usage(mm, g)
    finally:
        try:
            mm.close()
        except BufferError:
            pass

    regions = [
        ("superblock", 0, g.journal_start),
        ("journal", g.journal_start, g.inode_start - g.journal_start),
        ("inodes", g.inode_start, g.dirent_start - g.inode_start),
        ("dirents", g.dirent_start, g.extent_start - g.dirent_start),
        ("extents", g.extent_start, g.refcount_start - g.extent_start),
        ("refcounts", g.refcount_start, g.data_start - g.refcount_start),
        ("data", g.data_start, g.data_blocks),
    ]
    try:
        locked = daemon.is_locked(image)
    except OSError:
        locked = False
    mounts = daemon.mounts_of_image(image)
    created_ns = int(sb["created_ns"])
    return {
        "image": os.path.abspath(image),
        "file_size": st.st_size,
        "version": int(sb["version"]),
        "uuid": str(uuidlib.UUID(bytes=bytes(sb["uuid"]).ljust(16, b"\0"))),
        "created": _created(created_ns),
        "clean": bool(int(sb["clean"])),
        "mount_count": int(sb["mount_count"]),
        "mounted": locked,
        "mounted_on": mounts[-1].target if mounts else None,
        "daemon_pid": daemon.lock_holder(image) if locked else None,
        "block_size": int(sb["block_size"]),
        "blocks": g.nblocks,
        "regions": {name: {"start": start, "blocks": n} for name, start, n in regions},
        "inode_count": g.inode_count,
        "dirent_count": g.dirent_count,
        "extent_count": g.extent_count,
        **usage,
    }


def _usage(mm: mmap.mmap, g: fmt.Geometry) -> dict:
    all_refc = g.table(mm, "refcounts")
    refc = all_refc[g.data_start:]
    inodes = g.table(mm, "inodes")
    dirents = g.table(mm, "dirents")
    extents = g.table(mm, "extents")
    free = int(np.count_nonzero(refc == 0))
    shared = int(np.count_nonzero((refc > 1) & (refc != fmt.REFCOUNT_RESERVED)))
    reserved = int(np.count_nonzero(refc == fmt.REFCOUNT_RESERVED))
    out = {
        "data_blocks": g.data_blocks,
        "data_used": g.data_blocks - free,
        "data_free": free,
        "data_shared": shared,
        "data_reserved": reserved,
        "inodes_used": int(np.count_nonzero(inodes["mode"][1:] != 0)),
        "dirents_used": int(np.count_nonzero(dirents["parent"] != 0)),
        "extents_used": int(np.count_nonzero(extents["ino"] != 0)),
    }
    try:
        u = space_usage(inodes, extents, all_refc, g)
        out["logical_bytes"] = int(u["logical_bytes"])
        out["bytes_saved"] = int(u["bytes_saved"])
    except (KeyError, ValueError):
        pass
    del refc, all_refc, inodes, dirents, extents
    return out


def _human(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{nbytes} B"
        nbytes /= 1024
    return str(nbytes)


def render(d: dict) -> str:
    bs = d["block_size"]
    pct = 100.0 * d["data_used"] / d["data_blocks"] if d["data_blocks"] else 0.0
    if d["mounted"]:
        mounted = "yes"
        if d["mounted_on"]:
            mounted += f", on {d['mounted_on']}"
        if d["daemon_pid"]:
            mounted += f" (daemon pid {d['daemon_pid']})"
    else:
        mounted = "no"
    state = "clean" if d["clean"] else "dirty (mounted, or not unmounted cleanly)"
    lines = [
        f"image:          {d['image']}",
        f"format version: {d['version']}",
        f"uuid:           {d['uuid']}",
        f"created:        {d['created']}",
        f"state:          {state}",
        f"mounted:        {mounted}",
        f"mount count:    {d['mount_count']}",
        f"block size:     {bs}",
        f"blocks:         {d['blocks']} ({_human(d['blocks'] * bs)})",
        "regions:        name          start block      blocks",
    ]
    for name, r in d["regions"].items():
        lines.append(f"                {name:<12}{r['start']:>13}{r['blocks']:>12}")
    lines += [
        f"inodes:         {d['inodes_used']} used of {d['inode_count'] - 1}",
        f"dirents:        {d['dirents_used']} used of {d['dirent_count']}",
        f"extents:        {d['extents_used']} used of {d['extent_count']}",
        f"data blocks:    {d['data_used']} used, {d['data_free']} free of {d['data_blocks']} "
        f"({pct:.1f}% used; {_human(d['data_free'] * bs)} free)",
        f"shared blocks:  {d['data_shared']} (refcount > 1)",
    ]
    if "logical_bytes" in d:
        lines.append(f"file bytes:     {d['logical_bytes']} ({_human(d['logical_bytes'])}; "
                     f"{_human(d['bytes_saved'])} saved by sharing)")
    if d["data_reserved"]:
        lines.append(f"WARNING:        {d['data_reserved']} data blocks carry the reserved "
                     f"refcount (run daxfs fsck)")
    return "\n".join(lines)


def main_info(image: str, *, as_json: bool = False) -> int:
    d = gather(image)
    print(json.dumps(d, indent=2) if as_json else render(d))
    return 0


def _created(ns: int) -> str:
    """The creation time as text; a value no calendar can show (the field is not checked by
    anything) is printed as the raw number instead of failing."""
    try:
        return (datetime.datetime.fromtimestamp(ns / 1e9, datetime.timezone.utc)
                .strftime("%Y-%m-%d %H:%M:%S UTC"))
    except (ValueError, OverflowError, OSError):
        return f"{ns} ns (out of range)"
