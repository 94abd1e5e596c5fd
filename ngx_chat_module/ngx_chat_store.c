
/*
 * Copyright (C) ngx_chat_module authors
 *
 * The SQL the module runs, and batched sends.
 *
 * Sends that arrive while batches are in flight wait in one queue and go
 * out together as one transaction of two steps, chat_send_stage() and
 * chat_send_events() (ngx_chat_bus.c says why two): one commit for many
 * messages.  Several batches may be in flight (one pool
 * connection is left for everything else), but a conversation is carried
 * by one batch at a time: its later sends wait, so the sends of one
 * connection are stored in the order they were made.  A conversation that somebody else holds locked comes back
 * "busy"; its sends wait in a deferred queue (newer sends to it queue up
 * behind them) and are retried on a timer, so one stalled conversation
 * never holds up the batch that carries everybody else.
 *
 * Sessions that join (load their memberships) are batched the same way:
 * a reconnect storm after a reload is one query per batch of users, not
 * one per connection.
 */


#include "ngx_chat_module.h"
#include "ngx_chat_db.h"
#include "ngx_chat_store.h"
#include "ngx_chat_metrics.h"
#include "ngx_chat_bus.h"
#include "ngx_chat_live.h"
#include "ngx_chat_json.h"
#include "ngx_chat_attach.h"


#define NGX_CHAT_RETRY_MIN     2
#define NGX_CHAT_RETRY_MAX     100
#define NGX_CHAT_PARALLEL_MIN  32
#define NGX_CHAT_PARALLEL_SLOW 20         /* ms */

/* user ids a send may mention */
#define NGX_CHAT_MAX_MENTIONS  50
#define NGX_CHAT_MAX_ATTACHMENTS  10


typedef struct {
    ngx_chat_query_t           query;            /* step 1 */
    ngx_chat_query_t           events;           /* step 2 and COMMIT */
    ngx_chat_send_t          **items;            /* NULL: answered */
    ngx_uint_t                 n;
    int64_t                   *convs;            /* carried, per item */
    ngx_uint_t                 ncarried;
    ngx_chat_buf_t             json;
    ngx_chat_buf_t             sql;

    int64_t                    key;              /* the transaction's lock */
    PGresult                  *stage;            /* step 1's answer */
    int                       *rows;             /* per item: its row */
    ngx_uint_t                 nok;
    uint64_t                   lo;               /* positions reserved */
    ngx_chat_resv_t           *resv;
} ngx_chat_batch_t;


typedef struct {
    ngx_chat_query_t           query;
    ngx_chat_join_t          **items;
    ngx_uint_t                 n;
    ngx_chat_buf_t             json;
    u_char                     max[NGX_INT_T_LEN + 1];
    u_char                     since[NGX_INT64_LEN + 1];
} ngx_chat_join_batch_t;


/* a conversation carried by a batch in flight, or with deferred sends */
typedef struct {
    ngx_rbtree_node_t          node;             /* key: conversation id */
    ngx_chat_batch_t          *owner;
    ngx_uint_t                 count;
} ngx_chat_carried_t;


/* a sender's sends waiting in this worker's store queue */
typedef struct {
    ngx_str_node_t             sn;
    ngx_uint_t                 count;
} ngx_chat_sender_t;


typedef struct {
    ngx_queue_t                pending;
    ngx_uint_t                 npending;
    ngx_queue_t                deferred;
    ngx_uint_t                 ndeferred;
    ngx_uint_t                 inflight;
    ngx_uint_t                 queued;           /* submitted, not built */
    ngx_rbtree_t               carried;
    ngx_rbtree_node_t          carried_sentinel;
    ngx_rbtree_t               held;             /* deferred convs */
    ngx_rbtree_node_t          held_sentinel;
    ngx_uint_t                 held_all;         /* the tree missed one */
    ngx_rbtree_t               senders;
    ngx_rbtree_node_t          senders_sentinel;
    ngx_msec_t                 retry_delay;
    ngx_msec_t                 sent_at;          /* the batch in flight */
    ngx_event_t                flush;
    ngx_event_t                retry;
    ngx_event_t                slow;

    ngx_queue_t                joins;
    ngx_uint_t                 njoins;
    ngx_uint_t                 join_queued;      /* submitted, not built */
    ngx_event_t                join_flush;
} ngx_chat_store_t;


static void ngx_chat_store_flush(ngx_event_t *ev);
static void ngx_chat_store_retry(ngx_event_t *ev);
static ngx_int_t ngx_chat_store_build(ngx_chat_query_t *q);
static ngx_int_t ngx_chat_store_add_item(ngx_chat_buf_t *b,
    ngx_chat_send_t *snd);
static ngx_int_t ngx_chat_store_stage_sql(ngx_chat_batch_t *b);
static void ngx_chat_store_stage_done(ngx_chat_query_t *q, PGresult *res,
    ngx_int_t rc);
static u_char *ngx_chat_store_column(u_char *p, ngx_chat_batch_t *b,
    PGresult *res, int col);
static void ngx_chat_store_events_done(ngx_chat_query_t *q, PGresult *res,
    ngx_int_t rc);
static void ngx_chat_store_batch_failed(ngx_chat_batch_t *b, PGresult *res,
    ngx_int_t rc);
static void ngx_chat_store_batch_end(ngx_chat_batch_t *b);
static void ngx_chat_store_defer(ngx_chat_send_t *snd);
static ngx_uint_t ngx_chat_store_deferred(int64_t conv);
static void ngx_chat_store_hold(ngx_chat_send_t *snd);
static ngx_int_t ngx_chat_store_sender(ngx_chat_send_t *snd, ngx_int_t inc);
static void ngx_chat_store_hold_pending(void);
static ngx_uint_t ngx_chat_store_in_batch(ngx_chat_batch_t *b,
    ngx_chat_send_t *snd);
static void ngx_chat_store_requeue(ngx_chat_batch_t *b);
static ngx_uint_t ngx_chat_store_transient(const char *state);
static ngx_chat_carried_t *ngx_chat_store_carried(int64_t conv);
static ngx_int_t ngx_chat_store_carry(ngx_chat_batch_t *b, int64_t conv);
static void ngx_chat_store_release(ngx_chat_batch_t *b);
static ngx_uint_t ngx_chat_store_max_inflight(void);
static ngx_uint_t ngx_chat_store_eligible(void);
static void ngx_chat_store_fail(ngx_chat_send_t *snd, const char *code,
    const char *msg, ngx_msec_t retry_after);
static void ngx_chat_store_finish(ngx_chat_send_t *snd);
static void ngx_chat_store_join_flush(ngx_event_t *ev);
static ngx_int_t ngx_chat_store_join_build(ngx_chat_query_t *q);
static void ngx_chat_store_join_done(ngx_chat_query_t *q, PGresult *res,
    ngx_int_t rc);
static void ngx_chat_store_join_finish(ngx_chat_join_t *j, ngx_int_t rc);


static ngx_chat_store_t  ngx_chat_store;


