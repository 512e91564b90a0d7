"""`mkfs.daxfs` and `fsck.daxfs`: the util-linux calling conventions, so that `mkfs -t daxfs`,
`fsck -t daxfs` and fstab's fsck pass (fsck -A) find and drive daxfs.

mkfs(8) runs `mkfs.daxfs [options] DEVICE [SIZE-IN-BLOCKS]` (blocks of 1 KiB, as mkfs.ext4
reads them); an existing image file of non-zero size keeps its size unless one is given.
fsck(8) runs `fsck.daxfs [-a|-p|-y|-n|-r|-f|-V|-C FD...] DEVICE`; -a, -p, -y and -r repair
(daxfs repairs only what it can prove right, so the automatic and interactive modes are the
same), -n checks only. Both end in `daxfs mkfs` / `daxfs fsck` with their exit codes.
"""
from __future__ import annotations

import os
import sys

from .main import main

MKFS_USAGE = "usage: mkfs.daxfs [-s SIZE] [-f|--force] [--inodes N] [--extents N] IMAGE [BLOCKS]"
FSCK_USAGE = "usage: fsck.daxfs [-a|-p|-y|-r|-n] [-f] [-V] IMAGE"


def mkfs_main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    opts: list[str] = []
    positional: list[str] = []
    it = iter(args)
    for a in it:
        if a in ("-s", "--size", "--inodes", "--extents"):
            opts += [a, next(it, "")]
        elif a in ("-f", "--force"):
            opts.append("--force")
        elif a == "--sparse":
            opts.append(a)
        elif a in ("-V", "--verbose", "-q", "--quiet"):
            continue
        elif a.startswith("-"):
            print(f"mkfs.daxfs: unknown option {a}\n{MKFS_USAGE}", file=sys.stderr)
            return 2
        else:
            positional.append(a)
    if not 1 <= len(positional) <= 2:
        print(MKFS_USAGE, file=sys.stderr)
        return 2
    image = positional[0]
    if len(positional) == 2:
        if not positional[1].isdigit():
            print(f"mkfs.daxfs: size in blocks must be a number: {positional[1]}",
                  file=sys.stderr)
            return 2
        opts += ["--size", str(int(positional[1]) * 1024)]
    elif "-s" not in opts and "--size" not in opts:
        try:
            size = os.stat(image).st_size
        except OSError:
            size = 0
        if size:                            # an existing file (or one made with truncate -s)
            opts += ["--size", str(size), "--force"]
    return main(["mkfs", image, *opts])


def fsck_main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    repair = False
    positional: list[str] = []
    it = iter(args)
    for a in it:
        if a in ("-C",):
            next(it, None)                  # progress fd: daxfs shows progress on a tty only
        elif a.startswith("-C"):
            continue
        elif a.startswith("-") and len(a) > 1 and not a.startswith("--"):
            flags = set(a[1:])
            if flags - set("apyrnfVtv"):
                print(f"fsck.daxfs: unknown option {a}\n{FSCK_USAGE}", file=sys.stderr)
                return 16
            repair |= bool(flags & set("apyr")) and "n" not in flags
        elif a == "--repair":
            repair = True
        elif a.startswith("--"):
            print(f"fsck.daxfs: unknown option {a}\n{FSCK_USAGE}", file=sys.stderr)
            return 16
        else:
            positional.append(a)
    if len(positional) != 1:
        print(FSCK_USAGE, file=sys.stderr)
        return 16
    return main(["fsck", positional[0], *(["--repair"] if repair else [])])
