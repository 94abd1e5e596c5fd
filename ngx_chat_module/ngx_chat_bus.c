
/*
 * Copyright (C) ngx_chat_module authors
 *
 * The bus: committed durable events are written into a ring in the shared
 * zone at the slot of their gseq; every worker reads the ring strictly in
 * gseq order and fans each event out to its local subscribers.  Reading by
 * gseq restores commit order whatever order workers published in.  A slot
 * that stays empty (a worker died between commit and publish) or was
 * overwritten (this worker fell behind) is read from PostgreSQL instead:
 * the ring is a cache, the store is the truth.
 *
 * Doorbells are eventfds made by the master before fork, one per worker
 * slot; a publisher rings every other worker once per batch.
 */


#include "ngx_chat_module.h"
#include "ngx_chat_json.h"

#include <sys/eventfd.h>


#define NGX_CHAT_BUS_CHUNK       64
#define NGX_CHAT_BUS_FETCH       512
#define NGX_CHAT_BUS_TICK        1000


typedef struct {
    ngx_rbtree_node_t          node;             /* key: conversation id */
    ngx_queue_t                subs;
} ngx_chat_conv_t;


typedef struct {
    ngx_queue_t                queue;            /* in conv->subs */
    ngx_chat_session_t        *session;
    ngx_chat_conv_t           *conv;
} ngx_chat_sub_t;


typedef struct {
    ngx_str_node_t             sn;               /* key: crc32 of user */
    ngx_queue_t                sessions;
    ngx_uint_t                 count;
} ngx_chat_user_t;


typedef struct {
    int                       *fds;
    ngx_uint_t                 n;
} ngx_chat_bells_t;


typedef struct {
    uint64_t                   gseq;
    int64_t                    conv;
    size_t                     off;
    size_t                     len;
} ngx_chat_copy_t;


typedef struct {
    uint64_t                   position;         /* all <= it dispatched */
    uint64_t                   clock;            /* highest gseq known */
    ngx_uint_t                 started;

    ngx_rbtree_t               convs;
    ngx_rbtree_node_t          convs_sentinel;
    ngx_rbtree_t               users;
    ngx_rbtree_node_t          users_sentinel;
    ngx_queue_t                sessions;
    ngx_uint_t                 nsessions;

    ngx_event_t                hole;
    ngx_event_t                tick;
    ngx_event_t                process;
    ngx_connection_t          *bell;
    ngx_uint_t                 fetching;
    ngx_uint_t                 clocking;
    ngx_uint_t                 ticks;

    ngx_chat_buf_t             frame;
    ngx_chat_buf_t             copy;
    ngx_chat_copy_t            copies[NGX_CHAT_BUS_CHUNK];

    u_char                     epoch[16];
    size_t                     epoch_len;
} ngx_chat_bus_t;


static void ngx_chat_bus_process(void);
static void ngx_chat_bus_process_handler(ngx_event_t *ev);
static void ngx_chat_bus_dispatch(uint64_t gseq, int64_t conv, u_char *data,
    size_t len);
static void ngx_chat_bus_membership(int64_t conv, u_char *data, size_t len);
static void ngx_chat_bus_fetch(uint64_t upto);
static void ngx_chat_bus_fetch_handler(ngx_chat_query_t *q, PGresult *res,
    ngx_int_t rc);
static void ngx_chat_bus_clock(void);
static void ngx_chat_bus_clock_handler(ngx_chat_query_t *q, PGresult *res,
    ngx_int_t rc);
static void ngx_chat_bus_hole_handler(ngx_event_t *ev);
static void ngx_chat_bus_tick_handler(ngx_event_t *ev);
static void ngx_chat_bus_bell_handler(ngx_event_t *ev);
static ngx_chat_conv_t *ngx_chat_bus_conv(int64_t id);
static ngx_chat_user_t *ngx_chat_bus_user(ngx_str_t *user);
static void ngx_chat_bus_free_slot(ngx_chat_slot_t *slot);
static u_char *ngx_chat_bus_alloc_locked(size_t len, uint64_t gseq);
static void ngx_chat_bells_cleanup(void *data);


static ngx_chat_bus_t     ngx_chat_bus;
static ngx_chat_bells_t  *ngx_chat_bells;


