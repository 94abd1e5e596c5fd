
/*
 * Copyright (C) ngx_chat_module authors
 *
 * Live state: what is shown next to the messages and is never stored as
 * an event -- typing and presence -- and the device table behind them.
 *
 * The ephemeral channel is a second ring in the shared zone, apart from
 * the durable one: records (typing, presence, "close that connection")
 * numbered by a counter, each in the slot of its number.  A writer takes
 * the slot of the oldest record, whoever has or has not read it; a worker
 * that falls more than chat_live_slots records behind skips what was
 * overwritten and counts it as lost.  Nothing on this path waits for
 * anybody and nothing of it touches the durable ring, the store or a
 * cursor: under pressure typing and presence events are dropped, never
 * messages.  Every worker reads every record, its own included.
 *
 * Typing states are kept in the zone, keyed by (conversation, user), so
 * that repeated starts from any connection on any worker are one event,
 * and any worker may end one: a send, the timeout, the connection that
 * started it closing.
 *
 * Presence.  Every joined connection is a device in the zone, under its
 * user and under the process that holds it.  A user is online while one
 * of their devices is visible, away while all are hidden, and offline
 * chat_presence_grace after the last one went away (a reload of a tab is
 * no event at all).  A worker that dies with SIGKILL cannot remove its
 * devices; every worker checks once a second whether the processes that
 * hold devices are still alive and removes the devices of dead ones.
 *
 * Who hears a presence change: connections subscribed (in their worker)
 * to one of the user's conversations of at most chat_presence_max_members
 * members -- the user's contacts, whose ids travel with the record -- and
 * connections that asked for the user with "presence_sub".  One event per
 * connection, however many conversations it shares with the user.
 */


#include "ngx_chat_module.h"
#include "ngx_chat_db.h"
#include "ngx_chat_store.h"
#include "ngx_chat_bus.h"
#include "ngx_chat_transport.h"
#include "ngx_chat_session.h"
#include "ngx_chat_json.h"
#include "ngx_chat_live.h"


#define NGX_CHAT_LIVE_TICK        250
#define NGX_CHAT_LIVE_REAP_TICKS  4
#define NGX_CHAT_LIVE_PROCS       512

/* records, and bytes, copied per hold of the zone mutex */
#define NGX_CHAT_LIVE_SCAN        256
#define NGX_CHAT_LIVE_COPY_BYTES  (256 * 1024)

/* a record carries at most this many contacts (8 KB) */
#define NGX_CHAT_LIVE_CONTACTS    1024

#define NGX_CHAT_LIVE_TYPING_MAX  65536

/* users copied out of the zone per hold of its mutex */
#define NGX_CHAT_LIVE_NOTES       64

/* an erased user's connections ended per record (the per-user cap is
   far below) */
#define NGX_CHAT_LIVE_IDS         1024

typedef struct {
    ngx_uint_t                 n;
    uint64_t                   id[NGX_CHAT_LIVE_IDS];
} ngx_chat_live_ids_t;

/* connections one new one may replace (same user and device_id) */
#define NGX_CHAT_LIVE_REPLACE     8

#define NGX_CHAT_REC_TYPING       1
#define NGX_CHAT_REC_PRESENCE     2
#define NGX_CHAT_REC_REPLACE      3
#define NGX_CHAT_REC_BLOCKS       4
#define NGX_CHAT_REC_ERASED       5


typedef struct {
    uint64_t                   seq;              /* 0: empty */
    size_t                     len;
    u_char                    *data;
} ngx_chat_live_slot_t;


/* a record in the ring; then contacts, user, event JSON */
typedef struct {
    uint32_t                   kind;
    uint32_t                   ncontacts;
    int64_t                    conv;
    uint64_t                   session;          /* REPLACE: whom */
    ngx_pid_t                  pid;              /* REPLACE: where */
    uint32_t                   user_len;
    uint32_t                   json_len;
} ngx_chat_live_rec_t;


typedef struct {
    ngx_pid_t                  pid;              /* 0: free */
    ngx_queue_t                devices;
    ngx_queue_t                kick;             /* of ngx_chat_kick_t */
} ngx_chat_live_proc_t;


/* a connection of the process to close: replaced by another one */
typedef struct {
    ngx_queue_t                queue;
    uint64_t                   session;
    size_t                     user_len;
    u_char                     user[1];
} ngx_chat_kick_t;


typedef struct {
    ngx_str_node_t             sn;               /* user */
    ngx_queue_t                devices;
    ngx_queue_t                leaving;          /* in sh->leaving */
    ngx_msec_t                 offline_at;       /* 0: not leaving */
    uint64_t                   left;             /* wall clock, ms */
    ngx_uint_t                 ndevices;
    ngx_uint_t                 status;           /* as last published */
    int64_t                   *contacts;
    ngx_uint_t                 ncontacts;
} ngx_chat_presence_t;


typedef struct {
    ngx_queue_t                queue;            /* in user->devices */
    ngx_queue_t                pqueue;           /* in proc->devices */
    ngx_chat_presence_t       *user;
    ngx_pid_t                  pid;
    uint64_t                   session;
    ngx_uint_t                 away;
    uint64_t                   device;           /* its id's hash, or 0 */
} ngx_chat_device_t;


typedef struct {
    ngx_pid_t                  pid;
    uint64_t                   session;
} ngx_chat_live_gone_t;


/*
 * A user copied out of the zone, for work done once it is unlocked: who
 * went offline (v: when), whose connection to close (v: the session).
 */
typedef struct {
    u_char                     user[NGX_CHAT_MAX_ID_LEN];
    size_t                     len;
    uint64_t                   v;
} ngx_chat_live_note_t;


typedef struct {
    ngx_str_node_t             sn;               /* "<conv>:<user>" */
    ngx_queue_t                lru;              /* by expiry */
    ngx_msec_t                 expire;
    int64_t                    conv;
    ngx_str_t                  user;             /* in sn.str */
    ngx_pid_t                  pid;              /* who started it */
    uint64_t                   session;
} ngx_chat_typing_t;


struct ngx_chat_live_sh_s {
    uint64_t                   seq;              /* last record written */
    uint64_t                   oldest;           /* oldest that may hold one */
    ngx_uint_t                 nslots;
    ngx_chat_live_slot_t      *slots;
    size_t                     bytes;            /* held by records */
    size_t                     budget;
    uint64_t                   dropped;          /* no room in the zone */

    ngx_rbtree_t               typing;
    ngx_rbtree_node_t          typing_sentinel;
    ngx_queue_t                typing_lru;
    ngx_uint_t                 ntyping;

    ngx_rbtree_t               users;
    ngx_rbtree_node_t          users_sentinel;
    ngx_queue_t                leaving;          /* by offline_at */
    ngx_uint_t                 nusers;

    ngx_chat_live_proc_t       procs[NGX_CHAT_LIVE_PROCS];
};


/* a presence_sub of one connection, in the worker's tree of such users */
typedef struct {
    ngx_str_node_t             sn;               /* user */
    ngx_queue_t                links;
} ngx_chat_psub_t;


typedef struct {
    ngx_queue_t                queue;            /* in psub->links */
    ngx_chat_psub_t           *psub;
    ngx_chat_session_t        *session;
} ngx_chat_plink_t;


typedef struct {
    uint64_t                   pos;              /* last record read */
    uint64_t                   lost;
    uint64_t                   mark;
    ngx_uint_t                 started;
    ngx_chat_live_proc_t      *proc;
    ngx_event_t                tick;
    ngx_event_t                process;
    ngx_uint_t                 ticks;
    ngx_rbtree_t               psubs;
    ngx_rbtree_node_t          psubs_sentinel;
    ngx_chat_buf_t             copy;
    ngx_chat_buf_t             rec;
    size_t                     offs[NGX_CHAT_LIVE_SCAN];
    ngx_chat_live_note_t       notes[NGX_CHAT_LIVE_NOTES];
} ngx_chat_live_t;