ngx_chat_stmt_t  ngx_chat_stmts[] = {

    /* a send batch's first step, run by EXECUTE inside a transaction */
    { "chat_send_stage",
      "SELECT o_idx, o_status, o_conv, o_id, o_message, o_event "
      "FROM chat_send_stage($1::bigint, $2::bigint, $3::jsonb)", 3 },

    { "chat_clock",
      "SELECT v, epoch, (SELECT coalesce(max(gseq), 0) FROM chat_events) "
      "FROM chat_clock", 0 },

    { "chat_events_after",
      "SELECT e.gseq, e.conversation_id, chat_event_payload(e) "
      "FROM chat_events e "
      "WHERE e.gseq > $1::bigint AND e.gseq <= $2::bigint "
      "ORDER BY e.gseq LIMIT 512", 2 },

    /* one row per user, in order; one snapshot for all of them */
    /* contacts: conversations of at most $2 members, for presence */
    /*
     * Each user's memberships as "id", "id@from" (added at gseq from) and,
     * for the ones that ended where the ring still holds events,
     * "id@from-until" (sql/006_members.sql); "^left" after a current one
     * whose earlier span ended there.
     */
    { "chat_memberships",
      "SELECT coalesce((SELECT string_agg(x.t, ',' ORDER BY x.c) FROM ("
      "SELECT m.conversation_id AS c, m.conversation_id::text "
      "|| CASE WHEN m.joined_gseq > 0 THEN '@' || m.joined_gseq "
      "ELSE '' END || coalesce('^' || (SELECT max(o.left_gseq) "
      "FROM chat_member_spans o WHERE o.user_id = u.u "
      "AND o.left_gseq > $3::bigint "
      "AND o.conversation_id = m.conversation_id), '') AS t "
      "FROM chat_members m WHERE m.user_id = u.u "
      "UNION ALL SELECT p.conversation_id, p.conversation_id::text "
      "|| '@' || p.joined_gseq || '-' || p.left_gseq "
      "FROM chat_member_spans p WHERE p.user_id = u.u "
      "AND p.left_gseq > $3::bigint AND NOT EXISTS (SELECT 1 "
      "FROM chat_members n WHERE n.conversation_id = p.conversation_id "
      "AND n.user_id = p.user_id)) x), ''), "
      "(SELECT coalesce(max(gseq), 0) FROM chat_events), "
      "coalesce((SELECT string_agg(m.conversation_id::text, ',' "
      "ORDER BY m.conversation_id) "
      "FROM chat_members m CROSS JOIN LATERAL (SELECT c.member_count "
      "FROM chat_conversations c WHERE c.id = m.conversation_id LIMIT 1) c "
      "WHERE m.user_id = u.u AND c.member_count <= $2::int), '') "
      /* the users it blocks: their typing and presence are not shown */
      ", coalesce((SELECT string_agg(b.blocked, E'\\n' "
      "ORDER BY b.blocked) FROM chat_blocks b WHERE b.blocker = u.u), '') "
      "FROM jsonb_array_elements_text($1::jsonb) WITH ORDINALITY "
      "AS u (u, ord) ORDER BY u.ord", 3 },

    /*
     * A page of a user's events after a cursor, a merge over the user's
     * memberships by the (conversation_id, gseq) index in two steps.
     * First each membership's first event after the cursor (one probe
     * each); b, the $3-th smallest of those, bounds the page: its $3
     * smallest events are all <= b, and only the $3 conversations whose
     * first event is <= b can hold any (b is NULL when fewer have
     * events).  Then those conversations' events up to b, the first $3,
     * cut where they pass $4 bytes (at least one).  n is the page before
     * the cut: a page with n < $3 and all n rows saw everything.
     */
    { "chat_catchup",
      "WITH s AS (SELECT m.conversation_id AS c, "
      "greatest($2::bigint, m.joined_gseq - 1) AS lo, $5::bigint AS hi "
      "FROM chat_members m WHERE m.user_id = $1 "
      "UNION ALL SELECT p.conversation_id, "
      "greatest($2::bigint, p.joined_gseq - 1), "
      "least($5::bigint, p.left_gseq) "
      "FROM chat_member_spans p WHERE p.user_id = $1 "
      "AND p.left_gseq > $2::bigint), "
      "f AS (SELECT s.c, s.lo, s.hi, y.gseq AS g "
      "FROM s CROSS JOIN LATERAL ("
      "SELECT e.gseq FROM chat_events e "
      "WHERE e.conversation_id = s.c "
      "AND e.gseq > s.lo AND e.gseq <= s.hi "
      "ORDER BY e.gseq LIMIT 1) y "
      "ORDER BY y.gseq LIMIT $3::int), "
      "b AS (SELECT CASE WHEN count(*) < $3::int THEN NULL "
      "ELSE max(g) END AS b FROM f) "
      "SELECT t.gseq, t.conversation_id, t.payload, t.n FROM ("
      "SELECT u.gseq, u.conversation_id, u.payload, u.n, "
      "sum(octet_length(u.payload)) OVER (ORDER BY u.gseq ROWS "
      "UNBOUNDED PRECEDING) - octet_length(u.payload) AS before "
      "FROM (SELECT e.gseq, e.conversation_id, "
      "chat_event_payload(e) AS payload, p.n "
      "FROM (SELECT x.gseq, count(*) OVER () AS n FROM ("
      "SELECT y.gseq FROM f CROSS JOIN b CROSS JOIN LATERAL ("
      "SELECT e.gseq FROM chat_events e WHERE e.conversation_id = f.c "
      "AND e.gseq > f.lo AND e.gseq <= f.hi "
      "AND (b.b IS NULL OR e.gseq <= b.b) "
      "ORDER BY e.gseq LIMIT $3::int) y "
      "ORDER BY y.gseq LIMIT $3::int) x) p "
      "JOIN chat_events e ON e.gseq = p.gseq) u) t "
      "WHERE t.before < $4::bigint ORDER BY t.gseq", 5 },

    /* a new conversation's first step, run by EXECUTE */
    { "chat_create_stage",
      "SELECT o_created, o_conv, o_json, o_event "
      "FROM chat_create_stage($1::bigint, $2::bigint, $3, $4, "
      "ARRAY(SELECT jsonb_array_elements_text($5::jsonb)), $6, $7::jsonb)",
      7 },
    { "chat_list_conversations",
      "SELECT chat_list_conversations($1, $2::bigint, $3::bigint, $4::int)",
      4 },

    { "chat_get_conversation",
      "SELECT chat_conversation_detail(c.id, $2), $3::boolean OR EXISTS "
      "(SELECT 1 FROM chat_members m WHERE m.conversation_id = c.id "
      "AND m.user_id = $2) FROM chat_conversations c "
      "WHERE c.id = $1::bigint", 3 },

    { "chat_history",
      "SELECT chat_history($1, $2::boolean, $3::bigint, $4::bigint, "
      "$5::bigint, $6::int)", 6 },

    /* a send batch's second step, run by EXECUTE before its COMMIT */
    /* (the statement itself: a SQL function around it costs 50-70 us) */
    { "chat_send_events",
      "INSERT INTO chat_events (gseq, conversation_id, kind, message_id) "
      "SELECT $1::bigint + u.ord - 1, u.c, 'message.new', u.i "
      "FROM unnest($2::bigint[], $3::bigint[]) WITH ORDINALITY AS u (c, i, ord)",
      3 },

    /* its second step, run by EXECUTE before its COMMIT */
    { "chat_create_event",
      "SELECT chat_create_event($1::bigint, $2::bigint)", 2 },

    { "chat_clock_start",
      "SELECT o_v, o_epoch, o_top "
      "FROM chat_clock_start($1::bigint, $2::boolean)", 2 },

    /* a chunk of positions: one short lock of the clock row per chunk */
    { "chat_clock_raise",
      "UPDATE chat_clock SET v = v + $1::bigint "
      "RETURNING v - $1::bigint + 1, v", 1 },

    { "chat_settle",
      "SELECT o_gseq, o_conv, o_payload "
      "FROM chat_settle($1::bigint, $2::bigint, $3::bigint)", 3 },

    { "chat_last_seen",
      "INSERT INTO chat_presence (user_id, last_seen) "
      "VALUES ($1, to_timestamp($2::bigint / 1000.0)) "
      "ON CONFLICT (user_id) DO UPDATE SET last_seen = "
      "greatest(chat_presence.last_seen, excluded.last_seen)", 2 },

    /* one row per user asked for, in order, but those the asker blocks */
    { "chat_presence",
      "SELECT u.u, chat_ts(p.last_seen) "
      "FROM jsonb_array_elements_text($1::jsonb) WITH ORDINALITY "
      "AS u (u, ord) LEFT JOIN chat_presence p ON p.user_id = u.u "
      "WHERE NOT EXISTS (SELECT 1 FROM chat_blocks b "
      "WHERE b.blocker = $2 AND b.blocked = u.u) "
      "ORDER BY u.ord", 2 },

    /* a receipt flush's two steps, run by EXECUTE in its transaction */
    { "chat_receipt_stage",
      "SELECT o_conv, o_event, o_user, o_delivered, o_read, o_asof "
      "FROM chat_receipt_stage($1::bigint, $2::bigint, $3::jsonb, $4::int)",
      4 },
    { "chat_receipt_events",
      "SELECT chat_receipt_events($1::bigint, $2::jsonb)", 2 },

    { "chat_unread_total",
      "SELECT chat_unread_total($1)", 1 },

    /* does the conversation exist, is the user a member */
    { "chat_member",
      "SELECT EXISTS (SELECT 1 FROM chat_conversations c "
      "WHERE c.id = $1::bigint), EXISTS (SELECT 1 FROM chat_members m "
      "WHERE m.conversation_id = $1::bigint AND m.user_id = $2)", 2 },

    /* the notification outbox (chat_notify_sweep() in sql/004) */
    { "chat_notify_sweep",
      "SELECT chat_notify_sweep($1::bigint, $2::bigint, $3::bigint)", 3 },
    { "chat_notifications",
      "SELECT chat_notifications_page($1::bigint, $2::int)", 2 },
    { "chat_notify_ack",
      "WITH d AS (DELETE FROM chat_notifications WHERE id <= $1::bigint "
      "RETURNING 1) SELECT count(*) FROM d", 1 },

    /* a member's settings; no row: not a member (or no conversation) */
    { "chat_mute",
      "UPDATE chat_members SET muted = $3::boolean "
      "WHERE conversation_id = $1::bigint AND user_id = $2 "
      "RETURNING muted", 3 },

    /* an operation on a message, its two steps, run by EXECUTE */
    { "chat_op_stage",
      "SELECT o_status, o_http, o_message, o_conv, o_result, o_event "
      "FROM chat_op_stage($1::bigint, $2::bigint, $3, $4, $5::boolean, "
      "$6::jsonb)", 6 },
    { "chat_op_event",
      "SELECT chat_op_event($1::bigint, $2::bigint)", 2 },

    /* in the order of the NGX_CHAT_STMT_* numbers */
    { "chat_replies",
      "SELECT chat_replies($1, $2::boolean, $3::bigint, $4::bigint, "
      "$5::bigint, $6::int)", 6 },

    { "chat_search",
      "SELECT chat_search($1, $2::boolean, $3::regconfig, $4, $5::bigint, "
      "$6::bigint, $7::int, $8::boolean)", 8 },

    /* blocks, reports, erasing a user (sql/008_safety.sql) */
    { "chat_call",
      "SELECT o_http, o_body FROM chat_call($1, $2, $3::boolean, $4::jsonb)",
      4 },

    /* attachments (sql/008_safety.sql) */
    { "chat_attachment_add",
      "SELECT chat_attachment_add($1, $2, $3, $4, $5::bigint, $6, $7)", 7 },
    { "chat_attachment_get",
      "SELECT o_http, o_name, o_mime "
      "FROM chat_attachment_get($1, $2::boolean, $3)", 3 },
    { "chat_attachments_sweep",
      "SELECT chat_attachments_sweep($1::bigint, $2::int)", 2 },

    /* a page without JavaScript (ngx_chat_html.c) */
    { "chat_page",
      "SELECT chat_page($1, $2::bigint, $3::bigint, $4::int)", 4 },

    { NULL, NULL, 0 }
};


