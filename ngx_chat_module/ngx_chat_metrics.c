
/*
 * Copyright (C) ngx_chat_module authors
 */


/*
 * /chat/metrics: Prometheus text exposition (format 0.0.4).
 *
 * Each worker process claims a slot of the zone's table at start (a slot
 * whose process is gone, or a free one) and counts into it alone: an
 * atomic add, no lock, no cache line shared with another worker.  A scrape
 * sums every slot: counters over all of them (a worker that died keeps
 * what it counted, a respawned one adds to a free slot), gauges over the
 * slots of live processes only (a killed worker's connections are gone).
 * The table lives in the zone, so it survives a reload.
 *
 * Gauges that are not moved where they change (the store pool, the bus
 * position) are written by each worker once a second.
 */


#include "ngx_chat_module.h"
#include "ngx_chat_api.h"
#include "ngx_chat_bus.h"
#include "ngx_chat_db.h"
#include "ngx_chat_metrics.h"


ngx_chat_metrics_slot_t  *ngx_chat_metrics;

static ngx_event_t        ngx_chat_metrics_tick_ev;

/* nginx's debug log reads a timer's data as a connection (its fd) */
static ngx_connection_t   ngx_chat_metrics_dumb;

static void ngx_chat_metrics_claim(ngx_log_t *log);
static void ngx_chat_metrics_tick(ngx_event_t *ev);
static void ngx_chat_metrics_publish(void);
static void ngx_chat_metrics_observe(ngx_chat_hist_t *h, ngx_msec_t ms);
static ngx_int_t ngx_chat_metrics_live(ngx_chat_metrics_slot_t *slot);
static ngx_int_t ngx_chat_metrics_render(ngx_chat_buf_t *b);
static ngx_int_t ngx_chat_metrics_family(ngx_chat_buf_t *b, const char *name,
    const char *type, const char *help);
static ngx_int_t ngx_chat_metrics_hist(ngx_chat_buf_t *b, const char *name,
    const char *label, ngx_chat_hist_t *h);


static const char  *ngx_chat_m_transports[NGX_CHAT_M_TRANSPORTS] = {
    "websocket", "sse", "poll"
};

/* the close codes a server sends (PROTOCOL §4); the last is "other" */
static ngx_uint_t   ngx_chat_m_close_codes[NGX_CHAT_M_CLOSE_CODES] = {
    1000, 1001, 1008, 1009, 1011, 4001, 4008, 4009, 4029, 0
};

/* PROTOCOL §2 and §11 error codes; the last is "other" */
static const char  *ngx_chat_m_errors[NGX_CHAT_M_ERRORS] = {
    "bad_request", "unauthorized", "token_expired", "forbidden", "not_found",
    "blocked", "conflict", "too_large", "rate_limited", "unavailable",
    "internal", "archived", "unsupported_type", "limit", "erased", "other"
};

static const char  *ngx_chat_m_rate_kinds[NGX_CHAT_RATE_KINDS] = {
    "send", "typing", "connect", "rest"
};

/* upper bounds of the latency buckets, ms (le= in seconds) */
static ngx_msec_t   ngx_chat_m_bounds[NGX_CHAT_M_BUCKETS] = {
    1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 10000
};


ngx_int_t
ngx_chat_metrics_init_zone(ngx_slab_pool_t *shpool, ngx_chat_shctx_t *sh)
{
    sh->metrics = ngx_slab_calloc(shpool, sizeof(ngx_chat_metrics_sh_t));
    if (sh->metrics == NULL) {
        return NGX_ERROR;
    }

    return NGX_OK;
}


ngx_int_t
ngx_chat_metrics_init_process(ngx_cycle_t *cycle)
{
    ngx_chat_metrics = NULL;

    if (ngx_chat_worker.sh == NULL || ngx_chat_worker.sh->metrics == NULL
        || ngx_process != NGX_PROCESS_WORKER)
    {
        return NGX_OK;
    }

    ngx_chat_metrics_claim(cycle->log);

    if (ngx_chat_metrics == NULL) {
        ngx_log_error(NGX_LOG_WARN, cycle->log, 0,
                      "chat: no free metrics slot yet, this worker is not "
                      "counted in /chat/metrics until one frees");
    }

    ngx_chat_metrics_dumb.fd = (ngx_socket_t) -1;

    ngx_chat_metrics_tick_ev.handler = ngx_chat_metrics_tick;
    ngx_chat_metrics_tick_ev.log = cycle->log;
    ngx_chat_metrics_tick_ev.data = &ngx_chat_metrics_dumb;
    ngx_chat_metrics_tick_ev.cancelable = 1;

    ngx_add_timer(&ngx_chat_metrics_tick_ev, 1000);

    return NGX_OK;
}


