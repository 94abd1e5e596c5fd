
/*
 * Copyright (C) ngx_chat_module authors
 */


#ifndef _NGX_CHAT_METRICS_H_INCLUDED_
#define _NGX_CHAT_METRICS_H_INCLUDED_


#include "ngx_chat_module.h"


/*
 * Counters and gauges of one worker process, in the shared zone.  Only
 * their worker writes them (an atomic add: the scrape reads them from
 * another worker at any time); /chat/metrics sums them over every slot.
 */

#define NGX_CHAT_M_TRANSPORTS   3        /* websocket, sse, poll */
#define NGX_CHAT_M_CLOSE_CODES  10       /* 9 codes and "other" */
#define NGX_CHAT_M_ERRORS       16       /* 15 codes and "other" */

enum {
    NGX_CHAT_MC_SESSIONS = 0,                            /* [transport] */
    NGX_CHAT_MC_DELIVERIES = NGX_CHAT_MC_SESSIONS + NGX_CHAT_M_TRANSPORTS,
    NGX_CHAT_MC_EPHEMERAL,
    NGX_CHAT_MC_STORED,
    NGX_CHAT_MC_DUPLICATES,
    NGX_CHAT_MC_SEND_ERRORS,
    NGX_CHAT_MC_CLOSES,                                  /* [close code] */
    NGX_CHAT_MC_ERRORS = NGX_CHAT_MC_CLOSES + NGX_CHAT_M_CLOSE_CODES,
    NGX_CHAT_MC_RATE_LIMITED = NGX_CHAT_MC_ERRORS + NGX_CHAT_M_ERRORS,
    NGX_CHAT_MC_DB_RECONNECTS = NGX_CHAT_MC_RATE_LIMITED + NGX_CHAT_RATE_KINDS,
    NGX_CHAT_MC_N
};

enum {
    NGX_CHAT_MG_CONNECTIONS = 0,                         /* [transport] */
    NGX_CHAT_MG_DB_ALIVE = NGX_CHAT_MG_CONNECTIONS + NGX_CHAT_M_TRANSPORTS,
    NGX_CHAT_MG_DB_BUSY,
    NGX_CHAT_MG_DB_QUEUED,
    NGX_CHAT_MG_BUS_POSITION,
    NGX_CHAT_MG_BUS_LAG,
    NGX_CHAT_MG_N
};

#define NGX_CHAT_M_BUCKETS      12       /* + the +Inf one */
#define NGX_CHAT_M_STMTS        40       /* the store's statements, + sql */

typedef struct {
    ngx_atomic_t               bucket[NGX_CHAT_M_BUCKETS + 1];
    ngx_atomic_t               sum_ms;
} ngx_chat_hist_t;

typedef struct {
    ngx_atomic_t               pid;
    ngx_atomic_t               seen;             /* ngx_time() of its tick */
    ngx_atomic_t               counter[NGX_CHAT_MC_N];
    ngx_atomic_t               gauge[NGX_CHAT_MG_N];
    ngx_chat_hist_t            send;             /* store: send -> answer */
    ngx_chat_hist_t            query[NGX_CHAT_M_STMTS];
} ngx_chat_metrics_slot_t;

/* every worker of a generation, and the old one draining after a reload */
#define NGX_CHAT_METRICS_SLOTS  128

struct ngx_chat_metrics_sh_s {
    ngx_chat_metrics_slot_t    slot[NGX_CHAT_METRICS_SLOTS];
};


extern ngx_chat_metrics_slot_t  *ngx_chat_metrics;

/* the hot path: one atomic add, nothing when metrics are off */
#define ngx_chat_count(i, n)                                                  \
    do {                                                                      \
        if (ngx_chat_metrics) {                                               \
            (void) ngx_atomic_fetch_add(&ngx_chat_metrics->counter[i], n);    \
        }                                                                     \
    } while (0)

#define ngx_chat_gauge_add(i, n)                                              \
    do {                                                                      \
        if (ngx_chat_metrics) {                                               \
            (void) ngx_atomic_fetch_add(&ngx_chat_metrics->gauge[i], n);      \
        }                                                                     \
    } while (0)


ngx_int_t ngx_chat_metrics_init_zone(ngx_slab_pool_t *shpool,
    ngx_chat_shctx_t *sh);
ngx_int_t ngx_chat_metrics_init_process(ngx_cycle_t *cycle);
void ngx_chat_metrics_exit_process(void);
ngx_uint_t ngx_chat_metrics_transport(ngx_str_t *name);
ngx_uint_t ngx_chat_metrics_session(ngx_str_t *transport, ngx_int_t n);
void ngx_chat_metrics_close(ngx_uint_t code);
void ngx_chat_metrics_error(const char *code);
void ngx_chat_metrics_send(ngx_msec_t ms, ngx_int_t rc, ngx_uint_t duplicate);
void ngx_chat_metrics_query(ngx_uint_t stmt, ngx_msec_t ms);
ngx_int_t ngx_chat_metrics_handler(ngx_http_request_t *r);


#endif /* _NGX_CHAT_METRICS_H_INCLUDED_ */
