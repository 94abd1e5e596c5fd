
/*
 * Copyright (C) ngx_chat_module authors
 *
 * Receipts: each member's delivered and read positions per conversation
 * (chat_members.delivered_seq / read_seq), moved by acks, reads and
 * sends, and told to the other members as durable "receipt" events.
 *
 * No database write per ack or per delivery: a worker keeps the highest
 * position asked for per (conversation, user) in a table of its own and
 * writes the table once per chat_receipt_flush, in one transaction of two
 * steps like a send batch (sql/004_live_state.sql): step 1 moves the
 * positions and makes one receipt event per conversation where any moved;
 * the worker reserves positions for those events; step 2 inserts them and
 * commits.  One flush at a time per worker; what is marked meanwhile
 * waits for the next.  A flush that fails puts its items back.
 *
 * Acks.  A connection remembers the messages it is handed (conversation,
 * seq, gseq), in delivery order; an ack with a cursor marks delivered
 * every remembered message up to it and forgets them.  The memory is
 * bounded: NGX_CHAT_ACKS_FIRST messages until the client has acked once
 * (a client that never acks costs 100 bytes), NGX_CHAT_ACKS after; past
 * it the oldest is forgotten, and a later message of its conversation
 * marks it delivered with the next ack.
 *
 * Reads are cut to the conversation's last message as of when the read
 * came (the worker's bus position then): a read past the end cannot
 * mark a message that was committed after it.
 */


#include "ngx_chat_module.h"
#include "ngx_chat_db.h"
#include "ngx_chat_store.h"
#include "ngx_chat_bus.h"
#include "ngx_chat_transport.h"
#include "ngx_chat_session.h"
#include "ngx_chat_json.h"
#include "ngx_chat_receipts.h"


#define NGX_CHAT_RECEIPTS_BATCH   4096
#define NGX_CHAT_RECEIPTS_MAX     65536
#define NGX_CHAT_ACKS             128
#define NGX_CHAT_ACKS_FIRST       4


typedef struct {
    ngx_str_node_t             sn;               /* "<conv>:<user>" */
    ngx_queue_t                queue;            /* dirty, or in a flush */
    int64_t                    conv;
    ngx_str_t                  user;             /* in sn.str */
    int64_t                    delivered;
    int64_t                    read;
    uint64_t                   asof;             /* read cut as of this */
} ngx_chat_rcpt_t;


typedef struct {
    ngx_chat_query_t           stage;            /* step 1 */
    ngx_chat_query_t           events;           /* step 2 */
    ngx_queue_t                items;            /* of ngx_chat_rcpt_t */
    PGresult                  *res;              /* step 1's answer */
    ngx_chat_resv_t           *resv;
    uint64_t                   lo;
    int64_t                    key;
    ngx_uint_t                 n;                /* events */
    ngx_chat_buf_t             sql;
} ngx_chat_rflush_t;


typedef struct {
    int64_t                    conv;
    int64_t                    seq;
    uint64_t                   gseq;
} ngx_chat_ack_t;


typedef struct {
    ngx_rbtree_t               tree;
    ngx_rbtree_node_t          sentinel;
    ngx_queue_t                dirty;
    ngx_uint_t                 n;
    ngx_event_t                flush;
    ngx_chat_rflush_t         *busy;
    uint64_t                   flushes;
    uint64_t                   events;
} ngx_chat_receipts_t;


static ngx_chat_receipts_t  ngx_chat_receipts;


static void ngx_chat_receipts_flush_handler(ngx_event_t *ev);
static void ngx_chat_receipts_stage_done(ngx_chat_query_t *q, PGresult *res,
    ngx_int_t rc);
static void ngx_chat_receipts_step2(ngx_chat_rflush_t *f,
    ngx_chat_query_t *q, PGresult *res);
static void ngx_chat_receipts_events_done(ngx_chat_query_t *q,
    PGresult *res, ngx_int_t rc);