/*
 * A slot whose process is gone (or that names this very pid: a process
 * that had it before died), or a free one.  Counters go on from what the
 * dead process counted; gauges start at zero.
 */
static void
ngx_chat_metrics_claim(ngx_log_t *log)
{
    ngx_uint_t                i, pass;
    ngx_atomic_uint_t         old;
    ngx_chat_metrics_sh_t    *msh;
    ngx_chat_metrics_slot_t  *slot;

    msh = ngx_chat_worker.sh->metrics;

    for (pass = 0; pass < 2; pass++) {
        for (i = 0; i < NGX_CHAT_METRICS_SLOTS; i++) {
            slot = &msh->slot[i];
            old = slot->pid;

            if (pass == 0 ? old != (ngx_atomic_uint_t) ngx_pid
                          : old != 0 && ngx_chat_metrics_live(slot))
            {
                continue;
            }

            if (!ngx_atomic_cmp_set(&slot->pid, old,
                                    (ngx_atomic_uint_t) ngx_pid))
            {
                continue;
            }

            ngx_memzero((void *) slot->gauge, sizeof(slot->gauge));
            slot->seen = ngx_time();
            ngx_chat_metrics = slot;
            return;
        }
    }
}


void
ngx_chat_metrics_exit_process(void)
{
    if (ngx_chat_metrics_tick_ev.timer_set) {
        ngx_del_timer(&ngx_chat_metrics_tick_ev);
    }

    if (ngx_chat_metrics) {
        /* a clean exit frees the slot at once */
        ngx_memzero((void *) ngx_chat_metrics->gauge,
                    sizeof(ngx_chat_metrics->gauge));
        (void) ngx_atomic_cmp_set(&ngx_chat_metrics->pid,
                                  (ngx_atomic_uint_t) ngx_pid, 0);
        ngx_chat_metrics = NULL;
    }
}


static void
ngx_chat_metrics_tick(ngx_event_t *ev)
{
    if (ngx_chat_metrics == NULL) {
        ngx_chat_metrics_claim(ev->log);
    }

    ngx_chat_metrics_publish();

    /* also while exiting (it says the slot is live); cancelable */
    ngx_add_timer(ev, 1000);
}


/* this worker's gauges that are not moved where they change */

static void
ngx_chat_metrics_publish(void)
{
    uint64_t                  position, known;
    ngx_chat_metrics_slot_t  *m;

    m = ngx_chat_metrics;
    if (m == NULL) {
        return;
    }

    m->seen = ngx_time();
    m->gauge[NGX_CHAT_MG_DB_ALIVE] = ngx_chat_db_alive_count();
    m->gauge[NGX_CHAT_MG_DB_BUSY] = ngx_chat_db_busy();
    m->gauge[NGX_CHAT_MG_DB_QUEUED] = ngx_chat_db_queued();

    position = ngx_chat_bus_position();
    known = ngx_chat_bus_started() ? ngx_chat_bus_known() : position;

    m->gauge[NGX_CHAT_MG_BUS_POSITION] = (ngx_atomic_uint_t) position;
    m->gauge[NGX_CHAT_MG_BUS_LAG] = (ngx_atomic_uint_t)
                                    (known > position ? known - position : 0);
}


ngx_uint_t
ngx_chat_metrics_transport(ngx_str_t *name)
{
    ngx_uint_t  i;

    for (i = 0; i < NGX_CHAT_M_TRANSPORTS; i++) {
        if (name->len == ngx_strlen(ngx_chat_m_transports[i])
            && ngx_strncmp(name->data, ngx_chat_m_transports[i], name->len)
               == 0)
        {
            return i;
        }
    }

    return 0;
}


/* a session opened (n = 1) or closed (n = -1); 1 if it was counted */

ngx_uint_t
ngx_chat_metrics_session(ngx_str_t *transport, ngx_int_t n)
{
    ngx_uint_t  t;

    if (ngx_chat_metrics == NULL) {
        return 0;
    }

    t = ngx_chat_metrics_transport(transport);

    if (n > 0) {
        ngx_chat_count(NGX_CHAT_MC_SESSIONS + t, 1);
    }

    ngx_chat_gauge_add(NGX_CHAT_MG_CONNECTIONS + t, n);

    return 1;
}