ngx_int_t
ngx_chat_bus_init_module(ngx_cycle_t *cycle)
{
    ngx_uint_t           i, n;
    ngx_core_conf_t     *ccf;
    ngx_chat_bells_t    *bells;
    ngx_pool_cleanup_t  *cln;

    ccf = (ngx_core_conf_t *) ngx_get_conf(cycle->conf_ctx, ngx_core_module);

    n = ccf->worker_processes;
    if (n < 1) {
        n = 1;
    }

    if (n > NGX_CHAT_MAX_WORKERS) {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, 0,
                      "chat: at most %d worker processes are supported",
                      NGX_CHAT_MAX_WORKERS);
        return NGX_ERROR;
    }

    bells = ngx_pcalloc(cycle->pool, sizeof(ngx_chat_bells_t));
    if (bells == NULL) {
        return NGX_ERROR;
    }

    bells->fds = ngx_pcalloc(cycle->pool, n * sizeof(int));
    if (bells->fds == NULL) {
        return NGX_ERROR;
    }

    cln = ngx_pool_cleanup_add(cycle->pool, 0);
    if (cln == NULL) {
        return NGX_ERROR;
    }

    cln->handler = ngx_chat_bells_cleanup;
    cln->data = bells;

    for (i = 0; i < n; i++) {
        bells->fds[i] = eventfd(0, EFD_NONBLOCK|EFD_CLOEXEC);

        if (bells->fds[i] == -1) {
            ngx_log_error(NGX_LOG_EMERG, cycle->log, ngx_errno,
                          "chat: eventfd() failed");
            return NGX_ERROR;
        }

        bells->n++;
    }

    ngx_chat_bells = bells;

    return NGX_OK;
}


static void
ngx_chat_bells_cleanup(void *data)
{
    ngx_chat_bells_t *bells = data;

    ngx_uint_t  i;

    for (i = 0; i < bells->n; i++) {
        if (ngx_chat_bus.bell && ngx_chat_bus.bell->fd == bells->fds[i]) {
            continue;
        }

        (void) close(bells->fds[i]);
    }

    if (ngx_chat_bells == bells) {
        ngx_chat_bells = NULL;
    }
}


ngx_int_t
ngx_chat_bus_init_zone(ngx_shm_zone_t *shm_zone, void *data)
{
    ngx_chat_main_conf_t  *ocmcf = data;

    size_t                 size;
    ngx_chat_shctx_t      *sh;
    ngx_slab_pool_t       *shpool;
    ngx_chat_main_conf_t  *cmcf;

    cmcf = shm_zone->data;
    shpool = (ngx_slab_pool_t *) shm_zone->shm.addr;

    if (ocmcf) {
        sh = shpool->data;

        if (sh->nslots == cmcf->bus_slots) {
            sh->generation++;
            return NGX_OK;
        }

        ngx_log_error(NGX_LOG_ERR, shm_zone->shm.log, 0,
                      "chat: \"chat_bus_slots\" changed, restart nginx "
                      "to apply it; keeping %ui slots", sh->nslots);
        return NGX_OK;
    }

    if (shm_zone->shm.exists) {
        return NGX_OK;
    }

    sh = ngx_slab_calloc(shpool, sizeof(ngx_chat_shctx_t));
    if (sh == NULL) {
        return NGX_ERROR;
    }

    size = cmcf->bus_slots * sizeof(ngx_chat_slot_t);

    sh->slots = ngx_slab_calloc(shpool, size);
    if (sh->slots == NULL) {
        return NGX_ERROR;
    }

    sh->nslots = cmcf->bus_slots;

    ngx_chat_tickets_init_zone(&sh->tickets);

    shpool->data = sh;
    shpool->log_nomem = 0;

    return NGX_OK;
}


ngx_int_t
ngx_chat_bus_init_process(ngx_cycle_t *cycle)
{
    ngx_chat_bus_t      *bus;
    ngx_slab_pool_t     *shpool;
    ngx_connection_t    *c;
    ngx_chat_shctx_t    *sh;

    bus = &ngx_chat_bus;

    shpool = (ngx_slab_pool_t *) ngx_chat_worker.cmcf->shm_zone->shm.addr;
    sh = shpool->data;

    ngx_chat_worker.shpool = shpool;
    ngx_chat_worker.sh = sh;

    ngx_rbtree_init(&bus->convs, &bus->convs_sentinel,
                    ngx_rbtree_insert_value);
    ngx_rbtree_init(&bus->users, &bus->users_sentinel,
                    ngx_str_rbtree_insert_value);
    ngx_queue_init(&bus->sessions);

    bus->hole.handler = ngx_chat_bus_hole_handler;
    bus->hole.log = cycle->log;
    bus->hole.data = bus;
    bus->hole.cancelable = 1;

    bus->tick.handler = ngx_chat_bus_tick_handler;
    bus->tick.log = cycle->log;
    bus->tick.data = bus;
    bus->tick.cancelable = 1;

    bus->process.handler = ngx_chat_bus_process_handler;
    bus->process.log = cycle->log;
    bus->process.data = bus;

    if (ngx_chat_worker.slot < NGX_CHAT_MAX_WORKERS) {
        /* a respawned worker inherits nothing of its predecessor */
        sh->workers[ngx_chat_worker.slot].connections = 0;
        sh->workers[ngx_chat_worker.slot].pid = ngx_pid;
    }

    if (ngx_chat_bells && ngx_chat_worker.slot < ngx_chat_bells->n) {
        c = ngx_get_connection(ngx_chat_bells->fds[ngx_chat_worker.slot],
                               cycle->log);
        if (c == NULL) {
            return NGX_ERROR;
        }

        c->read->handler = ngx_chat_bus_bell_handler;
        c->read->log = cycle->log;
        c->write->log = cycle->log;
        c->data = bus;

        if (ngx_add_event(c->read, NGX_READ_EVENT, 0) != NGX_OK) {
            return NGX_ERROR;
        }

        bus->bell = c;
    }

    ngx_shmtx_lock(&shpool->mutex);

    if (sh->started) {
        bus->position = sh->published;
        bus->clock = sh->published;
        ngx_memcpy(bus->epoch, sh->epoch, sh->epoch_len);
        bus->epoch_len = sh->epoch_len;
        bus->started = 1;
    }

    ngx_shmtx_unlock(&shpool->mutex);

    ngx_add_timer(&bus->tick, NGX_CHAT_BUS_TICK);

    return NGX_OK;
}