ngx_chat_query_t *
ngx_chat_query_alloc(ngx_uint_t stmt, size_t extra)
{
    ngx_chat_query_t  *q;

    q = ngx_calloc(sizeof(ngx_chat_query_t) + extra, ngx_chat_worker.log);
    if (q == NULL) {
        return NULL;
    }

    q->stmt = stmt;
    q->nparams = ngx_chat_stmts[stmt].nparams;

    return q;
}


void
ngx_chat_query_free(ngx_chat_query_t *q)
{
    ngx_free(q);
}


void
ngx_chat_store_on_ready(void)
{
    ngx_chat_store_t  *st;

    st = &ngx_chat_store;

    ngx_chat_bus_on_db_ready();

    if (st->flush.handler && st->npending && !st->flush.posted)
    {
        ngx_post_event(&st->flush, &ngx_posted_events);
    }
}


ngx_chat_send_t *
ngx_chat_store_send_alloc(size_t extra)
{
    ngx_chat_send_t  *snd;

    snd = ngx_calloc(sizeof(ngx_chat_send_t) + extra, ngx_chat_worker.log);
    if (snd == NULL) {
        return NULL;
    }

    snd->mem = (u_char *) &snd[1];

    return snd;
}


/*
 * Validates a send request -- a WebSocket "send" or a REST body, one set of
 * rules for both -- and makes the store item with copies of its fields.
 * conv 0 takes "conversation_id" from the request.  extra bytes are left
 * at snd->req_id for the caller.  NULL: *code and *msg say why.
 */
ngx_chat_send_t *
ngx_chat_store_send_from_json(json_t *root, ngx_str_t *sender, int64_t conv,
    size_t extra, const char **code, const char **msg)
{
    char             *mentions, *atts;
    size_t            i, mlen, alen;
    u_char           *p;
    json_t           *a, *m;
    int64_t           reply_to;
    ngx_str_t         cmid, body, format;
    ngx_chat_send_t  *snd;

    *code = "bad_request";

    if (conv == 0
        && ngx_chat_json_id(root, "conversation_id", &conv, 1) != NGX_OK)
    {
        *msg = "\"conversation_id\" must be an id string";
        return NULL;
    }

    if (ngx_chat_json_str(root, "client_msg_id", &cmid, 128, 1) != NGX_OK) {
        *msg = "\"client_msg_id\" must be a string of 1 to 128 bytes";
        return NULL;
    }

    if (ngx_chat_json_str(root, "body", &body,
                          ngx_chat_worker.cmcf->max_message, 0)
        == NGX_ERROR
        || body.data == NULL)
    {
        *msg = "\"body\" must be a string";
        return NULL;
    }

    if (ngx_chat_json_str(root, "format", &format, 16, 0) == NGX_ERROR
        || (format.len
            && !(format.len == 4 && ngx_strncmp(format.data, "text", 4) == 0)
            && !(format.len == 8
                 && ngx_strncmp(format.data, "markdown", 8) == 0)))
    {
        *msg = "\"format\" must be \"text\" or \"markdown\"";
        return NULL;
    }

    reply_to = 0;

    if (ngx_chat_json_id(root, "reply_to", &reply_to, 0) == NGX_ERROR) {
        *msg = "\"reply_to\" must be a message id string";
        return NULL;
    }

    /*
     * Attachments are ids of the sender's uploads; the store puts their
     * metadata in the message (never client JSON).
     */
    a = json_object_get(root, "attachments");
    atts = NULL;

    if (a && !json_is_null(a)) {
        if (!json_is_array(a)
            || json_array_size(a) > NGX_CHAT_MAX_ATTACHMENTS)
        {
            *msg = "\"attachments\" must be an array of at most 10 "
                   "attachment ids";
            return NULL;
        }

        json_array_foreach(a, i, m) {
            if (!json_is_string(m)
                || ngx_chat_attach_valid_id((u_char *) json_string_value(m),
                                            json_string_length(m))
                   != NGX_OK)
            {
                *msg = "\"attachments\" must be an array of at most 10 "
                       "attachment ids";
                return NULL;
            }
        }

        if (json_array_size(a)) {
            atts = json_dumps(a, JSON_COMPACT);
            if (atts == NULL) {
                *code = "internal";
                *msg = "no memory";
                return NULL;
            }
        }
    }

    /* user ids; kept by the store when they name other members */
    a = json_object_get(root, "mentions");
    mentions = NULL;

    if (a && !json_is_null(a)) {
        if (!json_is_array(a) || json_array_size(a) > NGX_CHAT_MAX_MENTIONS) {
            *msg = "\"mentions\" must be an array of at most 50 user ids";
            return NULL;
        }

        for (i = 0; i < json_array_size(a); i++) {
            m = json_array_get(a, i);

            if (!json_is_string(m)
                || ngx_chat_valid_user_id((u_char *) json_string_value(m),
                                          json_string_length(m))
                   != NGX_OK)
            {
                *msg = "\"mentions\" must be an array of user ids";
                return NULL;
            }
        }

        if (json_array_size(a)) {
            mentions = json_dumps(a, JSON_COMPACT);
            if (mentions == NULL) {
                free(atts);
                *code = "internal";
                *msg = "out of memory";
                return NULL;
            }
        }
    }

    mlen = mentions ? ngx_strlen(mentions) : 0;
    alen = atts ? ngx_strlen(atts) : 0;

    snd = ngx_chat_store_send_alloc(sender->len + cmid.len + body.len
                                    + format.len + mlen + alen + extra);
    if (snd == NULL) {
        free(mentions);
        free(atts);
        *code = "internal";
        *msg = "out of memory";
        return NULL;
    }

    p = snd->mem;

    if (mentions) {
        snd->mentions.data = p;
        snd->mentions.len = mlen;
        p = ngx_cpymem(p, mentions, mlen);
        free(mentions);
    }

    if (atts) {
        snd->attachments.data = p;
        snd->attachments.len = alen;
        p = ngx_cpymem(p, atts, alen);
        free(atts);
    }

    snd->sender.data = p;
    snd->sender.len = sender->len;
    p = ngx_cpymem(p, sender->data, sender->len);

    snd->client_msg_id.data = p;
    snd->client_msg_id.len = cmid.len;
    p = ngx_cpymem(p, cmid.data, cmid.len);

    snd->body.data = p;
    snd->body.len = body.len;
    p = ngx_cpymem(p, body.data, body.len);

    snd->format.data = p;
    snd->format.len = format.len;
    p = ngx_cpymem(p, format.data, format.len);

    snd->req_id = p;
    snd->conversation = conv;
    snd->reply_to = reply_to;

    return snd;
}