static void ngx_chat_receipts_end(ngx_chat_rflush_t *f, ngx_uint_t requeue);
static void ngx_chat_receipts_schedule(void);


ngx_int_t
ngx_chat_receipts_init_process(ngx_cycle_t *cycle)
{
    ngx_chat_receipts_t  *rt;

    rt = &ngx_chat_receipts;

    ngx_rbtree_init(&rt->tree, &rt->sentinel, ngx_str_rbtree_insert_value);
    ngx_queue_init(&rt->dirty);

    rt->flush.handler = ngx_chat_receipts_flush_handler;
    rt->flush.log = cycle->log;
    rt->flush.data = rt;
    rt->flush.cancelable = 1;

    return NGX_OK;
}


void
ngx_chat_receipts_exit_process(void)
{
    ngx_queue_t          *q;
    ngx_chat_rcpt_t      *r;
    ngx_chat_receipts_t  *rt;

    rt = &ngx_chat_receipts;

    if (rt->flush.timer_set) {
        ngx_del_timer(&rt->flush);
    }

    /* positions not yet written are lost with the process: acks resend */

    while (rt->dirty.next && !ngx_queue_empty(&rt->dirty)) {
        q = ngx_queue_head(&rt->dirty);
        r = ngx_queue_data(q, ngx_chat_rcpt_t, queue);
        ngx_queue_remove(q);
        ngx_rbtree_delete(&rt->tree, &r->sn.node);
        ngx_free(r);
    }

    rt->n = 0;
}


/*
 * Positions of user in conv, at least delivered and read (0: no change);
 * a read is cut to the last message as of position asof.  Members only:
 * the caller checked.
 */
void
ngx_chat_receipts_mark(int64_t conv, ngx_str_t *user, int64_t delivered,
    int64_t read, uint64_t asof)
{
    ngx_str_t             name;
    ngx_chat_rcpt_t      *r;
    ngx_chat_receipts_t  *rt;
    u_char                key[NGX_CHAT_CONV_KEY_LEN];

    rt = &ngx_chat_receipts;

    /* a read marks delivered too: in the store, once it is cut */
    if ((delivered <= 0 && read <= 0) || user->len > NGX_CHAT_MAX_ID_LEN) {
        return;
    }

    ngx_chat_conv_key(key, conv, user, &name);

    r = (ngx_chat_rcpt_t *) ngx_str_rbtree_lookup(&rt->tree, &name,
                                ngx_crc32_short(name.data, name.len));

    if (r == NULL) {
        if (rt->n >= NGX_CHAT_RECEIPTS_MAX) {
            /* the store is down for long: the client's next ack retries */
            return;
        }

        r = ngx_alloc(sizeof(ngx_chat_rcpt_t) + name.len, ngx_cycle->log);
        if (r == NULL) {
            return;
        }

        ngx_chat_str_node_init(&r->sn, (u_char *) &r[1], &name);
        r->user.data = r->sn.str.data + name.len - user->len;
        r->user.len = user->len;
        r->conv = conv;
        r->delivered = 0;
        r->read = 0;
        r->asof = 0;

        ngx_rbtree_insert(&rt->tree, &r->sn.node);
        ngx_queue_insert_tail(&rt->dirty, &r->queue);
        rt->n++;
    }

    r->delivered = ngx_max(r->delivered, delivered);

    if (read > r->read) {
        r->read = read;
        r->asof = ngx_max(r->asof, asof);
    }

    ngx_chat_receipts_schedule();
}


static void
ngx_chat_receipts_schedule(void)
{
    ngx_chat_receipts_t  *rt;

    rt = &ngx_chat_receipts;

    if (!rt->flush.timer_set && !rt->busy && !ngx_queue_empty(&rt->dirty)) {
        ngx_add_timer(&rt->flush, ngx_chat_worker.cmcf->receipt_flush);
    }
}


/* step 1 of a flush: the items leave the table for the flush */