void
ngx_chat_metrics_close(ngx_uint_t code)
{
    ngx_uint_t  i;

    for (i = 0; ngx_chat_m_close_codes[i]; i++) {
        if (ngx_chat_m_close_codes[i] == code) {
            break;
        }
    }

    ngx_chat_count(NGX_CHAT_MC_CLOSES + i, 1);
}


void
ngx_chat_metrics_error(const char *code)
{
    ngx_uint_t  i, n;

    n = sizeof(ngx_chat_m_errors) / sizeof(ngx_chat_m_errors[0]) - 1;

    for (i = 0; i < n; i++) {
        if (ngx_strcmp(code, ngx_chat_m_errors[i]) == 0) {
            break;
        }
    }

    ngx_chat_count(NGX_CHAT_MC_ERRORS + i, 1);
}


void
ngx_chat_metrics_send(ngx_msec_t ms, ngx_int_t rc, ngx_uint_t duplicate)
{
    if (ngx_chat_metrics == NULL) {
        return;
    }

    ngx_chat_metrics_observe(&ngx_chat_metrics->send, ms);

    ngx_chat_count(rc != NGX_OK ? NGX_CHAT_MC_SEND_ERRORS
                   : duplicate ? NGX_CHAT_MC_DUPLICATES
                   : NGX_CHAT_MC_STORED, 1);
}


void
ngx_chat_metrics_query(ngx_uint_t stmt, ngx_msec_t ms)
{
    if (ngx_chat_metrics == NULL) {
        return;
    }

    ngx_chat_metrics_observe(&ngx_chat_metrics->query[ngx_min(stmt,
                                                 NGX_CHAT_M_STMTS - 1)], ms);
}


static void
ngx_chat_metrics_observe(ngx_chat_hist_t *h, ngx_msec_t ms)
{
    ngx_uint_t  i;

    for (i = 0; i < NGX_CHAT_M_BUCKETS; i++) {
        if (ms <= ngx_chat_m_bounds[i]) {
            break;
        }
    }

    /* non-cumulative buckets: one add; the scrape accumulates them */
    (void) ngx_atomic_fetch_add(&h->bucket[i], 1);
    (void) ngx_atomic_fetch_add(&h->sum_ms, ms);
}


/*
 * Its process exists and ticked lately: a pid another process took after
 * the worker died does not keep a dead worker's gauges alive.
 */
static ngx_int_t
ngx_chat_metrics_live(ngx_chat_metrics_slot_t *slot)
{
    ngx_pid_t  pid;

    pid = (ngx_pid_t) slot->pid;

    if (pid == 0) {
        return 0;
    }

    if (pid == ngx_pid) {
        return slot == ngx_chat_metrics;
    }

    if (ngx_time() - (time_t) slot->seen > 5) {
        return 0;
    }

    return kill(pid, 0) == 0 || ngx_errno != NGX_ESRCH;
}


