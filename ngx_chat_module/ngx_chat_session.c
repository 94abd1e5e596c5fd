
/*
 * Copyright (C) ngx_chat_module authors
 *
 * A session is one authenticated client connection, whatever transport
 * carries it.  Its life:
 *
 *   NEW      waiting for "hello" (unless the upgrade carried credentials)
 *   JOINING  memberships are loaded from the store and subscribed
 *   CATCHUP  events after the cursor are replayed: from the bus ring when
 *            it still holds them, else from the store in pages
 *   LIVE     the bus fans events out to it
 *
 * The session is subscribed before catch-up starts, and the bus skips
 * sessions that are not LIVE; catch-up ends by replaying the ring up to
 * the worker's position, so the hand-over to live delivery has neither a
 * gap nor a duplicate: every event is delivered iff gseq > s->cursor.
 *
 * Flow control: a transport whose queue passes its window answers
 * NGX_AGAIN; a LIVE session then drops back to CATCHUP and waits for
 * "drained", and catch-up continues from its cursor, out of the ring or
 * the store, in pieces no larger than the window.  So a backlog of any
 * size, or a burst, costs a session at most its queue, and a reader is
 * only cut when it does not drain in time (the transport's business).
 */


#include "ngx_chat_module.h"
#include "ngx_chat_auth.h"
#include "ngx_chat_db.h"
#include "ngx_chat_store.h"
#include "ngx_chat_bus.h"
#include "ngx_chat_transport.h"
#include "ngx_chat_session.h"
#include "ngx_chat_metrics.h"
#include "ngx_chat_json.h"
#include "ngx_chat_limit.h"
#include "ngx_chat_live.h"
#include "ngx_chat_receipts.h"
#include "ngx_chat_ops.h"


#define NGX_CHAT_REQ_ID_MAX        64

/* sends of one session waiting for the store */
#define NGX_CHAT_SESSION_SENDS     64

/* rate limit refusals in a row that close a WebSocket (4029) */
#define NGX_CHAT_SESSION_REFUSED   32

/* a client that sends faster than the store answers is told to wait */
#define NGX_CHAT_SESSION_SEND_WAIT 100

/* a send's reply carries its message: the body and the rest */
#define ngx_chat_session_reply_size(snd)                                     \
    ((snd)->body.len + (snd)->client_msg_id.len + (snd)->sender.len         \
     + (snd)->mentions.len + 512)


typedef struct {
    u_char                     data[NGX_CHAT_REQ_ID_MAX + 8];
    size_t                     len;
} ngx_chat_req_id_t;


static ngx_int_t ngx_chat_session_req_id(json_t *root, ngx_chat_req_id_t *id);
static void ngx_chat_session_hello(ngx_chat_session_t *s, json_t *root,
    ngx_chat_req_id_t *rid);
static ngx_int_t ngx_chat_session_verify(ngx_chat_session_t *s,
    ngx_str_t *token, ngx_chat_req_id_t *rid, ngx_uint_t close);
static void ngx_chat_session_want(ngx_chat_session_t *s, ngx_str_t *cursor);
static ngx_int_t ngx_chat_session_check(ngx_chat_session_t *s,
    uint64_t known);
static void ngx_chat_session_auth(ngx_chat_session_t *s, json_t *root,
    ngx_chat_req_id_t *rid);
static void ngx_chat_session_send(ngx_chat_session_t *s, json_t *root,
    ngx_chat_req_id_t *rid);
static void ngx_chat_session_sync(ngx_chat_session_t *s, json_t *root,
    ngx_chat_req_id_t *rid);
static void ngx_chat_session_op(ngx_chat_session_t *s, const char *name,
    json_t *root, ngx_chat_req_id_t *rid);
static void ngx_chat_session_op_done(ngx_chat_op_t *op);
static void ngx_chat_session_send_done(ngx_chat_send_t *snd);
static ngx_int_t ngx_chat_session_limited(ngx_chat_session_t *s,
    ngx_uint_t kind, ngx_chat_req_id_t *rid);
static void ngx_chat_session_typing(ngx_chat_session_t *s, json_t *root,
    ngx_chat_req_id_t *rid);
static void ngx_chat_session_presence(ngx_chat_session_t *s, json_t *root,
    ngx_chat_req_id_t *rid);
static void ngx_chat_session_presence_sub(ngx_chat_session_t *s,
    json_t *root, ngx_chat_req_id_t *rid);
static ngx_int_t ngx_chat_session_contacts(ngx_chat_session_t *s,
    ngx_str_t *list);
static void ngx_chat_session_ack(ngx_chat_session_t *s, json_t *root,
    ngx_chat_req_id_t *rid);
static void ngx_chat_session_read(ngx_chat_session_t *s, json_t *root,
    ngx_chat_req_id_t *rid);
static void ngx_chat_session_join(ngx_chat_session_t *s);
static void ngx_chat_session_join_done(ngx_chat_join_t *j);
static void ngx_chat_session_welcome(ngx_chat_session_t *s);
static void ngx_chat_session_join_failed(ngx_chat_session_t *s);
static void ngx_chat_session_refuse(ngx_chat_session_t *s, ngx_int_t rc);
static void ngx_chat_session_rewind(ngx_chat_session_t *s, uint64_t cursor);
static void ngx_chat_session_catchup(ngx_chat_session_t *s);
static ngx_int_t ngx_chat_session_catchup_query(ngx_chat_session_t *s);
static void ngx_chat_session_catchup_done(ngx_chat_query_t *q,
    PGresult *res, ngx_int_t rc);
static void ngx_chat_session_catchup_next(void);
static ngx_int_t ngx_chat_session_set_identity(ngx_chat_session_t *s,
    ngx_chat_identity_t *id);
static void ngx_chat_session_set_timer(ngx_chat_session_t *s);
static void ngx_chat_session_timer(ngx_event_t *ev);
static ngx_int_t ngx_chat_session_unref(ngx_chat_session_t *s);
static void ngx_chat_session_free(ngx_chat_session_t *s);
static void ngx_chat_session_close(ngx_chat_session_t *s, ngx_uint_t code,
    const char *reason);
static void ngx_chat_reply_ok(ngx_chat_session_t *s, u_char *id, size_t idlen,
    u_char *result, size_t len);
static void ngx_chat_reply_error(ngx_chat_session_t *s, u_char *id,
    size_t idlen, const char *code, const char *msg, ngx_msec_t retry);
static void ngx_chat_session_resync_required(ngx_chat_session_t *s,
    const char *reason);
static ngx_int_t ngx_chat_session_write(ngx_chat_session_t *s,
    ngx_chat_buf_t *b);
static ngx_int_t ngx_chat_session_sent(ngx_chat_session_t *s, ngx_int_t rc);


static uint64_t        ngx_chat_session_seq;
static ngx_chat_buf_t  ngx_chat_reply_buf;

/* store pages of catch-up: a share of the pool, the rest waits in turn */
static ngx_uint_t      ngx_chat_catchup_inflight;
static ngx_queue_t     ngx_chat_catchup_waiting;


ngx_chat_session_t *
ngx_chat_session_create(ngx_chat_transport_t *t, void *tctx,
    ngx_connection_t *c, ngx_log_t *log, ngx_chat_identity_t *id,
    ngx_str_t *cursor)
{
    ngx_chat_session_t  *s;

    if (!ngx_chat_worker.ready) {
        return NULL;
    }

    s = ngx_calloc(sizeof(ngx_chat_session_t), log);
    if (s == NULL) {
        return NULL;
    }

    s->transport = t;
    s->tctx = tctx;
    s->log = log;

    ngx_chat_rate_addr(c, s->addr, &s->addr_len);
    s->id = ++ngx_chat_session_seq;
    s->state = NGX_CHAT_SESSION_NEW;

    s->timer.handler = ngx_chat_session_timer;
    s->timer.data = s;
    s->timer.log = log;

    if (id && ngx_chat_session_set_identity(s, id) != NGX_OK) {
        ngx_free(s);
        return NULL;
    }

    if (id == NULL) {
        /* counted until it authenticates: see chat_max_unauthenticated */
        s->unauth = 1;
        ngx_chat_limit_unauth_add(1);
    }

    /* ?cursor= on the upgrade: a browser resumes without a race */
    if (cursor) {
        ngx_chat_session_want(s, cursor);
    }

    ngx_chat_session_set_timer(s);

    s->metered = ngx_chat_metrics_session(&t->name, 1);

    return s;
}


