"""Sharing you can see: which ranges of a file share frames with which other files.

`daxfs stat FILE` reads this report as the virtual xattr `user.daxfs.sharing` of the file:
for every mapped range of the file whose blocks are shared, the other aliases of those frames
from the frame index, with the other file's path and offset (like FIEMAP's shared flag, but
naming the other side). Names of other files are shown to root and to their owner only; the
rest are reported by inode number, so the report reveals no name a user could not list.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from . import format as fmt
from .extents import HOLE

if TYPE_CHECKING:
    from .fs import FileSystem

BS = fmt.BLOCK_SIZE


def report(fs: FileSystem, ino: int, uid: int) -> dict:
    """{"size", "shared": [{"offset", "length", "other", "other_ino", "other_offset"}]},
    ranges in file order, adjacent blocks with one other side merged."""
    node = fs.inodes.get(ino)
    shared: list[dict] = []
    if node.is_reg and node.has_data:
        for l, n, p in node.extents.segments(0, fmt.blocks_for(node.size)):
            if p == HOLE:
                continue
            for rp, rn, other, olb in fs.frames.runs(p, p + n):
                off = l + (rp - p)
                if other == ino and olb == off:
                    continue                        # this file's own alias
                last = shared[-1] if shared else None
                if last and last["other_ino"] == other and \
                        last["offset"] + last["length"] == off * BS and \
                        last["other_offset"] + last["length"] == olb * BS:
                    last["length"] += rn * BS
                else:
                    shared.append({"offset": off * BS, "length": rn * BS, "other_ino": other,
                                   "other_offset": olb * BS})
    shared.sort(key=lambda r: (r["offset"], r["other_ino"], r["other_offset"]))
    names = fs.dirs.names_of({r["other_ino"] for r in shared})
    for r in shared:
        other = fs.inodes.get(r["other_ino"])
        where = names.get(r["other_ino"])
        visible = where is not None and (uid == 0 or other.uid == uid)
        r["other"] = fs.dirs.path(*where, fmt.ROOT_INO).decode("utf-8", "surrogateescape") \
            if visible else None
    return {"size": node.size, "shared": shared}