static void
ngx_chat_receipts_flush_handler(ngx_event_t *ev)
{
    u_char               *p;
    ngx_uint_t            n, max;
    ngx_queue_t          *q;
    ngx_chat_buf_t        items;
    ngx_chat_rcpt_t      *r;
    ngx_chat_rflush_t    *f;
    ngx_chat_receipts_t  *rt;

    rt = &ngx_chat_receipts;

    if (rt->busy || ngx_queue_empty(&rt->dirty)) {
        return;
    }

    if (!ngx_chat_db_ready() || !ngx_chat_bus_can_reserve()) {
        ngx_add_timer(&rt->flush, ngx_max(ngx_chat_db_retry_after(),
                                  ngx_chat_worker.cmcf->receipt_flush));
        return;
    }

    f = ngx_calloc(sizeof(ngx_chat_rflush_t), ev->log);
    if (f == NULL) {
        ngx_add_timer(&rt->flush, ngx_chat_worker.cmcf->receipt_flush);
        return;
    }

    ngx_queue_init(&f->items);
    ngx_memzero(&items, sizeof(ngx_chat_buf_t));

    if (ngx_chat_buf_add_lit(&items, "[") != NGX_OK) {
        goto failed;
    }

    n = 0;

    /* its events (one per conversation at most) fit in half a chunk */
    max = ngx_min(NGX_CHAT_RECEIPTS_BATCH,
                  ngx_chat_worker.cmcf->gseq_chunk / 2);

    while (!ngx_queue_empty(&rt->dirty) && n < max) {
        q = ngx_queue_head(&rt->dirty);
        r = ngx_queue_data(q, ngx_chat_rcpt_t, queue);

        if (ngx_chat_buf_reserve(&items, 3 * NGX_INT64_LEN + 8) != NGX_OK) {
            goto failed;
        }

        p = ngx_sprintf(items.data + items.len, "%s[%L,", n ? "," : "",
                        r->conv);
        items.len = p - items.data;

        if (ngx_chat_buf_add_json_str(&items, r->user.data, r->user.len)
            != NGX_OK
            || ngx_chat_buf_reserve(&items, 3 * NGX_INT64_LEN + 8) != NGX_OK)
        {
            goto failed;
        }

        p = ngx_sprintf(items.data + items.len, ",%L,%L,%uL]", r->delivered,
                        r->read, r->asof);
        items.len = p - items.data;

        /* out of the table: marks from now on go to the next flush */
        ngx_queue_remove(q);
        ngx_rbtree_delete(&rt->tree, &r->sn.node);
        rt->n--;
        ngx_queue_insert_tail(&f->items, q);
        n++;
    }

    if (ngx_chat_buf_add_lit(&items, "]") != NGX_OK) {
        goto failed;
    }

    f->key = ngx_chat_random_key();

    if (ngx_chat_buf_reserve(&f->sql, 96) != NGX_OK) {
        goto failed;
    }

    f->sql.len = ngx_sprintf(f->sql.data,
                             "BEGIN;EXECUTE chat_receipt_stage(%L,%L,",
                             f->key, ngx_chat_bus_holder())
                 - f->sql.data;

    if (ngx_chat_db_literal(&f->sql, items.data, items.len) != NGX_OK
        || ngx_chat_buf_reserve(&f->sql, NGX_INT_T_LEN + 4) != NGX_OK)
    {
        goto failed;
    }

    p = ngx_sprintf(f->sql.data + f->sql.len, ",%ui)",
                    ngx_chat_worker.cmcf->receipt_max_members);
    *p++ = '\0';
    f->sql.len = p - f->sql.data;

    ngx_chat_buf_free(&items);

    f->stage.stmt = NGX_CHAT_STMT_RECEIPT_STAGE;
    f->stage.sql = (const char *) f->sql.data;
    f->stage.txn = 1;
    f->stage.handler = ngx_chat_receipts_stage_done;
    f->stage.data = f;

    rt->busy = f;

    if (ngx_chat_db_query(&f->stage) != NGX_OK) {
        ngx_chat_receipts_end(f, 1);
    }

    return;

failed:

    ngx_chat_buf_free(&items);
    ngx_chat_receipts_end(f, 1);
}