static ngx_chat_live_t  ngx_chat_live;


static ngx_chat_live_sh_t *ngx_chat_live_sh(void);
static void ngx_chat_live_tick_handler(ngx_event_t *ev);
static void ngx_chat_live_process_handler(ngx_event_t *ev);
static void ngx_chat_live_evict_locked(size_t need, uint64_t upto);
static void ngx_chat_live_publish_locked(ngx_chat_live_rec_t *h,
    int64_t *contacts, ngx_str_t *user, u_char *json);
static void ngx_chat_live_dispatch(ngx_chat_live_rec_t *h);
static void ngx_chat_live_deliver(ngx_chat_session_t *s, void *data);
static void ngx_chat_live_blocks_set(ngx_chat_session_t *s, void *data);
static void ngx_chat_live_end_user(ngx_str_t *user);
static void ngx_chat_live_collect(ngx_chat_session_t *s, void *data);
static void ngx_chat_live_typing_event(ngx_chat_typing_t *t,
    ngx_uint_t start);
static void ngx_chat_live_typing_free(ngx_chat_typing_t *t);
static ngx_chat_typing_t *ngx_chat_live_typing_lookup(int64_t conv,
    ngx_str_t *user, u_char *key, ngx_str_t *name);
static ngx_uint_t ngx_chat_live_expire_locked(void);
static ngx_chat_presence_t *ngx_chat_live_user_locked(ngx_str_t *user);
static ngx_uint_t ngx_chat_live_user_status(ngx_chat_presence_t *u);
static void ngx_chat_live_update_locked(ngx_chat_presence_t *u);
static void ngx_chat_live_presence_event(ngx_chat_presence_t *u,
    ngx_uint_t status, uint64_t when);
static void ngx_chat_live_device_free(ngx_chat_device_t *d);
static void ngx_chat_live_kick_locked(ngx_pid_t pid, uint64_t session,
    ngx_str_t *user);
static void ngx_chat_live_kicks(void);
static void ngx_chat_live_proc_free_locked(ngx_chat_live_proc_t *proc);
static ngx_chat_device_t *ngx_chat_live_device_locked(ngx_chat_session_t *s);
static void ngx_chat_live_replace_locked(ngx_chat_presence_t *u,
    ngx_chat_device_t *d);
static ngx_uint_t ngx_chat_live_same_device(ngx_chat_presence_t *u,
    uint64_t dev);
static void ngx_chat_live_user_leaving(ngx_chat_presence_t *u);
static void ngx_chat_live_user_free(ngx_chat_presence_t *u);
static void ngx_chat_live_reap(void);
static ngx_uint_t ngx_chat_live_offline_locked(void);
static void ngx_chat_live_persist(ngx_str_t *user, uint64_t when);
static void ngx_chat_live_persist_done(ngx_chat_query_t *q, PGresult *res,
    ngx_int_t rc);
static void ngx_chat_live_unsubscribe(ngx_chat_session_t *s);
static uint64_t ngx_chat_live_now(void);


static ngx_str_t  ngx_chat_presence_names[] = {
    ngx_null_string,
    ngx_string("online"),
    ngx_string("away"),
    ngx_string("offline")
};


ngx_int_t
ngx_chat_live_init_zone(ngx_slab_pool_t *shpool, ngx_chat_shctx_t *sh,
    ngx_chat_main_conf_t *cmcf)
{
    ngx_uint_t           i;
    ngx_chat_live_sh_t  *lsh;

    lsh = ngx_slab_calloc(shpool, sizeof(ngx_chat_live_sh_t));
    if (lsh == NULL) {
        return NGX_ERROR;
    }

    lsh->slots = ngx_slab_calloc(shpool,
                                 cmcf->live_slots
                                 * sizeof(ngx_chat_live_slot_t));
    if (lsh->slots == NULL) {
        return NGX_ERROR;
    }

    lsh->nslots = cmcf->live_slots;
    lsh->oldest = 1;

    /* records never crowd out the durable ring, tickets and devices */
    lsh->budget = cmcf->shm_size / 8;

    /* nginx's own insert functions: no pointer into a module in the zone */
    ngx_rbtree_init(&lsh->typing, &lsh->typing_sentinel,
                    ngx_str_rbtree_insert_value);
    ngx_queue_init(&lsh->typing_lru);
    ngx_rbtree_init(&lsh->users, &lsh->users_sentinel,
                    ngx_str_rbtree_insert_value);
    ngx_queue_init(&lsh->leaving);

    for (i = 0; i < NGX_CHAT_LIVE_PROCS; i++) {
        ngx_queue_init(&lsh->procs[i].devices);
        ngx_queue_init(&lsh->procs[i].kick);
    }

    sh->live = lsh;

    return NGX_OK;
}


static ngx_chat_live_sh_t *
ngx_chat_live_sh(void)
{
    return ngx_chat_worker.sh->live;
}


ngx_int_t
ngx_chat_live_init_process(ngx_cycle_t *cycle)
{
    ngx_uint_t           i;
    ngx_chat_live_t     *lv;
    ngx_slab_pool_t     *shpool;
    ngx_chat_live_sh_t  *lsh;

    lv = &ngx_chat_live;
    lsh = ngx_chat_live_sh();
    shpool = ngx_chat_worker.shpool;

    ngx_rbtree_init(&lv->psubs, &lv->psubs_sentinel,
                    ngx_str_rbtree_insert_value);

    lv->tick.handler = ngx_chat_live_tick_handler;
    lv->tick.log = cycle->log;
    lv->tick.data = lv;
    lv->tick.cancelable = 1;

    lv->process.handler = ngx_chat_live_process_handler;
    lv->process.log = cycle->log;
    lv->process.data = lv;

    ngx_shmtx_lock(&shpool->mutex);

    /* ephemeral: a worker hears only what is said after it started */
    lv->pos = lsh->seq;
    lv->started = 1;

    for (i = 0; i < NGX_CHAT_LIVE_PROCS; i++) {
        if (lsh->procs[i].pid != ngx_pid) {
            continue;
        }

        /* a dead process's entry, and its pid given to us: stale */
        ngx_chat_live_proc_free_locked(&lsh->procs[i]);
    }

    for (i = 0; i < NGX_CHAT_LIVE_PROCS; i++) {
        if (lsh->procs[i].pid == 0) {
            lsh->procs[i].pid = ngx_pid;
            lv->proc = &lsh->procs[i];
            break;
        }
    }

    ngx_shmtx_unlock(&shpool->mutex);

    if (lv->proc == NULL) {
        ngx_log_error(NGX_LOG_ERR, cycle->log, 0,
                      "chat: no room for this process in the presence "
                      "table of the zone: its connections have no presence");
    }

    /* devices of a worker that died before it could be seen as dead */
    ngx_chat_live_reap();

    ngx_add_timer(&lv->tick, NGX_CHAT_LIVE_TICK);

    return NGX_OK;
}


void
ngx_chat_live_exit_process(void)
{
    ngx_chat_live_t      *lv;
    ngx_slab_pool_t      *shpool;

    lv = &ngx_chat_live;

    if (lv->tick.timer_set) {
        ngx_del_timer(&lv->tick);
    }

    if (lv->process.posted) {
        ngx_delete_posted_event(&lv->process);
    }

    if (lv->proc) {
        shpool = ngx_chat_worker.shpool;

        ngx_shmtx_lock(&shpool->mutex);

        /* connections still open at exit go away with the process */
        ngx_chat_live_proc_free_locked(lv->proc);
        lv->proc = NULL;

        ngx_shmtx_unlock(&shpool->mutex);
    }

    ngx_chat_buf_free(&lv->copy);
    ngx_chat_buf_free(&lv->rec);
}


/* wall clock in ms, for last_seen */

static uint64_t
ngx_chat_live_now(void)
{
    ngx_time_t  *tp;

    tp = ngx_timeofday();

    return (uint64_t) tp->sec * 1000 + tp->msec;
}