void
ngx_chat_bus_exit_process(void)
{
    ngx_chat_bus_t  *bus;

    bus = &ngx_chat_bus;

    if (bus->hole.timer_set) {
        ngx_del_timer(&bus->hole);
    }

    if (bus->tick.timer_set) {
        ngx_del_timer(&bus->tick);
    }

    if (bus->process.posted) {
        ngx_delete_posted_event(&bus->process);
    }

    if (bus->bell) {
        /* the fd belongs to the cycle's doorbells; only detach it */
        ngx_del_event(bus->bell->read, NGX_READ_EVENT, 0);
        ngx_free_connection(bus->bell);
        bus->bell->fd = (ngx_socket_t) -1;
        bus->bell = NULL;
    }

    ngx_chat_buf_free(&bus->frame);
    ngx_chat_buf_free(&bus->copy);
}


void
ngx_chat_bus_on_db_ready(void)
{
    if (!ngx_chat_bus.started && !ngx_chat_bus.clocking) {
        ngx_chat_bus_clock();
    }
}


ngx_int_t
ngx_chat_bus_started(void)
{
    return ngx_chat_bus.started;
}


uint64_t
ngx_chat_bus_position(void)
{
    return ngx_chat_bus.position;
}


/* cursors are "<epoch>.<gseq>": a cursor of another database is unknown */

u_char *
ngx_chat_cursor_print(u_char *p, uint64_t gseq)
{
    p = ngx_cpymem(p, ngx_chat_bus.epoch, ngx_chat_bus.epoch_len);
    *p++ = '.';
    return ngx_sprintf(p, "%uL", gseq);
}


ngx_int_t
ngx_chat_cursor_parse(u_char *p, size_t n, uint64_t *gseq)
{
    size_t    i;
    uint64_t  v;

    if (n <= ngx_chat_bus.epoch_len + 1
        || n > ngx_chat_bus.epoch_len + 1 + 19
        || ngx_memcmp(p, ngx_chat_bus.epoch, ngx_chat_bus.epoch_len) != 0
        || p[ngx_chat_bus.epoch_len] != '.')
    {
        return NGX_DECLINED;
    }

    v = 0;

    for (i = ngx_chat_bus.epoch_len + 1; i < n; i++) {
        if (p[i] < '0' || p[i] > '9') {
            return NGX_DECLINED;
        }

        v = v * 10 + (p[i] - '0');
    }

    *gseq = v;

    return NGX_OK;
}


u_char *
ngx_chat_bus_frame(uint64_t gseq, u_char *data, size_t len, size_t *out_len)
{
    u_char          *p;
    ngx_chat_buf_t  *b;

    b = &ngx_chat_bus.frame;
    b->len = 0;

    if (ngx_chat_buf_reserve(b, len + 64 + NGX_CHAT_CURSOR_LEN) != NGX_OK) {
        return NULL;
    }

    p = ngx_cpymem(b->data, "{\"type\":\"event\",\"cursor\":\"",
                   sizeof("{\"type\":\"event\",\"cursor\":\"") - 1);
    p = ngx_chat_cursor_print(p, gseq);
    p = ngx_cpymem(p, "\",\"event\":", sizeof("\",\"event\":") - 1);
    p = ngx_cpymem(p, data, len);
    *p++ = '}';

    b->len = p - b->data;
    *out_len = b->len;

    return b->data;
}


/* publishing: called by the store right after a commit */

