
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
 *
 * Positions.  gseq positions are handed out here, from chunks that the
 * store gives out (chat_clock.v), to a transaction only once it has done
 * everything that can wait on a lock (a send batch's first step), and
 * they are recorded in the zone (ngx_chat_resv_t) until the owner has
 * published the events or emptied the positions.  Transactions commit in
 * any order; no lock is held across a commit.  The horizon -- the
 * position before the oldest recorded reservation -- bounds everything
 * that reads past the ring: no reader takes a position from the store, or
 * moves a cursor, past a position that may still commit.  A reservation
 * whose outcome nobody saw (lost connection, killed worker) is settled
 * from the store once its transaction's advisory lock is free, which
 * PostgreSQL releases only after the commit or the rollback.
 */


#include "ngx_chat_module.h"
#include "ngx_chat_auth.h"
#include "ngx_chat_db.h"
#include "ngx_chat_store.h"
#include "ngx_chat_bus.h"
#include "ngx_chat_metrics.h"
#include "ngx_chat_limit.h"
#include "ngx_chat_transport.h"
#include "ngx_chat_session.h"
#include "ngx_chat_json.h"
#include "ngx_chat_live.h"

#include <sys/eventfd.h>
#include <openssl/rand.h>


#define NGX_CHAT_BUS_CHUNK       64
#define NGX_CHAT_BUS_FETCH       512
/*
 * A publisher rings the doorbells of its own cycle: after a reload the
 * new workers do not hear an old worker's commits, so every tick also
 * looks at what was published; every 8th tick asks the store's clock for
 * events that were committed and never published.
 */
#define NGX_CHAT_BUS_TICK        250
#define NGX_CHAT_BUS_CLOCK_TICKS 8

/* slots looked at, and event bytes copied, per hold of the zone mutex */
#define NGX_CHAT_BUS_SCAN        256
#define NGX_CHAT_BUS_COPY_BYTES  (256 * 1024)

/* slots a full zone's eviction looks at per hold */
#define NGX_CHAT_BUS_EVICT_SCAN  1024

/* sessions of a user a worker takes past chat_max_connections_per_user */
#define NGX_CHAT_BUS_REPLACING   8

/* events dispatched per turn of the event loop; the rest on the next */
#define NGX_CHAT_BUS_TURN        1024
#define NGX_CHAT_BUS_COPY_RESERVE                                            \
    (NGX_CHAT_BUS_COPY_BYTES + 6 * ngx_chat_worker.cmcf->max_message + 4096)


typedef struct {
    ngx_rbtree_node_t          node;             /* key: conversation id */
    ngx_queue_t                subs;
} ngx_chat_conv_t;


/*
 * A session's membership of a conversation as of the events: it gets the
 * conversation's events from "from" (its member.added, or 0) to "until"
 * (its member.removed, or 0: open).  A closed one is kept only so that a
 * session still catching up gets the events of the time it was a member.
 */
typedef struct {
    ngx_queue_t                queue;            /* in conv->subs */
    ngx_chat_session_t        *session;
    ngx_chat_conv_t           *conv;
    uint64_t                   from;
    uint64_t                   until;
} ngx_chat_sub_t;


#define ngx_chat_sub_has(sub, g)                                              \
    ((g) >= (sub)->from && ((sub)->until == 0 || (g) <= (sub)->until))


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
    uint64_t                   gseq;
    int64_t                    conv;
} ngx_chat_scan_t;


typedef struct {
    uint64_t                   position;         /* all <= it dispatched */
    uint64_t                   fetch_upto;
    ngx_uint_t                 fetch_resets;
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
    ngx_uint_t                 settling;
    ngx_uint_t                 waited;
    ngx_msec_t                 wait_since;
    ngx_uint_t                 ticks;
    ngx_uint_t                 resets;           /* database replacements */
    uint64_t                   clock_asked;      /* known when clock asked */

    ngx_chat_buf_t             frame;
    ngx_chat_buf_t             copy;
    ngx_chat_copy_t            copies[NGX_CHAT_BUS_SCAN];
    ngx_chat_scan_t            scan[NGX_CHAT_BUS_SCAN];

    u_char                     epoch[16];
    size_t                     epoch_len;
} ngx_chat_bus_t;


static void ngx_chat_bus_process(void);
static void ngx_chat_bus_process_handler(ngx_event_t *ev);
static void ngx_chat_bus_dispatch(uint64_t gseq, int64_t conv, u_char *data,
    size_t len);
static void ngx_chat_bus_membership(ngx_chat_event_t *ev,
    ngx_uint_t subscribe);
static void ngx_chat_bus_reset(uint64_t v, u_char *epoch, size_t len);
static void ngx_chat_bus_leave(ngx_chat_session_t *s, int64_t conv,
    uint64_t gseq);
static ngx_int_t ngx_chat_bus_sub_index(ngx_chat_session_t *s, int64_t conv,
    ngx_uint_t *index);
static void ngx_chat_bus_fetch(uint64_t upto);
static void ngx_chat_bus_fetch_handler(ngx_chat_query_t *q, PGresult *res,
    ngx_int_t rc);
static void ngx_chat_bus_clock(void);
static void ngx_chat_bus_clock_handler(ngx_chat_query_t *q, PGresult *res,
    ngx_int_t rc);
static void ngx_chat_bus_hole_handler(ngx_event_t *ev);
static uint64_t ngx_chat_bus_horizon(uint64_t below);
static uint64_t ngx_chat_bus_horizon_locked(uint64_t below);
static void ngx_chat_bus_skip_ahead(void);
static void ngx_chat_bus_raise(void);
static void ngx_chat_bus_raise_handler(ngx_chat_query_t *q, PGresult *res,
    ngx_int_t rc);
static void ngx_chat_bus_resv_end(ngx_chat_resv_t *r, int64_t key,
    ngx_uint_t empty);
static void ngx_chat_bus_void_locked(uint64_t lo, uint64_t hi);
static void ngx_chat_bus_settle(void);
static void ngx_chat_bus_settle_handler(ngx_chat_query_t *q, PGresult *res,
    ngx_int_t rc);
static ngx_uint_t ngx_chat_bus_alive(ngx_pid_t pid);
static void ngx_chat_bus_tick_handler(ngx_event_t *ev);
static void ngx_chat_bus_bell_handler(ngx_event_t *ev);
static ngx_chat_conv_t *ngx_chat_bus_conv(int64_t id);
static ngx_chat_user_t *ngx_chat_bus_user(ngx_str_t *user);
static ngx_int_t ngx_chat_bus_publish_locked(uint64_t gseq,
    int64_t conversation, u_char *data, size_t len);
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
    sh->holder = ngx_chat_random_key();

    if (ngx_chat_live_init_zone(shpool, sh, cmcf) != NGX_OK) {
        return NGX_ERROR;
    }

    if (ngx_chat_metrics_init_zone(shpool, sh) != NGX_OK) {
        return NGX_ERROR;
    }

    ngx_chat_tickets_init_zone(&sh->tickets);
    ngx_chat_rate_init_zone(&sh->rate);

    /* sessions of the pages live as long as the zone (a restart ends them) */
    if (RAND_bytes(sh->html_key, sizeof(sh->html_key)) != 1) {
        return NGX_ERROR;
    }

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
        /* a worker that starts under traffic: not past what may commit */
        bus->position = ngx_chat_bus_horizon_locked(sh->published);
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


/* below it the ring holds nothing: catch-up reads the store */

uint64_t
ngx_chat_bus_ring_start(void)
{
    uint64_t  n;

    n = ngx_chat_worker.sh->nslots;

    return (ngx_chat_bus.position > n) ? ngx_chat_bus.position - n : 0;
}


/* a join that began before a reset must not keep the old positions */

ngx_uint_t
ngx_chat_bus_resets(void)
{
    return ngx_chat_bus.resets;
}


/* the newest event this worker knows is committed, by any worker */