/* RFC 3339 with ms, UTC, as chat_ts() in SQL: 24 bytes */

u_char *
ngx_chat_live_ts(u_char *p, uint64_t ms)
{
    ngx_tm_t  tm;

    ngx_gmtime((time_t) (ms / 1000), &tm);

    return ngx_sprintf(p, "%4d-%02d-%02dT%02d:%02d:%02d.%03dZ",
                       tm.ngx_tm_year, tm.ngx_tm_mon, tm.ngx_tm_mday,
                       tm.ngx_tm_hour, tm.ngx_tm_min, tm.ngx_tm_sec,
                       (int) (ms % 1000));
}


ngx_int_t
ngx_chat_live_valid_device(u_char *p, size_t n)
{
    size_t  i;

    if (n == 0 || n > NGX_CHAT_DEVICE_ID_LEN) {
        return NGX_ERROR;
    }

    for (i = 0; i < n; i++) {
        if (!((p[i] >= 'a' && p[i] <= 'z') || (p[i] >= 'A' && p[i] <= 'Z')
              || (p[i] >= '0' && p[i] <= '9')
              || p[i] == '.' || p[i] == '_' || p[i] == '-'))
        {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


/* the ring */

/*
 * The oldest records go first: for the byte budget, and when the zone has
 * no room (a worker that has not read them loses them: the ring is lossy).
 */
static void
ngx_chat_live_evict_locked(size_t need, uint64_t upto)
{
    ngx_chat_live_sh_t    *lsh;
    ngx_chat_live_slot_t  *slot;

    lsh = ngx_chat_live_sh();

    while (lsh->oldest <= upto && lsh->oldest <= lsh->seq
           && (need == 0 || lsh->bytes + need > lsh->budget))
    {
        slot = &lsh->slots[lsh->oldest % lsh->nslots];

        if (slot->seq == lsh->oldest && slot->data) {
            ngx_slab_free_locked(ngx_chat_worker.shpool, slot->data);
            lsh->bytes -= slot->len;
            slot->data = NULL;
            slot->seq = 0;
        }

        lsh->oldest++;
    }
}


static void
ngx_chat_live_publish_locked(ngx_chat_live_rec_t *h, int64_t *contacts,
    ngx_str_t *user, u_char *json)
{
    size_t                 size;
    u_char                *p;
    ngx_slab_pool_t       *shpool;
    ngx_chat_live_sh_t    *lsh;
    ngx_chat_live_slot_t  *slot;

    lsh = ngx_chat_live_sh();
    shpool = ngx_chat_worker.shpool;

    size = sizeof(ngx_chat_live_rec_t) + h->ncontacts * sizeof(int64_t)
           + h->user_len + h->json_len;

    /* the slot's previous record, and more for the budget */
    if (lsh->seq + 1 > lsh->nslots) {
        ngx_chat_live_evict_locked(0, lsh->seq + 1 - lsh->nslots);
    }

    ngx_chat_live_evict_locked(size, lsh->seq);

    /* the record is lost to everybody if there is no room, its number not */
    lsh->seq++;
    slot = &lsh->slots[lsh->seq % lsh->nslots];

    p = ngx_slab_alloc_locked(shpool, size);

    if (p == NULL) {
        /* half of what the ring holds, then once more */
        ngx_chat_live_evict_locked(0, lsh->oldest
                                      + (lsh->seq - lsh->oldest) / 2);
        p = ngx_slab_alloc_locked(shpool, size);
    }

    if (p == NULL) {
        lsh->dropped++;
        slot->seq = 0;
        slot->data = NULL;
        return;
    }

    slot->seq = lsh->seq;
    slot->data = p;
    slot->len = size;
    lsh->bytes += size;

    p = ngx_cpymem(p, h, sizeof(ngx_chat_live_rec_t));
    p = ngx_cpymem(p, contacts, h->ncontacts * sizeof(int64_t));
    p = ngx_cpymem(p, user->data, h->user_len);
    ngx_memcpy(p, json, h->json_len);
}


void
ngx_chat_live_process(void)
{
    u_char                *p;
    uint64_t               seq;
    ngx_uint_t             i, n;
    ngx_chat_live_t       *lv;
    ngx_slab_pool_t       *shpool;
    ngx_chat_live_sh_t    *lsh;
    ngx_chat_live_slot_t  *slot;

    lv = &ngx_chat_live;

    if (!lv->started) {
        return;
    }

    lsh = ngx_chat_live_sh();
    shpool = ngx_chat_worker.shpool;

    if (*(volatile uint64_t *) &lsh->seq == lv->pos) {
        return;
    }

    n = 0;
    lv->copy.len = 0;

    ngx_shmtx_lock(&shpool->mutex);

    seq = lsh->seq;

    if (seq - lv->pos > lsh->nslots) {
        lv->lost += seq - lv->pos - lsh->nslots;
        lv->pos = seq - lsh->nslots;
    }

    while (lv->pos < seq && n < NGX_CHAT_LIVE_SCAN
           && lv->copy.len < NGX_CHAT_LIVE_COPY_BYTES)
    {
        lv->pos++;
        slot = &lsh->slots[lv->pos % lsh->nslots];

        if (slot->seq != lv->pos || slot->data == NULL) {
            lv->lost++;
            continue;
        }

        /* records are 8-byte aligned in the copy */
        if (ngx_chat_buf_reserve(&lv->copy, slot->len + 8) != NGX_OK) {
            lv->lost++;
            continue;
        }

        lv->offs[n++] = lv->copy.len;
        ngx_memcpy(lv->copy.data + lv->copy.len, slot->data, slot->len);
        lv->copy.len = ngx_align(lv->copy.len + slot->len, 8);
    }

    ngx_shmtx_unlock(&shpool->mutex);

    for (i = 0; i < n; i++) {
        p = lv->copy.data + lv->offs[i];
        ngx_chat_live_dispatch((ngx_chat_live_rec_t *) p);
    }

    if (lv->pos < seq && !lv->process.posted) {
        ngx_post_event(&lv->process, &ngx_posted_events);
    }
}


static void
ngx_chat_live_process_handler(ngx_event_t *ev)
{
    ngx_chat_live_process();
}


typedef struct {
    ngx_chat_event_t           ev;
    ngx_str_t                  user;             /* not to them */
    uint64_t                   mark;             /* 0: no dedup */
} ngx_chat_live_fan_t;


static void
ngx_chat_live_dispatch(ngx_chat_live_rec_t *h)
{
    u_char               *json;
    int64_t              *contacts;
    ngx_uint_t            i;
    ngx_queue_t          *q, *next;
    ngx_chat_psub_t      *ps;
    ngx_chat_plink_t     *pl;
    ngx_chat_live_fan_t   fan;

    contacts = (int64_t *) &h[1];
    fan.user.data = (u_char *) &contacts[h->ncontacts];
    fan.user.len = h->user_len;
    json = fan.user.data + h->user_len;

    switch (h->kind) {

    case NGX_CHAT_REC_TYPING:
        ngx_chat_event_init(&fan.ev, 0, h->conv, json, h->json_len);
        fan.mark = 0;
        ngx_chat_bus_each(h->conv, ngx_chat_live_deliver, &fan);
        break;

    case NGX_CHAT_REC_PRESENCE:
        ngx_chat_event_init(&fan.ev, 0, 0, json, h->json_len);
        fan.mark = ++ngx_chat_live.mark;

        for (i = 0; i < h->ncontacts; i++) {
            ngx_chat_bus_each(contacts[i], ngx_chat_live_deliver, &fan);
        }

        ps = (ngx_chat_psub_t *) ngx_str_rbtree_lookup(&ngx_chat_live.psubs,
                                     &fan.user,
                                     ngx_crc32_short(fan.user.data,
                                                     fan.user.len));
        if (ps) {
            for (q = ngx_queue_head(&ps->links);
                 q != ngx_queue_sentinel(&ps->links);
                 q = next)
            {
                /* a delivery never frees a session or its links */
                next = ngx_queue_next(q);
                pl = ngx_queue_data(q, ngx_chat_plink_t, queue);
                ngx_chat_live_deliver(pl->session, &fan);
            }
        }

        break;

    case NGX_CHAT_REC_REPLACE:
        /* what to close is in this process's queue in the zone */
        if (h->pid == ngx_pid) {
            ngx_chat_live_kicks();
        }

        break;

    case NGX_CHAT_REC_BLOCKS:
        fan.ev.payload.data = json;
        fan.ev.payload.len = h->json_len;
        ngx_chat_bus_each_of(&fan.user, ngx_chat_live_blocks_set, &fan);
        break;

    case NGX_CHAT_REC_ERASED:
        ngx_chat_live_end_user(&fan.user);
        break;
    }
}


/*
 * An erased user's connections here end (1008): what they were members
 * of is no longer theirs.  Their ids first: ending one may change the
 * user's list.
 */

static void
ngx_chat_live_end_user(ngx_str_t *user)
{
    ngx_uint_t           i;
    ngx_chat_session_t  *s;
    ngx_chat_live_ids_t  ids;

    ids.n = 0;
    ngx_chat_bus_each_of(user, ngx_chat_live_collect, &ids);

    for (i = 0; i < ids.n; i++) {
        s = ngx_chat_bus_find(user, ids.id[i]);

        if (s) {
            ngx_log_error(NGX_LOG_INFO, s->log, 0,
                          "chat: connection of an erased user closed");
            ngx_chat_session_end(s, NGX_CHAT_CLOSE_POLICY, "erased");
        }
    }
}


static void
ngx_chat_live_collect(ngx_chat_session_t *s, void *data)
{
    ngx_chat_live_ids_t  *ids = data;

    if (ids->n < NGX_CHAT_LIVE_IDS) {
        ids->id[ids->n++] = s->id;
    }
}


/* after a user was erased (committed): every worker ends its sessions */

void
ngx_chat_live_erased(ngx_str_t *user)
{
    ngx_chat_live_rec_t   h;

    ngx_memzero(&h, sizeof(ngx_chat_live_rec_t));
    h.kind = NGX_CHAT_REC_ERASED;
    h.user_len = user->len;

    ngx_shmtx_lock(&ngx_chat_worker.shpool->mutex);
    ngx_chat_live_publish_locked(&h, NULL, user, (u_char *) "");
    ngx_shmtx_unlock(&ngx_chat_worker.shpool->mutex);

    ngx_chat_bus_notify();
}


/* a user changed its blocks: its sessions here take the new list */

static void
ngx_chat_live_blocks_set(ngx_chat_session_t *s, void *data)
{
    ngx_chat_live_fan_t  *fan = data;

    ngx_chat_session_set_blocks(s, fan->ev.payload.data,
                                fan->ev.payload.len, 1);
}


/* after a change of the user's blocks (committed): every worker hears */

void
ngx_chat_live_blocks(ngx_str_t *user, u_char *list, size_t len)
{
    ngx_chat_live_rec_t   h;

    ngx_memzero(&h, sizeof(ngx_chat_live_rec_t));
    h.kind = NGX_CHAT_REC_BLOCKS;
    h.user_len = user->len;
    h.json_len = len;

    ngx_shmtx_lock(&ngx_chat_worker.shpool->mutex);
    ngx_chat_live_publish_locked(&h, NULL, user, list);
    ngx_shmtx_unlock(&ngx_chat_worker.shpool->mutex);

    ngx_chat_bus_notify();
}


static void
ngx_chat_live_deliver(ngx_chat_session_t *s, void *data)
{
    ngx_chat_live_fan_t  *fan = data;

    if (s->state != NGX_CHAT_SESSION_LIVE) {
        /* lossy by design: a session catching up is told nothing new */
        return;
    }

    if (fan->mark) {
        if (s->live_mark == fan->mark) {
            return;
        }

        s->live_mark = fan->mark;
    }

    if (s->user.len == fan->user.len
        && ngx_strncmp(s->user.data, fan->user.data, fan->user.len) == 0)
    {
        return;
    }

    /* a user it blocks: neither typing nor presence */
    if (s->blocks_len && ngx_chat_session_blocked(s, &fan->user)) {
        return;
    }

    (void) ngx_chat_session_deliver(s, &fan->ev);
}


static void
ngx_chat_live_tick_handler(ngx_event_t *ev)
{
    ngx_str_t            user;
    ngx_uint_t           i, n, gone;
    ngx_chat_live_t     *lv;
    ngx_slab_pool_t     *shpool;
    ngx_chat_live_sh_t  *lsh;

    lv = &ngx_chat_live;

    if (ngx_exiting || ngx_terminate || ngx_quit) {
        return;
    }

    lv->ticks++;
    lsh = ngx_chat_live_sh();
    shpool = ngx_chat_worker.shpool;

    if (lv->ticks % NGX_CHAT_LIVE_REAP_TICKS == 0) {
        ngx_chat_live_reap();
    }

    if ((*(volatile ngx_uint_t *) &lsh->ntyping
         && !ngx_queue_empty(&lsh->typing_lru))
        || !ngx_queue_empty(&lsh->leaving))
    {
        ngx_shmtx_lock(&shpool->mutex);
        n = ngx_chat_live_expire_locked();
        gone = ngx_chat_live_offline_locked();
        ngx_shmtx_unlock(&shpool->mutex);

        for (i = 0; i < gone; i++) {
            user.data = lv->notes[i].user;
            user.len = lv->notes[i].len;
            ngx_chat_live_persist(&user, lv->notes[i].v);
        }

        if (n + gone) {
            ngx_chat_bus_notify();
        }
    }

    /* a doorbell rung by a worker of another generation is not ours */
    ngx_chat_live_process();
    ngx_chat_live_kicks();

    ngx_add_timer(&lv->tick, NGX_CHAT_LIVE_TICK);
}


/* typing */

static ngx_chat_typing_t *
ngx_chat_live_typing_lookup(int64_t conv, ngx_str_t *user, u_char *key,
    ngx_str_t *name)
{
    ngx_chat_conv_key(key, conv, user, name);

    return (ngx_chat_typing_t *) ngx_str_rbtree_lookup(
                                     &ngx_chat_live_sh()->typing, name,
                                     ngx_crc32_short(name->data, name->len));
}


/*
 * A start refreshes the state of (conv, user) and is an event only when
 * that user was not typing there; a stop is an event only when they were.
 * Members only: the caller checked.
 */
ngx_int_t
ngx_chat_live_typing(int64_t conv, ngx_str_t *user, ngx_uint_t start,
    uint64_t session)
{
    ngx_str_t            name;
    ngx_slab_pool_t     *shpool;
    ngx_chat_typing_t   *t;
    ngx_chat_live_sh_t  *lsh;
    u_char               key[NGX_CHAT_CONV_KEY_LEN];

    if (user->len > NGX_CHAT_MAX_ID_LEN) {
        return NGX_ERROR;
    }

    lsh = ngx_chat_live_sh();
    shpool = ngx_chat_worker.shpool;

    ngx_shmtx_lock(&shpool->mutex);

    t = ngx_chat_live_typing_lookup(conv, user, key, &name);

    if (!start) {
        if (t) {
            ngx_chat_live_typing_event(t, 0);
            ngx_chat_live_typing_free(t);
        }

        ngx_shmtx_unlock(&shpool->mutex);

        if (t) {
            ngx_chat_bus_notify();
        }

        return NGX_OK;
    }

    if (t) {
        t->expire = ngx_current_msec + ngx_chat_worker.cmcf->typing_timeout;
        t->pid = ngx_pid;
        t->session = session;
        ngx_queue_remove(&t->lru);
        ngx_queue_insert_tail(&lsh->typing_lru, &t->lru);

        ngx_shmtx_unlock(&shpool->mutex);
        return NGX_OK;
    }

    if (lsh->ntyping >= NGX_CHAT_LIVE_TYPING_MAX) {
        ngx_shmtx_unlock(&shpool->mutex);
        return NGX_BUSY;
    }

    t = ngx_slab_alloc_locked(shpool, sizeof(ngx_chat_typing_t) + name.len);
    if (t == NULL) {
        ngx_shmtx_unlock(&shpool->mutex);
        return NGX_BUSY;
    }

    ngx_chat_str_node_init(&t->sn, (u_char *) &t[1], &name);
    t->user.data = t->sn.str.data + name.len - user->len;
    t->user.len = user->len;
    t->conv = conv;
    t->expire = ngx_current_msec + ngx_chat_worker.cmcf->typing_timeout;
    t->pid = ngx_pid;
    t->session = session;

    ngx_rbtree_insert(&lsh->typing, &t->sn.node);
    ngx_queue_insert_tail(&lsh->typing_lru, &t->lru);
    lsh->ntyping++;

    ngx_chat_live_typing_event(t, 1);

    ngx_shmtx_unlock(&shpool->mutex);

    ngx_chat_bus_notify();

    return NGX_OK;
}


/* a connection lets go of a typing state it holds, if it still does */

void
ngx_chat_live_typing_release(int64_t conv, ngx_str_t *user,
    uint64_t session)
{
    ngx_str_t            name;
    ngx_slab_pool_t     *shpool;
    ngx_chat_typing_t   *t;
    u_char               key[NGX_CHAT_CONV_KEY_LEN];

    if (user->len > NGX_CHAT_MAX_ID_LEN) {
        return;
    }

    shpool = ngx_chat_worker.shpool;

    ngx_shmtx_lock(&shpool->mutex);

    t = ngx_chat_live_typing_lookup(conv, user, key, &name);

    if (t && t->pid == ngx_pid && t->session == session) {
        ngx_chat_live_typing_event(t, 0);
        ngx_chat_live_typing_free(t);

    } else {
        t = NULL;
    }

    ngx_shmtx_unlock(&shpool->mutex);

    if (t) {
        ngx_chat_bus_notify();
    }
}


/* a message of user in conv was committed: they stopped typing there */

void
ngx_chat_live_sent(int64_t conv, ngx_str_t *user)
{
    ngx_str_t            name;
    ngx_slab_pool_t     *shpool;
    ngx_chat_typing_t   *t;
    u_char               key[NGX_CHAT_CONV_KEY_LEN];

    if (ngx_chat_worker.sh == NULL
        || *(volatile ngx_uint_t *) &ngx_chat_live_sh()->ntyping == 0
        || user->len > NGX_CHAT_MAX_ID_LEN)
    {
        return;
    }

    shpool = ngx_chat_worker.shpool;

    ngx_shmtx_lock(&shpool->mutex);

    t = ngx_chat_live_typing_lookup(conv, user, key, &name);

    if (t) {
        ngx_chat_live_typing_event(t, 0);
        ngx_chat_live_typing_free(t);
    }

    ngx_shmtx_unlock(&shpool->mutex);

    if (t) {
        ngx_chat_bus_notify();
    }
}


static void
ngx_chat_live_typing_event(ngx_chat_typing_t *t, ngx_uint_t start)
{
    ngx_chat_buf_t       *b;
    ngx_chat_live_rec_t   h;

    b = &ngx_chat_live.rec;
    b->len = 0;

    if (ngx_chat_buf_add_lit(b, "{\"kind\":\"typing\",\"conversation_id\":\"")
        != NGX_OK
        || ngx_chat_buf_reserve(b, NGX_INT64_LEN) != NGX_OK)
    {
        return;
    }

    b->len = ngx_sprintf(b->data + b->len, "%L", t->conv) - b->data;

    if (ngx_chat_buf_add_lit(b, "\",\"user\":") != NGX_OK
        || ngx_chat_buf_add_json_str(b, t->user.data, t->user.len) != NGX_OK
        || (start ? ngx_chat_buf_add_lit(b, ",\"state\":\"start\"}")
                  : ngx_chat_buf_add_lit(b, ",\"state\":\"stop\"}"))
           != NGX_OK)
    {
        return;
    }

    ngx_memzero(&h, sizeof(ngx_chat_live_rec_t));
    h.kind = NGX_CHAT_REC_TYPING;
    h.conv = t->conv;
    h.user_len = t->user.len;
    h.json_len = b->len;

    ngx_chat_live_publish_locked(&h, NULL, &t->user, b->data);
}


static void
ngx_chat_live_typing_free(ngx_chat_typing_t *t)
{
    ngx_chat_live_sh_t  *lsh;

    lsh = ngx_chat_live_sh();

    ngx_rbtree_delete(&lsh->typing, &t->sn.node);
    ngx_queue_remove(&t->lru);
    lsh->ntyping--;

    ngx_slab_free_locked(ngx_chat_worker.shpool, t);
}


/* typing states past their timeout end with a stop, by any worker */

static ngx_uint_t
ngx_chat_live_expire_locked(void)
{
    ngx_uint_t           n;
    ngx_queue_t         *q;
    ngx_chat_typing_t   *t;
    ngx_chat_live_sh_t  *lsh;

    lsh = ngx_chat_live_sh();
    n = 0;

    while (!ngx_queue_empty(&lsh->typing_lru) && n < 1024) {
        q = ngx_queue_head(&lsh->typing_lru);
        t = ngx_queue_data(q, ngx_chat_typing_t, lru);

        if ((ngx_msec_int_t) (t->expire - ngx_current_msec) > 0) {
            break;
        }

        ngx_chat_live_typing_event(t, 0);
        ngx_chat_live_typing_free(t);
        n++;
    }

    return n;
}


/* presence */

static ngx_chat_presence_t *
ngx_chat_live_user_locked(ngx_str_t *user)
{
    return (ngx_chat_presence_t *) ngx_str_rbtree_lookup(
                                       &ngx_chat_live_sh()->users, user,
                                       ngx_crc32_short(user->data,
                                                       user->len));
}


static ngx_uint_t
ngx_chat_live_user_status(ngx_chat_presence_t *u)
{
    ngx_queue_t        *q;
    ngx_chat_device_t  *d;

    if (u->ndevices == 0) {
        /* in the grace period: as it was */
        return u->status;
    }

    for (q = ngx_queue_head(&u->devices);
         q != ngx_queue_sentinel(&u->devices);
         q = ngx_queue_next(q))
    {
        d = ngx_queue_data(q, ngx_chat_device_t, queue);

        if (!d->away) {
            return NGX_CHAT_PRESENCE_ONLINE;
        }
    }

    return NGX_CHAT_PRESENCE_AWAY;
}


static void
ngx_chat_live_update_locked(ngx_chat_presence_t *u)
{
    ngx_uint_t  status;

    status = ngx_chat_live_user_status(u);

    if (status != u->status) {
        u->status = status;
        ngx_chat_live_presence_event(u, status, ngx_chat_live_now());
    }
}


static void
ngx_chat_live_presence_event(ngx_chat_presence_t *u, ngx_uint_t status,
    uint64_t when)
{
    u_char               *p;
    ngx_chat_buf_t       *b;
    ngx_chat_live_rec_t   h;

    b = &ngx_chat_live.rec;
    b->len = 0;

    if (ngx_chat_buf_add_lit(b, "{\"kind\":\"presence\",\"user\":") != NGX_OK
        || ngx_chat_buf_add_json_str(b, u->sn.str.data, u->sn.str.len)
           != NGX_OK
        || ngx_chat_buf_add_lit(b, ",\"status\":\"") != NGX_OK
        || ngx_chat_buf_add_str(b, &ngx_chat_presence_names[status])
           != NGX_OK
        || ngx_chat_buf_add_lit(b, "\",\"last_seen\":\"") != NGX_OK
        || ngx_chat_buf_reserve(b, 32) != NGX_OK)
    {
        return;
    }

    p = ngx_chat_live_ts(b->data + b->len, when);
    *p++ = '"';
    *p++ = '}';
    b->len = p - b->data;

    ngx_memzero(&h, sizeof(ngx_chat_live_rec_t));
    h.kind = NGX_CHAT_REC_PRESENCE;
    h.ncontacts = ngx_min(u->ncontacts, NGX_CHAT_LIVE_CONTACTS);
    h.user_len = u->sn.str.len;
    h.json_len = b->len;

    ngx_chat_live_publish_locked(&h, u->contacts, &u->sn.str, b->data);
}


/*
 * The devices of user u with the same device id as d, other than d, are
 * replaced: freed here, and their connections told to close (4009) through
 * the ring, whichever worker holds them.  d is in place first, so the user
 * stays present throughout.
 */
static void
ngx_chat_live_replace_locked(ngx_chat_presence_t *u, ngx_chat_device_t *d)
{
    ngx_uint_t            i, n;
    ngx_queue_t          *q, *next;
    ngx_chat_device_t    *old;
    ngx_chat_live_rec_t   h;
    ngx_chat_live_gone_t  gone[NGX_CHAT_LIVE_REPLACE];

    if (d->device == 0) {
        return;
    }

    n = 0;

    for (q = ngx_queue_head(&u->devices);
         q != ngx_queue_sentinel(&u->devices) && n < NGX_CHAT_LIVE_REPLACE;
         q = next)
    {
        next = ngx_queue_next(q);
        old = ngx_queue_data(q, ngx_chat_device_t, queue);

        if (old == d || old->device != d->device) {
            continue;
        }

        gone[n].pid = old->pid;
        gone[n].session = old->session;
        n++;

        ngx_chat_live_device_free(old);
    }

    for (i = 0; i < n; i++) {
        /*
         * Lossless: a note in the owner's queue, which it reads on every
         * doorbell and tick; the ring record (lossy) only makes it look
         * at once.
         */
        ngx_chat_live_kick_locked(gone[i].pid, gone[i].session, &u->sn.str);

        ngx_memzero(&h, sizeof(ngx_chat_live_rec_t));
        h.kind = NGX_CHAT_REC_REPLACE;
        h.pid = gone[i].pid;
        h.user_len = u->sn.str.len;

        ngx_chat_live_publish_locked(&h, NULL, &u->sn.str, NULL);
    }
}


static void
ngx_chat_live_kick_locked(ngx_pid_t pid, uint64_t session, ngx_str_t *user)
{
    ngx_uint_t            i;
    ngx_chat_kick_t      *k;
    ngx_chat_live_sh_t   *lsh;

    lsh = ngx_chat_live_sh();

    for (i = 0; i < NGX_CHAT_LIVE_PROCS; i++) {
        if (lsh->procs[i].pid == pid) {
            break;
        }
    }

    if (i == NGX_CHAT_LIVE_PROCS) {
        /* gone already, and its connections with it */
        return;
    }

    k = ngx_slab_alloc_locked(ngx_chat_worker.shpool,
                              sizeof(ngx_chat_kick_t) + user->len);
    if (k == NULL) {
        ngx_log_error(NGX_LOG_WARN, ngx_chat_worker.log, 0,
                      "chat: the zone is full, a replaced connection "
                      "stays open");
        return;
    }

    k->session = session;
    k->user_len = user->len;
    ngx_memcpy(k->user, user->data, user->len);

    ngx_queue_insert_tail(&lsh->procs[i].kick, &k->queue);
}


/* this process's connections that were replaced: closed with 4009 */

static void
ngx_chat_live_kicks(void)
{
    ngx_str_t              user;
    ngx_uint_t             i, n;
    ngx_queue_t           *q;
    ngx_chat_kick_t       *k;
    ngx_slab_pool_t       *shpool;
    ngx_chat_session_t    *s;
    ngx_chat_live_note_t  *note;

    if (ngx_chat_live.proc == NULL
        || ngx_queue_empty(&ngx_chat_live.proc->kick))
    {
        return;
    }

    shpool = ngx_chat_worker.shpool;
    n = 0;

    ngx_shmtx_lock(&shpool->mutex);

    while (!ngx_queue_empty(&ngx_chat_live.proc->kick)
           && n < NGX_CHAT_LIVE_NOTES)
    {
        q = ngx_queue_head(&ngx_chat_live.proc->kick);
        k = ngx_queue_data(q, ngx_chat_kick_t, queue);
        ngx_queue_remove(q);

        note = &ngx_chat_live.notes[n++];
        note->v = k->session;
        note->len = ngx_min(k->user_len, NGX_CHAT_MAX_ID_LEN);
        ngx_memcpy(note->user, k->user, note->len);

        ngx_slab_free_locked(shpool, k);
    }

    ngx_shmtx_unlock(&shpool->mutex);

    for (i = 0; i < n; i++) {
        user.data = ngx_chat_live.notes[i].user;
        user.len = ngx_chat_live.notes[i].len;

        s = ngx_chat_bus_find(&user, ngx_chat_live.notes[i].v);

        if (s) {
            ngx_log_error(NGX_LOG_INFO, s->log, 0,
                          "chat: connection replaced by a new one of the "
                          "same device");
            ngx_chat_session_end(s, NGX_CHAT_CLOSE_REPLACED, "replaced");
        }
    }
}


/* devices of u with device id dev, other than the session's own */

static ngx_uint_t
ngx_chat_live_same_device(ngx_chat_presence_t *u, uint64_t dev)
{
    ngx_uint_t          n;
    ngx_queue_t        *q;
    ngx_chat_device_t  *d;

    n = 0;

    if (dev == 0) {
        return 0;
    }

    for (q = ngx_queue_head(&u->devices);
         q != ngx_queue_sentinel(&u->devices);
         q = ngx_queue_next(q))
    {
        d = ngx_queue_data(q, ngx_chat_device_t, queue);

        if (d->device == dev) {
            n++;
        }
    }

    return ngx_min(n, NGX_CHAT_LIVE_REPLACE);
}


/*
 * A session that finished joining becomes a device of its user.  contacts
 * are its conversations small enough for presence.  NGX_DECLINED: the
 * user has chat_max_connections_per_user connections already (the ones
 * this one replaces do not count).
 */
ngx_int_t
ngx_chat_live_join(ngx_chat_session_t *s, int64_t *contacts, ngx_uint_t n)
{
    int64_t              *c;
    ngx_slab_pool_t      *shpool;
    ngx_chat_device_t    *d;
    ngx_chat_live_sh_t   *lsh;
    ngx_chat_presence_t  *u;

    if (ngx_chat_live.proc == NULL) {
        /* no room for this process in the zone's table: no presence */
        return NGX_OK;
    }

    lsh = ngx_chat_live_sh();
    shpool = ngx_chat_worker.shpool;

    n = ngx_min(n, NGX_CHAT_LIVE_CONTACTS);

    ngx_shmtx_lock(&shpool->mutex);

    u = ngx_chat_live_user_locked(&s->user);

    if (u == NULL) {
        u = ngx_slab_calloc_locked(shpool,
                                   sizeof(ngx_chat_presence_t) + s->user.len);
        if (u == NULL) {
            goto nomem;
        }

        ngx_chat_str_node_init(&u->sn, (u_char *) &u[1], &s->user);
        ngx_queue_init(&u->devices);
        u->status = NGX_CHAT_PRESENCE_NONE;

        ngx_rbtree_insert(&lsh->users, &u->sn.node);
        lsh->nusers++;
    }

    if (u->ndevices - ngx_chat_live_same_device(u, s->device)
        >= ngx_chat_worker.cmcf->max_connections)
    {
        ngx_chat_live_user_leaving(u);
        ngx_shmtx_unlock(&shpool->mutex);
        return NGX_DECLINED;
    }

    d = ngx_slab_calloc_locked(shpool, sizeof(ngx_chat_device_t));
    if (d == NULL) {
        ngx_chat_live_user_leaving(u);
        goto nomem;
    }

    /* the newest connection's view of who its contacts are */

    if (n != u->ncontacts
        || (n && ngx_memcmp(u->contacts, contacts, n * sizeof(int64_t)) != 0))
    {
        c = NULL;

        if (n) {
            c = ngx_slab_alloc_locked(shpool, n * sizeof(int64_t));
        }

        if (c || n == 0) {
            if (u->contacts) {
                ngx_slab_free_locked(shpool, u->contacts);
            }

            if (n) {
                ngx_memcpy(c, contacts, n * sizeof(int64_t));
            }

            u->contacts = c;
            u->ncontacts = n;
        }
    }

    d->user = u;
    d->pid = ngx_pid;
    d->session = s->id;
    d->away = 0;
    d->device = s->device;

    ngx_queue_insert_tail(&u->devices, &d->queue);
    ngx_queue_insert_tail(&ngx_chat_live.proc->devices, &d->pqueue);
    u->ndevices++;

    if (u->offline_at) {
        /* back within the grace period: nobody was told it had left */
        ngx_queue_remove(&u->leaving);
        u->offline_at = 0;
    }

    ngx_chat_live_replace_locked(u, d);
    ngx_chat_live_update_locked(u);

    ngx_shmtx_unlock(&shpool->mutex);

    s->present = 1;

    ngx_chat_bus_notify();

    return NGX_OK;

nomem:

    ngx_shmtx_unlock(&shpool->mutex);

    /* presence is not worth refusing a connection for */
    ngx_log_error(NGX_LOG_WARN, s->log, 0,
                  "chat: the zone is full, connection without presence");

    return NGX_OK;
}


/* a device_id that came after the join (a hello after credentials on the
 * upgrade): the device takes it, and replaces others with it */

void
ngx_chat_live_device(ngx_chat_session_t *s)
{
    ngx_slab_pool_t    *shpool;
    ngx_chat_device_t  *d;

    if (!s->present || s->device == 0) {
        return;
    }

    shpool = ngx_chat_worker.shpool;

    ngx_shmtx_lock(&shpool->mutex);

    d = ngx_chat_live_device_locked(s);

    if (d && d->device == 0) {
        d->device = s->device;

        ngx_chat_live_replace_locked(d->user, d);
    }

    ngx_shmtx_unlock(&shpool->mutex);

    ngx_chat_bus_notify();
}


static ngx_chat_device_t *
ngx_chat_live_device_locked(ngx_chat_session_t *s)
{
    ngx_queue_t          *q;
    ngx_chat_device_t    *d;
    ngx_chat_presence_t  *u;

    u = ngx_chat_live_user_locked(&s->user);

    if (u == NULL) {
        return NULL;
    }

    for (q = ngx_queue_head(&u->devices);
         q != ngx_queue_sentinel(&u->devices);
         q = ngx_queue_next(q))
    {
        d = ngx_queue_data(q, ngx_chat_device_t, queue);

        if (d->pid == ngx_pid && d->session == s->id) {
            return d;
        }
    }

    return NULL;
}


void
ngx_chat_live_away(ngx_chat_session_t *s, ngx_uint_t away)
{
    ngx_slab_pool_t    *shpool;
    ngx_chat_device_t  *d;

    if (!s->present) {
        return;
    }

    shpool = ngx_chat_worker.shpool;

    ngx_shmtx_lock(&shpool->mutex);

    d = ngx_chat_live_device_locked(s);

    if (d && d->away != away) {
        d->away = away;
        ngx_chat_live_update_locked(d->user);
    }

    ngx_shmtx_unlock(&shpool->mutex);

    ngx_chat_bus_notify();
}


/* the session is gone: its device, its typing, its presence_sub */

void
ngx_chat_live_leave(ngx_chat_session_t *s)
{
    ngx_str_t            name;
    ngx_uint_t           i, n;
    ngx_slab_pool_t     *shpool;
    ngx_chat_device_t   *d;
    ngx_chat_typing_t   *t;
    u_char               key[NGX_CHAT_CONV_KEY_LEN];

    ngx_chat_live_unsubscribe(s);

    if (!s->present && s->ntyping == 0) {
        return;
    }

    shpool = ngx_chat_worker.shpool;
    n = 0;

    ngx_shmtx_lock(&shpool->mutex);

    if (s->present) {
        d = ngx_chat_live_device_locked(s);

        if (d) {
            ngx_chat_live_device_free(d);
            n++;
        }
    }

    /* the typing this connection started, unless another took it over */

    for (i = 0; i < s->ntyping; i++) {
        t = ngx_chat_live_typing_lookup(s->typing[i], &s->user, key, &name);

        if (t && t->pid == ngx_pid && t->session == s->id) {
            ngx_chat_live_typing_event(t, 0);
            ngx_chat_live_typing_free(t);
            n++;
        }
    }

    ngx_shmtx_unlock(&shpool->mutex);

    s->present = 0;
    s->ntyping = 0;

    if (n) {
        ngx_chat_bus_notify();
    }
}


/* with the zone locked; the user is updated or starts its grace period */

static void
ngx_chat_live_device_free(ngx_chat_device_t *d)
{
    ngx_chat_presence_t  *u;

    u = d->user;

    ngx_queue_remove(&d->queue);
    ngx_queue_remove(&d->pqueue);
    u->ndevices--;

    ngx_slab_free_locked(ngx_chat_worker.shpool, d);

    if (u->ndevices) {
        ngx_chat_live_update_locked(u);
        return;
    }

    ngx_chat_live_user_leaving(u);
}


static void
ngx_chat_live_user_leaving(ngx_chat_presence_t *u)
{
    ngx_chat_live_sh_t  *lsh;

    if (u->ndevices || u->offline_at) {
        return;
    }

    if (u->status == NGX_CHAT_PRESENCE_NONE) {
        /* nobody was ever told it was here */
        ngx_chat_live_user_free(u);
        return;
    }

    lsh = ngx_chat_live_sh();

    u->left = ngx_chat_live_now();
    u->offline_at = ngx_current_msec + ngx_chat_worker.cmcf->presence_grace;

    if (u->offline_at == 0) {
        u->offline_at = 1;
    }

    ngx_queue_insert_tail(&lsh->leaving, &u->leaving);
}


static void
ngx_chat_live_user_free(ngx_chat_presence_t *u)
{
    ngx_slab_pool_t     *shpool;
    ngx_chat_live_sh_t  *lsh;

    lsh = ngx_chat_live_sh();
    shpool = ngx_chat_worker.shpool;

    if (u->offline_at) {
        ngx_queue_remove(&u->leaving);
    }

    ngx_rbtree_delete(&lsh->users, &u->sn.node);
    lsh->nusers--;

    if (u->contacts) {
        ngx_slab_free_locked(shpool, u->contacts);
    }

    ngx_slab_free_locked(shpool, u);
}


/*
 * Users whose grace period passed go offline; last_seen is written to the
 * store by the worker that saw it (a lost write loses one last_seen,
 * nothing else).
 */
static ngx_uint_t
ngx_chat_live_offline_locked(void)
{
    ngx_uint_t            n;
    ngx_queue_t          *q;
    ngx_chat_live_note_t *gone;
    ngx_chat_live_sh_t   *lsh;
    ngx_chat_presence_t  *u;

    lsh = ngx_chat_live_sh();
    n = 0;

    while (!ngx_queue_empty(&lsh->leaving) && n < NGX_CHAT_LIVE_NOTES) {
        q = ngx_queue_head(&lsh->leaving);
        u = ngx_queue_data(q, ngx_chat_presence_t, leaving);

        if ((ngx_msec_int_t) (u->offline_at - ngx_current_msec) > 0) {
            break;
        }

        ngx_chat_live_presence_event(u, NGX_CHAT_PRESENCE_OFFLINE, u->left);

        /* written to the store once the zone is unlocked */
        gone = &ngx_chat_live.notes[n];
        gone->len = ngx_min(u->sn.str.len, NGX_CHAT_MAX_ID_LEN);
        ngx_memcpy(gone->user, u->sn.str.data, gone->len);
        gone->v = u->left;

        ngx_chat_live_user_free(u);
        n++;
    }

    return n;
}


static void
ngx_chat_live_persist(ngx_str_t *user, uint64_t when)
{
    u_char            *p;
    ngx_chat_query_t  *q;

    if (!ngx_chat_db_ready()) {
        return;
    }

    q = ngx_chat_query_alloc(NGX_CHAT_STMT_LAST_SEEN,
                             user->len + 1 + NGX_INT64_LEN + 1);
    if (q == NULL) {
        return;
    }

    p = (u_char *) &q[1];

    q->params[0] = (char *) p;
    p = ngx_cpymem(p, user->data, user->len);
    *p++ = '\0';

    q->params[1] = (char *) p;
    p = ngx_sprintf(p, "%uL", when);
    *p++ = '\0';

    q->handler = ngx_chat_live_persist_done;

    if (ngx_chat_db_query(q) != NGX_OK) {
        ngx_chat_query_free(q);
    }
}


static void
ngx_chat_live_persist_done(ngx_chat_query_t *q, PGresult *res, ngx_int_t rc)
{
    ngx_chat_query_free(q);
}


/*
 * Devices of processes that are gone (SIGKILL, a crash): the master
 * respawns the worker, but nobody closed its connections' devices.
 */
static void
ngx_chat_live_reap(void)
{
    ngx_uint_t           i, k, n;
    ngx_pid_t            dead[8];
    ngx_slab_pool_t     *shpool;
    ngx_chat_live_sh_t  *lsh;

    lsh = ngx_chat_live_sh();
    shpool = ngx_chat_worker.shpool;
    n = 0;

    for (i = 0; i < NGX_CHAT_LIVE_PROCS && n < 8; i++) {
        if (lsh->procs[i].pid && lsh->procs[i].pid != ngx_pid
            && kill(lsh->procs[i].pid, 0) == -1 && ngx_errno == NGX_ESRCH)
        {
            dead[n++] = lsh->procs[i].pid;
        }
    }

    if (n == 0) {
        return;
    }

    ngx_shmtx_lock(&shpool->mutex);

    for (i = 0; i < NGX_CHAT_LIVE_PROCS; i++) {
        for (k = 0; k < n; k++) {
            if (lsh->procs[i].pid == dead[k]) {
                break;
            }
        }

        if (lsh->procs[i].pid == 0 || k == n) {
            continue;
        }

        ngx_log_error(NGX_LOG_NOTICE, ngx_chat_worker.log, 0,
                      "chat: process %P is gone, its connections with it",
                      lsh->procs[i].pid);

        /* its typing ends by the timeout */
        ngx_chat_live_proc_free_locked(&lsh->procs[i]);
    }

    ngx_shmtx_unlock(&shpool->mutex);

    ngx_chat_bus_notify();
}


/* with the zone locked: a process's entry, devices and notes */

static void
ngx_chat_live_proc_free_locked(ngx_chat_live_proc_t *proc)
{
    ngx_queue_t        *q;
    ngx_chat_kick_t    *k;
    ngx_chat_device_t  *d;

    while (!ngx_queue_empty(&proc->devices)) {
        q = ngx_queue_head(&proc->devices);
        d = ngx_queue_data(q, ngx_chat_device_t, pqueue);
        ngx_chat_live_device_free(d);
    }

    while (!ngx_queue_empty(&proc->kick)) {
        q = ngx_queue_head(&proc->kick);
        k = ngx_queue_data(q, ngx_chat_kick_t, queue);
        ngx_queue_remove(q);
        ngx_slab_free_locked(ngx_chat_worker.shpool, k);
    }

    proc->pid = 0;
}


/* explicit presence subscriptions of a connection */

static void
ngx_chat_live_unsubscribe(ngx_chat_session_t *s)
{
    ngx_uint_t         i;
    ngx_chat_psub_t   *ps;
    ngx_chat_plink_t  *pl;

    for (i = 0; i < s->npsubs; i++) {
        pl = s->psubs[i];
        ps = pl->psub;

        ngx_queue_remove(&pl->queue);
        ngx_free(pl);

        if (ngx_queue_empty(&ps->links)) {
            ngx_rbtree_delete(&ngx_chat_live.psubs, &ps->sn.node);
            ngx_free(ps);
        }
    }

    ngx_free(s->psubs);
    s->psubs = NULL;
    s->npsubs = 0;
}


/*
 * users replaces the connection's list; out gets the JSON array of their
 * current states.
 */
ngx_int_t
ngx_chat_live_subscribe(ngx_chat_session_t *s, ngx_str_t *users,
    ngx_uint_t n, ngx_chat_buf_t *out)
{
    uint32_t           hash;
    ngx_uint_t         i, status;
    ngx_chat_psub_t   *ps;
    ngx_chat_plink_t  *pl;

    ngx_chat_live_unsubscribe(s);

    if (n) {
        s->psubs = ngx_alloc(n * sizeof(void *), s->log);
        if (s->psubs == NULL) {
            return NGX_ERROR;
        }
    }

    if (ngx_chat_buf_add_lit(out, "[") != NGX_OK) {
        return NGX_ERROR;
    }

    for (i = 0; i < n; i++) {
        hash = ngx_crc32_short(users[i].data, users[i].len);
        ps = (ngx_chat_psub_t *) ngx_str_rbtree_lookup(&ngx_chat_live.psubs,
                                                       &users[i], hash);

        if (ps == NULL) {
            ps = ngx_alloc(sizeof(ngx_chat_psub_t) + users[i].len, s->log);
            if (ps == NULL) {
                return NGX_ERROR;
            }

            ngx_chat_str_node_init(&ps->sn, (u_char *) &ps[1], &users[i]);
            ngx_queue_init(&ps->links);

            ngx_rbtree_insert(&ngx_chat_live.psubs, &ps->sn.node);
        }

        pl = ngx_alloc(sizeof(ngx_chat_plink_t), s->log);
        if (pl == NULL) {
            if (ngx_queue_empty(&ps->links)) {
                ngx_rbtree_delete(&ngx_chat_live.psubs, &ps->sn.node);
                ngx_free(ps);
            }

            return NGX_ERROR;
        }

        pl->psub = ps;
        pl->session = s;
        ngx_queue_insert_tail(&ps->links, &pl->queue);
        s->psubs[s->npsubs++] = pl;

        status = ngx_chat_live_status(&users[i]);

        if ((i && ngx_chat_buf_add_lit(out, ",") != NGX_OK)
            || ngx_chat_buf_add_lit(out, "{\"user\":") != NGX_OK
            || ngx_chat_buf_add_json_str(out, users[i].data, users[i].len)
               != NGX_OK
            || ngx_chat_buf_add_lit(out, ",\"status\":\"") != NGX_OK
            || ngx_chat_buf_add_str(out, &ngx_chat_presence_names[status])
               != NGX_OK
            || ngx_chat_buf_add_lit(out, "\",\"last_seen\":null}") != NGX_OK)
        {
            return NGX_ERROR;
        }
    }

    return ngx_chat_buf_add_lit(out, "]");
}


ngx_str_t *
ngx_chat_live_status_name(ngx_uint_t status)
{
    return &ngx_chat_presence_names[status];
}


/* online, away, or offline (also while nobody knows better) */

ngx_uint_t
ngx_chat_live_status(ngx_str_t *user)
{
    ngx_uint_t            status;
    ngx_slab_pool_t      *shpool;
    ngx_chat_presence_t  *u;

    shpool = ngx_chat_worker.shpool;

    ngx_shmtx_lock(&shpool->mutex);

    u = ngx_chat_live_user_locked(user);
    status = u ? u->status : NGX_CHAT_PRESENCE_NONE;

    ngx_shmtx_unlock(&shpool->mutex);

    return (status == NGX_CHAT_PRESENCE_NONE) ? NGX_CHAT_PRESENCE_OFFLINE
                                              : status;
}