void
ngx_chat_bus_publish(uint64_t gseq, int64_t conversation, u_char *data,
    size_t len)
{
    u_char            *p;
    ngx_chat_slot_t   *slot;
    ngx_slab_pool_t   *shpool;
    ngx_chat_shctx_t  *sh;

    shpool = ngx_chat_worker.shpool;
    sh = ngx_chat_worker.sh;

    ngx_shmtx_lock(&shpool->mutex);

    slot = &sh->slots[gseq % sh->nslots];

    if (slot->gseq >= gseq) {
        ngx_shmtx_unlock(&shpool->mutex);
        return;
    }

    p = ngx_chat_bus_alloc_locked(len, gseq);

    if (p == NULL) {
        /* readers will find the slot empty and read the store */
        if (gseq > sh->published) {
            sh->published = gseq;
        }

        ngx_shmtx_unlock(&shpool->mutex);

        ngx_log_error(NGX_LOG_WARN, ngx_chat_worker.log, 0,
                      "chat: bus zone is full, event %uL is served "
                      "from the store", gseq);
        return;
    }

    ngx_chat_bus_free_slot(slot);

    ngx_memcpy(p, data, len);
    slot->conversation = conversation;
    slot->len = len;
    slot->data = p;

    /* gseq last: a reader that sees it sees the rest */
    ngx_memory_barrier();
    slot->gseq = gseq;

    if (gseq > sh->published) {
        sh->published = gseq;
    }

    ngx_shmtx_unlock(&shpool->mutex);
}


static void
ngx_chat_bus_free_slot(ngx_chat_slot_t *slot)
{
    if (slot->data) {
        ngx_slab_free_locked(ngx_chat_worker.shpool, slot->data);
        slot->data = NULL;
    }

    slot->gseq = 0;
    slot->len = 0;
}


/*
 * When the zone is full, free the oldest events of the ring: any reader
 * that still needed them reads them from the store.
 */
static u_char *
ngx_chat_bus_alloc_locked(size_t len, uint64_t gseq)
{
    u_char            *p;
    uint64_t           g, from;
    ngx_uint_t         freed;
    ngx_chat_slot_t   *slot;
    ngx_chat_shctx_t  *sh;

    sh = ngx_chat_worker.sh;

    p = ngx_slab_alloc_locked(ngx_chat_worker.shpool, len);
    if (p) {
        return p;
    }

    from = (sh->published > sh->nslots) ? sh->published - sh->nslots + 1 : 1;

    for (g = from, freed = 0; g < gseq && freed < sh->nslots; g++) {
        slot = &sh->slots[g % sh->nslots];

        if (slot->data == NULL || slot->gseq != g) {
            continue;
        }

        ngx_chat_bus_free_slot(slot);
        freed++;

        if ((freed & 15) == 0) {
            p = ngx_slab_alloc_locked(ngx_chat_worker.shpool, len);
            if (p) {
                return p;
            }
        }
    }

    return ngx_slab_alloc_locked(ngx_chat_worker.shpool, len);
}


void
ngx_chat_bus_notify(void)
{
    uint64_t    one;
    ngx_uint_t  i;

    if (ngx_chat_bells) {
        one = 1;

        for (i = 0; i < ngx_chat_bells->n; i++) {
            if (i == ngx_chat_worker.slot) {
                continue;
            }

            if (write(ngx_chat_bells->fds[i], &one, sizeof(one)) == -1
                && ngx_errno != NGX_EAGAIN)
            {
                ngx_log_error(NGX_LOG_ALERT, ngx_chat_worker.log, ngx_errno,
                              "chat: doorbell write() failed");
            }
        }
    }

    if (!ngx_chat_bus.process.posted) {
        ngx_post_event(&ngx_chat_bus.process, &ngx_posted_events);
    }
}


static void
ngx_chat_bus_bell_handler(ngx_event_t *ev)
{
    uint64_t           v;
    ngx_connection_t  *c;

    c = ev->data;

    while (read(c->fd, &v, sizeof(v)) > 0) {
        /* void */
    }

    ngx_chat_bus_process();
}


static void
ngx_chat_bus_process_handler(ngx_event_t *ev)
{
    ngx_chat_bus_process();
}


/* read the ring in gseq order from our position */