/*
 * Step 1 is back with one row per conversation whose positions moved
 * (its receipt event) and one per item it could not lock (to retry).
 */
static void
ngx_chat_receipts_stage_done(ngx_chat_query_t *q, PGresult *res,
    ngx_int_t rc)
{
    u_char             *p;
    ngx_str_t           user;
    ngx_int_t           i, rows;
    ngx_uint_t          quiet;
    ngx_chat_buf_t      ev;
    ngx_chat_rflush_t  *f;

    f = q->data;

    if (rc != NGX_OK) {
        ngx_chat_receipts_end(f, 1);
        return;
    }

    rows = PQntuples(res);
    f->n = 0;
    quiet = 0;

    for (i = 0; i < rows; i++) {
        if (!PQgetisnull(res, i, 1)) {
            f->n++;
            continue;
        }

        if (PQgetisnull(res, i, 2)) {
            /* a big conversation: stored, not announced */
            quiet++;
            continue;
        }

        /* held by a send about to commit: at the next flush */
        user.data = (u_char *) PQgetvalue(res, i, 2);
        user.len = PQgetlength(res, i, 2);

        ngx_chat_receipts_mark(ngx_atoof((u_char *) PQgetvalue(res, i, 0),
                                         PQgetlength(res, i, 0)),
                               &user,
                               ngx_atoof((u_char *) PQgetvalue(res, i, 3),
                                         PQgetlength(res, i, 3)),
                               ngx_atoof((u_char *) PQgetvalue(res, i, 4),
                                         PQgetlength(res, i, 4)),
                               ngx_atoof((u_char *) PQgetvalue(res, i, 5),
                                         PQgetlength(res, i, 5)));
    }

    if (f->n == 0) {
        if (quiet == 0) {
            /* nothing moved: the transaction is rolled back */
            ngx_chat_receipts_end(f, 0);
            return;
        }

        /* positions moved without events: no positions to take */
        f->sql.len = 0;

        if (ngx_chat_buf_add(&f->sql, "COMMIT", sizeof("COMMIT")) != NGX_OK) {
            ngx_chat_receipts_end(f, 1);
            return;
        }

        ngx_chat_receipts_step2(f, q, res);
        return;
    }

    if (ngx_chat_bus_reserve(f->n, f->key, &f->lo, &f->resv) != NGX_OK) {
        ngx_chat_receipts_end(f, 1);
        return;
    }

    ngx_memzero(&ev, sizeof(ngx_chat_buf_t));

    if (ngx_chat_buf_add_lit(&ev, "[") != NGX_OK) {
        goto failed;
    }

    for (i = 0; i < rows; i++) {
        if (PQgetisnull(res, i, 1)) {
            continue;
        }

        if (ngx_chat_buf_add(&ev, ev.len > 1 ? ",[" : "[", ev.len > 1 ? 2 : 1)
            != NGX_OK
            || ngx_chat_buf_add(&ev, PQgetvalue(res, i, 0),
                                PQgetlength(res, i, 0)) != NGX_OK
            || ngx_chat_buf_add_lit(&ev, ",") != NGX_OK
            || ngx_chat_buf_add_json_str(&ev, (u_char *) PQgetvalue(res, i, 1),
                                         PQgetlength(res, i, 1)) != NGX_OK
            || ngx_chat_buf_add_lit(&ev, "]") != NGX_OK)
        {
            goto failed;
        }
    }

    if (ngx_chat_buf_add_lit(&ev, "]") != NGX_OK) {
        goto failed;
    }

    f->sql.len = 0;

    if (ngx_chat_buf_reserve(&f->sql, 64) != NGX_OK) {
        goto failed;
    }

    p = ngx_sprintf(f->sql.data, "EXECUTE chat_receipt_events(%uL,", f->lo);
    f->sql.len = p - f->sql.data;

    if (ngx_chat_db_literal(&f->sql, ev.data, ev.len) != NGX_OK
        || ngx_chat_buf_add(&f->sql, ");COMMIT", sizeof(");COMMIT"))
           != NGX_OK)
    {
        goto failed;
    }

    ngx_chat_buf_free(&ev);

    ngx_chat_receipts_step2(f, q, res);

    return;

failed:

    ngx_chat_buf_free(&ev);
    ngx_chat_bus_void(f->resv, f->key);
    f->resv = NULL;
    ngx_chat_receipts_end(f, 1);
}