/*
 * NGX_OK: the handler will be called.  NGX_DECLINED: the store cannot take
 * it now (unavailable, or the queue is full); NGX_BUSY: the sender has
 * its share of the queue waiting already.  Either way the caller answers
 * at once and still owns snd.
 */
ngx_int_t
ngx_chat_store_send(ngx_chat_send_t *snd)
{
    ngx_chat_store_t  *st;

    st = &ngx_chat_store;

    if (st->flush.handler == NULL) {
        ngx_queue_init(&st->pending);
        ngx_queue_init(&st->deferred);

        /* data must not be NULL: nginx's debug log reads through it */
        st->flush.handler = ngx_chat_store_flush;
        st->flush.log = ngx_chat_worker.log;
        st->flush.data = st;
        st->retry.handler = ngx_chat_store_retry;
        st->retry.log = ngx_chat_worker.log;
        st->retry.data = st;
        st->retry.cancelable = 1;
        st->slow.handler = ngx_chat_store_flush;
        st->slow.log = ngx_chat_worker.log;
        st->slow.data = st;
        st->slow.cancelable = 1;

        ngx_rbtree_init(&st->carried, &st->carried_sentinel,
                        ngx_rbtree_insert_value);
        ngx_rbtree_init(&st->held, &st->held_sentinel,
                        ngx_rbtree_insert_value);
        ngx_rbtree_init(&st->senders, &st->senders_sentinel,
                        ngx_str_rbtree_insert_value);
    }

    if (!ngx_chat_db_ready()
        || st->npending + st->ndeferred >= ngx_chat_worker.cmcf->db_queue_size)
    {
        return NGX_DECLINED;
    }

    /* no sender takes more than its share of the queue */

    switch (ngx_chat_store_sender(snd, 1)) {

    case NGX_OK:
        break;

    case NGX_BUSY:
        return NGX_BUSY;

    default:
        return NGX_DECLINED;
    }

    snd->start = ngx_current_msec;
    snd->deadline = ngx_current_msec
                    + ngx_chat_worker.cmcf->db_statement_timeout;

    if (st->ndeferred && ngx_chat_store_deferred(snd->conversation)) {
        /* keep the order of sends to a conversation that is held */
        ngx_chat_store_hold(snd);
        return NGX_OK;
    }

    ngx_queue_insert_tail(&st->pending, &snd->queue);
    st->npending++;

    if (!st->flush.posted) {
        ngx_post_event(&st->flush, &ngx_posted_events);
    }

    return NGX_OK;
}


static void
ngx_chat_store_flush(ngx_event_t *ev)
{
    ngx_msec_int_t     left;
    ngx_chat_batch_t  *b;
    ngx_chat_store_t  *st;

    st = &ngx_chat_store;

    if (st->queued || st->npending == 0 || !ngx_chat_store_eligible()) {
        return;
    }

    /* no positions to be had yet: the bus calls back when there are */
    if (!ngx_chat_bus_can_reserve()) {
        return;
    }

    if (st->inflight >= ngx_chat_store_max_inflight()) {

        /* a slow batch must not hold up the sends behind it for long */
        left = (ngx_msec_int_t) (st->sent_at + NGX_CHAT_PARALLEL_SLOW
                                 - ngx_current_msec);

        if (st->inflight == 1 && left >= 0 && !st->slow.timer_set
            && ngx_chat_worker.cmcf->db_pool_size > 2)
        {
            ngx_add_timer(&st->slow, (ngx_msec_t) left + 1);
        }

        return;
    }

    b = ngx_calloc(sizeof(ngx_chat_batch_t), ngx_chat_worker.log);
    if (b == NULL) {
        return;
    }

    b->query.stmt = NGX_CHAT_STMT_SEND_STAGE;
    b->query.build = ngx_chat_store_build;
    b->query.handler = ngx_chat_store_stage_done;
    b->query.data = b;
    b->query.txn = 1;

    if (ngx_chat_db_query(&b->query) != NGX_OK) {
        ngx_free(b);

        /* the store went away: answer everything that waits */
        while (st->npending) {
            ngx_chat_store_fail(ngx_queue_data(ngx_queue_head(&st->pending),
                                               ngx_chat_send_t, queue),
                                "unavailable", "the store is unavailable",
                                ngx_chat_db_retry_after());
        }

        return;
    }

    st->inflight++;
    st->queued = 1;
}


/* runs when a pool connection takes the batch: take all that waits now */

static ngx_int_t
ngx_chat_store_build(ngx_chat_query_t *q)
{
    ngx_uint_t           max;
    ngx_queue_t         *qq, *next;
    ngx_chat_batch_t    *b;
    ngx_chat_store_t    *st;
    ngx_chat_send_t     *snd;
    ngx_chat_carried_t  *carried;

    b = q->data;
    st = &ngx_chat_store;
    st->queued = 0;

    if (st->inflight == 1) {
        /* the only batch in flight: the one a slow statement would hold */
        st->sent_at = ngx_current_msec;
    }

    max = ngx_min(st->npending, ngx_chat_worker.cmcf->db_batch_size);

    if (max == 0) {
        return NGX_ERROR;
    }

    b->items = ngx_alloc(max * (sizeof(ngx_chat_send_t *) + sizeof(int64_t)),
                         ngx_chat_worker.log);
    if (b->items == NULL) {
        return NGX_ERROR;
    }

    b->convs = (int64_t *) &b->items[max];

    if (ngx_chat_buf_add_lit(&b->json, "[") != NGX_OK) {
        return NGX_ERROR;
    }

    for (qq = ngx_queue_head(&st->pending);
         qq != ngx_queue_sentinel(&st->pending) && b->n < max;
         qq = next)
    {
        next = ngx_queue_next(qq);
        snd = ngx_queue_data(qq, ngx_chat_send_t, queue);

        /*
         * A retry that races its original goes into the next batch,
         * where the store finds the first one and answers "dup".
         */
        if (ngx_chat_store_in_batch(b, snd)) {
            continue;
        }

        /* another batch carries this conversation: wait for it */
        carried = ngx_chat_store_carried(snd->conversation);

        if (carried && carried->owner != b) {
            continue;
        }

        /*
         * A send of a batch that failed goes on its own, in its turn:
         * nothing behind it (a later send to its conversation) may go
         * before it.
         */
        if (snd->alone && b->n) {
            break;
        }

        if (b->n && ngx_chat_buf_add_lit(&b->json, ",") != NGX_OK) {
            return NGX_ERROR;
        }

        if (ngx_chat_store_add_item(&b->json, snd) != NGX_OK) {
            return NGX_ERROR;
        }

        ngx_queue_remove(qq);
        qq->next = NULL;
        st->npending--;
        b->items[b->n++] = snd;

        if (ngx_chat_store_carry(b, snd->conversation) != NGX_OK) {
            return NGX_ERROR;
        }

        b->convs[b->ncarried++] = snd->conversation;

        if (snd->alone) {
            break;
        }
    }

    /* what this batch could not take may go out in another one */
    if (st->npending && !st->flush.posted) {
        ngx_post_event(&st->flush, &ngx_posted_events);
    }

    if (b->n == 0) {
        return NGX_ERROR;
    }

    if (ngx_chat_buf_add_lit(&b->json, "]") != NGX_OK) {
        return NGX_ERROR;
    }

    return ngx_chat_store_stage_sql(b);
}


/* BEGIN; EXECUTE chat_send_stage(key, holder, $tag$[...]$tag$) */

