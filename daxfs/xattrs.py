"""Extended attributes: all of an inode's xattrs packed in one 4 KiB block (as ext4 does by
default), journaled whole on every change. Namespaces user., trusted., security.; system.*
(POSIX ACLs) is not supported."""
from __future__ import annotations

import errno
import struct

from . import format as fmt
from .errors import FsError

_ENTRY = struct.Struct("<BH")
NAMESPACES = (b"user.", b"trusted.", b"security.")
XATTR_CREATE, XATTR_REPLACE = 1, 2


def check_name(name: bytes) -> None:
    if not name or len(name) > 255:
        raise FsError(errno.ERANGE if name else errno.EINVAL)
    if not name.startswith(NAMESPACES):
        raise FsError(errno.EOPNOTSUPP)


def decode(block: bytes) -> dict[bytes, bytes]:
    """Parse an xattr block; raises ValueError on a malformed one."""
    count = int.from_bytes(block[:2], "little")
    out: dict[bytes, bytes] = {}
    p = 2
    for _ in range(count):
        if p + _ENTRY.size > len(block):
            raise ValueError("xattr block truncated")
        nlen, vlen = _ENTRY.unpack_from(block, p)
        p += _ENTRY.size
        if nlen == 0 or p + nlen + vlen > len(block):
            raise ValueError("xattr entry out of bounds")
        out[bytes(block[p:p + nlen])] = bytes(block[p + nlen:p + nlen + vlen])
        p += nlen + vlen
    return out


def encode(attrs: dict[bytes, bytes]) -> bytes:
    """The xattr block holding `attrs`; ENOSPC (as ext4 says for a value that fits no block)
    when they do not fit in one, checked before any length is packed into its field."""
    need = 2 + sum(_ENTRY.size + len(k) + len(v) for k, v in attrs.items())
    if need > fmt.BLOCK_SIZE:
        raise FsError(errno.ENOSPC, "xattrs exceed one block")
    out = bytearray(len(attrs).to_bytes(2, "little"))
    for name, value in attrs.items():
        out += _ENTRY.pack(len(name), len(value)) + name + value
    if len(out) > fmt.BLOCK_SIZE:
        raise FsError(errno.ENOSPC, "xattrs exceed one block")
    return bytes(out) + bytes(fmt.BLOCK_SIZE - len(out))