/* f->sql (the events, if any, and the COMMIT) on step 1's connection */

static void
ngx_chat_receipts_step2(ngx_chat_rflush_t *f, ngx_chat_query_t *q,
    PGresult *res)
{
    ngx_chat_db_keep_result();
    f->res = res;

    f->events.stmt = NGX_CHAT_STMT_RECEIPT_EVENTS;
    f->events.sql = (const char *) f->sql.data;
    f->events.handler = ngx_chat_receipts_events_done;
    f->events.data = f;

    ngx_chat_db_continue(&f->events, q->conn);
}


static void
ngx_chat_receipts_events_done(ngx_chat_query_t *q, PGresult *res,
    ngx_int_t rc)
{
    uint64_t            g;
    ngx_int_t           i, rows;
    ngx_chat_rflush_t  *f;

    f = q->data;

    if (f->n == 0) {
        /* a COMMIT of positions without events: nothing reserved */
        ngx_chat_receipts_end(f, rc != NGX_OK);
        return;
    }

    if (rc == NGX_OK) {
        g = f->lo;
        rows = PQntuples(f->res);

        for (i = 0; i < rows; i++) {
            if (PQgetisnull(f->res, i, 1)) {
                continue;
            }

            ngx_chat_bus_publish_reserved(f->resv, f->key, g++,
                ngx_atoof((u_char *) PQgetvalue(f->res, i, 0),
                          PQgetlength(f->res, i, 0)),
                (u_char *) PQgetvalue(f->res, i, 1),
                PQgetlength(f->res, i, 1));
        }

        ngx_chat_bus_release(f->resv, f->key);
        ngx_chat_bus_notify();

        ngx_chat_receipts.events += f->n;
        f->resv = NULL;
        ngx_chat_receipts_end(f, 0);
        return;
    }

    if (rc == NGX_DECLINED) {
        /* committed or not: the store says, once the lock is free */
        ngx_chat_bus_unknown(f->resv, f->key);

    } else {
        ngx_chat_bus_void(f->resv, f->key);
    }

    f->resv = NULL;

    /* marks are idempotent: moving them again is harmless */
    ngx_chat_receipts_end(f, 1);
}


static void
ngx_chat_receipts_end(ngx_chat_rflush_t *f, ngx_uint_t requeue)
{
    ngx_queue_t          *q;
    ngx_chat_rcpt_t      *r;
    ngx_chat_receipts_t  *rt;

    rt = &ngx_chat_receipts;

    if (rt->busy == f) {
        rt->busy = NULL;
    }

    rt->flushes++;

    if (requeue && !rt->flush.timer_set) {
        /* a failed flush is retried no sooner than the store allows */
        ngx_add_timer(&rt->flush, ngx_max(ngx_chat_db_retry_after(),
                                  ngx_chat_worker.cmcf->receipt_flush));
    }

    while (!ngx_queue_empty(&f->items)) {
        q = ngx_queue_head(&f->items);
        r = ngx_queue_data(q, ngx_chat_rcpt_t, queue);
        ngx_queue_remove(q);

        if (requeue) {
            ngx_chat_receipts_mark(r->conv, &r->user, r->delivered, r->read,
                                   r->asof);
        }

        ngx_free(r);
    }

    if (f->res) {
        PQclear(f->res);
    }

    ngx_chat_buf_free(&f->sql);
    ngx_free(f);

    if (!requeue && !ngx_queue_empty(&rt->dirty) && !rt->flush.timer_set
        && rt->n >= NGX_CHAT_RECEIPTS_BATCH)
    {
        /* a full batch and more waiting: the next one at once */
        ngx_add_timer(&rt->flush, 1);
        return;
    }

    ngx_chat_receipts_schedule();
}