static void
ngx_chat_bus_process(void)
{
    uint64_t           g, published, found;
    ngx_uint_t         i, n;
    ngx_chat_bus_t    *bus;
    ngx_chat_slot_t   *slot;
    ngx_slab_pool_t   *shpool;
    ngx_chat_shctx_t  *sh;

    bus = &ngx_chat_bus;

    if (!bus->started || bus->fetching) {
        return;
    }

    shpool = ngx_chat_worker.shpool;
    sh = ngx_chat_worker.sh;

    for ( ;; ) {
        n = 0;
        found = 0;
        bus->copy.len = 0;

        ngx_shmtx_lock(&shpool->mutex);

        published = sh->published;

        for (g = bus->position + 1;
             g <= published && n < NGX_CHAT_BUS_CHUNK;
             g++)
        {
            slot = &sh->slots[g % sh->nslots];
            found = slot->gseq;

            if (found != g) {
                break;
            }

            if (ngx_chat_buf_add(&bus->copy, slot->data, slot->len)
                != NGX_OK)
            {
                break;
            }

            bus->copies[n].gseq = g;
            bus->copies[n].conv = slot->conversation;
            bus->copies[n].off = bus->copy.len - slot->len;
            bus->copies[n].len = slot->len;
            n++;
        }

        ngx_shmtx_unlock(&shpool->mutex);

        if (published > bus->clock) {
            bus->clock = published;
        }

        for (i = 0; i < n; i++) {
            ngx_chat_bus_dispatch(bus->copies[i].gseq, bus->copies[i].conv,
                                  bus->copy.data + bus->copies[i].off,
                                  bus->copies[i].len);
            bus->position = bus->copies[i].gseq;
        }

        if (n < NGX_CHAT_BUS_CHUNK) {
            break;
        }
    }

    if (bus->position >= bus->clock) {
        if (bus->hole.timer_set) {
            ngx_del_timer(&bus->hole);
        }

        return;
    }

    if (found > bus->position + 1
        || bus->clock - bus->position >= sh->nslots)
    {
        /* overwritten: we fell behind the ring */
        ngx_chat_bus_fetch(bus->clock);
        return;
    }

    if (!bus->hole.timer_set) {
        ngx_add_timer(&bus->hole, ngx_chat_worker.cmcf->bus_hole_timeout);
    }
}


static void
ngx_chat_bus_hole_handler(ngx_event_t *ev)
{
    ngx_chat_bus_t  *bus;

    bus = &ngx_chat_bus;

    ngx_chat_bus_process();

    if (bus->position < bus->clock && !bus->fetching) {
        ngx_log_debug2(NGX_LOG_DEBUG_HTTP, ngx_chat_worker.log, 0,
                       "chat bus: hole after %uL, reading the store "
                       "up to %uL", bus->position, bus->clock);

        ngx_chat_bus_fetch(bus->clock);
    }
}


static void
ngx_chat_bus_fetch(uint64_t upto)
{
    u_char            *p;
    ngx_chat_query_t  *q;

    if (ngx_chat_bus.fetching) {
        return;
    }

    q = ngx_chat_query_alloc(NGX_CHAT_STMT_EVENTS_AFTER, 2 * NGX_INT64_LEN);
    if (q == NULL) {
        return;
    }

    p = (u_char *) &q[1];

    q->params[0] = (char *) p;
    p = ngx_sprintf(p, "%uL", ngx_chat_bus.position);
    *p++ = '\0';

    q->params[1] = (char *) p;
    p = ngx_sprintf(p, "%uL", upto);
    *p++ = '\0';

    q->nparams = 2;
    q->handler = ngx_chat_bus_fetch_handler;

    if (ngx_chat_db_query(q) != NGX_OK) {
        ngx_chat_query_free(q);

        /* try again later: the hole timer keeps the worker looking */
        if (!ngx_chat_bus.hole.timer_set) {
            ngx_add_timer(&ngx_chat_bus.hole, ngx_chat_db_retry_after());
        }

        return;
    }

    ngx_chat_bus.fetching = 1;
}


static void
ngx_chat_bus_fetch_handler(ngx_chat_query_t *q, PGresult *res, ngx_int_t rc)
{
    int              i, n;
    int64_t          conv;
    uint64_t         gseq;
    ngx_chat_bus_t  *bus;

    bus = &ngx_chat_bus;
    bus->fetching = 0;

    ngx_chat_query_free(q);

    if (rc != NGX_OK) {
        if (!bus->hole.timer_set) {
            ngx_add_timer(&bus->hole, ngx_chat_db_retry_after());
        }

        return;
    }

    n = PQntuples(res);

    for (i = 0; i < n; i++) {
        gseq = ngx_atoof((u_char *) PQgetvalue(res, i, 0),
                         PQgetlength(res, i, 0));
        conv = ngx_atoof((u_char *) PQgetvalue(res, i, 1),
                         PQgetlength(res, i, 1));

        if (gseq != bus->position + 1) {
            /* gseq is gapless: this cannot happen unless the log was cut */
            ngx_log_error(NGX_LOG_ERR, ngx_chat_worker.log, 0,
                          "chat: event log jumps from %uL to %uL",
                          bus->position, gseq);
        }

        if (gseq <= bus->position) {
            continue;
        }

        ngx_chat_bus_dispatch(gseq, conv, (u_char *) PQgetvalue(res, i, 2),
                              PQgetlength(res, i, 2));
        bus->position = gseq;
    }

    if (bus->position > bus->clock) {
        bus->clock = bus->position;
    }

    if (!bus->process.posted) {
        ngx_post_event(&bus->process, &ngx_posted_events);
    }
}


