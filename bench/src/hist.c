/*
 * Log-linear histogram in the manner of HdrHistogram: values below
 * 2 * CB_HIST_SUB are counted exactly; above, each power of two is split
 * into CB_HIST_SUB linear sub-buckets, so a bucket is at most 1/1024 of
 * its value wide (three significant decimal digits).
 */

#include <string.h>

#include "cb.h"


void
cb_hist_init(cb_hist_t *h)
{
    memset(h, 0, sizeof(cb_hist_t));
    h->min = UINT64_MAX;
}


uint32_t
cb_hist_index(uint64_t v)
{
    uint32_t  e, shift;

    if (v >= (1ULL << CB_HIST_MAX_EXP)) {
        v = (1ULL << CB_HIST_MAX_EXP) - 1;
    }

    if (v < 2 * CB_HIST_SUB) {
        return (uint32_t) v;
    }

    e = 63 - (uint32_t) __builtin_clzll(v);   /* floor(log2 v) */
    shift = e - CB_HIST_SUB_BITS;

    /* v >> shift lies in [SUB, 2 * SUB) */
    return shift * CB_HIST_SUB + (uint32_t) (v >> shift);
}


/* the highest value that falls into bucket idx */
uint64_t
cb_hist_value(uint32_t idx)
{
    uint32_t  shift;

    if (idx < 2 * CB_HIST_SUB) {
        return idx;
    }

    shift = idx / CB_HIST_SUB - 1;

    return (((uint64_t) (idx - shift * CB_HIST_SUB) + 1) << shift) - 1;
}


void
cb_hist_add(cb_hist_t *h, uint64_t v)
{
    h->b[cb_hist_index(v)]++;
    h->n++;
    h->sum += (double) v;

    if (v < h->min) {
        h->min = v;
    }

    if (v > h->max) {
        h->max = v;
    }
}


void
cb_hist_merge(cb_hist_t *d, const cb_hist_t *s)
{
    uint32_t  i;

    if (s->n == 0) {
        return;
    }

    for (i = 0; i < CB_HIST_BUCKETS; i++) {
        d->b[i] += s->b[i];
    }

    d->n += s->n;
    d->sum += s->sum;

    if (s->min < d->min) {
        d->min = s->min;
    }

    if (s->max > d->max) {
        d->max = s->max;
    }
}


/* value at percentile pct (0..100); 100 gives the exact maximum */
uint64_t
cb_hist_pct(const cb_hist_t *h, double pct)
{
    uint64_t  want, acc, v;
    uint32_t  i;

    if (h->n == 0) {
        return 0;
    }

    if (pct >= 100.0) {
        return h->max;
    }

    want = (uint64_t) (pct / 100.0 * (double) h->n + 0.5);
    if (want < 1) {
        want = 1;
    }

    acc = 0;

    for (i = 0; i < CB_HIST_BUCKETS; i++) {
        acc += h->b[i];

        if (acc >= want) {
            v = cb_hist_value(i);
            if (v > h->max) {
                v = h->max;
            }
            if (v < h->min) {
                v = h->min;
            }
            return v;
        }
    }

    return h->max;
}
