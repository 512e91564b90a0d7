"""Redo journal: every metadata change reaches the tables only through a committed transaction.

Log layout (in the journal region, after its header block; the bytes are spelled in
format.py), one transaction after another:

    TXN_HEADER   magic 'DXT1', nrec, body_len, crc32(nrec,epoch,seq,body), epoch, seq (32 bytes)
    body         nrec records: offset u64, length u32, pad u32, data padded to 8 bytes
    commit word  u64 == commit_word(epoch, seq), 8-byte aligned, stored after the body is durable

Commit order (XFS/ext4 style): store header+body, persist, fence; store commit word, persist,
fence; only then apply the records to the tables in place. The in-place stores need no persist
until the next checkpoint, because replay redoes every committed transaction of the current
epoch. A checkpoint persists the whole metadata area, then bumps the header's 8-byte epoch,
which retires every transaction in the log at once.

Replay walks the log from its start and applies transactions while header, epoch, sequence,
checksum and commit word all match; the first mismatch is the end of the log (a torn tail).
"""
from __future__ import annotations

import logging

from . import format as fmt
from .format import TXN_HEADER, TXN_MAGIC, TXN_RECORD, commit_word, txn_crc
from .pmem import PMem

log = logging.getLogger(__name__)


def _pad8(n: int) -> int:
    return (n + 7) & ~7


_ZEROS = [bytes((8 - r) % 8) for r in range(8)]     # the padding after data of length % 8 == r

try:                  # the encoding in C: a COW break commits ~6 small records
    from . import _fastmaps
except ImportError:
    _fastmaps = None


def _txn(writes: list[tuple[int, bytes]], epoch: int, seq: int) -> bytes:
    """TXN_HEADER + body of one transaction (_fastmaps.journal_txn: the same bytes in C)."""
    if _fastmaps is not None:
        return _fastmaps.journal_txn(writes, TXN_MAGIC, epoch, seq)
    body = _body(writes)
    return TXN_HEADER.pack(TXN_MAGIC, len(writes), len(body),
                           txn_crc(len(writes), epoch, seq, body), epoch, seq) + body


def _body(writes: list[tuple[int, bytes]]) -> bytes:
    """The transaction body: per record TXN_RECORD, the data, zeros to 8 bytes (one join,
    not a growing bytearray)."""
    parts = []
    pack = TXN_RECORD.pack
    for off, data in writes:
        n = len(data)
        parts.append(pack(off, n, 0))
        parts.append(data)
        if n & 7:
            parts.append(_ZEROS[n & 7])
    return b"".join(parts)


class JournalFull(Exception):
    """A single transaction larger than the journal can hold (a bug: callers split work)."""


