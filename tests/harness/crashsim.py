"""In-process crash-state exploration of the engine (no FUSE): record, rebuild, recover, judge.

1. Record. A workload (a list of operations) runs on a copy of a small pre-populated template
   image through `RecordingPMem`, which logs every store (image offset + the bytes *after* the
   store), every persist(range) and every fence, each labelled with the index of the operation
   in progress. Operation 0 is the mount, the last one the unmount (`close`). After each
   operation the logical state of the live engine is captured (`extract`): these are the
   reference states S_0..S_n+2 that crash images are judged against.

2. Rebuild. A crash image is the template's bytes plus a set of 4 KiB page versions derived
   from the log. Two crash models:
   - kill (SIGKILL / exception): every store so far survives, in program order -> one image
     after *every* store (all stores of all journal commits included, no sampling), plus one at
     the end of each operation.
   - power (power loss / OS crash): a store is durable once a persist covering its page and then
     a fence happened (durable content = the page as it was at the persist). At every fence
     (just before and just after it) and at the end of each operation, each in-flight page
     (current content != durable content) may independently hold its durable, its persisted-
     but-unfenced or its current version: all combinations when <= 16, else none, all, every
     single page, every page but one, and >= 20 seeded random combinations.
   Images are written into ONE scratch file with os.pwrite of only the pages that differ from
   what the file holds (the pages the previous state wrote and the pages its recovery stored).

   Plus crashes during recovery: the image a power loss leaves at the end of a sequence's last
   op (journal committed, nothing applied in place durable) is itself mounted under recording,
   and every kill/power crash point of that recovery (replay, checkpoint, orphan reclaim,
   unmount) is checked against the state its clean recovery shows.

3. Recover and judge. fsck of the crash image as found (fsck replays into a private mapping;
   must be clean), FileSystem.open (journal replay, orphan reclaim, trim), extract the logical
   state, close, fsck again (must be clean), then the oracle:
   - the logical state (every path -> type+mode, size, nlink, hard-link group, xattrs, content
     digest; symlink target) must equal S_before or S_after of the interrupted operation (at the
     end of an operation: S_after only), so every operation is atomic and every completed one
     is durable;
   - power model only, file *contents*: an overwrite of an existing block is not durable before
     fsync (README durability contract), so each 4 KiB page of a file may show any version the
     page had since the last fsync/unmount, *as long as the block stayed the same physical
     block*. Versions are masked to the file size at every step (bytes cut off by a truncate
     stay zero, so stale data resurfacing after truncate+grow is caught); a page that moved to
     a newly allocated block (hole fill, COW break) must show exactly its new contents (new
     blocks are persisted before the transaction that maps them); a page that became shared by
     a clone may show any version allowed for the source page. For S_before, pages the
     interrupted write/clone/punch overwrote in place may also show their new bytes.
   Metadata is never relaxed: it must equal S_before or S_after exactly in both models.

Prefix-closed exploration: crash points inside operation k of a sequence are skipped when the
sequence's first k operations were already explored as a sequence of their own (the log up to
there is identical), so longer sequences only add new states. Crash points that produce the
same image within one sequence are checked once (against every point's expectations); fsck
verdicts are memoized by a digest of the image bytes (fsck is a pure function of them); every
counted state is mounted, read and judged.

Engine bugs found so far are listed in KNOWN_ISSUES so that output can separate them from new
ones. Not modelled: stores torn inside one store() call (kill), sub-page (cache-line, DAX)
persistence granularity, intermediate page versions between two fences, timestamps.

The harness is split by stage: crashsim_state (logical state), crashsim_workload (operations,
template, catalog), crashsim_record (recording run), crashsim_oracle (allowed page versions,
verdicts), crashsim_images (crash images of both models), crashsim_check (scratch file, fsck,
recovery), crashsim_explore (Explorer, known issues). This module gathers their public names:
`from harness import crashsim as cs` (tests) or `from . import crashsim` (the harness itself);
tests/harness/crash_explore.py is the command line.
"""
from __future__ import annotations

from .crashsim_check import FsckCache, Observed, Scratch, recover_and_check
from .crashsim_explore import (KNOWN_ISSUES, Explorer, Failure, Stats, catalog_sequences,
                               known_issue)
from .crashsim_images import (Expect, PageImage, PowerTracker, choices, kill_image, kill_states,
                              power_image, power_states)
from .crashsim_oracle import (DATA_OPS, SYNC_OPS, Verdict, allowed_versions, diff_kinds,
                              initial_allowed, judge, kill_before, mask, page_of)
from .crashsim_record import (Recording, RecordingPMem, ReferenceError_, open_recording,
                              record)
from .crashsim_state import (BS, HOLE, IMAGE_SIZE, PAGE, ZERO_PAGE, ExtractError, State,
                             diff_states, extract)
from .crashsim_workload import (A_SIZE, CATALOG, Workload, build_template, payload,
                                random_op)

__all__ = [
    "A_SIZE", "BS", "CATALOG", "DATA_OPS", "Expect", "Explorer", "ExtractError", "Failure",
    "FsckCache", "HOLE", "IMAGE_SIZE", "KNOWN_ISSUES", "Observed", "PAGE", "PageImage",
    "PowerTracker", "Recording", "RecordingPMem", "ReferenceError_", "SYNC_OPS", "Scratch",
    "State", "Stats", "Verdict", "Workload", "ZERO_PAGE", "allowed_versions", "build_template",
    "catalog_sequences", "choices", "diff_kinds", "diff_states", "extract", "initial_allowed",
    "judge", "kill_before", "kill_image", "kill_states", "known_issue", "mask", "open_recording",
    "page_of", "payload", "power_image", "power_states", "random_op", "record",
    "recover_and_check",
]