ngx_int_t
ngx_chat_metrics_handler(ngx_http_request_t *r)
{
    ngx_int_t         rc;
    ngx_chat_buf_t    b;
    ngx_table_elt_t  *h;

    static ngx_str_t  type = ngx_string("text/plain; version=0.0.4");

    /* the length without the parameter: nginx's type tests (gzip_types) */

    if (!(r->method & (NGX_HTTP_GET|NGX_HTTP_HEAD))) {
        return ngx_chat_http_error(r, NGX_HTTP_NOT_ALLOWED, "bad_request",
                                   "GET or HEAD only", 0);
    }

    if (!ngx_chat_worker.ready || ngx_chat_worker.sh == NULL
        || ngx_chat_worker.sh->metrics == NULL)
    {
        return ngx_chat_http_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                   "unavailable", "the worker is starting",
                                   1000);
    }

    /* the answering worker's own gauges are exact, the others' a second old */
    ngx_chat_metrics_publish();

    ngx_memzero(&b, sizeof(ngx_chat_buf_t));

    if (ngx_chat_metrics_render(&b) != NGX_OK) {
        ngx_chat_buf_free(&b);
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    h = ngx_list_push(&r->headers_out.headers);
    if (h == NULL) {
        ngx_chat_buf_free(&b);
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    h->hash = 1;
    ngx_str_set(&h->key, "Cache-Control");
    ngx_str_set(&h->value, "no-store");

    rc = ngx_chat_http_send(r, NGX_HTTP_OK, &type, sizeof("text/plain") - 1,
                            b.data, b.len);

    ngx_chat_buf_free(&b);

    return rc;
}


/* one line: name{labels} value */
#define ngx_chat_m_line(b, fmt, ...)                                          \
    do {                                                                      \
        if (ngx_chat_buf_reserve(b, 256) != NGX_OK) {                         \
            return NGX_ERROR;                                                 \
        }                                                                     \
        (b)->len = ngx_snprintf((b)->data + (b)->len, 256, fmt "\n",          \
                                __VA_ARGS__) - (b)->data;                     \
    } while (0)


static ngx_int_t
ngx_chat_metrics_render(ngx_chat_buf_t *b)
{
    size_t                    zone_free;
    ngx_uint_t                i, j, nstmts, live[NGX_CHAT_METRICS_SLOTS];
    ngx_atomic_uint_t         c[NGX_CHAT_MC_N], g[NGX_CHAT_MG_N];
    ngx_slab_pool_t          *shpool;
    ngx_chat_metrics_sh_t    *msh;
    ngx_chat_metrics_slot_t  *s;

    msh = ngx_chat_worker.sh->metrics;

    ngx_memzero(c, sizeof(c));
    ngx_memzero(g, sizeof(g));

    for (i = 0; i < NGX_CHAT_METRICS_SLOTS; i++) {
        s = &msh->slot[i];
        live[i] = ngx_chat_metrics_live(s);

        for (j = 0; j < NGX_CHAT_MC_N; j++) {
            c[j] += s->counter[j];
        }

        if (live[i]) {
            for (j = 0; j < NGX_CHAT_MG_N; j++) {
                g[j] += s->gauge[j];
            }
        }
    }

    if (ngx_chat_metrics_family(b, "chat_connections", "gauge",
                                "Open client connections (WebSocket, SSE "
                                "streams, held long-polls)")
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    for (i = 0; i < NGX_CHAT_M_TRANSPORTS; i++) {
        ngx_chat_m_line(b, "chat_connections{transport=\"%s\"} %uA",
                        ngx_chat_m_transports[i],
                        g[NGX_CHAT_MG_CONNECTIONS + i]);
    }

    if (ngx_chat_metrics_family(b, "chat_worker_connections", "gauge",
                                "Open client connections per worker process")
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    for (i = 0; i < NGX_CHAT_METRICS_SLOTS; i++) {
        s = &msh->slot[i];

        if (!live[i]) {
            continue;
        }

        ngx_chat_m_line(b, "chat_worker_connections{pid=\"%uA\"} %uA",
                        s->pid,
                        s->gauge[NGX_CHAT_MG_CONNECTIONS]
                        + s->gauge[NGX_CHAT_MG_CONNECTIONS + 1]
                        + s->gauge[NGX_CHAT_MG_CONNECTIONS + 2]);
    }

    if (ngx_chat_metrics_family(b, "chat_sessions_total", "counter",
                                "Client connections opened") != NGX_OK)
    {
        return NGX_ERROR;
    }

    for (i = 0; i < NGX_CHAT_M_TRANSPORTS; i++) {
        ngx_chat_m_line(b, "chat_sessions_total{transport=\"%s\"} %uA",
                        ngx_chat_m_transports[i],
                        c[NGX_CHAT_MC_SESSIONS + i]);
    }

    if (ngx_chat_metrics_family(b, "chat_messages_total", "counter",
                                "Sends answered by the store: stored, "
                                "duplicate (an idempotent retry), error")
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    ngx_chat_m_line(b, "chat_messages_total{result=\"stored\"} %uA",
                    c[NGX_CHAT_MC_STORED]);
    ngx_chat_m_line(b, "chat_messages_total{result=\"duplicate\"} %uA",
                    c[NGX_CHAT_MC_DUPLICATES]);
    ngx_chat_m_line(b, "chat_messages_total{result=\"error\"} %uA",
                    c[NGX_CHAT_MC_SEND_ERRORS]);

    if (ngx_chat_metrics_family(b, "chat_deliveries_total", "counter",
                                "Events handed to client connections")
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    ngx_chat_m_line(b, "chat_deliveries_total{kind=\"durable\"} %uA",
                    c[NGX_CHAT_MC_DELIVERIES]);
    ngx_chat_m_line(b, "chat_deliveries_total{kind=\"ephemeral\"} %uA",
                    c[NGX_CHAT_MC_EPHEMERAL]);

    if (ngx_chat_metrics_family(b, "chat_closes_total", "counter",
                                "Connections closed by the server, by close "
                                "code (4008: a slow reader or a cap)")
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    for (i = 0; i < NGX_CHAT_M_CLOSE_CODES; i++) {
        if (ngx_chat_m_close_codes[i]) {
            ngx_chat_m_line(b, "chat_closes_total{code=\"%ui\"} %uA",
                            ngx_chat_m_close_codes[i],
                            c[NGX_CHAT_MC_CLOSES + i]);

        } else {
            ngx_chat_m_line(b, "chat_closes_total{code=\"other\"} %uA",
                            c[NGX_CHAT_MC_CLOSES + i]);
        }
    }

    if (ngx_chat_metrics_family(b, "chat_errors_total", "counter",
                                "Error answers to clients, by code")
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    for (i = 0; i < NGX_CHAT_M_ERRORS; i++) {
        ngx_chat_m_line(b, "chat_errors_total{code=\"%s\"} %uA",
                        ngx_chat_m_errors[i], c[NGX_CHAT_MC_ERRORS + i]);
    }

    if (ngx_chat_metrics_family(b, "chat_rate_limited_total", "counter",
                                "Requests refused by chat_rate_limit")
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    for (i = 0; i < NGX_CHAT_RATE_KINDS; i++) {
        ngx_chat_m_line(b, "chat_rate_limited_total{kind=\"%s\"} %uA",
                        ngx_chat_m_rate_kinds[i],
                        c[NGX_CHAT_MC_RATE_LIMITED + i]);
    }

    if (ngx_chat_metrics_family(b, "chat_db_connections", "gauge",
                                "Live PostgreSQL connections of the workers' "
                                "pools") != NGX_OK)
    {
        return NGX_ERROR;
    }

    ngx_chat_m_line(b, "chat_db_connections %uA", g[NGX_CHAT_MG_DB_ALIVE]);

    if (ngx_chat_metrics_family(b, "chat_db_busy", "gauge",
                                "Pool connections running a statement")
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    ngx_chat_m_line(b, "chat_db_busy %uA", g[NGX_CHAT_MG_DB_BUSY]);

    if (ngx_chat_metrics_family(b, "chat_db_queue", "gauge",
                                "Statements waiting for a pool connection")
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    ngx_chat_m_line(b, "chat_db_queue %uA", g[NGX_CHAT_MG_DB_QUEUED]);

    if (ngx_chat_metrics_family(b, "chat_db_reconnects_total", "counter",
                                "PostgreSQL connections lost and retried")
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    ngx_chat_m_line(b, "chat_db_reconnects_total %uA",
                    c[NGX_CHAT_MC_DB_RECONNECTS]);

    if (ngx_chat_metrics_family(b, "chat_bus_position", "gauge",
                                "The last event position each worker has "
                                "delivered from") != NGX_OK)
    {
        return NGX_ERROR;
    }

    for (i = 0; i < NGX_CHAT_METRICS_SLOTS; i++) {
        s = &msh->slot[i];

        if (live[i]) {
            ngx_chat_m_line(b, "chat_bus_position{pid=\"%uA\"} %uA", s->pid,
                            s->gauge[NGX_CHAT_MG_BUS_POSITION]);
        }
    }

    if (ngx_chat_metrics_family(b, "chat_bus_lag", "gauge",
                                "Events published that a worker has not "
                                "delivered yet") != NGX_OK)
    {
        return NGX_ERROR;
    }

    for (i = 0; i < NGX_CHAT_METRICS_SLOTS; i++) {
        s = &msh->slot[i];

        if (live[i]) {
            ngx_chat_m_line(b, "chat_bus_lag{pid=\"%uA\"} %uA", s->pid,
                            s->gauge[NGX_CHAT_MG_BUS_LAG]);
        }
    }

    shpool = ngx_chat_worker.shpool;
    zone_free = *(volatile ngx_uint_t *) &shpool->pfree << ngx_pagesize_shift;

    if (ngx_chat_metrics_family(b, "chat_zone_bytes", "gauge",
                                "The shared zone: size and free bytes")
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    ngx_chat_m_line(b, "chat_zone_bytes{state=\"size\"} %uz",
                    ngx_chat_worker.cmcf->shm_zone->shm.size);
    ngx_chat_m_line(b, "chat_zone_bytes{state=\"free\"} %uz", zone_free);

    if (ngx_chat_metrics_family(b, "chat_send_seconds", "histogram",
                                "From a send reaching the store queue to its "
                                "answer (committed, or refused)") != NGX_OK)
    {
        return NGX_ERROR;
    }

    {
        ngx_chat_hist_t  sum;

        ngx_memzero(&sum, sizeof(ngx_chat_hist_t));

        for (i = 0; i < NGX_CHAT_METRICS_SLOTS; i++) {
            for (j = 0; j <= NGX_CHAT_M_BUCKETS; j++) {
                sum.bucket[j] += msh->slot[i].send.bucket[j];
            }

            sum.sum_ms += msh->slot[i].send.sum_ms;
        }

        if (ngx_chat_metrics_hist(b, "chat_send_seconds", NULL, &sum)
            != NGX_OK)
        {
            return NGX_ERROR;
        }
    }

    if (ngx_chat_metrics_family(b, "chat_db_query_seconds", "histogram",
                                "PostgreSQL statements, queue wait included, "
                                "by statement") != NGX_OK)
    {
        return NGX_ERROR;
    }

    for (nstmts = 0; ngx_chat_stmts[nstmts].name; nstmts++) {
        /* void */
    }

    for (j = 0; j < NGX_CHAT_M_STMTS; j++) {
        ngx_chat_hist_t  sum;
        const char      *name;
        ngx_uint_t       k, any;

        if (j < nstmts) {
            name = ngx_chat_stmts[j].name;

        } else if (j == NGX_CHAT_M_STMTS - 1) {
            name = "sql";

        } else {
            continue;
        }

        ngx_memzero(&sum, sizeof(ngx_chat_hist_t));
        any = 0;

        for (i = 0; i < NGX_CHAT_METRICS_SLOTS; i++) {
            for (k = 0; k <= NGX_CHAT_M_BUCKETS; k++) {
                sum.bucket[k] += msh->slot[i].query[j].bucket[k];
                any |= msh->slot[i].query[j].bucket[k] != 0;
            }

            sum.sum_ms += msh->slot[i].query[j].sum_ms;
        }

        if (any && ngx_chat_metrics_hist(b, "chat_db_query_seconds", name,
                                         &sum)
                   != NGX_OK)
        {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


static ngx_int_t
ngx_chat_metrics_family(ngx_chat_buf_t *b, const char *name,
    const char *type, const char *help)
{
    if (name == NULL) {
        return NGX_OK;
    }

    ngx_chat_m_line(b, "# HELP %s %s", name, help);
    ngx_chat_m_line(b, "# TYPE %s %s", name, type);

    return NGX_OK;
}


static ngx_int_t
ngx_chat_metrics_hist(ngx_chat_buf_t *b, const char *name, const char *label,
    ngx_chat_hist_t *h)
{
    ngx_uint_t         i;
    ngx_atomic_uint_t  cum;
    u_char             lb[64], *p;

    p = label ? ngx_snprintf(lb, sizeof(lb) - 1, "statement=\"%s\",", label)
              : lb;
    *p = '\0';

    cum = 0;

    for (i = 0; i < NGX_CHAT_M_BUCKETS; i++) {
        cum += h->bucket[i];

        ngx_chat_m_line(b, "%s_bucket{%sle=\"%ui.%03ui\"} %uA", name, lb,
                        ngx_chat_m_bounds[i] / 1000,
                        ngx_chat_m_bounds[i] % 1000, cum);
    }

    cum += h->bucket[NGX_CHAT_M_BUCKETS];

    ngx_chat_m_line(b, "%s_bucket{%sle=\"+Inf\"} %uA", name, lb, cum);

    if (label) {
        ngx_chat_m_line(b, "%s_sum{statement=\"%s\"} %uA.%03uA", name, label,
                        h->sum_ms / 1000, h->sum_ms % 1000);
        ngx_chat_m_line(b, "%s_count{statement=\"%s\"} %uA", name, label,
                        cum);

    } else {
        ngx_chat_m_line(b, "%s_sum %uA.%03uA", name, h->sum_ms / 1000,
                        h->sum_ms % 1000);
        ngx_chat_m_line(b, "%s_count %uA", name, cum);
    }

    return NGX_OK;
}
