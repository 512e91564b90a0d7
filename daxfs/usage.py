"""Space accounting and the reverse map (physical block -> aliases), for `daxfs stat`, fsck
and tests. Computed with numpy over the committed tables, which are current between
operations: every size and mapping change is applied when its transaction commits."""
from __future__ import annotations

import stat as st

import numpy as np

from . import format as fmt


def reverse_map(extents: np.ndarray, pblk: int) -> list[tuple[int, int]]:
    """Every (inode, file block) whose alias descriptor points at physical block `pblk`."""
    used = extents[extents["ino"] != 0]
    start = used["pblk"].astype(np.int64)
    hit = (start <= pblk) & (pblk < start + used["length"].astype(np.int64))
    rows = used[hit]
    return sorted(zip(rows["ino"].tolist(),
                      (rows["lblk"].astype(np.int64) + pblk - rows["pblk"].astype(np.int64)).tolist()))


def usage(inodes: np.ndarray, extents: np.ndarray, refcounts: np.ndarray,
          g: fmt.Geometry) -> dict[str, int]:
    modes = inodes["mode"]
    is_reg = (modes & fmt.S_IFMT_BITS) == st.S_IFREG
    rc = refcounts[g.data_start:].astype(np.int64)
    aliases = int(extents["length"][extents["ino"] != 0].astype(np.int64).sum())
    xattr_blocks = int(np.count_nonzero(inodes["xattr_blk"]))
    used_blocks = int(np.count_nonzero(rc))
    data_blocks = used_blocks - xattr_blocks          # frames mapped by at least one file
    return {
        "logical_bytes": int(inodes["size"][is_reg].astype(np.int64).sum()),
        "physical_bytes": used_blocks * fmt.BLOCK_SIZE,
        "free_bytes": int(np.count_nonzero(rc == 0)) * fmt.BLOCK_SIZE,
        "total_bytes": g.data_blocks * fmt.BLOCK_SIZE,
        "files": int(np.count_nonzero(modes)),        # inodes in use, root included
        "shared_blocks": int(np.count_nonzero(rc > 1)),
        "aliases": aliases,
        "bytes_saved": max(0, aliases - data_blocks) * fmt.BLOCK_SIZE,
    }