class Journal:
    def __init__(self, pm: PMem, g: fmt.Geometry):
        self.pm = pm
        self.hdr_off = g.journal_start * fmt.BLOCK_SIZE
        self.epoch_off = self.hdr_off + fmt.JOURNAL_EPOCH_OFF     # 8 bytes, stored atomically
        self.log_off = self.hdr_off + fmt.BLOCK_SIZE
        # new transactions stop before the COW intent ring (format.py); replay scans the whole
        # region, as images made before the ring existed may hold transactions there
        self.log_len = (g.journal_blocks - 1 - g.cow_ring_blocks) * fmt.BLOCK_SIZE
        self.scan_len = (g.journal_blocks - 1) * fmt.BLOCK_SIZE
        self.meta_len = g.data_start * fmt.BLOCK_SIZE
        self.pos = 0          # next free byte in the log
        self.seq = 0          # sequence number of the next transaction in this epoch
        self.commits = 0
        self.checkpoints = 0
        # records that land in the data region (xattr blocks) since the last checkpoint: the
        # checkpoint must persist them too, not only the metadata area
        self.data_ranges: list[tuple[int, int]] = []

    # -- header ----------------------------------------------------------------------------------
    def header_ok(self) -> bool:
        return fmt.unpack_journal_header(
            self.pm.buf[self.hdr_off:self.hdr_off + fmt.JOURNAL_HEADER_DTYPE.itemsize])[0]

    @property
    def epoch(self) -> int:
        return int.from_bytes(self.pm.buf[self.epoch_off:self.epoch_off + 8], "little")

    @property
    def max_txn_bytes(self) -> int:
        return self.log_len // 2

    # -- commit ----------------------------------------------------------------------------------
    def commit(self, writes: list[tuple[int, bytes]]) -> None:
        """Make `writes` (image offset, bytes) durable as one atomic transaction, then apply."""
        if not writes:
            return
        epoch = self.epoch
        txn = _txn(writes, epoch, self.seq)
        need = len(txn) + 8
        if need > self.max_txn_bytes:
            raise JournalFull(f"transaction of {need} bytes exceeds journal limit {self.max_txn_bytes}")
        if self.pos + need > self.log_len:
            self.checkpoint()                  # a new epoch, seq 0: stamp them
            epoch = self.epoch
            txn = _txn(writes, epoch, self.seq)
        at = self.log_off + self.pos
        pm = self.pm
        pm.store(at, txn)
        pm.persist(at, len(txn))
        pm.fence()
        cw_at = at + len(txn)
        pm.store(cw_at, commit_word(epoch, self.seq).to_bytes(8, "little"))
        pm.persist(cw_at, 8)
        pm.fence()
        self._apply(writes)
        self.pos += need
        self.seq += 1
        self.commits += 1

    def _apply(self, records) -> None:
        pm, meta_len = self.pm, self.meta_len
        if type(pm).store is PMem.store and pm.observer is None:
            # PMem.store's own work, inline (a COW break applies 6 records); a crash
            # harness's PMem (an observer, its own store, or a stand-in with only the
            # methods) sees every store as before
            buf = pm.buf
            for off, data in records:
                buf[off:off + len(data)] = data
                if off >= meta_len:
                    self.data_ranges.append((off, len(data)))
            return
        for off, data in records:
            pm.store(off, data)
            if off >= meta_len:
                self.data_ranges.append((off, len(data)))

    def checkpoint(self) -> None:
        """Persist the tables, then retire the whole log by bumping the epoch."""
        pm = self.pm
        pm.persist(0, self.meta_len)
        for off, length in self.data_ranges:
            pm.persist(off, length)
        self.data_ranges.clear()
        pm.fence()
        pm.store(self.epoch_off, max(1, (self.epoch + 1) & 0xFFFF_FFFF_FFFF_FFFF)
                 .to_bytes(8, "little"))         # wraps past 2**64 - 1, skipping 0 (invalid)
        pm.persist(self.epoch_off, 8)
        pm.fence()
        self.pos = 0
        self.seq = 0
        self.checkpoints += 1

    # -- recovery --------------------------------------------------------------------------------
    def _scan(self):
        """Yield (records, next_pos) for each committed transaction of the current epoch."""
        epoch = self.epoch
        buf = self.pm.buf
        pos, seq = 0, 0
        while pos + TXN_HEADER.size + 8 <= self.scan_len:
            at = self.log_off + pos
            magic, nrec, body_len, crc, t_epoch, t_seq = TXN_HEADER.unpack(
                bytes(buf[at:at + TXN_HEADER.size]))
            if magic != TXN_MAGIC or t_epoch != epoch or t_seq != seq:
                return
            end = pos + TXN_HEADER.size + body_len + 8
            if body_len % 8 or end > self.scan_len:
                return
            body = bytes(buf[at + TXN_HEADER.size:at + TXN_HEADER.size + body_len])
            if txn_crc(nrec, t_epoch, t_seq, body) != crc:
                return
            cw_at = at + TXN_HEADER.size + body_len
            cw = int.from_bytes(buf[cw_at:cw_at + 8], "little")
            if cw != commit_word(epoch, seq):
                return
            records = []
            p = 0
            for _ in range(nrec):
                if p + TXN_RECORD.size > body_len:
                    return
                off, length, _pad = TXN_RECORD.unpack_from(body, p)
                p += TXN_RECORD.size
                if p + length > body_len or off + length > self.meta_len and not self._data_ok(off, length):
                    return
                records.append((off, body[p:p + length]))
                p += _pad8(length)
            yield records, end
            pos, seq = end, seq + 1

    def _data_ok(self, off: int, length: int) -> bool:
        # xattr blocks live in the data region; everything else is in the metadata area
        return off >= self.meta_len and off + length <= self.pm.size

    def pending(self) -> int:
        return sum(1 for _ in self._scan())

    def replay(self) -> int:
        """Apply every committed transaction of the current epoch, then checkpoint."""
        n = 0
        for records, _end in self._scan():
            self._apply(records)
            n += 1
        if n:
            log.info("journal: replayed %d transaction(s)", n)
        self.checkpoint()
        return n