/*
 * The join keeps its own copy of the user, so the identity may change
 * (a refreshed token) at any time; it is copied only when it changed.
 */
static ngx_int_t
ngx_chat_session_set_identity(ngx_chat_session_t *s, ngx_chat_identity_t *id)
{
    u_char  *p;

    if (s->idmem == NULL
        || id->user.len != s->user.len
        || id->name.len != s->name.len
        || ngx_memcmp(id->user.data, s->user.data, s->user.len) != 0
        || ngx_memcmp(id->name.data, s->name.data, s->name.len) != 0)
    {
        p = ngx_alloc(id->user.len + id->name.len + 1, s->log);
        if (p == NULL) {
            return NGX_ERROR;
        }

        ngx_free(s->idmem);
        s->idmem = p;

        s->user.data = p;
        s->user.len = id->user.len;
        p = ngx_cpymem(p, id->user.data, id->user.len);

        s->name.data = p;
        s->name.len = id->name.len;
        ngx_memcpy(p, id->name.data, id->name.len);
    }

    s->role = id->role;
    s->exp = id->exp;
    s->authenticated = 1;

    if (s->unauth) {
        s->unauth = 0;
        ngx_chat_limit_unauth_add(-1);
    }

    return NGX_OK;
}


/* one timer: the hello deadline first, then the token's expiry */

static void
ngx_chat_session_set_timer(ngx_chat_session_t *s)
{
    time_t  left;

    if (!s->authenticated) {
        if (!s->timer.timer_set) {
            ngx_add_timer(&s->timer, ngx_chat_worker.cmcf->auth_timeout);
        }

        return;
    }

    if (!s->hello_done) {
        /* authenticated on the upgrade: join on the next turn */
        if (!s->timer.timer_set) {
            ngx_add_timer(&s->timer, 1);
        }

        return;
    }

    /* the same leeway the verifier allowed when it accepted the token */
    left = s->exp + ngx_chat_worker.cmcf->jwt_leeway - ngx_time();

    if (left < 0) {
        left = 0;
    }

    /* timers are ngx_msec_t: cap far expiries, the timer re-arms itself */
    if (left > 86400) {
        left = 86400;
    }

    ngx_add_timer(&s->timer, (ngx_msec_t) left * 1000 + 1);
}


static void
ngx_chat_session_timer(ngx_event_t *ev)
{
    ngx_chat_session_t  *s;

    s = ev->data;

    if (s->state == NGX_CHAT_SESSION_CLOSED) {
        return;
    }

    if (!s->authenticated) {
        ngx_chat_session_close(s, NGX_CHAT_CLOSE_POLICY,
                               "authentication timeout");
        return;
    }

    if (!s->hello_done) {
        if (s->state == NGX_CHAT_SESSION_NEW) {
            ngx_chat_session_join(s);
        }

        return;
    }

    if (ngx_time() >= s->exp + ngx_chat_worker.cmcf->jwt_leeway) {
        ngx_chat_session_close(s, NGX_CHAT_CLOSE_TOKEN_EXPIRED,
                               "token_expired");
        return;
    }

    ngx_chat_session_set_timer(s);
}


void
ngx_chat_session_recv(ngx_chat_session_t *s, u_char *data, size_t len)
{
    json_t             *root, *type;
    const char         *t;
    ngx_chat_req_id_t   rid;

    if (s->state == NGX_CHAT_SESSION_CLOSED) {
        return;
    }

    rid.len = 4;
    ngx_memcpy(rid.data, "null", 4);

    root = ngx_chat_json_parse(data, len);

    if (root == NULL || !json_is_object(root)) {
        ngx_chat_reply_error(s, rid.data, rid.len, "bad_request",
                             "a request must be a JSON object", 0);
        goto done;
    }

    if (ngx_chat_session_req_id(root, &rid) != NGX_OK) {
        ngx_chat_reply_error(s, rid.data, rid.len, "bad_request",
                             "\"id\" must be a number or a short string", 0);
        goto done;
    }

    type = json_object_get(root, "type");

    if (!json_is_string(type)) {
        ngx_chat_reply_error(s, rid.data, rid.len, "bad_request",
                             "\"type\" is required", 0);
        goto done;
    }

    t = json_string_value(type);

    if (ngx_strcmp(t, "ping") == 0) {
        ngx_chat_reply_buf.len = 0;

        if (ngx_chat_buf_add_lit(&ngx_chat_reply_buf,
                                 "{\"type\":\"pong\",\"id\":") == NGX_OK
            && ngx_chat_buf_add(&ngx_chat_reply_buf, rid.data, rid.len)
               == NGX_OK
            && ngx_chat_buf_add_lit(&ngx_chat_reply_buf, "}") == NGX_OK)
        {
            (void) ngx_chat_session_write(s, &ngx_chat_reply_buf);
        }

        goto done;
    }

    if (ngx_strcmp(t, "hello") == 0) {
        ngx_chat_session_hello(s, root, &rid);
        goto done;
    }

    /* a session authenticated on the upgrade needs no hello to send */
    if (!s->authenticated) {
        ngx_chat_reply_error(s, rid.data, rid.len, "unauthorized",
                             "send \"hello\" first", 0);
        goto done;
    }

    if (ngx_strcmp(t, "send") == 0) {
        ngx_chat_session_send(s, root, &rid);

    } else if (ngx_strcmp(t, "edit") == 0 || ngx_strcmp(t, "delete") == 0
               || ngx_strcmp(t, "react") == 0
               || ngx_strcmp(t, "unreact") == 0)
    {
        ngx_chat_session_op(s, t, root, &rid);

    } else if (ngx_strcmp(t, "ack") == 0) {
        ngx_chat_session_ack(s, root, &rid);

    } else if (ngx_strcmp(t, "read") == 0) {
        ngx_chat_session_read(s, root, &rid);

    } else if (ngx_strcmp(t, "typing") == 0) {
        ngx_chat_session_typing(s, root, &rid);

    } else if (ngx_strcmp(t, "presence") == 0) {
        ngx_chat_session_presence(s, root, &rid);

    } else if (ngx_strcmp(t, "presence_sub") == 0) {
        ngx_chat_session_presence_sub(s, root, &rid);

    } else if (ngx_strcmp(t, "auth") == 0) {
        ngx_chat_session_auth(s, root, &rid);

    } else if (ngx_strcmp(t, "sync") == 0) {
        if (!s->hello_done) {
            ngx_chat_reply_error(s, rid.data, rid.len, "bad_request",
                                 "the session is still joining", 0);
            goto done;
        }

        ngx_chat_session_sync(s, root, &rid);

    } else {
        ngx_chat_reply_error(s, rid.data, rid.len, "bad_request",
                             "unsupported request type", 0);
    }

done:

    if (root) {
        json_decref(root);
    }
}


/*
 * chat_rate_limit for a request of the session: NGX_OK, or the refusal
 * is answered; a client that goes on sending into refusals is closed
 * with 4029 (a well-behaved one waits for retry_after_ms).
 */

static ngx_int_t
ngx_chat_session_limited(ngx_chat_session_t *s, ngx_uint_t kind,
    ngx_chat_req_id_t *rid)
{
    ngx_str_t   addr;
    ngx_msec_t  retry_after;

    if (s->role == NGX_CHAT_ROLE_SERVICE) {
        return NGX_OK;
    }

    addr.data = s->addr;
    addr.len = s->addr_len;

    if (ngx_chat_rate_check(kind, &s->user, &addr, s->log, &retry_after)
        == NGX_OK)
    {
        s->refused = 0;
        return NGX_OK;
    }

    ngx_chat_reply_error(s, rid->data, rid->len, "rate_limited",
                         "too many requests, slow down", retry_after);

    if (++s->refused >= NGX_CHAT_SESSION_REFUSED) {
        ngx_log_error(NGX_LOG_WARN, s->log, 0,
                      "chat: closing a connection of \"%V\" that went on "
                      "past %ui rate limit refusals", &s->user, s->refused);

        ngx_chat_session_close(s, NGX_CHAT_CLOSE_RATE_LIMITED,
                               "rate_limited");
    }

    return NGX_DECLINED;
}