static ngx_int_t
ngx_chat_store_stage_sql(ngx_chat_batch_t *b)
{
    u_char  *p;

    b->key = ngx_chat_random_key();
    b->sql.len = 0;

    if (ngx_chat_buf_reserve(&b->sql, b->json.len + 128) != NGX_OK) {
        return NGX_ERROR;
    }

    p = ngx_sprintf(b->sql.data, "BEGIN;EXECUTE chat_send_stage(%L,%L,",
                    b->key, ngx_chat_bus_holder());
    b->sql.len = p - b->sql.data;

    if (ngx_chat_db_literal(&b->sql, b->json.data, b->json.len) != NGX_OK
        || ngx_chat_buf_add(&b->sql, ")", 2) != NGX_OK)
    {
        return NGX_ERROR;
    }

    b->query.sql = (const char *) b->sql.data;

    return NGX_OK;
}


static ngx_int_t
ngx_chat_store_add_item(ngx_chat_buf_t *b, ngx_chat_send_t *snd)
{
    if (ngx_chat_buf_add_lit(b, "{\"sender\":") != NGX_OK
        || ngx_chat_buf_add_json_str(b, snd->sender.data, snd->sender.len)
           != NGX_OK
        || ngx_chat_buf_add_lit(b, ",\"conversation_id\":\"") != NGX_OK
        || ngx_chat_buf_add_uint(b, snd->conversation) != NGX_OK
        || ngx_chat_buf_add_lit(b, "\",\"client_msg_id\":") != NGX_OK
        || ngx_chat_buf_add_json_str(b, snd->client_msg_id.data,
                                     snd->client_msg_id.len) != NGX_OK
        || ngx_chat_buf_add_lit(b, ",\"body\":") != NGX_OK
        || ngx_chat_buf_add_json_str(b, snd->body.data, snd->body.len)
           != NGX_OK)
    {
        return NGX_ERROR;
    }

    if (snd->format.len
        && (ngx_chat_buf_add_lit(b, ",\"format\":") != NGX_OK
            || ngx_chat_buf_add_json_str(b, snd->format.data,
                                         snd->format.len) != NGX_OK))
    {
        return NGX_ERROR;
    }

    if (snd->reply_to
        && (ngx_chat_buf_add_lit(b, ",\"reply_to\":\"") != NGX_OK
            || ngx_chat_buf_add_uint(b, snd->reply_to) != NGX_OK
            || ngx_chat_buf_add_lit(b, "\"") != NGX_OK))
    {
        return NGX_ERROR;
    }

    if (snd->attachments.len
        && (ngx_chat_buf_add_lit(b, ",\"attachments\":") != NGX_OK
            || ngx_chat_buf_add_str(b, &snd->attachments) != NGX_OK))
    {
        return NGX_ERROR;
    }

    if (snd->mentions.len
        && (ngx_chat_buf_add_lit(b, ",\"mentions\":") != NGX_OK
            || ngx_chat_buf_add_str(b, &snd->mentions) != NGX_OK))
    {
        return NGX_ERROR;
    }

    return ngx_chat_buf_add_lit(b, "}");
}


/*
 * Step 1 is back, in a transaction still open: answer what was not
 * stored, reserve positions for what was, and send step 2 and the COMMIT.
 */
static void
ngx_chat_store_stage_done(ngx_chat_query_t *q, PGresult *res, ngx_int_t rc)
{
    int                i, n, *rows;
    char              *status;
    u_char            *p;
    ngx_int_t          rrc;
    ngx_uint_t         idx;
    ngx_chat_batch_t  *b;
    ngx_chat_store_t  *st;
    ngx_chat_send_t   *snd;

    b = q->data;
    st = &ngx_chat_store;

    if (b->n == 0) {
        /* never built: the query was failed before a connection took it */
        st->queued = 0;
    }

    if (rc != NGX_OK) {
        ngx_chat_store_batch_failed(b, res, rc);
        ngx_chat_store_batch_end(b);
        return;
    }

    rows = ngx_alloc(b->n * sizeof(int), ngx_chat_worker.log);
    if (rows == NULL) {
        ngx_chat_store_batch_failed(b, NULL, NGX_DECLINED);
        ngx_chat_store_batch_end(b);
        return;
    }

    for (idx = 0; idx < b->n; idx++) {
        rows[idx] = -1;
    }

    b->rows = rows;
    n = PQntuples(res);

    for (i = 0; i < n; i++) {
        idx = ngx_atoi((u_char *) PQgetvalue(res, i, 0),
                       PQgetlength(res, i, 0));

        if (idx == (ngx_uint_t) NGX_ERROR || idx < 1 || idx > b->n
            || b->items[idx - 1] == NULL)
        {
            continue;
        }

        snd = b->items[idx - 1];
        status = PQgetvalue(res, i, 1);

        if (ngx_strcmp(status, "ok") == 0) {
            /* stays in b->items until step 2 has committed */
            rows[idx - 1] = i;
            b->nok++;
            continue;
        }

        b->items[idx - 1] = NULL;

        if (ngx_strcmp(status, "busy") == 0) {
            if ((ngx_msec_int_t) (ngx_current_msec - snd->deadline) < 0) {
                ngx_chat_store_defer(snd);
                continue;
            }

            ngx_chat_store_fail(snd, "unavailable",
                                "the conversation is busy", 1000);
            continue;

        } else if (ngx_strcmp(status, "dup") != 0) {

            if (ngx_strcmp(status, "forbidden") == 0) {
                ngx_chat_store_fail(snd, "forbidden",
                                    "not a member of the conversation", 0);

            } else if (ngx_strcmp(status, "not_found") == 0) {
                ngx_chat_store_fail(snd, "not_found",
                                    "no such conversation", 0);

            } else if (ngx_strcmp(status, "archived") == 0) {
                ngx_chat_store_fail(snd, "archived",
                                    "the conversation is archived "
                                    "(read-only)", 0);

            } else if (ngx_strcmp(status, "bad_attachment") == 0) {
                ngx_chat_store_fail(snd, "bad_request",
                                    "an attachment is not an upload of the "
                                    "sender's for this conversation", 0);

            } else if (ngx_strcmp(status, "blocked") == 0) {
                ngx_chat_store_fail(snd, "blocked",
                                    "the other member does not take "
                                    "messages from this user", 0);

            } else if (ngx_strcmp(status, "conflict") == 0) {
                ngx_chat_store_fail(snd, "conflict",
                                    "client_msg_id was used for another "
                                    "conversation", 0);

            } else {
                ngx_chat_store_fail(snd, "bad_request",
                                    "reply_to is not a message of the "
                                    "conversation", 0);
            }

            continue;
        }

        /* stored before, and committed: its original */
        snd->rc = NGX_OK;
        snd->duplicate = 1;
        snd->message.data = (u_char *) PQgetvalue(res, i, 4);
        snd->message.len = PQgetlength(res, i, 4);

        ngx_chat_store_finish(snd);
    }

    for (idx = 0; idx < b->n; idx++) {
        if (b->items[idx] && rows[idx] < 0) {
            /* no row for it */
            ngx_chat_store_fail(b->items[idx], "internal",
                                "the store gave no answer", 0);
            b->items[idx] = NULL;
        }
    }

    /*
     * Sends to a conversation deferred just now that wait in the pending
     * queue go behind it at once: one that arrives while step 2 is on its
     * way is held behind them, never before them.
     */
    if (st->ndeferred) {
        ngx_chat_store_hold_pending();
    }

    if (b->nok == 0) {
        /* nothing was written: the transaction is rolled back */
        ngx_chat_store_batch_end(b);
        return;
    }

    rrc = ngx_chat_bus_reserve(b->nok, b->key, &b->lo, &b->resv);

    if (rrc != NGX_OK) {
        /* no positions yet: roll back, and again once a chunk is there */
        ngx_chat_store_requeue(b);

        if (!st->slow.timer_set) {
            ngx_add_timer(&st->slow, 10);
        }

        ngx_chat_store_batch_end(b);
        return;
    }

    /* EXECUTE chat_send_events(lo, '{conv,...}', '{id,...}'); COMMIT */

    b->sql.len = 0;

    if (ngx_chat_buf_reserve(&b->sql, 128 + b->nok * 2 * (NGX_INT64_LEN + 1))
        != NGX_OK)
    {
        goto failed;
    }

    p = ngx_sprintf(b->sql.data, "EXECUTE chat_send_events(%uL,'{",
                    b->lo);
    p = ngx_chat_store_column(p, b, res, 2);             /* conversations */
    p = ngx_cpymem(p, "}','{", 5);
    p = ngx_chat_store_column(p, b, res, 3);             /* message ids */
    p = ngx_cpymem(p, "}');COMMIT", 10);
    *p++ = '\0';

    b->sql.len = p - b->sql.data;

    /* the rows of the stored messages live until step 2 is back */
    ngx_chat_db_keep_result();
    b->stage = res;

    b->events.stmt = NGX_CHAT_STMT_SEND_EVENTS;
    b->events.sql = (const char *) b->sql.data;
    b->events.handler = ngx_chat_store_events_done;
    b->events.data = b;

    ngx_chat_db_continue(&b->events, q->conn);

    return;

failed:

    ngx_chat_bus_void(b->resv, b->key);
    ngx_chat_store_batch_failed(b, NULL, NGX_DECLINED);
    ngx_chat_store_batch_end(b);
}