/* acks: what a connection was handed, per conversation */

/*
 * A message.new event object starts {"kind":"message.new",
 * "conversation_id":"<id>","seq":<seq>, (chat_message_event_json()).
 */
static int64_t
ngx_chat_receipts_event_seq(ngx_chat_event_t *ev)
{
    u_char   *p, *end;
    int64_t   seq;

    if (ev->kind.len != 11
        || ngx_strncmp(ev->kind.data, "message.new", 11) != 0)
    {
        return 0;
    }

    p = ev->kind.data + 11;
    end = ev->payload.data + ngx_min(ev->payload.len, 128);

    p = ngx_strlcasestrn(p, end, (u_char *) "\"seq\":", 6 - 1);
    if (p == NULL) {
        return 0;
    }

    seq = 0;

    for (p += 6; p < end && *p >= '0' && *p <= '9'; p++) {
        if (seq >= NGX_MAX_OFF_T_VALUE / 10) {
            return 0;
        }

        seq = seq * 10 + (*p - '0');
    }

    return seq;
}


void
ngx_chat_receipts_delivered(ngx_chat_session_t *s, ngx_chat_event_t *ev)
{
    int64_t          seq;
    ngx_uint_t       i, k, cap;
    ngx_chat_ack_t  *a, *na;

    /* once per event, whatever the number of sessions it goes to */
    if (ev->seq == 0) {
        ev->seq = ngx_chat_receipts_event_seq(ev);

        if (ev->seq == 0) {
            ev->seq = -1;
        }
    }

    seq = ev->seq;

    if (seq <= 0) {
        return;
    }

    a = s->acks;
    cap = s->nalloc_acks;

    /* a client that has not acked yet gets the smallest ring */
    if (s->nacks == cap
        && cap < (s->acking ? NGX_CHAT_ACKS : NGX_CHAT_ACKS_FIRST))
    {
        /* grow, unrolling the ring */
        na = ngx_alloc((cap ? 2 * cap : NGX_CHAT_ACKS_FIRST)
                       * sizeof(ngx_chat_ack_t), s->log);
        if (na == NULL) {
            return;
        }

        for (i = 0; i < s->nacks; i++) {
            na[i] = a[(s->ack_head + i) % cap];
        }

        ngx_free(a);
        s->acks = na;
        s->ack_head = 0;
        s->nalloc_acks = cap ? 2 * cap : NGX_CHAT_ACKS_FIRST;
        a = na;
        cap = s->nalloc_acks;
    }

    if (s->nacks == cap) {
        /* full: the oldest is forgotten (a later message covers it) */
        s->ack_head = (s->ack_head + 1) % cap;
        s->nacks--;
    }

    k = (s->ack_head + s->nacks) % cap;

    a[k].conv = ev->conversation;
    a[k].seq = seq;
    a[k].gseq = ev->gseq;
    s->nacks++;
}


/* the client has everything up to gseq: in delivery order, a prefix */

void
ngx_chat_receipts_ack(ngx_chat_session_t *s, uint64_t gseq)
{
    ngx_chat_ack_t  *a;

    s->acking = 1;
    a = s->acks;

    while (s->nacks && a[s->ack_head].gseq <= gseq) {
        ngx_chat_receipts_mark(a[s->ack_head].conv, &s->user,
                               a[s->ack_head].seq, 0, 0);
        s->ack_head = (s->ack_head + 1) % s->nalloc_acks;
        s->nacks--;
    }
}


void
ngx_chat_receipts_free(ngx_chat_session_t *s)
{
    ngx_free(s->acks);
    s->acks = NULL;
    s->ack_head = 0;
    s->nacks = 0;
    s->nalloc_acks = 0;
}