uint64_t
ngx_chat_bus_known(void)
{
    uint64_t  published;

    if (!ngx_chat_bus.started) {
        return ngx_chat_bus.clock;
    }

    /* an aligned 64-bit load: a torn value cannot be read */
    published = *(volatile uint64_t *) &ngx_chat_worker.sh->published;

    return ngx_max(ngx_chat_bus.clock, published);
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


/*
 * The event objects the store writes begin with their kind:
 * {"kind":"message.new",...}; anything else has an empty kind.
 */
void
ngx_chat_event_init(ngx_chat_event_t *ev, uint64_t gseq, int64_t conv,
    u_char *data, size_t len)
{
    u_char  *p, *last;

    ev->gseq = gseq;
    ev->conversation = conv;
    ev->seq = 0;
    ev->payload.data = data;
    ev->payload.len = len;
    ngx_str_null(&ev->envelope);
    ngx_str_null(&ev->kind);

    if (len > 10 && ngx_strncmp(data, "{\"kind\":\"", 9) == 0) {
        p = data + 9;
        last = ngx_strlchr(p, ngx_min(data + len, p + 64), '"');

        if (last) {
            ev->kind.data = p;
            ev->kind.len = last - p;
        }
    }
}


/* the JSON envelope, built once per event for every session it goes to */

ngx_int_t
ngx_chat_event_envelope(ngx_chat_event_t *ev)
{
    u_char          *p;
    ngx_chat_buf_t  *b;

    if (ev->envelope.data) {
        return NGX_OK;
    }

    b = &ngx_chat_bus.frame;
    b->len = 0;

    if (ngx_chat_buf_reserve(b, ev->payload.len + 64 + NGX_CHAT_CURSOR_LEN)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    if (ev->gseq) {
        p = ngx_cpymem(b->data, "{\"type\":\"event\",\"cursor\":\"",
                       sizeof("{\"type\":\"event\",\"cursor\":\"") - 1);
        p = ngx_chat_cursor_print(p, ev->gseq);
        p = ngx_cpymem(p, "\",\"event\":", sizeof("\",\"event\":") - 1);

    } else {
        p = ngx_cpymem(b->data, "{\"type\":\"event\",\"event\":",
                       sizeof("{\"type\":\"event\",\"event\":") - 1);
    }

    p = ngx_cpymem(p, ev->payload.data, ev->payload.len);
    *p++ = '}';

    b->len = p - b->data;

    ev->envelope.data = b->data;
    ev->envelope.len = b->len;

    return NGX_OK;
}


/* publishing: called by the store right after a commit */

/*
 * The event of a position of reservation r, while r is still the
 * reservation of key: a reset of the zone (the database was replaced)
 * may have handed the position to somebody else meanwhile.
 */
void
ngx_chat_bus_publish_reserved(ngx_chat_resv_t *r, int64_t key,
    uint64_t gseq, int64_t conversation, u_char *data, size_t len)
{
    ngx_int_t         rc;
    ngx_slab_pool_t  *shpool;

    shpool = ngx_chat_worker.shpool;
    rc = NGX_OK;

    ngx_shmtx_lock(&shpool->mutex);

    if (r->lo && r->key == key && gseq >= r->lo && gseq <= r->hi) {
        rc = ngx_chat_bus_publish_locked(gseq, conversation, data, len);
    }

    ngx_shmtx_unlock(&shpool->mutex);

    if (rc == NGX_DECLINED) {
        ngx_log_error(NGX_LOG_WARN, ngx_chat_worker.log, 0,
                      "chat: bus zone is full, event %uL is served "
                      "from the store", gseq);
    }
}


/*
 * An edit or a delete of a message (data: its message.edited or
 * message.deleted event at gseq): the ring's other events of the same
 * message -- its message.new, its earlier edits -- are dropped, and so is
 * this one when a newer one is there already (two workers may publish the
 * events of one message out of order).  Whoever needs them reads the
 * store, which builds them from the message as it is now
 * (sql/005_messaging.sql): a client that catches up later never gets text
 * that was replaced or deleted.  Only the half of the ring that catch-up
 * replays from is looked at, with the zone mutex released every
 * NGX_CHAT_BUS_SCAN slots.
 */
void
ngx_chat_bus_forget_message(int64_t conv, uint64_t gseq, u_char *data,
    size_t len)
{
    u_char            *p, *q, *id, *end, *d;
    size_t             idlen;
    uint64_t           g, from, last, top;
    ngx_uint_t         newer;
    ngx_slab_pool_t   *shpool;
    ngx_chat_slot_t   *slot;
    ngx_chat_shctx_t  *sh;

    static u_char  prefix[] = "{\"kind\":\"message.";
    static u_char  key[] = ",\"message\":{\"id\":\"";

    sh = ngx_chat_worker.sh;
    shpool = ngx_chat_worker.shpool;
    end = data + len;

    /* message.edited or message.deleted only */
    if (len <= sizeof(prefix) + 8
        || ngx_strncmp(data, prefix, sizeof(prefix) - 1) != 0
        || (ngx_strncmp(data + sizeof(prefix) - 1, "edited\"", 7) != 0
            && ngx_strncmp(data + sizeof(prefix) - 1, "deleted\"", 8) != 0))
    {
        return;
    }

    q = ngx_strlchr(data + sizeof(prefix) - 1, end, '"');
    if (q == NULL) {
        return;
    }

    id = ngx_strlcasestrn(q, ngx_min(end, q + 128), key, sizeof(key) - 2);
    if (id == NULL) {
        return;
    }

    id += sizeof(key) - 1;
    p = ngx_strlchr(id, end, '"');
    if (p == NULL) {
        return;
    }

    idlen = p - id;
    newer = 0;

    ngx_shmtx_lock(&shpool->mutex);

    top = sh->published;
    from = (top > sh->nslots / 2) ? top - sh->nslots / 2 + 1 : 1;
    from = ngx_max(from, sh->evict);

    ngx_shmtx_unlock(&shpool->mutex);

    for (g = from; g <= top; g = last) {
        last = ngx_min(top + 1, g + NGX_CHAT_BUS_SCAN);

        ngx_shmtx_lock(&shpool->mutex);

        for ( /* void */ ; g < last; g++) {
            slot = &sh->slots[g % sh->nslots];

            if (g == gseq || slot->gseq != g || slot->conversation != conv
                || slot->data == NULL
                || slot->len <= sizeof(prefix) - 1 + 4
                || ngx_strncmp(slot->data, prefix, sizeof(prefix) - 1) != 0)
            {
                continue;
            }

            d = slot->data + sizeof(prefix) - 1;

            if (ngx_strncmp(d, "new\"", 4) != 0
                && !(slot->len > sizeof(prefix) + 7
                     && (ngx_strncmp(d, "edited\"", 7) == 0
                         || ngx_strncmp(d, "deleted\"", 8) == 0)))
            {
                continue;
            }

            p = ngx_strlcasestrn(d, ngx_min(slot->data + slot->len, d + 160),
                                 key, sizeof(key) - 2);

            if (p == NULL
                || (size_t) (slot->data + slot->len - p)
                   <= sizeof(key) - 1 + idlen
                || ngx_strncmp(p + sizeof(key) - 1, id, idlen) != 0
                || p[sizeof(key) - 1 + idlen] != '"')
            {
                continue;
            }

            if (g > gseq) {
                newer = 1;
                continue;
            }

            /* readers that need it read the store */
            ngx_chat_bus_free_slot(slot);
        }

        if (g > top && newer) {
            /* ours shows an older state of the message than one above it */
            slot = &sh->slots[gseq % sh->nslots];

            if (slot->gseq == gseq) {
                ngx_chat_bus_free_slot(slot);
            }
        }

        ngx_shmtx_unlock(&shpool->mutex);
    }
}


/* NGX_DECLINED: no room, readers find the slot empty and read the store */

static ngx_int_t
ngx_chat_bus_publish_locked(uint64_t gseq, int64_t conversation,
    u_char *data, size_t len)
{
    u_char            *p;
    ngx_chat_slot_t   *slot;
    ngx_chat_shctx_t  *sh;

    sh = ngx_chat_worker.sh;

    slot = &sh->slots[gseq % sh->nslots];

    if (slot->gseq >= gseq) {
        return NGX_OK;
    }

    p = ngx_chat_bus_alloc_locked(len, gseq);

    if (p == NULL) {
        if (gseq > sh->published) {
            sh->published = gseq;
        }

        return NGX_DECLINED;
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

    return NGX_OK;
}


static void
ngx_chat_bus_free_slot(ngx_chat_slot_t *slot)
{
    /* the slot stops claiming its event before the event goes */
    slot->gseq = 0;
    ngx_memory_barrier();

    if (slot->data) {
        ngx_slab_free_locked(ngx_chat_worker.shpool, slot->data);
        slot->data = NULL;
    }

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

    /* oldest first, from where the last eviction stopped, and a bounded
       stretch per hold: past it this event is served from the store */

    from = (sh->published > sh->nslots) ? sh->published - sh->nslots + 1 : 1;
    from = ngx_max(from, sh->evict);

    for (g = from, freed = 0;
         g < gseq && g < from + NGX_CHAT_BUS_EVICT_SCAN;
         g++)
    {
        slot = &sh->slots[g % sh->nslots];

        if (slot->data == NULL || slot->gseq != g) {
            continue;
        }

        ngx_chat_bus_free_slot(slot);
        freed++;

        if ((freed & 15) == 0) {
            p = ngx_slab_alloc_locked(ngx_chat_worker.shpool, len);
            if (p) {
                sh->evict = g + 1;
                return p;
            }
        }
    }

    sh->evict = g;

    return ngx_slab_alloc_locked(ngx_chat_worker.shpool, len);
}


/* a positive 63-bit key for PostgreSQL's advisory locks */

int64_t
ngx_chat_random_key(void)
{
    uint64_t  k;

    k = ((uint64_t) ngx_random() << 33) ^ ((uint64_t) ngx_random() << 2)
        ^ (uint64_t) ngx_random();

    return (int64_t) ((k & 0x7fffffffffffffffULL) | 1);
}


int64_t
ngx_chat_bus_holder(void)
{
    return ngx_chat_worker.sh->holder;
}


/*
 * n positions for the transaction that holds key, recorded in the zone
 * until ngx_chat_bus_release(), _void() or _unknown().  NGX_AGAIN: no
 * chunk (one is asked for) or no free entry; try again shortly.
 */
ngx_int_t
ngx_chat_bus_reserve(ngx_uint_t n, int64_t key, uint64_t *lo,
    ngx_chat_resv_t **entry)
{
    ngx_uint_t         i, raise;
    ngx_chat_resv_t   *r;
    ngx_slab_pool_t   *shpool;
    ngx_chat_shctx_t  *sh;

    shpool = ngx_chat_worker.shpool;
    sh = ngx_chat_worker.sh;
    r = NULL;

    ngx_shmtx_lock(&shpool->mutex);

    if (!sh->started || !ngx_chat_bus.started) {
        ngx_shmtx_unlock(&shpool->mutex);
        return NGX_AGAIN;
    }

    if (sh->nresv >= NGX_CHAT_RESV_MAX) {
        ngx_shmtx_unlock(&shpool->mutex);
        return NGX_AGAIN;
    }

    if (sh->next + n - 1 > sh->limit) {

        if (sh->spare_lo == 0 || sh->spare_hi - sh->spare_lo + 1 < n) {
            ngx_shmtx_unlock(&shpool->mutex);
            ngx_chat_bus_raise();
            return NGX_AGAIN;
        }

        /* the rest of the chunk (fewer than n) is never used */
        if (sh->next <= sh->limit) {
            ngx_chat_bus_void_locked(sh->next, sh->limit);
        }

        sh->next = sh->spare_lo;
        sh->limit = sh->spare_hi;
        sh->spare_lo = 0;
        sh->spare_hi = 0;
    }

    for (i = 0; i < NGX_CHAT_RESV_MAX; i++) {
        if (sh->resv[i].lo == 0) {
            r = &sh->resv[i];
            break;
        }
    }

    if (r == NULL) {
        /* cannot happen while nresv counts right */
        ngx_shmtx_unlock(&shpool->mutex);
        return NGX_AGAIN;
    }

    sh->nresv++;

    r->lo = sh->next;
    r->hi = sh->next + n - 1;
    r->key = key;
    r->pid = ngx_pid;
    r->settler = 0;
    r->since = ngx_current_msec;
    r->state = NGX_CHAT_RESV_INFLIGHT;

    sh->next += n;

    *lo = r->lo;
    *entry = r;

    raise = (sh->spare_lo == 0
             && sh->next + ngx_chat_worker.cmcf->gseq_chunk / 2 > sh->limit);

    ngx_shmtx_unlock(&shpool->mutex);

    if (raise) {
        ngx_chat_bus_raise();
    }

    return NGX_OK;
}


/*
 * Whether a reservation can be had now, without the mutex (a hint): if
 * not, a chunk is asked for, and the store hears when it comes.
 */
ngx_int_t
ngx_chat_bus_can_reserve(void)
{
    volatile ngx_chat_shctx_t  *sh;

    sh = ngx_chat_worker.sh;

    if (!ngx_chat_bus.started || !sh->started) {
        return 0;
    }

    if (sh->nresv >= NGX_CHAT_RESV_MAX) {
        /* every entry in flight: the next answer frees one */
        return 0;
    }

    if (sh->next <= sh->limit || sh->spare_lo) {
        return 1;
    }

    ngx_chat_bus_raise();

    return 0;
}


/* the owner published every event of the reservation */

void
ngx_chat_bus_release(ngx_chat_resv_t *r, int64_t key)
{
    ngx_chat_bus_resv_end(r, key, 0);
}


/* the transaction rolled back: its positions are empty for good */

void
ngx_chat_bus_void(ngx_chat_resv_t *r, int64_t key)
{
    ngx_chat_bus_resv_end(r, key, 1);
    ngx_chat_bus_notify();
}


static void
ngx_chat_bus_resv_end(ngx_chat_resv_t *r, int64_t key, ngx_uint_t empty)
{
    ngx_slab_pool_t  *shpool;

    shpool = ngx_chat_worker.shpool;

    ngx_shmtx_lock(&shpool->mutex);

    if (r->lo && r->key == key) {
        if (empty) {
            ngx_chat_bus_void_locked(r->lo, r->hi);
        }

        r->lo = 0;
        ngx_chat_worker.sh->nresv--;
    }

    ngx_shmtx_unlock(&shpool->mutex);
}


/* the owner cannot tell whether the transaction committed */

void
ngx_chat_bus_unknown(ngx_chat_resv_t *r, int64_t key)
{
    uint64_t          lo;
    ngx_slab_pool_t  *shpool;

    shpool = ngx_chat_worker.shpool;

    ngx_shmtx_lock(&shpool->mutex);

    lo = 0;

    if (r->lo && r->key == key) {
        r->state = NGX_CHAT_RESV_UNKNOWN;
        lo = r->lo;
    }

    ngx_shmtx_unlock(&shpool->mutex);

    ngx_log_error(NGX_LOG_WARN, ngx_chat_worker.log, 0,
                  "chat: the outcome of events from %uL is not known yet, "
                  "reading them from the store", lo);
}


/* bounded by the batch size: positions read as empty, in order */

static void
ngx_chat_bus_void_locked(uint64_t lo, uint64_t hi)
{
    uint64_t           g;
    ngx_chat_slot_t   *slot;
    ngx_chat_shctx_t  *sh;

    sh = ngx_chat_worker.sh;

    for (g = lo; g <= hi; g++) {
        slot = &sh->slots[g % sh->nslots];

        if (slot->gseq >= g) {
            continue;
        }

        ngx_chat_bus_free_slot(slot);

        slot->conversation = 0;
        slot->len = 0;

        ngx_memory_barrier();
        slot->gseq = g;
    }

    if (hi > sh->published) {
        sh->published = hi;
    }
}


/*
 * Every position up to the horizon is settled: committed, rolled back, or
 * never handed out.  below: the caller's upper bound.
 */
static uint64_t
ngx_chat_bus_horizon(uint64_t below)
{
    uint64_t          f;
    ngx_slab_pool_t  *shpool;

    shpool = ngx_chat_worker.shpool;

    ngx_shmtx_lock(&shpool->mutex);
    f = ngx_chat_bus_horizon_locked(below);
    ngx_shmtx_unlock(&shpool->mutex);

    return f;
}


static uint64_t
ngx_chat_bus_horizon_locked(uint64_t below)
{
    uint64_t           f;
    ngx_uint_t         i;
    ngx_chat_shctx_t  *sh;

    sh = ngx_chat_worker.sh;

    f = ngx_min(below, sh->next - 1);

    for (i = 0; i < NGX_CHAT_RESV_MAX; i++) {
        if (sh->resv[i].lo && sh->resv[i].lo - 1 < f) {
            f = sh->resv[i].lo - 1;
        }
    }

    return f;
}


/*
 * The store holds events above the positions this instance has handed
 * out (a SQL caller outside the module took them): leave the rest of the
 * chunk unused and move to a chunk above them, so that the horizon
 * passes them.
 */
static void
ngx_chat_bus_skip_ahead(void)
{
    uint64_t           upto;
    ngx_uint_t         i, raise;
    ngx_slab_pool_t   *shpool;
    ngx_chat_shctx_t  *sh;

    shpool = ngx_chat_worker.shpool;
    sh = ngx_chat_worker.sh;
    upto = ngx_chat_bus.clock;
    raise = 0;

    ngx_shmtx_lock(&shpool->mutex);

    for (i = 0; i < NGX_CHAT_RESV_MAX; i++) {
        if (sh->resv[i].lo && sh->resv[i].lo <= upto) {
            /* an owner will settle it first */
            ngx_shmtx_unlock(&shpool->mutex);
            return;
        }
    }

    if (sh->next <= upto) {
        if (sh->spare_lo && sh->spare_lo > sh->next) {
            sh->next = sh->spare_lo;
            sh->limit = sh->spare_hi;
            sh->spare_lo = 0;
            sh->spare_hi = 0;

        } else {
            sh->next = sh->limit + 1;
        }

        raise = (sh->spare_lo == 0);
    }

    ngx_shmtx_unlock(&shpool->mutex);

    if (raise) {
        ngx_chat_bus_raise();
    }
}


static ngx_uint_t
ngx_chat_bus_alive(ngx_pid_t pid)
{
    return pid == ngx_pid || kill(pid, 0) == 0 || ngx_errno != NGX_ESRCH;
}


/* a chunk of positions from the store, for whichever worker needs it */

static void
ngx_chat_bus_raise(void)
{
    u_char            *p;
    ngx_pid_t          raising;
    ngx_slab_pool_t   *shpool;
    ngx_chat_query_t  *q;
    ngx_chat_shctx_t  *sh;

    shpool = ngx_chat_worker.shpool;
    sh = ngx_chat_worker.sh;

    ngx_shmtx_lock(&shpool->mutex);

    raising = sh->raising;

    if (sh->spare_lo
        || (raising
            && (ngx_msec_int_t) (ngx_current_msec - sh->raising_since)
               < 10000))
    {
        ngx_shmtx_unlock(&shpool->mutex);

        if (raising && raising != ngx_pid && !ngx_chat_bus_alive(raising)) {
            /* its asker died: ask again on the next tick */
            ngx_shmtx_lock(&shpool->mutex);
            if (sh->raising == raising) {
                sh->raising = 0;
            }
            ngx_shmtx_unlock(&shpool->mutex);
        }

        return;
    }

    sh->raising = ngx_pid;
    sh->raising_since = ngx_current_msec;

    ngx_shmtx_unlock(&shpool->mutex);

    q = ngx_chat_query_alloc(NGX_CHAT_STMT_RAISE, NGX_INT64_LEN + 1);
    if (q == NULL) {
        goto failed;
    }

    p = (u_char *) &q[1];
    q->params[0] = (char *) p;
    p = ngx_sprintf(p, "%ui", ngx_chat_worker.cmcf->gseq_chunk);
    *p = '\0';

    q->nparams = 1;
    q->handler = ngx_chat_bus_raise_handler;

    if (ngx_chat_db_query(q) == NGX_OK) {
        return;
    }

    ngx_chat_query_free(q);

failed:

    ngx_shmtx_lock(&shpool->mutex);
    sh->raising = 0;
    ngx_shmtx_unlock(&shpool->mutex);
}


static void
ngx_chat_bus_raise_handler(ngx_chat_query_t *q, PGresult *res, ngx_int_t rc)
{
    uint64_t           lo, hi;
    ngx_slab_pool_t   *shpool;
    ngx_chat_shctx_t  *sh;

    ngx_chat_query_free(q);

    shpool = ngx_chat_worker.shpool;
    sh = ngx_chat_worker.sh;

    lo = 0;
    hi = 0;

    if (rc == NGX_OK && PQntuples(res) == 1) {
        lo = ngx_atoof((u_char *) PQgetvalue(res, 0, 0),
                       PQgetlength(res, 0, 0));
        hi = ngx_atoof((u_char *) PQgetvalue(res, 0, 1),
                       PQgetlength(res, 0, 1));
    }

    ngx_shmtx_lock(&shpool->mutex);

    if (sh->raising == ngx_pid) {
        sh->raising = 0;
    }

    /* a chunk nobody takes is never used: its positions read as empty */
    if (lo > 0 && hi >= lo && sh->spare_lo == 0 && lo > sh->limit) {
        sh->spare_lo = lo;
        sh->spare_hi = hi;
    }

    ngx_shmtx_unlock(&shpool->mutex);

    ngx_log_debug2(NGX_LOG_DEBUG_HTTP, ngx_chat_worker.log, 0,
                   "chat bus: chunk %uL-%uL", lo, hi);

    /* sends that waited for positions */
    ngx_chat_store_on_ready();
}


/*
 * Reservations whose owner died, or could not tell how its transaction
 * ended, are settled from the store, one at a time per worker.
 */
static void
ngx_chat_bus_settle(void)
{
    u_char            *p;
    ngx_uint_t         i, n, idx[8];
    ngx_pid_t          pids[8];
    uint64_t           los[8];
    ngx_chat_resv_t   *r, *claim;
    ngx_slab_pool_t   *shpool;
    ngx_chat_query_t  *q;
    ngx_chat_shctx_t  *sh;

    if (ngx_chat_bus.settling || !ngx_chat_db_ready()) {
        return;
    }

    shpool = ngx_chat_worker.shpool;
    sh = ngx_chat_worker.sh;
    n = 0;
    claim = NULL;

    /* owners that look gone: checked outside the mutex */

    ngx_shmtx_lock(&shpool->mutex);

    for (i = 0; i < NGX_CHAT_RESV_MAX && n < 8; i++) {
        r = &sh->resv[i];

        if (r->lo && r->state == NGX_CHAT_RESV_INFLIGHT && r->pid != ngx_pid
            && (ngx_msec_int_t) (ngx_current_msec - r->since) > 1000)
        {
            idx[n] = i;
            pids[n] = r->pid;
            los[n] = r->lo;
            n++;
        }
    }

    ngx_shmtx_unlock(&shpool->mutex);

    for (i = 0; i < n; i++) {
        if (ngx_chat_bus_alive(pids[i])) {
            continue;
        }

        ngx_shmtx_lock(&shpool->mutex);

        r = &sh->resv[idx[i]];

        if (r->lo == los[i] && r->pid == pids[i]) {
            r->state = NGX_CHAT_RESV_UNKNOWN;
        }

        ngx_shmtx_unlock(&shpool->mutex);

        ngx_log_error(NGX_LOG_WARN, ngx_chat_worker.log, 0,
                      "chat: events from %uL were reserved by process %P, "
                      "which is gone: reading them from the store",
                      los[i], pids[i]);
    }

    n = 0;

    ngx_shmtx_lock(&shpool->mutex);

    for (i = 0; i < NGX_CHAT_RESV_MAX; i++) {
        r = &sh->resv[i];

        if (r->lo && r->state == NGX_CHAT_RESV_UNKNOWN) {
            if (r->settler == 0
                || (r->settler != ngx_pid
                    && (ngx_msec_int_t) (ngx_current_msec - r->since)
                       > 10000))
            {
                r->settler = ngx_pid;
                r->since = ngx_current_msec;
                claim = r;
                los[0] = r->lo;
                los[1] = r->hi;
                los[2] = (uint64_t) r->key;
                break;
            }
        }
    }

    ngx_shmtx_unlock(&shpool->mutex);

    if (claim == NULL) {
        return;
    }

    q = ngx_chat_query_alloc(NGX_CHAT_STMT_SETTLE,
                             sizeof(ngx_chat_resv_t *) + 3 * NGX_INT64_LEN
                             + 3);
    if (q == NULL) {
        goto failed;
    }

    p = (u_char *) &q[1];
    ngx_memcpy(p, &claim, sizeof(ngx_chat_resv_t *));
    p += sizeof(ngx_chat_resv_t *);

    q->params[0] = (char *) p;
    p = ngx_sprintf(p, "%L", (int64_t) los[2]);
    *p++ = '\0';

    q->params[1] = (char *) p;
    p = ngx_sprintf(p, "%uL", los[0]);
    *p++ = '\0';

    q->params[2] = (char *) p;
    p = ngx_sprintf(p, "%uL", los[1]);
    *p = '\0';

    q->nparams = 3;
    q->handler = ngx_chat_bus_settle_handler;

    if (ngx_chat_db_query(q) == NGX_OK) {
        ngx_chat_bus.settling = 1;
        return;
    }

    ngx_chat_query_free(q);

failed:

    ngx_shmtx_lock(&shpool->mutex);
    if (claim->lo == los[0] && claim->settler == ngx_pid) {
        claim->settler = 0;
    }
    ngx_shmtx_unlock(&shpool->mutex);
}


static void
ngx_chat_bus_settle_handler(ngx_chat_query_t *q, PGresult *res, ngx_int_t rc)
{
    int                i, n;
    int64_t            conv, key;
    uint64_t           lo, hi, g, from;
    ngx_uint_t         same;
    ngx_chat_resv_t   *r;
    ngx_slab_pool_t   *shpool;

    ngx_chat_bus.settling = 0;
    shpool = ngx_chat_worker.shpool;

    ngx_memcpy(&r, &q[1], sizeof(ngx_chat_resv_t *));
    key = ngx_atoof((u_char *) q->params[0], ngx_strlen(q->params[0]));
    lo = ngx_atoof((u_char *) q->params[1], ngx_strlen(q->params[1]));
    hi = ngx_atoof((u_char *) q->params[2], ngx_strlen(q->params[2]));

    n = (rc == NGX_OK) ? PQntuples(res) : 0;

    if (n == 0) {
        /* its transaction may still commit: look again on a later tick */
        ngx_chat_query_free(q);

        ngx_shmtx_lock(&shpool->mutex);
        if (r->lo == lo && r->key == key && r->settler == ngx_pid) {
            r->settler = 0;
        }
        ngx_shmtx_unlock(&shpool->mutex);

        return;
    }

    ngx_chat_query_free(q);

    ngx_shmtx_lock(&shpool->mutex);
    same = (r->lo == lo && r->key == key);
    ngx_shmtx_unlock(&shpool->mutex);

    if (!same) {
        /* the zone was reset meanwhile: these positions are gone */
        return;
    }

    /* row 0 says the transaction has ended; then its committed events */

    for (i = 1; i < n; i++) {
        g = ngx_atoof((u_char *) PQgetvalue(res, i, 0),
                      PQgetlength(res, i, 0));
        conv = ngx_atoof((u_char *) PQgetvalue(res, i, 1),
                         PQgetlength(res, i, 1));

        if (!PQgetisnull(res, i, 2)) {
            ngx_chat_bus_publish_reserved(r, key, g, conv,
                                          (u_char *) PQgetvalue(res, i, 2),
                                          PQgetlength(res, i, 2));

            /* an edit or a delete: as ngx_chat_op_event_done() does */
            ngx_chat_bus_forget_message(conv, g,
                                        (u_char *) PQgetvalue(res, i, 2),
                                        PQgetlength(res, i, 2));
        }
    }

    ngx_shmtx_lock(&shpool->mutex);

    if (r->lo == lo && r->key == key) {
        from = lo;

        for (i = 1; i < n; i++) {
            if (PQgetisnull(res, i, 2)) {
                /* no payload to publish: the position reads as empty */
                continue;
            }

            g = ngx_atoof((u_char *) PQgetvalue(res, i, 0),
                          PQgetlength(res, i, 0));

            if (g > from) {
                ngx_chat_bus_void_locked(from, g - 1);
            }

            from = g + 1;
        }

        if (from <= hi) {
            ngx_chat_bus_void_locked(from, hi);
        }

        r->lo = 0;
        ngx_chat_worker.sh->nresv--;
    }

    ngx_shmtx_unlock(&shpool->mutex);

    ngx_log_error(NGX_LOG_NOTICE, ngx_chat_worker.log, 0,
                  "chat: events %uL-%uL settled from the store: "
                  "%d committed", lo, hi, n - 1);

    ngx_chat_bus_notify();

    /* after a restart of PostgreSQL many may wait: the next at once */
    ngx_chat_bus_settle();
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
    ngx_chat_live_process();
}


static void
ngx_chat_bus_process_handler(ngx_event_t *ev)
{
    ngx_chat_bus_process();
    ngx_chat_live_process();
}


/* read the ring in gseq order from our position */

static void
ngx_chat_bus_process(void)
{
    uint64_t           g, published, found, upto;
    ngx_uint_t         i, n, turn;
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
    turn = 0;

    for ( ;; ) {
        n = 0;
        found = 0;
        bus->copy.len = 0;

        if (turn >= NGX_CHAT_BUS_TURN) {
            /* let this worker's sockets and timers run: go on next turn */
            if (!bus->process.posted) {
                ngx_post_event(&bus->process, &ngx_posted_next_events);
            }

            return;
        }

        /* no allocation under the mutex: the budget and one large event */
        if (ngx_chat_buf_reserve(&bus->copy, NGX_CHAT_BUS_COPY_RESERVE)
            != NGX_OK)
        {
            break;
        }

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

            if (bus->copy.len + slot->len > bus->copy.cap
                || (n && bus->copy.len + slot->len > NGX_CHAT_BUS_COPY_BYTES))
            {
                found = 0;
                break;
            }

            if (slot->len) {
                (void) ngx_chat_buf_add(&bus->copy, slot->data, slot->len);
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
            /* an empty position: its transaction rolled back */
            if (bus->copies[i].len) {
                ngx_chat_bus_dispatch(bus->copies[i].gseq,
                                      bus->copies[i].conv,
                                      bus->copy.data + bus->copies[i].off,
                                      bus->copies[i].len);
            }

            bus->position = bus->copies[i].gseq;
        }

        turn += n;

        if (n < NGX_CHAT_BUS_CHUNK && found != 0) {
            break;
        }

        if (n == 0) {
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
        upto = ngx_chat_bus_horizon(bus->clock);

        if (upto > bus->position) {
            ngx_chat_bus_fetch(upto);
            return;
        }
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

    uint64_t         upto;

    ngx_chat_bus_process();

    if (bus->position >= bus->clock || bus->fetching) {
        return;
    }

    /* never past a position whose transaction may still commit */
    upto = ngx_chat_bus_horizon(bus->clock);

    if (upto > bus->position) {
        ngx_log_debug2(NGX_LOG_DEBUG_HTTP, ngx_chat_worker.log, 0,
                       "chat bus: hole after %uL, reading the store "
                       "up to %uL", bus->position, upto);

        ngx_chat_bus_fetch(upto);
        return;
    }

    if (upto < bus->clock) {
        ngx_chat_bus_skip_ahead();
    }

    if (!bus->hole.timer_set) {
        ngx_add_timer(&bus->hole, ngx_chat_worker.cmcf->bus_hole_timeout);
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

    ngx_chat_bus.fetch_upto = upto;
    ngx_chat_bus.fetch_resets = ngx_chat_bus.resets;

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

    if (bus->fetch_resets != bus->resets) {
        /* the database was replaced meanwhile: these positions are gone */
        if (!bus->process.posted) {
            ngx_post_event(&bus->process, &ngx_posted_events);
        }

        return;
    }

    n = PQntuples(res);

    for (i = 0; i < n; i++) {
        gseq = ngx_atoof((u_char *) PQgetvalue(res, i, 0),
                         PQgetlength(res, i, 0));
        conv = ngx_atoof((u_char *) PQgetvalue(res, i, 1),
                         PQgetlength(res, i, 1));

        /* positions of rolled back transactions are missing */

        if (gseq <= bus->position) {
            continue;
        }

        /* a message event whose message row is gone has no payload */
        if (!PQgetisnull(res, i, 2)) {
            ngx_chat_bus_dispatch(gseq, conv,
                                  (u_char *) PQgetvalue(res, i, 2),
                                  PQgetlength(res, i, 2));
        }

        bus->position = gseq;
    }

    /* a short answer saw every event up to the horizon it was asked for */
    if (n < NGX_CHAT_BUS_FETCH && bus->fetch_upto > bus->position) {
        bus->position = bus->fetch_upto;
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
    u_char            *p;
    ngx_uint_t         start;
    ngx_chat_query_t  *q;

    /*
     * The first worker of a fresh zone starts where the store says, once
     * no transaction of the nginx before it can still commit.
     */
    start = !ngx_chat_worker.sh->started;

    q = ngx_chat_query_alloc(start ? NGX_CHAT_STMT_CLOCK_START
                                   : NGX_CHAT_STMT_CLOCK,
                             NGX_INT64_LEN + 4);
    if (q == NULL) {
        return;
    }

    if (start) {
        if (ngx_chat_bus.wait_since == 0) {
            ngx_chat_bus.wait_since = ngx_current_msec;
        }

        p = (u_char *) &q[1];
        q->params[0] = (char *) p;
        p = ngx_sprintf(p, "%L", ngx_chat_worker.sh->holder);
        *p++ = '\0';

        /*
         * Transactions of a killed nginx end within the statement
         * timeout; past it, another nginx runs against the database too.
         */
        q->params[1] = (ngx_msec_int_t) (ngx_current_msec
                                         - ngx_chat_bus.wait_since)
                       > (ngx_msec_int_t)
                         (ngx_chat_worker.cmcf->db_statement_timeout + 6000)
                       ? "t" : "f";
    }

    q->handler = ngx_chat_bus_clock_handler;

    if (ngx_chat_db_query(q) != NGX_OK) {
        ngx_chat_query_free(q);
        return;
    }

    /*
     * Everything known now was committed before the store is asked, so a
     * clock below it means the database went back; the position may move
     * on while the answer is on its way, which means nothing.
     */
    ngx_chat_bus.clock_asked = ngx_chat_bus_known();
    ngx_chat_bus.clocking = 1;
}


static void
ngx_chat_bus_clock_handler(ngx_chat_query_t *q, PGresult *res, ngx_int_t rc)
{
    size_t             len;
    uint64_t           v, top;
    ngx_uint_t         start;
    ngx_chat_bus_t    *bus;
    ngx_slab_pool_t   *shpool;
    ngx_chat_shctx_t  *sh;

    bus = &ngx_chat_bus;
    bus->clocking = 0;

    start = (q->stmt == NGX_CHAT_STMT_CLOCK_START);

    ngx_chat_query_free(q);

    if (rc != NGX_OK || PQntuples(res) != 1) {
        return;
    }

    if (PQgetisnull(res, 0, 0)) {
        if (!bus->waited) {
            ngx_log_error(NGX_LOG_NOTICE, ngx_chat_worker.log, 0,
                          "chat: waiting for the transactions of the nginx "
                          "that ran before to end");
            bus->waited = 1;
        }

        return;
    }

    v = ngx_atoof((u_char *) PQgetvalue(res, 0, 0), PQgetlength(res, 0, 0));
    len = ngx_min((size_t) PQgetlength(res, 0, 1), sizeof(bus->epoch));

    /*
     * The newest committed event; the clock is where chunks end, and no
     * event lies above it unless somebody wrote one without taking its
     * position from the clock.
     */
    top = ngx_atoof((u_char *) PQgetvalue(res, 0, 2),
                    PQgetlength(res, 0, 2));

    if (top > v) {
        top = v;
    }

    shpool = ngx_chat_worker.shpool;
    sh = ngx_chat_worker.sh;

    if (bus->started
        && (len != bus->epoch_len
            || ngx_memcmp(bus->epoch, PQgetvalue(res, 0, 1), len) != 0
            || v < bus->clock_asked))
    {
        ngx_chat_bus_reset(v, (u_char *) PQgetvalue(res, 0, 1), len);
        return;
    }

    ngx_shmtx_lock(&shpool->mutex);

    if (!sh->started && !start) {
        /* another worker's answer started the zone first: ask again */
        ngx_shmtx_unlock(&shpool->mutex);
        return;
    }

    if (!sh->started
        || sh->epoch_len != len
        || ngx_memcmp(sh->epoch, PQgetvalue(res, 0, 1), len) != 0)
    {
        /* a first start, or the database was replaced under us */
        sh->published = v;
        sh->next = v + 1;
        sh->limit = v;
        sh->spare_lo = 0;
        sh->spare_hi = 0;
        ngx_memzero(sh->resv, sizeof(sh->resv));
        sh->nresv = 0;
        ngx_memcpy(sh->epoch, PQgetvalue(res, 0, 1), len);
        sh->epoch_len = len;
        sh->started = 1;
    }

    if (!bus->started) {
        bus->position = ngx_chat_bus_horizon_locked(sh->published);
        bus->clock = sh->published;
        ngx_memcpy(bus->epoch, sh->epoch, sh->epoch_len);
        bus->epoch_len = sh->epoch_len;
        bus->started = 1;
    }

    ngx_shmtx_unlock(&shpool->mutex);

    if (top > bus->clock) {
        /* committed but never published: a worker died in between */
        bus->clock = top;
    }

    if (start) {
        ngx_chat_bus_raise();
    }

    ngx_chat_bus_process();

    /* sends that waited for the bus */
    ngx_chat_store_on_ready();
}


/*
 * The database was replaced or restored under running workers: its clock
 * is another epoch's, or went back.  Positions of the old one mean
 * nothing, so the ring is emptied (the first worker to notice does it),
 * this worker starts again at the store's clock, and every local session
 * is told to resync.
 */
static void
ngx_chat_bus_reset(uint64_t v, u_char *epoch, size_t len)
{
    ngx_uint_t          i;
    ngx_queue_t        *q, *next;
    ngx_chat_bus_t     *bus;
    ngx_slab_pool_t    *shpool;
    ngx_chat_shctx_t   *sh;
    ngx_chat_session_t *s;

    bus = &ngx_chat_bus;
    shpool = ngx_chat_worker.shpool;
    sh = ngx_chat_worker.sh;

    ngx_log_error(NGX_LOG_WARN, ngx_chat_worker.log, 0,
                  "chat: the database changed under the bus (clock %uL, "
                  "was at %uL): sessions are told to resync",
                  v, bus->position);

    ngx_shmtx_lock(&shpool->mutex);

    if (sh->epoch_len != len || ngx_memcmp(sh->epoch, epoch, len) != 0
        || v < sh->published)
    {
        /* once for the whole zone: bounded by the ring's size */
        for (i = 0; i < sh->nslots; i++) {
            ngx_chat_bus_free_slot(&sh->slots[i]);
        }

        sh->published = v;
        sh->next = v + 1;
        sh->limit = v;
        sh->spare_lo = 0;
        sh->spare_hi = 0;
        ngx_memzero(sh->resv, sizeof(sh->resv));
        sh->nresv = 0;
        sh->evict = 0;
        ngx_memcpy(sh->epoch, epoch, len);
        sh->epoch_len = len;
    }

    ngx_memcpy(bus->epoch, sh->epoch, sh->epoch_len);
    bus->epoch_len = sh->epoch_len;

    /* the zone may have been reset by another worker, and used since */
    bus->position = ngx_chat_bus_horizon_locked(sh->published);
    bus->clock = sh->published;

    ngx_shmtx_unlock(&shpool->mutex);

    bus->resets++;

    if (bus->hole.timer_set) {
        ngx_del_timer(&bus->hole);
    }

    for (q = ngx_queue_head(&bus->sessions);
         q != ngx_queue_sentinel(&bus->sessions);
         q = next)
    {
        next = ngx_queue_next(q);
        s = ngx_queue_data(q, ngx_chat_session_t, queue);

        ngx_chat_session_resync(s, "the store was replaced");
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

    if (bus->started) {
        ngx_chat_bus_settle();

        /* sends that waited for a chunk another worker asked for */
        ngx_chat_store_on_ready();
    }

    if (!bus->started) {
        if (!bus->clocking && ngx_chat_db_ready()) {
            ngx_chat_bus_clock();
        }

    } else if (*(volatile uint64_t *) &ngx_chat_worker.sh->published
               > bus->position)
    {
        ngx_chat_bus_process();

    } else if (bus->ticks % NGX_CHAT_BUS_CLOCK_TICKS == 0 && !bus->clocking
               && !bus->fetching && bus->position == bus->clock
               && ngx_chat_db_ready())
    {
        ngx_chat_bus_clock();
    }

    ngx_add_timer(&bus->tick, NGX_CHAT_BUS_TICK);
}


/* local fan-out */

static void
ngx_chat_bus_dispatch(uint64_t gseq, int64_t conv, u_char *data, size_t len)
{
    ngx_queue_t         *q, *next;
    ngx_chat_sub_t      *sub;
    ngx_chat_conv_t     *cv;
    ngx_chat_event_t     ev;
    ngx_chat_session_t  *s;

    ngx_chat_event_init(&ev, gseq, conv, data, len);

    /* new members are subscribed before the event goes out */
    ngx_chat_bus_membership(&ev, 1);

    cv = ngx_chat_bus_conv(conv);

    if (cv) {
        for (q = ngx_queue_head(&cv->subs);
             q != ngx_queue_sentinel(&cv->subs);
             q = next)
        {
            next = ngx_queue_next(q);

            sub = ngx_queue_data(q, ngx_chat_sub_t, queue);
            s = sub->session;

            if (s->state != NGX_CHAT_SESSION_LIVE || gseq <= s->cursor
                || !ngx_chat_sub_has(sub, gseq))
            {
                continue;
            }

            /* a session past its window leaves LIVE and catches up later */
            (void) ngx_chat_session_deliver(s, &ev);
        }
    }

    /* removed members get the event that removes them, then nothing */
    ngx_chat_bus_membership(&ev, 0);
}


/*
 * Events that change membership (conversation.created, member.added,
 * member.removed) name the members; only those are parsed, and only the
 * members with sessions in this worker are looked at.
 */
static void
ngx_chat_bus_membership(ngx_chat_event_t *ev, ngx_uint_t subscribe)
{
    size_t               i;
    json_t              *root, *members, *m;
    ngx_str_t            user;
    ngx_queue_t         *q, *next;
    ngx_chat_user_t     *u;
    ngx_chat_session_t  *s;

    if (subscribe) {
        if (!(ev->kind.len == 20
              && ngx_strncmp(ev->kind.data, "conversation.created", 20) == 0)
            && !(ev->kind.len == 12
                 && ngx_strncmp(ev->kind.data, "member.added", 12) == 0))
        {
            return;
        }

    } else if (!(ev->kind.len == 14
                 && ngx_strncmp(ev->kind.data, "member.removed", 14) == 0))
    {
        return;
    }

    if (ngx_chat_bus.nsessions == 0) {
        return;
    }

    root = ngx_chat_json_parse(ev->payload.data, ev->payload.len);
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
                 q = next)
            {
                next = ngx_queue_next(q);
                s = ngx_queue_data(q, ngx_chat_session_t, user_queue);

                if (s->state == NGX_CHAT_SESSION_JOINING) {
                    /* its memberships may be older than this: redo */
                    s->join_stale = 1;

                } else if (subscribe) {
                    (void) ngx_chat_bus_subscribe_span(s, ev->conversation,
                                                       ev->gseq, 0);

                } else {
                    ngx_chat_bus_leave(s, ev->conversation, ev->gseq);
                }
            }
        }
    }

    json_decref(root);
}


/*
 * Catches a session up from its cursor to the worker's position out of the
 * ring.  Each hold of the zone mutex is bounded: the slot headers of a
 * stretch are copied out first and filtered by the session's subscriptions
 * outside the lock, then only the session's events are copied, up to a
 * byte budget.  NGX_OK: caught up; NGX_AGAIN: the transport's window is
 * full; NGX_DECLINED: the ring no longer holds it, read the store;
 * NGX_ERROR: the session is closing.
 */
ngx_int_t
ngx_chat_bus_replay(ngx_chat_session_t *s)
{
    uint64_t           g, upto, last;
    ngx_int_t          rc;
    ngx_uint_t         i, k, m, n, index;
    ngx_chat_bus_t    *bus;
    ngx_chat_slot_t   *slot;
    ngx_chat_event_t   ev;
    ngx_slab_pool_t   *shpool;
    ngx_chat_shctx_t  *sh;

    bus = &ngx_chat_bus;
    shpool = ngx_chat_worker.shpool;
    sh = ngx_chat_worker.sh;

    upto = bus->position;

    if (s->cursor >= upto) {
        return NGX_OK;
    }

    if (upto - s->cursor > sh->nslots / 2
        || s->cursor < s->store_below)
    {
        /* far behind, or spans of membership the ring cannot tell apart */
        return NGX_DECLINED;
    }

    while (s->cursor < upto) {

        n = 0;
        last = ngx_min(upto, s->cursor + NGX_CHAT_BUS_SCAN);

        ngx_shmtx_lock(&shpool->mutex);

        for (g = s->cursor + 1; g <= last; g++) {
            slot = &sh->slots[g % sh->nslots];

            if (slot->gseq != g) {
                ngx_shmtx_unlock(&shpool->mutex);
                return NGX_DECLINED;
            }

            bus->scan[n].gseq = g;
            bus->scan[n].conv = slot->conversation;
            n++;
        }

        ngx_shmtx_unlock(&shpool->mutex);

        for (i = 0, m = 0; i < n; i++) {
            if (ngx_chat_bus_sub_index(s, bus->scan[i].conv, &index)
                == NGX_OK
                && ngx_chat_sub_has((ngx_chat_sub_t *) s->subs[index],
                                    bus->scan[i].gseq))
            {
                bus->scan[m++] = bus->scan[i];
            }
        }

        if (m == 0) {
            /* nothing of the session's in the stretch: it has all of it */
            s->cursor = last;
            continue;
        }

        bus->copy.len = 0;
        k = 0;

        if (ngx_chat_buf_reserve(&bus->copy, NGX_CHAT_BUS_COPY_RESERVE)
            != NGX_OK)
        {
            return NGX_ERROR;
        }

        ngx_shmtx_lock(&shpool->mutex);

        for (i = 0; i < m; i++) {
            g = bus->scan[i].gseq;
            slot = &sh->slots[g % sh->nslots];

            if (slot->gseq != g) {
                break;
            }

            if (bus->copy.len + slot->len > bus->copy.cap
                || (k && bus->copy.len + slot->len > NGX_CHAT_BUS_COPY_BYTES))
            {
                break;
            }

            (void) ngx_chat_buf_add(&bus->copy, slot->data, slot->len);

            bus->copies[k].gseq = g;
            bus->copies[k].conv = slot->conversation;
            bus->copies[k].off = bus->copy.len - slot->len;
            bus->copies[k].len = slot->len;
            k++;
        }

        ngx_shmtx_unlock(&shpool->mutex);

        if (k == 0) {
            /* overwritten meanwhile (or out of memory): read the store */
            return NGX_DECLINED;
        }

        for (i = 0; i < k; i++) {
            ngx_chat_event_init(&ev, bus->copies[i].gseq,
                                bus->copies[i].conv,
                                bus->copy.data + bus->copies[i].off,
                                bus->copies[i].len);

            rc = ngx_chat_session_deliver(s, &ev);

            if (rc != NGX_OK) {
                return rc;
            }
        }

        /* everything scanned before the next event of the session is had */
        s->cursor = (k < m) ? bus->scan[k].gseq - 1 : last;
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

        ngx_chat_str_node_init(&u->sn, (u_char *) &u[1], &s->user);
        ngx_queue_init(&u->sessions);
        u->count = 0;

        ngx_rbtree_insert(&ngx_chat_bus.users, &u->sn.node);

    } else if (u->count >= ngx_chat_worker.cmcf->max_connections
                            + NGX_CHAT_BUS_REPLACING)
    {
        /*
         * The cap across workers is the zone's (ngx_chat_live_join());
         * this one bounds a worker when the zone cannot, with room for
         * connections that replace others of the same device.
         */
        return NGX_DECLINED;
    }

    ngx_queue_insert_tail(&u->sessions, &s->user_queue);
    u->count++;
    s->user_node = u;

    ngx_queue_insert_tail(&ngx_chat_bus.sessions, &s->queue);
    ngx_chat_bus.nsessions++;

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

    if (--u->count == 0) {
        ngx_rbtree_delete(&ngx_chat_bus.users, &u->sn.node);
        ngx_free(u);
    }
}


/* every session of this worker subscribed to conv */

void
ngx_chat_bus_each(int64_t conv, ngx_chat_bus_each_pt handler, void *data)
{
    ngx_queue_t      *q, *next;
    ngx_chat_sub_t   *sub;
    ngx_chat_conv_t  *cv;

    cv = ngx_chat_bus_conv(conv);

    if (cv == NULL) {
        return;
    }

    for (q = ngx_queue_head(&cv->subs);
         q != ngx_queue_sentinel(&cv->subs);
         q = next)
    {
        /* the handler does not unsubscribe anybody */
        next = ngx_queue_next(q);
        sub = ngx_queue_data(q, ngx_chat_sub_t, queue);

        if (sub->until) {
            /* no longer a member */
            continue;
        }

        handler(sub->session, data);
    }
}


ngx_chat_session_t *
ngx_chat_bus_find(ngx_str_t *user, uint64_t id)
{
    ngx_queue_t         *q;
    ngx_chat_user_t     *u;
    ngx_chat_session_t  *s;

    u = ngx_chat_bus_user(user);

    if (u == NULL) {
        return NULL;
    }

    for (q = ngx_queue_head(&u->sessions);
         q != ngx_queue_sentinel(&u->sessions);
         q = ngx_queue_next(q))
    {
        s = ngx_queue_data(q, ngx_chat_session_t, user_queue);

        if (s->id == id) {
            return s;
        }
    }

    return NULL;
}


/* every local session of a user (the handler must not free one) */

void
ngx_chat_bus_each_of(ngx_str_t *user, ngx_chat_bus_each_pt handler,
    void *data)
{
    ngx_queue_t         *q;
    ngx_chat_user_t     *u;

    u = ngx_chat_bus_user(user);

    if (u == NULL) {
        return;
    }

    for (q = ngx_queue_head(&u->sessions);
         q != ngx_queue_sentinel(&u->sessions);
         q = ngx_queue_next(q))
    {
        handler(ngx_queue_data(q, ngx_chat_session_t, user_queue), data);
    }
}


static ngx_chat_conv_t *
ngx_chat_bus_conv(int64_t id)
{
    /* node is the first member */
    return (ngx_chat_conv_t *) ngx_chat_rbtree_lookup(&ngx_chat_bus.convs,
                                                      (ngx_rbtree_key_t) id);
}


/*
 * A session's subscriptions are kept sorted by conversation id: lookups
 * are a binary search, and a join, whose memberships come in id order,
 * appends.  NGX_OK: subscribed, at *index; NGX_DECLINED: not, *index is
 * where it would go.
 */
static ngx_int_t
ngx_chat_bus_sub_index(ngx_chat_session_t *s, int64_t conv, ngx_uint_t *index)
{
    int64_t          key;
    ngx_uint_t       lo, hi, mid;
    ngx_chat_sub_t  *sub;

    lo = 0;
    hi = s->nsubs;

    if (hi && (int64_t) ((ngx_chat_sub_t *) s->subs[hi - 1])->conv->node.key
              < conv)
    {
        *index = hi;
        return NGX_DECLINED;
    }

    while (lo < hi) {
        mid = lo + (hi - lo) / 2;
        sub = s->subs[mid];
        key = (int64_t) sub->conv->node.key;

        if (key == conv) {
            *index = mid;
            return NGX_OK;
        }

        if (key < conv) {
            lo = mid + 1;

        } else {
            hi = mid;
        }
    }

    *index = lo;

    return NGX_DECLINED;
}


ngx_int_t
ngx_chat_bus_subscribed(ngx_chat_session_t *s, int64_t conv)
{
    ngx_uint_t  index;

    return ngx_chat_bus_sub_index(s, conv, &index) == NGX_OK
           && ((ngx_chat_sub_t *) s->subs[index])->until == 0;
}


ngx_int_t
ngx_chat_bus_subscribe(ngx_chat_session_t *s, int64_t conv)
{
    return ngx_chat_bus_subscribe_span(s, conv, 0, 0);
}


/*
 * A membership from "from" to "until" (0: open).  A session that is a
 * member again gets the new span: a gap before it that it has not caught
 * up with yet is read from the store, which knows every span.
 */
ngx_int_t
ngx_chat_bus_subscribe_span(ngx_chat_session_t *s, int64_t conv,
    uint64_t from, uint64_t until)
{
    void            **subs;
    ngx_uint_t        n, index;
    ngx_chat_sub_t   *sub;
    ngx_chat_conv_t  *cv;

    if (ngx_chat_bus_sub_index(s, conv, &index) == NGX_OK) {
        sub = s->subs[index];

        if (sub->until && until == 0) {
            /* the ring filters by one span: the old one is the store's */
            if (sub->until > s->cursor) {
                s->store_below = ngx_max(s->store_below, sub->until);
            }

            sub->from = from;
            sub->until = 0;
        }

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
    sub->from = from;
    sub->until = until;
    ngx_queue_insert_tail(&cv->subs, &sub->queue);

    if (index < s->nsubs) {
        ngx_memmove(&s->subs[index + 1], &s->subs[index],
                    (s->nsubs - index) * sizeof(void *));
    }

    s->subs[index] = sub;
    s->nsubs++;

    return NGX_OK;
}


static void
ngx_chat_bus_sub_free(ngx_chat_sub_t *sub)
{
    ngx_chat_conv_t  *cv;

    cv = sub->conv;

    ngx_queue_remove(&sub->queue);
    ngx_free(sub);

    if (ngx_queue_empty(&cv->subs)) {
        ngx_rbtree_delete(&ngx_chat_bus.convs, &cv->node);
        ngx_free(cv);
    }
}


/*
 * A member removed at gseq: a session that has everything up to it has
 * nothing more to get; one still catching up gets the conversation's
 * events up to its removal.
 */
static void
ngx_chat_bus_leave(ngx_chat_session_t *s, int64_t conv, uint64_t gseq)
{
    ngx_uint_t       index;
    ngx_chat_sub_t  *sub;

    if (ngx_chat_bus_sub_index(s, conv, &index) != NGX_OK) {
        return;
    }

    if (s->state == NGX_CHAT_SESSION_LIVE && s->cursor >= gseq) {
        ngx_chat_bus_unsubscribe(s, conv);
        return;
    }

    sub = s->subs[index];
    sub->until = gseq;
}


void
ngx_chat_bus_unsubscribe(ngx_chat_session_t *s, int64_t conv)
{
    ngx_uint_t  index;

    if (ngx_chat_bus_sub_index(s, conv, &index) != NGX_OK) {
        return;
    }

    ngx_chat_bus_sub_free(s->subs[index]);

    s->nsubs--;

    if (index < s->nsubs) {
        ngx_memmove(&s->subs[index], &s->subs[index + 1],
                    (s->nsubs - index) * sizeof(void *));
    }
}


void
ngx_chat_bus_unsubscribe_all(ngx_chat_session_t *s)
{
    ngx_uint_t  i;

    for (i = 0; i < s->nsubs; i++) {
        ngx_chat_bus_sub_free(s->subs[i]);
    }

    ngx_free(s->subs);
    s->subs = NULL;
    s->nsubs = 0;
    s->nalloc = 0;
}