/* a column of step 1's stored items, comma separated: an array's body */

static u_char *
ngx_chat_store_column(u_char *p, ngx_chat_batch_t *b, PGresult *res,
    int col)
{
    ngx_uint_t  idx, k;

    for (idx = 0, k = 0; idx < b->n; idx++) {
        if (b->items[idx] == NULL) {
            continue;
        }

        if (k++) {
            *p++ = ',';
        }

        p = ngx_cpymem(p, PQgetvalue(res, b->rows[idx], col),
                       PQgetlength(res, b->rows[idx], col));
    }

    return p;
}


static void
ngx_chat_store_events_done(ngx_chat_query_t *q, PGresult *res, ngx_int_t rc)
{
    char              *state;
    uint64_t           g;
    ngx_uint_t         idx;
    ngx_chat_batch_t  *b;
    ngx_chat_send_t   *snd;
    PGresult          *stage;

    b = q->data;
    stage = b->stage;

    if (rc == NGX_DECLINED) {
        /* committed or not: the store says once the lock is free */
        ngx_chat_bus_unknown(b->resv, b->key);
        ngx_chat_store_batch_failed(b, NULL, NGX_DECLINED);
        ngx_chat_store_batch_end(b);
        return;
    }

    if (rc != NGX_OK) {
        /* an error from the server: the transaction did not commit */
        ngx_chat_bus_void(b->resv, b->key);

        state = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;

        if (ngx_chat_store_transient(state)
            || (state && ngx_strcmp(state, "40001") == 0))
        {
            ngx_chat_store_requeue(b);

        } else {
            ngx_chat_store_batch_failed(b, res, rc);
        }

        ngx_chat_store_batch_end(b);
        return;
    }

    /* committed: events at their positions, in item order */

    g = b->lo;

    for (idx = 0; idx < b->n; idx++) {
        if (b->items[idx] == NULL) {
            continue;
        }

        ngx_chat_bus_publish_reserved(b->resv, b->key, g++,
            ngx_atoof((u_char *) PQgetvalue(stage, b->rows[idx], 2),
                      PQgetlength(stage, b->rows[idx], 2)),
            (u_char *) PQgetvalue(stage, b->rows[idx], 5),
            PQgetlength(stage, b->rows[idx], 5));

        /* whoever sends has stopped typing there */
        ngx_chat_live_sent(b->items[idx]->conversation,
                           &b->items[idx]->sender);
    }

    ngx_chat_bus_release(b->resv, b->key);
    ngx_chat_bus_notify();

    for (idx = 0; idx < b->n; idx++) {
        snd = b->items[idx];

        if (snd == NULL) {
            continue;
        }

        b->items[idx] = NULL;

        snd->rc = NGX_OK;
        snd->duplicate = 0;
        snd->message.data = (u_char *) PQgetvalue(stage, b->rows[idx], 4);
        snd->message.len = PQgetlength(stage, b->rows[idx], 4);

        ngx_chat_store_finish(snd);
    }

    ngx_chat_store_batch_end(b);
}


/* a step failed: requeue, isolate or answer the items still in b */

static void
ngx_chat_store_batch_failed(ngx_chat_batch_t *b, PGresult *res,
    ngx_int_t rc)
{
    char        *state;
    ngx_uint_t   idx, n;

    if (rc == NGX_ERROR && b->n == 0) {
        /* build found nothing to send */
        return;
    }

    /* the items still waiting for an answer go first */

    for (idx = 0, n = 0; idx < b->n; idx++) {
        if (b->items[idx]) {
            b->items[n++] = b->items[idx];
        }
    }

    b->n = n;

    state = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;

    if (rc == NGX_ERROR && state && ngx_strcmp(state, "40001") == 0) {
        /* a duplicate raced us from another worker: run it again */
        ngx_chat_store_requeue(b);
        return;
    }

    if (rc == NGX_ERROR && b->n > 1 && !ngx_chat_store_transient(state)) {
        /*
         * One bad item must not fail everybody's send: each goes
         * again in a batch of its own, and only the bad one fails.
         */
        ngx_log_error(NGX_LOG_WARN, ngx_chat_worker.log, 0,
                      "chat: a batch of %ui sends failed (%s), "
                      "storing them one by one", b->n,
                      state ? state : "-");

        for (idx = 0; idx < b->n; idx++) {
            b->items[idx]->alone = 1;
        }

        ngx_chat_store_requeue(b);
        return;
    }

    if (rc == NGX_ERROR && res) {
        ngx_log_error(NGX_LOG_ERR, ngx_chat_worker.log, 0,
                      "chat: a send could not be stored: %s",
                      PQresultErrorMessage(res));
    }

    for (idx = 0; idx < b->n; idx++) {
        if (rc == NGX_DECLINED || ngx_chat_store_transient(state)) {
            ngx_chat_store_fail(b->items[idx], "unavailable",
                                "the store is unavailable",
                                ngx_chat_db_retry_after());
        } else {
            ngx_chat_store_fail(b->items[idx], "internal",
                                "the message could not be stored", 0);
        }
    }

    b->n = 0;
}


/* the batch's transaction is over, whichever way */

static void
ngx_chat_store_batch_end(ngx_chat_batch_t *b)
{
    ngx_uint_t         idx;
    ngx_chat_store_t  *st;

    st = &ngx_chat_store;
    st->inflight--;

    ngx_chat_store_release(b);

    for (idx = 0; idx < b->n; idx++) {
        if (b->items[idx]) {
            ngx_chat_store_fail(b->items[idx], "internal",
                                "the store gave no answer", 0);
        }
    }

    if (st->ndeferred) {
        ngx_chat_store_hold_pending();
    }

    if (b->stage) {
        PQclear(b->stage);
    }

    ngx_free(b->rows);
    ngx_free(b->items);
    ngx_chat_buf_free(&b->json);
    ngx_chat_buf_free(&b->sql);
    ngx_free(b);

    if (st->npending && !st->flush.posted) {
        ngx_post_event(&st->flush, &ngx_posted_events);
    }
}


static void
ngx_chat_store_defer(ngx_chat_send_t *snd)
{
    ngx_chat_store_t  *st;

    st = &ngx_chat_store;

    ngx_chat_store_hold(snd);

    if (snd->busy_since == 0) {
        snd->busy_since = ngx_current_msec;
    }

    if (!st->retry.timer_set) {
        /*
         * Another worker's batch holds the conversation for a commit:
         * try again at once.  Only a send that stays busy (a lock held
         * from outside) backs off, by a quarter of how long it waited.
         */
        st->retry_delay = ngx_max(NGX_CHAT_RETRY_MIN,
                                  ngx_min((ngx_current_msec - snd->busy_since)
                                          / 4, NGX_CHAT_RETRY_MAX));

        ngx_add_timer(&st->retry, st->retry_delay);
    }
}


/* the deferred queue, and a tree of the conversations it holds */

static void
ngx_chat_store_hold(ngx_chat_send_t *snd)
{
    ngx_chat_store_t    *st;
    ngx_chat_carried_t  *h;

    st = &ngx_chat_store;

    ngx_queue_insert_tail(&st->deferred, &snd->queue);
    st->ndeferred++;

    h = (ngx_chat_carried_t *) ngx_chat_rbtree_lookup(&st->held,
                                   (ngx_rbtree_key_t) snd->conversation);
    if (h) {
        h->count++;
        return;
    }

    h = ngx_calloc(sizeof(ngx_chat_carried_t), ngx_chat_worker.log);

    if (h == NULL) {
        /* until the retry, every conversation counts as held: in order */
        st->held_all = 1;
        return;
    }

    h->node.key = (ngx_rbtree_key_t) snd->conversation;
    h->count = 1;
    ngx_rbtree_insert(&st->held, &h->node);
}