/* the store's clock: where to start, and events nobody published */

static void
ngx_chat_bus_clock(void)
{
    ngx_chat_query_t  *q;

    q = ngx_chat_query_alloc(NGX_CHAT_STMT_CLOCK, 0);
    if (q == NULL) {
        return;
    }

    q->handler = ngx_chat_bus_clock_handler;

    if (ngx_chat_db_query(q) != NGX_OK) {
        ngx_chat_query_free(q);
        return;
    }

    ngx_chat_bus.clocking = 1;
}


static void
ngx_chat_bus_clock_handler(ngx_chat_query_t *q, PGresult *res, ngx_int_t rc)
{
    size_t             len;
    uint64_t           v;
    ngx_chat_bus_t    *bus;
    ngx_slab_pool_t   *shpool;
    ngx_chat_shctx_t  *sh;

    bus = &ngx_chat_bus;
    bus->clocking = 0;

    ngx_chat_query_free(q);

    if (rc != NGX_OK || PQntuples(res) != 1) {
        return;
    }

    v = ngx_atoof((u_char *) PQgetvalue(res, 0, 0), PQgetlength(res, 0, 0));
    len = ngx_min((size_t) PQgetlength(res, 0, 1), sizeof(bus->epoch));

    shpool = ngx_chat_worker.shpool;
    sh = ngx_chat_worker.sh;

    ngx_shmtx_lock(&shpool->mutex);

    if (!sh->started
        || sh->epoch_len != len
        || ngx_memcmp(sh->epoch, PQgetvalue(res, 0, 1), len) != 0)
    {
        /* a first start, or the database was replaced under us */
        sh->published = v;
        sh->base = v;
        ngx_memcpy(sh->epoch, PQgetvalue(res, 0, 1), len);
        sh->epoch_len = len;
        sh->started = 1;
    }

    if (!bus->started) {
        bus->position = sh->published;
        bus->clock = sh->published;
        ngx_memcpy(bus->epoch, sh->epoch, sh->epoch_len);
        bus->epoch_len = sh->epoch_len;
        bus->started = 1;
    }

    ngx_shmtx_unlock(&shpool->mutex);

    if (v > bus->clock) {
        /* committed but never published: a worker died in between */
        bus->clock = v;
    }

    ngx_chat_bus_process();
}


static void
ngx_chat_bus_tick_handler(ngx_event_t *ev)
{
    ngx_chat_bus_t  *bus;

    bus = &ngx_chat_bus;

    if (ngx_exiting || ngx_terminate || ngx_quit) {
        return;
    }

    bus->ticks++;

    if (!bus->started) {
        if (!bus->clocking && ngx_chat_db_ready()) {
            ngx_chat_bus_clock();
        }

    } else if (bus->ticks % 2 == 0 && !bus->clocking && !bus->fetching
               && bus->position == bus->clock && ngx_chat_db_ready())
    {
        ngx_chat_bus_clock();
    }

    ngx_add_timer(&bus->tick, NGX_CHAT_BUS_TICK);
}


/* local fan-out */

static void
ngx_chat_bus_dispatch(uint64_t gseq, int64_t conv, u_char *data, size_t len)
{
    u_char              *frame;
    size_t               flen;
    ngx_queue_t         *q, *next;
    ngx_chat_sub_t      *sub;
    ngx_chat_conv_t     *cv;
    ngx_chat_session_t  *s;

    if (len < 10 || ngx_strncmp(data, "{\"kind\":\"message.", 17) != 0) {
        ngx_chat_bus_membership(conv, data, len);
    }

    cv = ngx_chat_bus_conv(conv);
    if (cv == NULL) {
        return;
    }

    frame = NULL;
    flen = 0;

    for (q = ngx_queue_head(&cv->subs);
         q != ngx_queue_sentinel(&cv->subs);
         q = next)
    {
        next = ngx_queue_next(q);

        sub = ngx_queue_data(q, ngx_chat_sub_t, queue);
        s = sub->session;

        if (s->state != NGX_CHAT_SESSION_LIVE || gseq <= s->cursor) {
            continue;
        }

        if (frame == NULL) {
            frame = ngx_chat_bus_frame(gseq, data, len, &flen);
            if (frame == NULL) {
                return;
            }
        }

        ngx_chat_session_deliver(s, gseq, frame, flen);
    }
}