static ngx_int_t
ngx_chat_session_req_id(json_t *root, ngx_chat_req_id_t *rid)
{
    json_t          *id;
    ngx_chat_buf_t   b;

    id = json_object_get(root, "id");

    if (id == NULL || json_is_null(id)) {
        return NGX_OK;
    }

    if (json_is_integer(id)) {
        rid->len = ngx_sprintf(rid->data, "%L",
                               (int64_t) json_integer_value(id))
                   - rid->data;
        return NGX_OK;
    }

    if (!json_is_string(id) || json_string_length(id) > NGX_CHAT_REQ_ID_MAX)
    {
        return NGX_ERROR;
    }

    ngx_memzero(&b, sizeof(ngx_chat_buf_t));

    if (ngx_chat_buf_add_json_str(&b, (u_char *) json_string_value(id),
                                  json_string_length(id))
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    /* control characters would grow past the buffer: refuse them */
    if (b.len > sizeof(rid->data)) {
        ngx_chat_buf_free(&b);
        return NGX_ERROR;
    }

    ngx_memcpy(rid->data, b.data, b.len);
    rid->len = b.len;
    ngx_chat_buf_free(&b);

    return NGX_OK;
}


static void
ngx_chat_session_hello(ngx_chat_session_t *s, json_t *root,
    ngx_chat_req_id_t *rid)
{
    ngx_str_t   token, cursor, device;
    ngx_int_t   rc;
    uint64_t    start;
    ngx_uint_t  first;
    ngx_msec_t  retry_after;

    if (s->hello_id) {
        ngx_chat_reply_error(s, rid->data, rid->len, "bad_request",
                             "\"hello\" is already in progress", 0);
        return;
    }

    rc = ngx_chat_json_str(root, "token", &token, 8192, 0);

    if (rc == NGX_ERROR
        || ngx_chat_json_str(root, "cursor", &cursor, 1024, 0) == NGX_ERROR
        || ngx_chat_json_str(root, "device_id", &device, 128, 0)
           == NGX_ERROR)
    {
        ngx_chat_reply_error(s, rid->data, rid->len, "bad_request",
                             "bad \"token\", \"cursor\" or \"device_id\"", 0);
        return;
    }

    if (device.data
        && ngx_chat_live_valid_device(device.data, device.len) != NGX_OK)
    {
        ngx_chat_reply_error(s, rid->data, rid->len, "bad_request",
                             "\"device_id\" must be 1 to 64 of "
                             "[A-Za-z0-9._-]", 0);
        return;
    }

    if (rc == NGX_DECLINED && !s->authenticated) {
        ngx_chat_reply_error(s, rid->data, rid->len, "unauthorized",
                             "a token is required", 0);
        ngx_chat_session_close(s, NGX_CHAT_CLOSE_POLICY, "unauthorized");
        return;
    }

    first = !s->authenticated;

    if (rc == NGX_OK
        && ngx_chat_session_verify(s, &token, rid, 1) != NGX_OK)
    {
        return;
    }

    /* the upgrade counted the address; the user is known only now */

    if (first && s->role != NGX_CHAT_ROLE_SERVICE
        && ngx_chat_rate_check(NGX_CHAT_RATE_CONNECT, &s->user, NULL, s->log,
                               &retry_after)
           != NGX_OK)
    {
        ngx_chat_reply_error(s, rid->data, rid->len, "rate_limited",
                             "too many connection attempts", retry_after);
        ngx_chat_session_close(s, NGX_CHAT_CLOSE_RATE_LIMITED,
                               "rate_limited");
        return;
    }

    s->hello_id = ngx_alloc(rid->len, s->log);
    if (s->hello_id == NULL) {
        ngx_chat_session_close(s, NGX_CHAT_CLOSE_INTERNAL, "internal");
        return;
    }

    ngx_memcpy(s->hello_id, rid->data, rid->len);
    s->hello_id_len = rid->len;

    /*
     * The device of a connection is set once: before the join it goes in
     * with it; after an implicit join (credentials on the upgrade) the
     * joined device takes it now.
     */
    if (device.len && s->device == 0) {
        (void) ngx_chat_session_device(s, &device);
        ngx_chat_live_device(s);
    }

    switch (s->state) {

    case NGX_CHAT_SESSION_NEW:
    case NGX_CHAT_SESSION_JOINING:
        /* a hello without a cursor keeps the one of the upgrade */
        if (cursor.len) {
            ngx_chat_session_want(s, &cursor);
        }

        if (s->state == NGX_CHAT_SESSION_NEW) {
            ngx_chat_session_join(s);
        }

        /* else the implicit join answers it when it completes */
        return;

    default:
        break;
    }

    /*
     * A hello after an implicit join (credentials on the upgrade, no
     * ?cursor=): the stream began at s->start.  A client cursor at or past
     * it needs nothing replayed; an older one is replayed only while
     * nothing has been delivered yet, else the order could not be kept.
     */

    start = s->start;
    ngx_chat_session_want(s, &cursor);

    if (s->has_cursor && !s->bad_cursor
        && ngx_chat_session_check(s, ngx_chat_bus_known()) == NGX_OK)
    {
        if (s->want >= start) {
            if (s->want > s->cursor) {
                s->cursor = s->want;
            }

        } else if (!s->delivered) {
            ngx_chat_session_rewind(s, s->want);

        } else {
            s->bad_cursor = 1;
        }
    }

    ngx_chat_session_welcome(s);
    ngx_chat_session_catchup(s);
}


/* hello{token} and auth: the same user, or a first identity */

static ngx_int_t
ngx_chat_session_verify(ngx_chat_session_t *s, ngx_str_t *token,
    ngx_chat_req_id_t *rid, ngx_uint_t close)
{
    ngx_int_t             rc;
    const char           *code, *msg;
    ngx_pool_t           *pool;
    ngx_chat_identity_t   id;

    pool = ngx_create_pool(1024, s->log);
    if (pool == NULL) {
        ngx_chat_session_close(s, NGX_CHAT_CLOSE_INTERNAL, "internal");
        return NGX_ERROR;
    }

    if (ngx_chat_auth_verify(token, pool, &id, &code, &msg) != NGX_OK) {
        ngx_chat_reply_error(s, rid->data, rid->len, code, msg, 0);
        ngx_destroy_pool(pool);

        if (close) {
            ngx_chat_session_close(s, NGX_CHAT_CLOSE_POLICY, code);
        }

        return NGX_DECLINED;
    }

    if (s->authenticated
        && (id.user.len != s->user.len
            || ngx_strncmp(id.user.data, s->user.data, s->user.len) != 0))
    {
        ngx_chat_reply_error(s, rid->data, rid->len, "forbidden",
                             "the token is for another user", 0);
        ngx_destroy_pool(pool);

        if (close) {
            ngx_chat_session_close(s, NGX_CHAT_CLOSE_POLICY, "forbidden");
        }

        return NGX_DECLINED;
    }

    rc = ngx_chat_session_set_identity(s, &id);
    ngx_destroy_pool(pool);

    if (rc != NGX_OK) {
        ngx_chat_session_close(s, NGX_CHAT_CLOSE_INTERNAL, "internal");
        return NGX_ERROR;
    }

    return NGX_OK;
}


/* the cursor a client resumes from; empty: from where the session is */

static void
ngx_chat_session_want(ngx_chat_session_t *s, ngx_str_t *cursor)
{
    s->has_cursor = 0;
    s->bad_cursor = 0;

    if (cursor->len == 0) {
        return;
    }

    s->has_cursor = 1;

    if (ngx_chat_cursor_parse(cursor->data, cursor->len, &s->want) != NGX_OK)
    {
        s->bad_cursor = 1;
    }
}


/*
 * A cursor is known if it is not past the newest event anybody has seen
 * committed: the store's clock at join, or what any worker has published
 * (not only what this worker has dispatched: a client may come from a
 * worker that is ahead).  One too far behind is too costly to replay.
 */
static ngx_int_t
ngx_chat_session_check(ngx_chat_session_t *s, uint64_t known)
{
    uint64_t  max;

    if (s->want > known) {
        s->bad_cursor = 1;
        return NGX_DECLINED;
    }

    max = ngx_chat_worker.cmcf->max_rewind;

    if (max && known - s->want > max) {
        s->bad_cursor = 1;
        return NGX_DECLINED;
    }

    return NGX_OK;
}


/*
 * The one resume routine: the stream continues after cursor.  A store
 * page on its way for an earlier cursor is discarded when it arrives.
 */
static void
ngx_chat_session_rewind(ngx_chat_session_t *s, uint64_t cursor)
{
    s->cursor = cursor;
    s->state = NGX_CHAT_SESSION_CATCHUP;

    if (s->catchup_busy) {
        s->catchup_stale = 1;
    }
}


/*
 * Subscribes the session to its conversations.  Answers the pending
 * hello, or, for a session that authenticated on the upgrade and sent
 * none, says "welcome".
 */
static void
ngx_chat_session_join(ngx_chat_session_t *s)
{
    ngx_int_t         rc;
    ngx_chat_join_t  *j;

    if (!ngx_chat_bus_started() || !ngx_chat_db_ready()) {
        ngx_chat_session_join_failed(s);
        return;
    }

    rc = ngx_chat_bus_register(s);

    if (rc != NGX_OK) {
        ngx_chat_session_refuse(s, rc);
        return;
    }

    /* the join outlives any identity change: it has its own user */

    j = ngx_calloc(sizeof(ngx_chat_join_t) + s->user.len,
                   ngx_chat_worker.log);
    if (j == NULL) {
        ngx_chat_bus_unregister(s);
        ngx_chat_session_close(s, NGX_CHAT_CLOSE_INTERNAL, "internal");
        return;
    }

    j->user.data = (u_char *) &j[1];
    j->user.len = s->user.len;
    ngx_memcpy(j->user.data, s->user.data, s->user.len);

    j->handler = ngx_chat_session_join_done;
    j->data = s;

    /* without a cursor the client starts from here */
    s->cursor = ngx_chat_bus_position();
    s->resets = ngx_chat_bus_resets();

    if (ngx_chat_store_join(j) != NGX_OK) {
        ngx_free(j);
        ngx_chat_bus_unregister(s);

        ngx_chat_session_join_failed(s);
        return;
    }

    s->refs++;
    s->state = NGX_CHAT_SESSION_JOINING;
}


static void
ngx_chat_session_join_done(ngx_chat_join_t *j)
{
    u_char              *p, *end, *last, *at, *dash, *caret;
    int64_t              conv;
    uint64_t             from, until, left;
    ngx_int_t            rc;
    ngx_chat_session_t  *s;

    s = j->data;

    if (ngx_chat_session_unref(s) != NGX_OK) {
        return;
    }

    if (j->rc != NGX_OK) {
        ngx_chat_bus_unregister(s);
        s->state = NGX_CHAT_SESSION_NEW;

        ngx_chat_session_join_failed(s);
        return;
    }

    if (s->join_stale && s->rejoins < 3) {
        /*
         * A member.added or member.removed of this user was dispatched
         * while the memberships were read: they may not show it.
         */
        s->join_stale = 0;
        s->rejoins++;

        ngx_chat_bus_unregister(s);
        s->state = NGX_CHAT_SESSION_NEW;

        ngx_chat_session_join(s);
        return;
    }

    /*
     * "id", "id@from" or "id@from-until", as of the events; "^left" after
     * a membership: an earlier one ended at left (the store tells them
     * apart)
     */

    p = j->conversations.data;
    end = p + j->conversations.len;

    while (p < end) {
        last = ngx_strlchr(p, end, ',');
        if (last == NULL) {
            last = end;
        }

        caret = ngx_strlchr(p, last, '^');

        if (caret) {
            left = (uint64_t) ngx_atoof(caret + 1, last - caret - 1);
            s->store_below = ngx_max(s->store_below, left);
            last = caret;
        }

        at = ngx_strlchr(p, last, '@');
        from = 0;
        until = 0;

        if (at) {
            dash = ngx_strlchr(at + 1, last, '-');
            from = (uint64_t) ngx_atoof(at + 1, (dash ? dash : last) - at - 1);

            if (dash) {
                until = (uint64_t) ngx_atoof(dash + 1, last - dash - 1);
            }
        }

        if (ngx_chat_parse_id(p, (at ? at : last) - p, &conv) == NGX_OK
            && ngx_chat_bus_subscribe_span(s, conv, from, until) != NGX_OK)
        {
            ngx_chat_session_close(s, NGX_CHAT_CLOSE_INTERNAL, "internal");
            return;
        }

        p = ngx_strlchr(last, end, ',');
        p = p ? p + 1 : end;
    }

    if (s->resets != ngx_chat_bus_resets()) {
        /* the database was replaced while the join was on its way */
        s->cursor = ngx_chat_bus_position();

        if (s->has_cursor) {
            s->bad_cursor = 1;
        }

    } else if (s->has_cursor && !s->bad_cursor
               && ngx_chat_session_check(s, ngx_max(j->clock,
                                                    ngx_chat_bus_known()))
                  == NGX_OK)
    {
        s->cursor = s->want;
    }

    ngx_chat_session_set_blocks(s, j->blocks.data, j->blocks.len, 0);

    rc = ngx_chat_session_contacts(s, &j->contacts);

    if (rc != NGX_OK) {
        ngx_chat_session_refuse(s, rc);
        return;
    }

    s->start = s->cursor;
    s->delivered = 0;
    s->hello_done = 1;
    s->state = NGX_CHAT_SESSION_CATCHUP;

    if (s->timer.timer_set) {
        ngx_del_timer(&s->timer);
    }

    ngx_chat_session_set_timer(s);

    ngx_chat_session_welcome(s);
    ngx_chat_session_catchup(s);
}


/* a join refused: NGX_DECLINED, the user's cap; else an internal error */

static void
ngx_chat_session_refuse(ngx_chat_session_t *s, ngx_int_t rc)
{
    if (rc != NGX_DECLINED) {
        ngx_chat_session_close(s, NGX_CHAT_CLOSE_INTERNAL, "internal");
        return;
    }

    if (s->hello_id) {
        ngx_chat_reply_error(s, s->hello_id, s->hello_id_len, "rate_limited",
                             "too many connections for this user", 5000);
    }

    ngx_chat_session_close(s, NGX_CHAT_CLOSE_SLOW, "too many connections");
}


/*
 * The store could not be reached while joining: a pending hello is told
 * to retry and the connection stays; an implicit join has nobody to tell,
 * so the client is sent away to reconnect.
 */
static void
ngx_chat_session_join_failed(ngx_chat_session_t *s)
{
    if (s->hello_id) {
        ngx_chat_reply_error(s, s->hello_id, s->hello_id_len, "unavailable",
                             "the store is unavailable",
                             ngx_chat_db_retry_after());
        ngx_free(s->hello_id);
        s->hello_id = NULL;
        return;
    }

    ngx_chat_session_close(s, NGX_CHAT_CLOSE_GOING_AWAY, "store unavailable");
}


/* the hello reply (or "welcome"), then resync_required if it applies */

static void
ngx_chat_session_welcome(ngx_chat_session_t *s)
{
    u_char          *last;
    ngx_chat_buf_t  *b;
    u_char           cbuf[NGX_CHAT_CURSOR_LEN];

    b = &ngx_chat_reply_buf;
    b->len = 0;
    last = ngx_chat_cursor_print(cbuf, s->cursor);

    if ((s->hello_id
         ? (ngx_chat_buf_add_lit(b, "{\"type\":\"reply\",\"id\":") != NGX_OK
            || ngx_chat_buf_add(b, s->hello_id, s->hello_id_len) != NGX_OK
            || ngx_chat_buf_add_lit(b, ",\"ok\":true,\"result\":{") != NGX_OK)
         : ngx_chat_buf_add_lit(b, "{\"type\":\"welcome\",") != NGX_OK)
        || ngx_chat_buf_add_lit(b, "\"user\":{\"id\":") != NGX_OK
        || ngx_chat_buf_add_json_str(b, s->user.data, s->user.len) != NGX_OK
        || ngx_chat_buf_add_lit(b, ",\"name\":") != NGX_OK
        || ngx_chat_buf_add_json_str(b, s->name.data, s->name.len) != NGX_OK
        || ngx_chat_buf_add_lit(b, ",\"role\":") != NGX_OK
        || (s->role == NGX_CHAT_ROLE_SERVICE
            ? ngx_chat_buf_add_lit(b, "\"service\"")
            : ngx_chat_buf_add_lit(b, "\"user\"")) != NGX_OK
        || ngx_chat_buf_add_lit(b, "},\"session_id\":\"") != NGX_OK
        || ngx_chat_buf_reserve(b, 64) != NGX_OK)
    {
        goto failed;
    }

    b->len = ngx_sprintf(b->data + b->len, "%P-%uL\",\"cursor\":\"", ngx_pid,
                         s->id)
             - b->data;

    if (ngx_chat_buf_add(b, cbuf, last - cbuf) != NGX_OK
        || ngx_chat_buf_add_lit(b, "\",\"heartbeat_ms\":") != NGX_OK
        || ngx_chat_buf_add_uint(b, ngx_chat_worker.cmcf->ping_interval)
           != NGX_OK
        || (s->hello_id ? ngx_chat_buf_add_lit(b, "}}")
                        : ngx_chat_buf_add_lit(b, "}")) != NGX_OK)
    {
        goto failed;
    }

    (void) ngx_chat_session_write(s, b);

    ngx_free(s->hello_id);
    s->hello_id = NULL;

    if (s->bad_cursor) {
        s->bad_cursor = 0;
        ngx_chat_session_resync_required(s, "unknown cursor");
    }

    return;

failed:

    ngx_free(s->hello_id);
    s->hello_id = NULL;
    ngx_chat_session_close(s, NGX_CHAT_CLOSE_INTERNAL, "internal");
}


static void
ngx_chat_session_resync_required(ngx_chat_session_t *s, const char *reason)
{
    u_char          *last;
    ngx_chat_buf_t  *b;
    u_char           cbuf[NGX_CHAT_CURSOR_LEN];

    b = &ngx_chat_reply_buf;
    b->len = 0;
    last = ngx_chat_cursor_print(cbuf, s->cursor);

    if (ngx_chat_buf_add_lit(b, "{\"type\":\"resync_required\",\"cursor\":\"")
        == NGX_OK
        && ngx_chat_buf_add(b, cbuf, last - cbuf) == NGX_OK
        && ngx_chat_buf_add_lit(b, "\",\"reason\":") == NGX_OK
        && ngx_chat_buf_add_json_str(b, (u_char *) reason, ngx_strlen(reason))
           == NGX_OK
        && ngx_chat_buf_add_lit(b, "}") == NGX_OK)
    {
        (void) ngx_chat_session_write(s, b);
    }
}


/*
 * The bus was reset (the database was replaced): the session continues
 * live from the bus's new position and the client reloads over REST.
 */
void
ngx_chat_session_resync(ngx_chat_session_t *s, const char *reason)
{
    if (s->state == NGX_CHAT_SESSION_CLOSED || !s->hello_done) {
        return;
    }

    if (s->catchup_busy) {
        s->catchup_stale = 1;
    }

    s->cursor = ngx_chat_bus_position();
    s->start = s->cursor;
    s->delivered = 0;
    s->state = NGX_CHAT_SESSION_CATCHUP;

    ngx_chat_session_resync_required(s, reason);
    ngx_chat_session_catchup(s);
}


static void
ngx_chat_session_catchup(ngx_chat_session_t *s)
{
    ngx_int_t  rc;

    if (s->state != NGX_CHAT_SESSION_CATCHUP || s->catchup_busy
        || s->catchup_waiting || s->wait_drain || s->pending_close)
    {
        return;
    }

    rc = ngx_chat_bus_replay(s);

    if (rc == NGX_OK) {
        s->state = NGX_CHAT_SESSION_LIVE;
        return;
    }

    if (rc == NGX_AGAIN) {
        /* deliver() set wait_drain */
        return;
    }

    if (rc == NGX_ERROR) {
        /* closing already, or out of memory: then close */
        ngx_chat_session_close(s, NGX_CHAT_CLOSE_INTERNAL, "internal");
        return;
    }

    /* the ring no longer holds all of it: read the store */

    if (ngx_chat_catchup_waiting.next == NULL) {
        ngx_queue_init(&ngx_chat_catchup_waiting);
    }

    if (ngx_chat_catchup_inflight
        >= ngx_max(ngx_chat_worker.cmcf->db_pool_size / 2, 1))
    {
        ngx_queue_insert_tail(&ngx_chat_catchup_waiting, &s->catchup_queue);
        s->catchup_waiting = 1;
        return;
    }

    if (ngx_chat_session_catchup_query(s) != NGX_OK) {
        ngx_chat_session_close(s, NGX_CHAT_CLOSE_GOING_AWAY,
                               "store unavailable");
    }
}


/*
 * A page of the user's events after the cursor: a merge over the user's
 * memberships, no larger in bytes than the room left in the transport's
 * window (and at least one event).
 */
static ngx_int_t
ngx_chat_session_catchup_query(ngx_chat_session_t *s)
{
    u_char            *p;
    size_t             room, pending, window;
    ngx_chat_query_t  *q;

    q = ngx_chat_query_alloc(NGX_CHAT_STMT_CATCHUP,
                             s->user.len + 1 + 4 * NGX_INT64_LEN + 4);
    if (q == NULL) {
        return NGX_ERROR;
    }

    window = ngx_chat_worker.cmcf->max_queue / 2;
    pending = s->transport->pending(s);
    room = (pending < window) ? window - pending : 1;

    p = (u_char *) &q[1];

    q->params[0] = (char *) p;
    p = ngx_cpymem(p, s->user.data, s->user.len);
    *p++ = '\0';

    q->params[1] = (char *) p;
    p = ngx_sprintf(p, "%uL", s->cursor);
    *p++ = '\0';

    q->params[2] = (char *) p;
    p = ngx_sprintf(p, "%ui", ngx_chat_worker.cmcf->catchup_page);
    *p++ = '\0';

    q->params[3] = (char *) p;
    p = ngx_sprintf(p, "%uz", room);
    *p++ = '\0';

    /*
     * Only what the bus has passed: every position up to it is settled,
     * while one above may belong to a transaction that commits later.
     */
    s->catchup_upto = ngx_chat_bus_position();

    q->params[4] = (char *) p;
    p = ngx_sprintf(p, "%uL", s->catchup_upto);
    *p++ = '\0';

    q->handler = ngx_chat_session_catchup_done;
    q->data = s;

    if (ngx_chat_db_query(q) != NGX_OK) {
        ngx_chat_query_free(q);
        return NGX_ERROR;
    }

    ngx_chat_catchup_inflight++;
    s->refs++;
    s->catchup_busy = 1;

    return NGX_OK;
}


static void
ngx_chat_session_catchup_done(ngx_chat_query_t *q, PGresult *res,
    ngx_int_t rc)
{
    int                  i, n, page;
    int64_t              conv;
    uint64_t             gseq;
    ngx_int_t            drc;
    ngx_chat_event_t     ev;
    ngx_chat_session_t  *s;

    s = q->data;
    ngx_chat_query_free(q);

    ngx_chat_catchup_inflight--;
    ngx_chat_session_catchup_next();

    if (ngx_chat_session_unref(s) != NGX_OK) {
        return;
    }

    s->catchup_busy = 0;

    if (s->catchup_stale) {
        /* the cursor was rewound while this page was on its way */
        s->catchup_stale = 0;
        ngx_chat_session_catchup(s);
        return;
    }

    if (rc != NGX_OK) {
        ngx_chat_session_close(s, NGX_CHAT_CLOSE_GOING_AWAY,
                               "store unavailable");
        return;
    }

    n = PQntuples(res);
    page = n ? (int) ngx_atoi((u_char *) PQgetvalue(res, 0, 3),
                              PQgetlength(res, 0, 3))
             : 0;

    for (i = 0; i < n; i++) {
        gseq = ngx_atoof((u_char *) PQgetvalue(res, i, 0),
                         PQgetlength(res, i, 0));

        if (gseq <= s->cursor) {
            continue;
        }

        if (PQgetisnull(res, i, 2)) {
            /* a message event whose message row is gone: nothing to send */
            s->cursor = gseq;
            continue;
        }

        conv = ngx_atoof((u_char *) PQgetvalue(res, i, 1),
                         PQgetlength(res, i, 1));

        ngx_chat_event_init(&ev, gseq, conv, (u_char *) PQgetvalue(res, i, 2),
                            PQgetlength(res, i, 2));

        drc = ngx_chat_session_deliver(s, &ev);

        if (drc == NGX_ERROR) {
            return;
        }

        if (drc == NGX_AGAIN && i + 1 < n) {
            /* the rest of the page comes again once the client drained */
            return;
        }
    }

    if (page == n && (ngx_uint_t) n < ngx_chat_worker.cmcf->catchup_page) {
        /*
         * A short page saw every event committed before it was asked
         * for, and everything up to catchup_upto was committed by then.
         */
        if (s->catchup_upto > s->cursor) {
            s->cursor = s->catchup_upto;
        }
    }

    ngx_chat_session_catchup(s);
}


/* a store page of catch-up came back: the next waiting session's turn */

static void
ngx_chat_session_catchup_next(void)
{
    ngx_queue_t         *q;
    ngx_chat_session_t  *s;

    while (ngx_chat_catchup_waiting.next
           && !ngx_queue_empty(&ngx_chat_catchup_waiting)
           && ngx_chat_catchup_inflight
              < ngx_max(ngx_chat_worker.cmcf->db_pool_size / 2, 1))
    {
        q = ngx_queue_head(&ngx_chat_catchup_waiting);
        ngx_queue_remove(q);

        s = ngx_queue_data(q, ngx_chat_session_t, catchup_queue);
        s->catchup_waiting = 0;

        ngx_chat_session_catchup(s);
    }
}


void
ngx_chat_session_drained(ngx_chat_session_t *s)
{
    if (s->wait_drain) {
        s->wait_drain = 0;
        ngx_chat_session_catchup(s);
    }
}


/*
 * NGX_OK, NGX_AGAIN (delivered; the window is full: the session waits for
 * "drained" and catches up from its cursor then) or NGX_ERROR.
 */
ngx_int_t
ngx_chat_session_deliver(ngx_chat_session_t *s, ngx_chat_event_t *ev)
{
    if (s->pending_close) {
        return NGX_ERROR;
    }

    if (ev->gseq) {
        s->cursor = ev->gseq;
        s->delivered = 1;
        ngx_chat_receipts_delivered(s, ev);
        ngx_chat_count(NGX_CHAT_MC_DELIVERIES, 1);

    } else {
        ngx_chat_count(NGX_CHAT_MC_EPHEMERAL, 1);
    }

    return ngx_chat_session_sent(s, s->transport->send_event(s, ev));
}


/*
 * What the transport answered: on NGX_AGAIN the window is full, and
 * events wait for "drained" (a LIVE session steps back to catch-up).
 */
static ngx_int_t
ngx_chat_session_sent(ngx_chat_session_t *s, ngx_int_t rc)
{
    if (rc == NGX_ERROR) {
        s->pending_close = 1;
        return NGX_ERROR;
    }

    if (rc == NGX_AGAIN) {
        s->wait_drain = 1;

        if (s->state == NGX_CHAT_SESSION_LIVE) {
            s->state = NGX_CHAT_SESSION_CATCHUP;
        }
    }

    return rc;
}


static void
ngx_chat_session_send(ngx_chat_session_t *s, json_t *root,
    ngx_chat_req_id_t *rid)
{
    ngx_int_t         rc;
    const char       *code, *msg;
    ngx_chat_send_t  *snd;

    if (ngx_chat_session_limited(s, NGX_CHAT_RATE_SEND, rid) != NGX_OK) {
        return;
    }

    snd = ngx_chat_store_send_from_json(root, &s->user, 0, rid->len, &code,
                                        &msg);
    if (snd == NULL) {
        ngx_chat_reply_error(s, rid->data, rid->len, code, msg, 0);
        return;
    }

    /*
     * One connection cannot fill the worker's store queue, and the replies
     * it is owed (each carries its message) fit half the output queue.
     */

    if (s->sends
        && (s->sends >= NGX_CHAT_SESSION_SENDS
            || s->send_bytes + ngx_chat_session_reply_size(snd)
               > ngx_chat_worker.cmcf->max_queue / 2))
    {
        ngx_free(snd);
        ngx_chat_reply_error(s, rid->data, rid->len, "rate_limited",
                             "too many sends waiting for the store",
                             NGX_CHAT_SESSION_SEND_WAIT);
        return;
    }

    snd->req_id_len = rid->len;
    ngx_memcpy(snd->req_id, rid->data, rid->len);

    snd->handler = ngx_chat_session_send_done;
    snd->data = s;

    rc = ngx_chat_store_send(snd);

    if (rc != NGX_OK) {
        ngx_free(snd);

        if (rc == NGX_BUSY) {
            ngx_chat_reply_error(s, rid->data, rid->len, "rate_limited",
                                 "too many sends of this user waiting for "
                                 "the store", NGX_CHAT_SESSION_SEND_WAIT);
            return;
        }

        ngx_chat_reply_error(s, rid->data, rid->len, "unavailable",
                             "the store is unavailable",
                             ngx_chat_db_retry_after());
        return;
    }

    s->refs++;
    s->sends++;
    s->send_bytes += ngx_chat_session_reply_size(snd);
}


static void
ngx_chat_session_send_done(ngx_chat_send_t *snd)
{
    ngx_chat_buf_t      *b;
    ngx_chat_session_t  *s;

    s = snd->data;
    s->sends--;
    s->send_bytes -= ngx_chat_session_reply_size(snd);

    if (ngx_chat_session_unref(s) != NGX_OK) {
        return;
    }

    if (snd->rc != NGX_OK) {
        ngx_chat_reply_error(s, snd->req_id, snd->req_id_len, snd->error,
                             snd->error_msg, snd->retry_after);
        return;
    }

    b = &ngx_chat_reply_buf;
    b->len = 0;

    if (ngx_chat_buf_add_lit(b, "{\"type\":\"reply\",\"id\":") != NGX_OK
        || ngx_chat_buf_add(b, snd->req_id, snd->req_id_len) != NGX_OK
        || ngx_chat_buf_add_lit(b, ",\"ok\":true,\"result\":{\"message\":")
           != NGX_OK
        || ngx_chat_buf_add_str(b, &snd->message) != NGX_OK
        || ngx_chat_buf_add_lit(b, "}}") != NGX_OK)
    {
        return;
    }

    (void) ngx_chat_session_write(s, b);
}


/* edit, delete, react, unreact: one event each (ngx_chat_ops.c) */

static void
ngx_chat_session_op(ngx_chat_session_t *s, const char *name, json_t *root,
    ngx_chat_req_id_t *rid)
{
    const char     *code, *msg;
    ngx_chat_op_t  *op;

    if (s->sends >= NGX_CHAT_SESSION_SENDS) {
        ngx_chat_reply_error(s, rid->data, rid->len, "rate_limited",
                             "too many requests waiting for the store",
                             NGX_CHAT_SESSION_SEND_WAIT);
        return;
    }

    /* no position to give its event: nothing is written */
    if (!ngx_chat_bus_can_reserve()) {
        ngx_chat_reply_error(s, rid->data, rid->len, "unavailable",
                             "the store is busy", 200);
        return;
    }

    if (ngx_chat_session_limited(s, NGX_CHAT_RATE_SEND, rid) != NGX_OK) {
        return;
    }

    op = ngx_chat_op_create(name, 0, root, &s->user,
                            s->role == NGX_CHAT_ROLE_SERVICE, rid->len,
                            &code, &msg);
    if (op == NULL) {
        ngx_chat_reply_error(s, rid->data, rid->len,
                             code ? code : "internal",
                             code ? msg : "internal error", 0);
        return;
    }

    op->req_id_len = rid->len;
    ngx_memcpy(op->req_id, rid->data, rid->len);

    op->handler = ngx_chat_session_op_done;
    op->query.data = s;

    if (ngx_chat_db_query(&op->query) != NGX_OK) {
        ngx_free(op);
        ngx_chat_reply_error(s, rid->data, rid->len, "unavailable",
                             "the store is unavailable",
                             ngx_chat_db_retry_after());
        return;
    }

    s->refs++;
    s->sends++;
}


static void
ngx_chat_session_op_done(ngx_chat_op_t *op)
{
    ngx_chat_session_t  *s;

    s = op->query.data;
    s->sends--;

    if (ngx_chat_session_unref(s) != NGX_OK) {
        return;
    }

    if (op->rc != NGX_OK) {
        ngx_chat_reply_error(s, op->req_id, op->req_id_len, "unavailable",
                             "the store is unavailable",
                             ngx_chat_db_retry_after());

    } else if (op->code) {
        ngx_chat_reply_error(s, op->req_id, op->req_id_len, op->code,
                             (const char *) op->text.data, 0);

    } else {
        ngx_chat_reply_ok(s, op->req_id, op->req_id_len, op->text.data,
                          op->text.len);
    }
}


static void
ngx_chat_session_auth(ngx_chat_session_t *s, json_t *root,
    ngx_chat_req_id_t *rid)
{
    u_char     *p;
    ngx_str_t   token;
    u_char      result[64];

    if (ngx_chat_json_str(root, "token", &token, 8192, 1) != NGX_OK) {
        ngx_chat_reply_error(s, rid->data, rid->len, "bad_request",
                             "\"token\" is required", 0);
        return;
    }

    if (ngx_chat_session_verify(s, &token, rid, 0) != NGX_OK) {
        return;
    }

    if (s->timer.timer_set) {
        ngx_del_timer(&s->timer);
    }

    ngx_chat_session_set_timer(s);

    p = ngx_sprintf(result, "{\"exp\":%T}", s->exp);
    ngx_chat_reply_ok(s, rid->data, rid->len, result, p - result);
}


static void
ngx_chat_session_sync(ngx_chat_session_t *s, json_t *root,
    ngx_chat_req_id_t *rid)
{
    u_char     *p;
    ngx_str_t   cursor;
    u_char      result[NGX_CHAT_CURSOR_LEN + 16];

    if (ngx_chat_json_str(root, "cursor", &cursor, 1024, 1) != NGX_OK) {
        ngx_chat_reply_error(s, rid->data, rid->len, "bad_request",
                             "\"cursor\" is required", 0);
        return;
    }

    ngx_chat_session_want(s, &cursor);

    if (s->bad_cursor
        || ngx_chat_session_check(s, ngx_chat_bus_known()) != NGX_OK)
    {
        s->bad_cursor = 0;
        ngx_chat_reply_error(s, rid->data, rid->len, "bad_request",
                             "unknown cursor: reload over REST", 0);
        ngx_chat_session_resync_required(s, "unknown cursor");
        return;
    }

    p = ngx_cpymem(result, "{\"cursor\":\"", sizeof("{\"cursor\":\"") - 1);
    p = ngx_chat_cursor_print(p, s->want);
    *p++ = '"';
    *p++ = '}';
    ngx_chat_reply_ok(s, rid->data, rid->len, result, p - result);

    if (s->want < s->cursor) {
        ngx_chat_session_rewind(s, s->want);
        ngx_chat_session_catchup(s);

    } else {
        /* the client has these already (from another connection) */
        s->cursor = s->want;
    }
}


/* the transport is gone */

void
ngx_chat_session_closed(ngx_chat_session_t *s)
{
    s->transport_gone = 1;
    s->state = NGX_CHAT_SESSION_CLOSED;

    if (s->metered) {
        (void) ngx_chat_metrics_session(&s->transport->name, -1);
    }

    if (s->timer.timer_set) {
        ngx_del_timer(&s->timer);
    }

    if (s->catchup_waiting) {
        ngx_queue_remove(&s->catchup_queue);
        s->catchup_waiting = 0;
    }

    ngx_chat_live_leave(s);
    ngx_chat_bus_unregister(s);

    if (s->refs == 0) {
        ngx_chat_session_free(s);
    }
}


static ngx_int_t
ngx_chat_session_unref(ngx_chat_session_t *s)
{
    s->refs--;

    if (s->state == NGX_CHAT_SESSION_CLOSED) {
        if (s->refs == 0) {
            ngx_chat_session_free(s);
        }

        return NGX_DECLINED;
    }

    return NGX_OK;
}


static void
ngx_chat_session_free(ngx_chat_session_t *s)
{
    if (s->unauth) {
        ngx_chat_limit_unauth_add(-1);
    }

    ngx_chat_receipts_free(s);
    ngx_free(s->hello_id);
    ngx_free(s->idmem);
    ngx_free(s->blocks);
    ngx_free(s);
}


/*
 * The users this session's user blocks (one per line): their typing and
 * presence are not delivered to it.  Set at the join, and again when the
 * user changes its blocks (ngx_chat_live.c).  Without memory the old
 * list stays (a missed update is like a lost typing event).
 */

void
ngx_chat_session_set_blocks(ngx_chat_session_t *s, u_char *list, size_t len,
    ngx_uint_t live)
{
    u_char  *p;

    /* a change that came while the join was on its way is newer */
    if (!live && s->blocks_live) {
        return;
    }

    s->blocks_live = live;

    /* 256 ids of at most 128 bytes and their newlines */
    if (len > 256 * (NGX_CHAT_MAX_ID_LEN + 1)) {
        return;
    }

    if (len == 0) {
        ngx_free(s->blocks);
        s->blocks = NULL;
        s->blocks_len = 0;
        return;
    }

    p = ngx_alloc(len + 2, s->log);
    if (p == NULL) {
        return;
    }

    p[0] = '\n';
    ngx_memcpy(p + 1, list, len);
    p[len + 1] = '\n';

    ngx_free(s->blocks);
    s->blocks = p;
    s->blocks_len = len + 2;
}


ngx_int_t
ngx_chat_session_blocked(ngx_chat_session_t *s, ngx_str_t *user)
{
    u_char  *p, *end;

    if (s->blocks_len == 0 || user->len == 0) {
        return 0;
    }

    p = s->blocks;
    end = s->blocks + s->blocks_len;

    /* "\n" user "\n" somewhere in the list */

    while (p + user->len + 2 <= end) {
        if (p[user->len + 1] == '\n'
            && ngx_strncmp(p + 1, user->data, user->len) == 0)
        {
            return 1;
        }

        p = ngx_strlchr(p + 1, end, '\n');

        if (p == NULL) {
            break;
        }
    }

    return 0;
}


void
ngx_chat_session_end(ngx_chat_session_t *s, ngx_uint_t code,
    const char *reason)
{
    ngx_chat_session_close(s, code, reason);
}


static void
ngx_chat_session_close(ngx_chat_session_t *s, ngx_uint_t code,
    const char *reason)
{
    if (s->state == NGX_CHAT_SESSION_CLOSED || s->pending_close) {
        return;
    }

    s->pending_close = 1;
    ngx_chat_metrics_close(code);
    s->transport->close(s, code, reason);
}


/*
 * Replies and control messages are always queued: what a client is owed
 * for its own requests is bounded by what it sends.
 */
static ngx_int_t
ngx_chat_session_write(ngx_chat_session_t *s, ngx_chat_buf_t *b)
{
    if (s->pending_close || s->state == NGX_CHAT_SESSION_CLOSED) {
        return NGX_ERROR;
    }

    return ngx_chat_session_sent(s, s->transport->send(s, b->data, b->len));
}


static void
ngx_chat_reply_ok(ngx_chat_session_t *s, u_char *id, size_t idlen,
    u_char *result, size_t len)
{
    ngx_chat_buf_t  *b;

    b = &ngx_chat_reply_buf;
    b->len = 0;

    if (ngx_chat_buf_add_lit(b, "{\"type\":\"reply\",\"id\":") != NGX_OK
        || ngx_chat_buf_add(b, id, idlen) != NGX_OK
        || ngx_chat_buf_add_lit(b, ",\"ok\":true,\"result\":") != NGX_OK
        || ngx_chat_buf_add(b, result, len) != NGX_OK
        || ngx_chat_buf_add_lit(b, "}") != NGX_OK)
    {
        return;
    }

    (void) ngx_chat_session_write(s, b);
}


static void
ngx_chat_reply_error(ngx_chat_session_t *s, u_char *id, size_t idlen,
    const char *code, const char *msg, ngx_msec_t retry)
{
    ngx_chat_buf_t  *b;

    ngx_chat_metrics_error(code);

    b = &ngx_chat_reply_buf;
    b->len = 0;

    if (ngx_chat_buf_add_lit(b, "{\"type\":\"reply\",\"id\":") != NGX_OK
        || ngx_chat_buf_add(b, id, idlen) != NGX_OK
        || ngx_chat_buf_add_lit(b, ",\"ok\":false,\"error\":") != NGX_OK
        || ngx_chat_buf_add_error(b, code, msg, retry) != NGX_OK
        || ngx_chat_buf_add_lit(b, "}") != NGX_OK)
    {
        return;
    }

    (void) ngx_chat_session_write(s, b);
}


ngx_int_t
ngx_chat_session_device(ngx_chat_session_t *s, ngx_str_t *device)
{
    if (ngx_chat_live_valid_device(device->data, device->len) != NGX_OK) {
        return NGX_ERROR;
    }

    /*
     * Only sameness matters: a 64-bit hash (two independent 32-bit ones)
     * stands for the id, in the session and in the zone.
     */
    s->device = ((uint64_t) ngx_crc32_long(device->data, device->len) << 32)
                | ngx_hash_key(device->data, device->len);

    if (s->device == 0) {
        s->device = 1;
    }

    return NGX_OK;
}


/*
 * The joined session becomes a device of its user (presence, device_id,
 * the per-user cap); list holds its conversations small enough for
 * presence, comma separated.
 */
static ngx_int_t
ngx_chat_session_contacts(ngx_chat_session_t *s, ngx_str_t *list)
{
    u_char      *p, *end, *last;
    int64_t     *contacts;
    ngx_int_t    rc;
    ngx_uint_t   n;

    n = 0;
    contacts = NULL;

    if (list->len) {
        /* "1,2,3": at most len / 2 + 1 ids */
        contacts = ngx_alloc((list->len / 2 + 1) * sizeof(int64_t), s->log);
        if (contacts == NULL) {
            return NGX_ERROR;
        }

        p = list->data;
        end = p + list->len;

        while (p < end) {
            last = ngx_strlchr(p, end, ',');
            if (last == NULL) {
                last = end;
            }

            if (ngx_chat_parse_id(p, last - p, &contacts[n]) == NGX_OK) {
                n++;
            }

            p = last + 1;
        }
    }

    rc = ngx_chat_live_join(s, contacts, n);

    ngx_free(contacts);

    return rc;
}


/* "id" is optional on live-state requests: without it, no success reply */

static ngx_inline void
ngx_chat_session_reply_empty(ngx_chat_session_t *s, json_t *root,
    ngx_chat_req_id_t *rid)
{
    if (json_object_get(root, "id") != NULL) {
        ngx_chat_reply_ok(s, rid->data, rid->len, (u_char *) "{}", 2);
    }
}


static void
ngx_chat_session_typing(ngx_chat_session_t *s, json_t *root,
    ngx_chat_req_id_t *rid)
{
    int64_t     conv;
    ngx_uint_t  i;
    ngx_str_t   state;
    ngx_uint_t  start;

    if (ngx_chat_json_id(root, "conversation_id", &conv, 1) != NGX_OK
        || ngx_chat_json_str(root, "state", &state, 8, 1) != NGX_OK
        || !((state.len == 5 && ngx_strncmp(state.data, "start", 5) == 0)
             || (state.len == 4 && ngx_strncmp(state.data, "stop", 4) == 0)))
    {
        ngx_chat_reply_error(s, rid->data, rid->len, "bad_request",
                             "\"conversation_id\" and \"state\" (\"start\" "
                             "or \"stop\") are required", 0);
        return;
    }

    if (!s->hello_done
        || !ngx_chat_bus_subscribed(s, conv))
    {
        ngx_chat_reply_error(s, rid->data, rid->len, "forbidden",
                             "not a member of the conversation", 0);
        return;
    }

    start = (state.len == 5);

    if (start
        && ngx_chat_session_limited(s, NGX_CHAT_RATE_TYPING, rid) != NGX_OK)
    {
        return;
    }

    for (i = 0; i < s->ntyping; i++) {
        if (s->typing[i] == conv) {
            break;
        }
    }

    if (!start && i < s->ntyping) {
        s->typing[i] = s->typing[--s->ntyping];

    } else if (start && i == s->ntyping) {

        if (s->ntyping == NGX_CHAT_SESSION_TYPING) {
            /* a connection types in a few conversations at once at most */
            ngx_chat_live_typing_release(s->typing[0], &s->user, s->id);
            ngx_memmove(&s->typing[0], &s->typing[1],
                        (NGX_CHAT_SESSION_TYPING - 1) * sizeof(int64_t));
            s->ntyping--;
        }

        s->typing[s->ntyping++] = conv;
    }

    if (ngx_chat_live_typing(conv, &s->user, start, s->id) == NGX_BUSY) {
        ngx_chat_reply_error(s, rid->data, rid->len, "rate_limited",
                             "too many typing states", 1000);
        return;
    }

    ngx_chat_session_reply_empty(s, root, rid);
}


static void
ngx_chat_session_presence(ngx_chat_session_t *s, json_t *root,
    ngx_chat_req_id_t *rid)
{
    ngx_str_t  status;

    if (ngx_chat_json_str(root, "status", &status, 8, 1) != NGX_OK
        || !((status.len == 6 && ngx_strncmp(status.data, "online", 6) == 0)
             || (status.len == 4 && ngx_strncmp(status.data, "away", 4) == 0)))
    {
        ngx_chat_reply_error(s, rid->data, rid->len, "bad_request",
                             "\"status\" must be \"online\" or \"away\"", 0);
        return;
    }

    ngx_chat_live_away(s, status.len == 4);

    ngx_chat_session_reply_empty(s, root, rid);
}


static void
ngx_chat_session_presence_sub(ngx_chat_session_t *s, json_t *root,
    ngx_chat_req_id_t *rid)
{
    json_t          *a, *u;
    size_t           i, j, n;
    ngx_str_t        users[NGX_CHAT_PRESENCE_SUB_MAX];
    ngx_chat_buf_t   b;

    a = json_object_get(root, "users");

    if (!json_is_array(a) || json_array_size(a) > NGX_CHAT_PRESENCE_SUB_MAX) {
        ngx_chat_reply_error(s, rid->data, rid->len, "bad_request",
                             "\"users\" must be an array of at most 256 "
                             "user ids", 0);
        return;
    }

    n = json_array_size(a);

    for (i = 0; i < n; i++) {
        u = json_array_get(a, i);

        if (!json_is_string(u)) {
            goto invalid;
        }

        users[i].data = (u_char *) json_string_value(u);
        users[i].len = json_string_length(u);

        if (ngx_chat_valid_user_id(users[i].data, users[i].len) != NGX_OK) {
            goto invalid;
        }
    }

    /* users this one blocks are not shown, now or later */

    for (i = 0, j = 0; i < n; i++) {
        if (!ngx_chat_session_blocked(s, &users[i])) {
            users[j++] = users[i];
        }
    }

    n = j;

    ngx_memzero(&b, sizeof(ngx_chat_buf_t));

    if (ngx_chat_buf_add_lit(&b, "{\"presence\":") != NGX_OK
        || ngx_chat_live_subscribe(s, users, n, &b) != NGX_OK
        || ngx_chat_buf_add_lit(&b, "}") != NGX_OK)
    {
        ngx_chat_buf_free(&b);
        ngx_chat_reply_error(s, rid->data, rid->len, "internal",
                             "out of memory", 0);
        return;
    }

    ngx_chat_reply_ok(s, rid->data, rid->len, b.data, b.len);
    ngx_chat_buf_free(&b);

    return;

invalid:

    ngx_chat_reply_error(s, rid->data, rid->len, "bad_request",
                         "\"users\" must be an array of user ids", 0);
}


/* the client has every event up to the cursor: "delivered" */

static void
ngx_chat_session_ack(ngx_chat_session_t *s, json_t *root,
    ngx_chat_req_id_t *rid)
{
    uint64_t   gseq;
    ngx_str_t  cursor;

    if (ngx_chat_json_str(root, "cursor", &cursor, 1024, 1) != NGX_OK
        || ngx_chat_cursor_parse(cursor.data, cursor.len, &gseq) != NGX_OK)
    {
        ngx_chat_reply_error(s, rid->data, rid->len, "bad_request",
                             "\"cursor\" must be a cursor of this server",
                             0);
        return;
    }

    /* a cursor past what this connection was handed acks only that */
    ngx_chat_receipts_ack(s, ngx_min(gseq, s->cursor));

    ngx_chat_session_reply_empty(s, root, rid);
}


static void
ngx_chat_session_read(ngx_chat_session_t *s, json_t *root,
    ngx_chat_req_id_t *rid)
{
    int64_t  conv, seq;

    if (ngx_chat_json_id(root, "conversation_id", &conv, 1) != NGX_OK
        || ngx_chat_json_int(root, "seq", &seq, 1) != NGX_OK
        || seq < 0)
    {
        ngx_chat_reply_error(s, rid->data, rid->len, "bad_request",
                             "\"conversation_id\" and \"seq\" are required",
                             0);
        return;
    }

    if (!s->hello_done || !ngx_chat_bus_subscribed(s, conv)) {
        ngx_chat_reply_error(s, rid->data, rid->len, "forbidden",
                             "not a member of the conversation", 0);
        return;
    }

    ngx_chat_receipts_mark(conv, &s->user, 0, seq, ngx_chat_bus_known());

    ngx_chat_session_reply_empty(s, root, rid);
}