static ngx_uint_t
ngx_chat_store_deferred(int64_t conv)
{
    return ngx_chat_store.held_all
           || ngx_chat_rbtree_lookup(&ngx_chat_store.held,
                                     (ngx_rbtree_key_t) conv)
              != NULL;
}


/*
 * Counts a sender's sends in the queue (inc 1 on entry, -1 on the way
 * out).  NGX_BUSY: the sender already has its share.
 */
static ngx_int_t
ngx_chat_store_sender(ngx_chat_send_t *snd, ngx_int_t inc)
{
    uint32_t            hash;
    ngx_uint_t          share;
    ngx_chat_store_t   *st;
    ngx_chat_sender_t  *sd;

    st = &ngx_chat_store;
    hash = ngx_crc32_short(snd->sender.data, snd->sender.len);

    sd = (ngx_chat_sender_t *) ngx_str_rbtree_lookup(&st->senders,
                                                     &snd->sender, hash);

    if (inc < 0) {
        if (sd && snd->counted) {
            snd->counted = 0;

            if (--sd->count == 0) {
                ngx_rbtree_delete(&st->senders, &sd->sn.node);
                ngx_free(sd);
            }
        }

        return NGX_OK;
    }

    share = ngx_max(ngx_chat_worker.cmcf->db_queue_size / 8, 64);

    if (sd == NULL) {
        sd = ngx_alloc(sizeof(ngx_chat_sender_t) + snd->sender.len,
                       ngx_chat_worker.log);
        if (sd == NULL) {
            return NGX_ERROR;
        }

        sd->sn.str.data = (u_char *) &sd[1];
        sd->sn.str.len = snd->sender.len;
        ngx_memcpy(sd->sn.str.data, snd->sender.data, snd->sender.len);
        sd->sn.node.key = hash;
        sd->count = 0;

        ngx_rbtree_insert(&st->senders, &sd->sn.node);

    } else if (sd->count >= share) {
        return NGX_BUSY;
    }

    sd->count++;
    snd->counted = 1;

    return NGX_OK;
}


static ngx_uint_t
ngx_chat_store_in_batch(ngx_chat_batch_t *b, ngx_chat_send_t *snd)
{
    ngx_uint_t        i;
    ngx_chat_send_t  *o;

    for (i = 0; i < b->n; i++) {
        o = b->items[i];

        if (o->client_msg_id.len == snd->client_msg_id.len
            && o->sender.len == snd->sender.len
            && ngx_memcmp(o->client_msg_id.data, snd->client_msg_id.data,
                          snd->client_msg_id.len) == 0
            && ngx_memcmp(o->sender.data, snd->sender.data, snd->sender.len)
               == 0)
        {
            return 1;
        }
    }

    return 0;
}


/*
 * Failures that pass by themselves: the statement timeout (a lock held
 * too long), lock and deadlock errors, a connection lost mid-statement.
 */
static ngx_uint_t
ngx_chat_store_transient(const char *state)
{
    if (state == NULL) {
        return 0;
    }

    return ngx_strcmp(state, "57014") == 0
           || ngx_strcmp(state, "55P03") == 0
           || ngx_strcmp(state, "40P01") == 0
           || ngx_strcmp(state, "57P01") == 0
           || ngx_strncmp(state, "08", 2) == 0;
}


/*
 * How many batches may be in flight now.  One goes out at once; another
 * only once enough sends wait to make it worth its fixed cost (planning
 * and executor start-up of chat_send_stage(), a commit): at low rates a
 * second, tiny batch would compete with the first for the CPU that
 * PostgreSQL shares with nginx and make everybody later (measured: group
 * fan-out at 1,000 msg/s on one core, p99 23 ms with three tiny batches in
 * flight, 3.6 ms with one), while under load the queue fills and the
 * batches run side by side.  A batch that is slow (it waits for a lock,
 * say) lets the next one go after NGX_CHAT_PARALLEL_SLOW ms.
 */
static ngx_uint_t
ngx_chat_store_max_inflight(void)
{
    ngx_uint_t  n;

    n = ngx_chat_worker.cmcf->db_pool_size;
    n = (n > 1) ? n - 1 : 1;

    if (ngx_chat_store.npending < NGX_CHAT_PARALLEL_MIN
        && (ngx_msec_int_t) (ngx_current_msec - ngx_chat_store.sent_at)
           < NGX_CHAT_PARALLEL_SLOW)
    {
        return 1;
    }

    return n;
}


/*
 * Whether a new batch would find anything to take: without this, a batch
 * built empty would post the next flush at once and the worker would
 * spin on posted events instead of reading the answers it waits for.
 */
static ngx_uint_t
ngx_chat_store_eligible(void)
{
    ngx_queue_t      *q;
    ngx_chat_send_t  *snd;

    if (ngx_chat_store.carried.root == ngx_chat_store.carried.sentinel) {
        return 1;
    }

    for (q = ngx_queue_head(&ngx_chat_store.pending);
         q != ngx_queue_sentinel(&ngx_chat_store.pending);
         q = ngx_queue_next(q))
    {
        snd = ngx_queue_data(q, ngx_chat_send_t, queue);

        if (ngx_chat_store_carried(snd->conversation) == NULL) {
            return 1;
        }
    }

    return 0;
}


static ngx_chat_carried_t *
ngx_chat_store_carried(int64_t conv)
{
    /* node is the first member */
    return (ngx_chat_carried_t *) ngx_chat_rbtree_lookup(
                                   &ngx_chat_store.carried,
                                   (ngx_rbtree_key_t) conv);
}


static ngx_int_t
ngx_chat_store_carry(ngx_chat_batch_t *b, int64_t conv)
{
    ngx_chat_carried_t  *c;

    c = ngx_chat_store_carried(conv);

    if (c == NULL) {
        c = ngx_calloc(sizeof(ngx_chat_carried_t), ngx_chat_worker.log);
        if (c == NULL) {
            return NGX_ERROR;
        }

        c->node.key = (ngx_rbtree_key_t) conv;
        c->owner = b;
        ngx_rbtree_insert(&ngx_chat_store.carried, &c->node);
    }

    c->count++;

    return NGX_OK;
}


static void
ngx_chat_store_release(ngx_chat_batch_t *b)
{
    ngx_uint_t           i;
    ngx_chat_carried_t  *c;

    for (i = 0; i < b->ncarried; i++) {
        c = ngx_chat_store_carried(b->convs[i]);

        if (c == NULL || c->owner != b) {
            continue;
        }

        if (--c->count == 0) {
            ngx_rbtree_delete(&ngx_chat_store.carried, &c->node);
            ngx_free(c);
        }
    }
}


/*
 * The items of a failed batch go back to the front, in their order; one
 * that keeps failing is answered once its time is up, so no send can
 * loop unanswered.
 */
static void
ngx_chat_store_requeue(ngx_chat_batch_t *b)
{
    ngx_uint_t         i;
    ngx_chat_send_t   *snd;
    ngx_chat_store_t  *st;

    st = &ngx_chat_store;

    for (i = b->n; i > 0; i--) {
        snd = b->items[i - 1];

        if (snd == NULL) {
            /* answered already */
            continue;
        }

        b->items[i - 1] = NULL;

        if ((ngx_msec_int_t) (ngx_current_msec - snd->deadline) >= 0) {
            ngx_log_error(NGX_LOG_WARN, ngx_chat_worker.log, 0,
                          "chat: a send kept conflicting for %M ms, "
                          "answering \"unavailable\"",
                          ngx_chat_worker.cmcf->db_statement_timeout);
            ngx_chat_store_fail(snd, "unavailable",
                                "the message could not be stored yet", 1000);
            continue;
        }

        ngx_queue_insert_head(&st->pending, &snd->queue);
        st->npending++;
    }

    b->n = 0;
}


/*
 * Sends to a held conversation that arrived while its deferred sends were
 * in flight must not overtake them: they wait behind them.
 */
static void
ngx_chat_store_hold_pending(void)
{
    ngx_queue_t       *q, *next;
    ngx_chat_store_t  *st;
    ngx_chat_send_t   *snd;

    st = &ngx_chat_store;

    for (q = ngx_queue_head(&st->pending);
         q != ngx_queue_sentinel(&st->pending);
         q = next)
    {
        next = ngx_queue_next(q);
        snd = ngx_queue_data(q, ngx_chat_send_t, queue);

        if (!ngx_chat_store_deferred(snd->conversation)) {
            continue;
        }

        ngx_queue_remove(q);
        st->npending--;

        ngx_chat_store_hold(snd);
    }
}