/*
 * conversation.created (and later member.added) subscribe the local
 * sessions of the members before the event itself is fanned out.
 */
static void
ngx_chat_bus_membership(int64_t conv, u_char *data, size_t len)
{
    size_t               i;
    json_t              *root, *members, *m;
    ngx_str_t            user;
    ngx_queue_t         *q;
    ngx_chat_user_t     *u;
    ngx_chat_session_t  *s;

    root = ngx_chat_json_parse(data, len);
    if (root == NULL) {
        return;
    }

    members = json_object_get(json_object_get(root, "conversation"),
                              "members");
    if (members == NULL) {
        members = json_object_get(root, "members");
    }

    if (json_is_array(members)) {
        json_array_foreach(members, i, m) {
            if (!json_is_string(m)) {
                continue;
            }

            user.data = (u_char *) json_string_value(m);
            user.len = json_string_length(m);

            u = ngx_chat_bus_user(&user);
            if (u == NULL) {
                continue;
            }

            for (q = ngx_queue_head(&u->sessions);
                 q != ngx_queue_sentinel(&u->sessions);
                 q = ngx_queue_next(q))
            {
                s = ngx_queue_data(q, ngx_chat_session_t, user_queue);
                (void) ngx_chat_bus_subscribe(s, conv);
            }
        }
    }

    json_decref(root);
}


/* catch a session up from its cursor to our position out of the ring */

ngx_int_t
ngx_chat_bus_replay(ngx_chat_session_t *s)
{
    size_t             flen;
    u_char            *frame;
    uint64_t           g, upto;
    ngx_uint_t         i, n;
    ngx_chat_bus_t    *bus;
    ngx_chat_slot_t   *slot;
    ngx_slab_pool_t   *shpool;
    ngx_chat_shctx_t  *sh;

    bus = &ngx_chat_bus;
    shpool = ngx_chat_worker.shpool;
    sh = ngx_chat_worker.sh;

    upto = bus->position;

    if (s->cursor >= upto) {
        return NGX_OK;
    }

    if (upto - s->cursor > sh->nslots / 2) {
        return NGX_DECLINED;
    }

    while (s->cursor < upto) {
        n = 0;
        bus->copy.len = 0;

        ngx_shmtx_lock(&shpool->mutex);

        for (g = s->cursor + 1; g <= upto && n < NGX_CHAT_BUS_CHUNK; g++) {
            slot = &sh->slots[g % sh->nslots];

            if (slot->gseq != g) {
                ngx_shmtx_unlock(&shpool->mutex);
                return NGX_DECLINED;
            }

            if (!ngx_chat_bus_subscribed(s, slot->conversation)) {
                continue;
            }

            if (ngx_chat_buf_add(&bus->copy, slot->data, slot->len)
                != NGX_OK)
            {
                ngx_shmtx_unlock(&shpool->mutex);
                return NGX_ERROR;
            }

            bus->copies[n].gseq = g;
            bus->copies[n].off = bus->copy.len - slot->len;
            bus->copies[n].len = slot->len;
            n++;
        }

        ngx_shmtx_unlock(&shpool->mutex);

        for (i = 0; i < n; i++) {
            frame = ngx_chat_bus_frame(bus->copies[i].gseq,
                                       bus->copy.data + bus->copies[i].off,
                                       bus->copies[i].len, &flen);
            if (frame == NULL) {
                return NGX_ERROR;
            }

            ngx_chat_session_deliver(s, bus->copies[i].gseq, frame, flen);

            if (s->state == NGX_CHAT_SESSION_CLOSED) {
                return NGX_ERROR;
            }
        }

        /* nothing of the session's in (cursor, g): it has all of them */
        s->cursor = g - 1;
    }

    return NGX_OK;
}


/* the worker's registry of sessions, users and subscriptions */

static ngx_chat_user_t *
ngx_chat_bus_user(ngx_str_t *user)
{
    return (ngx_chat_user_t *) ngx_str_rbtree_lookup(&ngx_chat_bus.users,
                                   user, ngx_crc32_short(user->data,
                                                         user->len));
}


ngx_int_t
ngx_chat_bus_register(ngx_chat_session_t *s)
{
    ngx_chat_user_t  *u;

    u = ngx_chat_bus_user(&s->user);

    if (u == NULL) {
        u = ngx_alloc(sizeof(ngx_chat_user_t) + s->user.len,
                      ngx_chat_worker.log);
        if (u == NULL) {
            return NGX_ERROR;
        }

        u->sn.str.data = (u_char *) &u[1];
        u->sn.str.len = s->user.len;
        ngx_memcpy(u->sn.str.data, s->user.data, s->user.len);
        u->sn.node.key = ngx_crc32_short(s->user.data, s->user.len);
        ngx_queue_init(&u->sessions);
        u->count = 0;

        ngx_rbtree_insert(&ngx_chat_bus.users, &u->sn.node);

    } else if (u->count >= ngx_chat_worker.cmcf->max_connections) {
        return NGX_DECLINED;
    }

    ngx_queue_insert_tail(&u->sessions, &s->user_queue);
    u->count++;
    s->user_node = u;

    ngx_queue_insert_tail(&ngx_chat_bus.sessions, &s->queue);
    ngx_chat_bus.nsessions++;

    (void) ngx_atomic_fetch_add(
               &ngx_chat_worker.sh->workers[ngx_chat_worker.slot].connections,
               1);

    return NGX_OK;
}


