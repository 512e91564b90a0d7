/*
 * daxfs data plane, the COW overlay: per published map, the file blocks whose sharing a C
 * thread broke and the blocks they moved to (see _cowplane.c for the breaks themselves).
 *
 * Until Python applies a break to its own extent map and republishes the file, the map's
 * runs still name the old, shared block; the overlay is what sends that file block's reads
 * and writes to the new one.  One open-addressing table per map, allocated at its first
 * break and freed with the map.  Readers (every thread serving the map, under the maps' read
 * lock) take no lock: the single writer (the breaker, under the COW mutex) stores a slot's
 * value before its key and widens the [lo, hi] bounds before both, with release ordering,
 * so a reader that sees a key sees its value and a block outside the bounds needs no probe.
 */
#define _GNU_SOURCE
#include "_dataplane.h"

#include <stdatomic.h>
#include <stdlib.h>

#define BLOCK_SHIFT DP_BLOCK_SHIFT
#define BLOCK_MASK ((uint64_t)(1u << BLOCK_SHIFT) - 1)

#define OV_BITS 19                   /* 8 MiB of address space: the breaks of a 1 GiB clone fit */
#define OV_SLOTS (1u << OV_BITS)
#define OV_FILL (OV_SLOTS / 4 * 3)   /* open addressing: probes stay short below 3/4 full */

struct cow_overlay {
    _Atomic uint64_t lo, hi;         /* least and greatest block in it: others need no probe */
    uint32_t count;                  /* entries (the breaker's, under the COW mutex) */
    struct {
        _Atomic uint64_t key;        /* file block + 1; 0: free */
        uint64_t val;                /* the block it moved to */
    } slot[OV_SLOTS];
};

static uint32_t ov_hash(uint64_t b)
{
    return (uint32_t)((b * 0x9E3779B97F4A7C15ull) >> (64 - OV_BITS));
}

/* 1 and *q = the block file block b moved to; 0: b did not move.  Read lock held. */
int cow_ov_get(const struct cow_overlay *ov, uint64_t b, uint64_t *q)
{
    if (b < atomic_load_explicit(&ov->lo, memory_order_acquire) ||
        b > atomic_load_explicit(&ov->hi, memory_order_acquire))
        return 0;
    for (uint32_t h = ov_hash(b);; h = (h + 1) & (OV_SLOTS - 1)) {
        uint64_t k = atomic_load_explicit(&ov->slot[h].key, memory_order_acquire);
        if (k == b + 1) {
            *q = ov->slot[h].val;
            return 1;
        }
        if (!k)
            return 0;                /* never full (OV_FILL): a free slot ends every probe */
    }
}

/* Add b -> q (b not in it, count below OV_FILL).  COW mutex held: the only writer.  The
 * bounds first, so that a reader who sees the key also sees them. */
void cow_ov_put(struct cow_overlay *ov, uint64_t b, uint64_t q)
{
    if (b < atomic_load_explicit(&ov->lo, memory_order_relaxed))
        atomic_store_explicit(&ov->lo, b, memory_order_release);
    if (b > atomic_load_explicit(&ov->hi, memory_order_relaxed))
        atomic_store_explicit(&ov->hi, b, memory_order_release);
    uint32_t h = ov_hash(b);
    while (atomic_load_explicit(&ov->slot[h].key, memory_order_relaxed))
        h = (h + 1) & (OV_SLOTS - 1);
    ov->slot[h].val = q;
    atomic_store_explicit(&ov->slot[h].key, b + 1, memory_order_release);
    ov->count++;
}

/* The overlay of a map that has none yet, published to its readers (empty: they find
 * nothing in it); NULL: no memory.  COW mutex held. */
struct cow_overlay *cow_new_overlay(struct map *m)
{
    struct cow_overlay *ov = calloc(1, sizeof(*ov));   /* untouched zero pages until used */
    if (!ov)
        return NULL;
    atomic_init(&ov->lo, UINT64_MAX);
    atomic_store_explicit(&m->overlay, ov, memory_order_release);
    return ov;
}

/* A map unlinked under the write lock (no reader, no breaker left in it), with its overlay. */
void cow_free_map(struct map *m)
{
    if (!m)
        return;
    free(atomic_load_explicit(&m->overlay, memory_order_relaxed));
    free(m);
}

/* For serve_read: [pos, e) lies inside one run and *base is where the run has pos.  Returns
 * the end of its first piece: pos's block alone if a break moved it (*base then points into
 * the block it moved to), else the run's blocks up to the first moved one.  Read lock held. */
uint64_t cow_read_piece(const struct cow_overlay *ov, uint64_t pos, uint64_t e, void **base)
{
    uint64_t b = pos >> BLOCK_SHIFT, q;
    if (cow_ov_get(ov, b, &q)) {
        *base = dp_image + (q << BLOCK_SHIFT) + (pos & BLOCK_MASK);
        return (b + 1) << BLOCK_SHIFT < e ? (b + 1) << BLOCK_SHIFT : e;
    }
    uint64_t c = b + 1, last = (e - 1) >> BLOCK_SHIFT;   /* only blocks within the bounds */
    uint64_t lo = atomic_load_explicit(&ov->lo, memory_order_acquire);
    uint64_t hi = atomic_load_explicit(&ov->hi, memory_order_acquire);
    c = c < lo ? lo : c;
    last = last > hi ? hi : last;
    for (; c <= last; c++)
        if (cow_ov_get(ov, c, &q))
            return c << BLOCK_SHIFT;
    return e;
}

/* No room for another break (open addressing stays fast below 3/4 full).  COW mutex held. */
int cow_overlay_full(const struct cow_overlay *ov)
{
    return ov->count >= OV_FILL;
}