/* deferred sends go back to the front of the line, in their order */

static void
ngx_chat_store_retry(ngx_event_t *ev)
{
    ngx_queue_t        *q;
    ngx_rbtree_node_t  *node;
    ngx_chat_store_t   *st;

    st = &ngx_chat_store;

    if (st->ndeferred == 0) {
        st->retry_delay = 0;
        return;
    }

    while (!ngx_queue_empty(&st->deferred)) {
        q = ngx_queue_last(&st->deferred);
        ngx_queue_remove(q);
        ngx_queue_insert_head(&st->pending, q);
    }

    st->npending += st->ndeferred;
    st->ndeferred = 0;

    st->held_all = 0;

    while (st->held.root != st->held.sentinel) {
        node = ngx_rbtree_min(st->held.root, st->held.sentinel);
        ngx_rbtree_delete(&st->held, node);
        ngx_free(node);
    }

    if (!st->flush.posted) {
        ngx_post_event(&st->flush, &ngx_posted_events);
    }
}


static void
ngx_chat_store_fail(ngx_chat_send_t *snd, const char *code, const char *msg,
    ngx_msec_t retry_after)
{
    ngx_chat_store_t  *st;

    st = &ngx_chat_store;

    /* it may still sit in the pending queue */
    if (snd->queue.next != NULL) {
        ngx_queue_remove(&snd->queue);
        snd->queue.next = NULL;
        st->npending--;
    }

    snd->rc = NGX_ERROR;
    snd->error = code;
    snd->error_msg = msg;
    snd->retry_after = retry_after;

    ngx_chat_store_finish(snd);
}


static void
ngx_chat_store_finish(ngx_chat_send_t *snd)
{
    (void) ngx_chat_store_sender(snd, -1);

    ngx_chat_metrics_send(ngx_current_msec - snd->start, snd->rc,
                          snd->duplicate);

    snd->handler(snd);
    ngx_free(snd);
}


/*
 * NGX_OK: j->handler will be called once, and j is freed after it returns.
 * NGX_DECLINED: the store is unavailable; the caller still owns j.
 */
ngx_int_t
ngx_chat_store_join(ngx_chat_join_t *j)
{
    ngx_chat_store_t  *st;

    st = &ngx_chat_store;

    if (st->join_flush.handler == NULL) {
        ngx_queue_init(&st->joins);

        st->join_flush.handler = ngx_chat_store_join_flush;
        st->join_flush.log = ngx_chat_worker.log;
        st->join_flush.data = st;
    }

    if (!ngx_chat_db_ready()
        || st->njoins >= ngx_chat_worker.cmcf->db_queue_size)
    {
        return NGX_DECLINED;
    }

    ngx_queue_insert_tail(&st->joins, &j->queue);
    st->njoins++;

    /* a batch that waits for a connection takes it when it is built */
    if (!st->join_queued && !st->join_flush.posted) {
        ngx_post_event(&st->join_flush, &ngx_posted_events);
    }

    return NGX_OK;
}


static void
ngx_chat_store_join_flush(ngx_event_t *ev)
{
    ngx_chat_store_t       *st;
    ngx_chat_join_batch_t  *b;

    st = &ngx_chat_store;

    if (st->join_queued || st->njoins == 0) {
        return;
    }

    b = ngx_calloc(sizeof(ngx_chat_join_batch_t), ngx_chat_worker.log);

    if (b != NULL) {
        b->query.stmt = NGX_CHAT_STMT_MEMBERSHIPS;
        b->query.nparams = 3;
        b->query.build = ngx_chat_store_join_build;
        b->query.handler = ngx_chat_store_join_done;
        b->query.data = b;

        if (ngx_chat_db_query(&b->query) == NGX_OK) {
            st->join_queued = 1;
            return;
        }

        ngx_free(b);
    }

    while (st->njoins) {
        ngx_chat_store_join_finish(ngx_queue_data(ngx_queue_head(&st->joins),
                                                  ngx_chat_join_t, queue),
                                   NGX_DECLINED);
    }
}


static ngx_int_t
ngx_chat_store_join_build(ngx_chat_query_t *q)
{
    ngx_uint_t              max;
    ngx_queue_t            *qq;
    ngx_chat_join_t        *j;
    ngx_chat_store_t       *st;
    ngx_chat_join_batch_t  *b;

    b = q->data;
    st = &ngx_chat_store;
    st->join_queued = 0;

    max = ngx_min(st->njoins, ngx_chat_worker.cmcf->db_batch_size);

    if (max == 0) {
        return NGX_ERROR;
    }

    b->items = ngx_alloc(max * sizeof(ngx_chat_join_t *), ngx_chat_worker.log);
    if (b->items == NULL) {
        return NGX_ERROR;
    }

    if (ngx_chat_buf_add_lit(&b->json, "[") != NGX_OK) {
        return NGX_ERROR;
    }

    while (b->n < max) {
        qq = ngx_queue_head(&st->joins);
        j = ngx_queue_data(qq, ngx_chat_join_t, queue);

        if ((b->n && ngx_chat_buf_add_lit(&b->json, ",") != NGX_OK)
            || ngx_chat_buf_add_json_str(&b->json, j->user.data, j->user.len)
               != NGX_OK)
        {
            return NGX_ERROR;
        }

        ngx_queue_remove(qq);
        qq->next = NULL;
        st->njoins--;
        b->items[b->n++] = j;
    }

    if (ngx_chat_buf_add(&b->json, "]", 2) != NGX_OK) {
        return NGX_ERROR;
    }

    if (st->njoins && !st->join_flush.posted) {
        ngx_post_event(&st->join_flush, &ngx_posted_events);
    }

    q->params[0] = (const char *) b->json.data;
    q->lengths[0] = b->json.len - 1;

    *ngx_sprintf(b->max, "%ui", ngx_chat_worker.cmcf->presence_max_members)
        = '\0';
    q->params[1] = (const char *) b->max;

    /* spans that ended before what the ring holds are the store's */
    *ngx_sprintf(b->since, "%uL", ngx_chat_bus_ring_start()) = '\0';
    q->params[2] = (const char *) b->since;

    return NGX_OK;
}


static void
ngx_chat_store_join_done(ngx_chat_query_t *q, PGresult *res, ngx_int_t rc)
{
    ngx_uint_t              i;
    ngx_chat_join_t        *j;
    ngx_chat_store_t       *st;
    ngx_chat_join_batch_t  *b;

    b = q->data;
    st = &ngx_chat_store;

    if (b->n == 0) {
        /* failed before a connection took it, or the build failed */
        st->join_queued = 0;
    }

    if (rc == NGX_OK && PQntuples(res) != (int) b->n) {
        ngx_log_error(NGX_LOG_ALERT, ngx_chat_worker.log, 0,
                      "chat: memberships: %d rows for %ui users",
                      PQntuples(res), b->n);
        rc = NGX_ERROR;
    }

    for (i = 0; i < b->n; i++) {
        j = b->items[i];

        if (rc == NGX_OK) {
            j->conversations.data = (u_char *) PQgetvalue(res, i, 0);
            j->conversations.len = PQgetlength(res, i, 0);
            j->contacts.data = (u_char *) PQgetvalue(res, i, 2);
            j->contacts.len = PQgetlength(res, i, 2);
            j->blocks.data = (u_char *) PQgetvalue(res, i, 3);
            j->blocks.len = PQgetlength(res, i, 3);
            j->clock = ngx_atoof((u_char *) PQgetvalue(res, i, 1),
                                 PQgetlength(res, i, 1));
        }

        ngx_chat_store_join_finish(j, rc == NGX_OK ? NGX_OK : NGX_DECLINED);
    }

    if (b->items) {
        ngx_free(b->items);
    }

    ngx_chat_buf_free(&b->json);
    ngx_free(b);

    if (st->njoins && !st->join_queued && !st->join_flush.posted) {
        ngx_post_event(&st->join_flush, &ngx_posted_events);
    }
}


static void
ngx_chat_store_join_finish(ngx_chat_join_t *j, ngx_int_t rc)
{
    ngx_chat_store_t  *st;

    st = &ngx_chat_store;

    if (j->queue.next != NULL) {
        ngx_queue_remove(&j->queue);
        j->queue.next = NULL;
        st->njoins--;
    }

    j->rc = rc;
    j->handler(j);
    ngx_free(j);
}