void
ngx_chat_bus_unregister(ngx_chat_session_t *s)
{
    ngx_chat_user_t  *u;

    u = s->user_node;

    if (u == NULL) {
        return;
    }

    ngx_chat_bus_unsubscribe_all(s);

    ngx_queue_remove(&s->user_queue);
    ngx_queue_remove(&s->queue);
    ngx_chat_bus.nsessions--;
    s->user_node = NULL;

    (void) ngx_atomic_fetch_add(
               &ngx_chat_worker.sh->workers[ngx_chat_worker.slot].connections,
               -1);

    if (--u->count == 0) {
        ngx_rbtree_delete(&ngx_chat_bus.users, &u->sn.node);
        ngx_free(u);
    }
}


static ngx_chat_conv_t *
ngx_chat_bus_conv(int64_t id)
{
    /* node is the first member */
    return (ngx_chat_conv_t *) ngx_chat_rbtree_lookup(&ngx_chat_bus.convs,
                                                      (ngx_rbtree_key_t) id);
}


ngx_int_t
ngx_chat_bus_subscribed(ngx_chat_session_t *s, int64_t conv)
{
    ngx_uint_t       i;
    ngx_chat_sub_t  *sub;

    for (i = 0; i < s->nsubs; i++) {
        sub = s->subs[i];

        if ((int64_t) sub->conv->node.key == conv) {
            return 1;
        }
    }

    return 0;
}


ngx_int_t
ngx_chat_bus_subscribe(ngx_chat_session_t *s, int64_t conv)
{
    void            **subs;
    ngx_uint_t        n;
    ngx_chat_sub_t   *sub;
    ngx_chat_conv_t  *cv;

    if (ngx_chat_bus_subscribed(s, conv)) {
        return NGX_OK;
    }

    if (s->nsubs == s->nalloc) {
        n = s->nalloc ? s->nalloc * 2 : 8;

        subs = ngx_alloc(n * sizeof(void *), ngx_chat_worker.log);
        if (subs == NULL) {
            return NGX_ERROR;
        }

        if (s->nsubs) {
            ngx_memcpy(subs, s->subs, s->nsubs * sizeof(void *));
        }

        ngx_free(s->subs);
        s->subs = subs;
        s->nalloc = n;
    }

    cv = ngx_chat_bus_conv(conv);

    if (cv == NULL) {
        cv = ngx_alloc(sizeof(ngx_chat_conv_t), ngx_chat_worker.log);
        if (cv == NULL) {
            return NGX_ERROR;
        }

        ngx_memzero(&cv->node, sizeof(ngx_rbtree_node_t));
        cv->node.key = (ngx_rbtree_key_t) conv;
        ngx_queue_init(&cv->subs);
        ngx_rbtree_insert(&ngx_chat_bus.convs, &cv->node);
    }

    sub = ngx_alloc(sizeof(ngx_chat_sub_t), ngx_chat_worker.log);
    if (sub == NULL) {
        if (ngx_queue_empty(&cv->subs)) {
            ngx_rbtree_delete(&ngx_chat_bus.convs, &cv->node);
            ngx_free(cv);
        }

        return NGX_ERROR;
    }

    sub->session = s;
    sub->conv = cv;
    ngx_queue_insert_tail(&cv->subs, &sub->queue);

    s->subs[s->nsubs++] = sub;

    return NGX_OK;
}


void
ngx_chat_bus_unsubscribe_all(ngx_chat_session_t *s)
{
    ngx_uint_t        i;
    ngx_chat_sub_t   *sub;
    ngx_chat_conv_t  *cv;

    for (i = 0; i < s->nsubs; i++) {
        sub = s->subs[i];
        cv = sub->conv;

        ngx_queue_remove(&sub->queue);
        ngx_free(sub);

        if (ngx_queue_empty(&cv->subs)) {
            ngx_rbtree_delete(&ngx_chat_bus.convs, &cv->node);
            ngx_free(cv);
        }
    }

    ngx_free(s->subs);
    s->subs = NULL;
    s->nsubs = 0;
    s->nalloc = 0;
}
