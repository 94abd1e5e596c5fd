
/*
 * Copyright (C) ngx_chat_module authors
 *
 * The HTTP transports: Server-Sent Events (GET /chat/events) and long-poll
 * (GET /chat/poll), for clients behind proxies that kill WebSockets.
 *
 * Both hold the HTTP request for the session's life and write through
 * nginx's output filters (chunked encoding, TLS, HTTP/2 all come from
 * nginx), one buffer at a time: text queued while a buffer is being sent
 * waits in a second one, and the two together are the window that
 * chat_max_queue bounds, as for a WebSocket.  A reader that does not drain
 * within chat_send_timeout is cut.
 *
 * SSE is a session like a WebSocket's, one-way: every durable event is
 * "id: <cursor>", "event: <kind>", "data: <envelope>"; ephemeral events
 * and control messages carry no id (resync_required carries its new
 * cursor, so that the browser resumes from it).  Once an EventSource has
 * its 200 it only stops reconnecting on a non-200 answer, so every later
 * condition -- the store down, a reload, a cap -- is an "error" event with
 * retry_after_ms and a "retry:" line, then the end of the stream; only a
 * failed authentication is answered 401.  What was written to the socket
 * counts as delivered (receipts): SSE has no way back for an ack.
 *
 * A long-poll is a short session: it joins, replays from its cursor, and
 * answers with the first events it is handed (up to a page), or when the
 * timeout passes, with the cursor to poll from next.  Its events count as
 * delivered when they are answered.
 *
 * The session never calls back into the transport from inside send() or
 * close(): those only queue and post ctx->post; flushing, answering and
 * finalizing happen in the transport's own event handlers.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_chat_module.h"
#include "ngx_chat_auth.h"
#include "ngx_chat_bus.h"
#include "ngx_chat_db.h"
#include "ngx_chat_transport.h"
#include "ngx_chat_session.h"
#include "ngx_chat_api.h"
#include "ngx_chat_limit.h"
#include "ngx_chat_live.h"
#include "ngx_chat_receipts.h"
#include "ngx_chat_stream.h"


#define NGX_CHAT_STREAM_OUT_MIN      1024
#define NGX_CHAT_STREAM_JOIN_WAIT    50


typedef struct {
    ngx_http_request_t        *request;
    ngx_chat_session_t        *session;
    ngx_chat_limit_addr_t     *limit;
    ngx_event_handler_pt       read_handler;    /* nginx's, while we hold */
    ngx_uint_t                 kind;

    /* queued, not yet handed to nginx */
    u_char                    *out;
    u_char                    *out_last;
    u_char                    *out_end;
    uint64_t                   out_gseq;        /* its last durable event */

    /* handed to nginx, being sent */
    u_char                    *busy;
    size_t                     busy_len;
    uint64_t                   busy_gseq;
    ngx_buf_t                  buf;
    ngx_chain_t                chain;

    ngx_event_t                post;            /* flush, answer, finish */
    ngx_event_t                timer;           /* heartbeat; poll deadline */
    ngx_msec_t                 paused_at;
    ngx_msec_t                 retry_after;      /* rate limited */

    /* long-poll */
    ngx_uint_t                 nevents;
    uint64_t                   cursor;          /* of the last one */

    ngx_uint_t                 close_code;
    const char                *close_reason;

    unsigned                   paused:1;        /* past the window */
    unsigned                   closing:1;       /* the last text queued */
    unsigned                   quiet:1;         /* nothing since the beat */
    unsigned                   finished:1;
} ngx_chat_stream_ctx_t;


static ngx_int_t ngx_chat_stream_cursor(ngx_http_request_t *r,
    ngx_uint_t kind, ngx_str_t *cursor);
static ngx_int_t ngx_chat_stream_timeout_arg(ngx_http_request_t *r,
    ngx_msec_t *timeout);
static ngx_int_t ngx_chat_stream_header(ngx_http_request_t *r, char *name,
    char *value);
static ngx_int_t ngx_chat_stream_sse_start(ngx_chat_stream_ctx_t *ctx);
static ngx_int_t ngx_chat_stream_limited(ngx_chat_stream_ctx_t *ctx,
    ngx_chat_identity_t *id);
static ngx_int_t ngx_chat_stream_reserve(ngx_chat_stream_ctx_t *ctx,
    size_t size);
static ngx_int_t ngx_chat_stream_add(ngx_chat_stream_ctx_t *ctx,
    u_char *data, size_t len);
static ngx_int_t ngx_chat_stream_record(ngx_chat_stream_ctx_t *ctx,
    u_char *head, size_t head_len, ngx_str_t *name, u_char *data,
    size_t len);
static ngx_int_t ngx_chat_stream_failed(ngx_chat_stream_ctx_t *ctx);
static ngx_int_t ngx_chat_stream_queued(ngx_chat_stream_ctx_t *ctx);
static void ngx_chat_stream_schedule(ngx_chat_stream_ctx_t *ctx);
static void ngx_chat_stream_post_handler(ngx_event_t *ev);
static void ngx_chat_stream_run(ngx_chat_stream_ctx_t *ctx);
static ngx_int_t ngx_chat_stream_flush(ngx_chat_stream_ctx_t *ctx);
static void ngx_chat_stream_write_handler(ngx_http_request_t *r);
static void ngx_chat_stream_read_handler(ngx_event_t *rev);
static void ngx_chat_stream_timer_handler(ngx_event_t *ev);
static void ngx_chat_stream_sse_error(ngx_chat_stream_ctx_t *ctx,
    ngx_uint_t code, const char *reason);
static void ngx_chat_stream_answer(ngx_chat_stream_ctx_t *ctx);
static ngx_int_t ngx_chat_stream_send_json(ngx_http_request_t *r,
    u_char *data, size_t len);
static void ngx_chat_stream_finish(ngx_chat_stream_ctx_t *ctx, ngx_int_t rc);
static void ngx_chat_stream_detach(ngx_chat_stream_ctx_t *ctx);
static void ngx_chat_stream_cleanup(void *data);
static void ngx_chat_stream_free(void *data);
static ngx_str_t ngx_chat_stream_type(u_char *data, size_t len, size_t skip);

static ngx_int_t ngx_chat_stream_send(ngx_chat_session_t *s, u_char *data,
    size_t len);
static ngx_int_t ngx_chat_stream_send_event(ngx_chat_session_t *s,
    ngx_chat_event_t *ev);
static void ngx_chat_stream_close(ngx_chat_session_t *s, ngx_uint_t code,
    const char *reason);
static size_t ngx_chat_stream_pending(ngx_chat_session_t *s);


/* ngx_http_request_handler(), which is static in nginx */
static ngx_event_handler_pt  ngx_chat_stream_http_handler;


static ngx_chat_transport_t  ngx_chat_sse_transport = {
    ngx_string("sse"),
    ngx_chat_stream_send,
    ngx_chat_stream_send_event,
    ngx_chat_stream_close,
    ngx_chat_stream_pending
};


static ngx_chat_transport_t  ngx_chat_poll_transport = {
    ngx_string("poll"),
    ngx_chat_stream_send,
    ngx_chat_stream_send_event,
    ngx_chat_stream_close,
    ngx_chat_stream_pending
};


ngx_int_t
ngx_chat_stream_handler(ngx_http_request_t *r, ngx_uint_t kind)
{
    ngx_int_t               rc;
    ngx_str_t               cursor, device;
    ngx_msec_t              timeout;
    const char             *code, *msg;
    ngx_connection_t       *c;
    ngx_pool_cleanup_t     *pcln;
    ngx_http_cleanup_t     *cln;
    ngx_chat_identity_t    *id;
    ngx_chat_stream_ctx_t  *ctx;

    c = r->connection;

    if (ngx_chat_worker.cmcf == NULL) {
        return ngx_chat_http_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                   "unavailable", "not ready", 1000);
    }

    if (r->method != NGX_HTTP_GET) {
        return ngx_chat_http_error(r, NGX_HTTP_NOT_ALLOWED, "bad_request",
                                   "method not allowed", 0);
    }

    /* a held request reads nothing more: a body would never be read */
    if (r->headers_in.content_length_n > 0 || r->headers_in.chunked) {
        return ngx_chat_http_error(r, NGX_HTTP_BAD_REQUEST, "bad_request",
                                   "a request with a body", 0);
    }

    timeout = 0;

    if (kind == NGX_CHAT_STREAM_POLL
        && ngx_chat_stream_timeout_arg(r, &timeout) != NGX_OK)
    {
        return ngx_chat_http_error(r, NGX_HTTP_BAD_REQUEST, "bad_request",
                                   "\"timeout_ms\" must be a number of "
                                   "milliseconds", 0);
    }

    if (ngx_chat_stream_cursor(r, kind, &cursor) != NGX_OK) {
        return ngx_chat_http_error(r, NGX_HTTP_BAD_REQUEST, "bad_request",
                                   "the cursor is too long", 0);
    }

    if (ngx_http_arg(r, (u_char *) "device_id", 9, &device) != NGX_OK) {
        ngx_str_null(&device);

    } else if (ngx_chat_live_valid_device(device.data, device.len) != NGX_OK)
    {
        return ngx_chat_http_error(r, NGX_HTTP_BAD_REQUEST, "bad_request",
                                   "\"device_id\" must be 1 to 64 of "
                                   "[A-Za-z0-9._-]", 0);
    }

    id = ngx_pcalloc(r->pool, sizeof(ngx_chat_identity_t));
    if (id == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    rc = ngx_chat_auth_request(r, id, &code, &msg);

    if (rc == NGX_DECLINED) {
        return ngx_chat_http_error(r, NGX_HTTP_UNAUTHORIZED,
                                   code ? code : "unauthorized",
                                   code ? msg : "a ticket or a bearer token "
                                                "is required", 0);
    }

    if (rc != NGX_OK) {
        return ngx_chat_http_error(r, NGX_HTTP_INTERNAL_SERVER_ERROR,
                                   "internal", "authentication failed", 0);
    }

    ctx = ngx_pcalloc(r->pool, sizeof(ngx_chat_stream_ctx_t));
    if (ctx == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    cln = ngx_http_cleanup_add(r, 0);
    if (cln == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    cln->handler = ngx_chat_stream_cleanup;
    cln->data = ctx;

    /*
     * The buffers go with r->pool, not with the request's cleanup: an
     * HTTP/2 stream that is terminated still sends the DATA frames that
     * point into them until ngx_http_free_request().
     */
    pcln = ngx_pool_cleanup_add(r->pool, 0);
    if (pcln == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    pcln->handler = ngx_chat_stream_free;
    pcln->data = ctx;

    ctx->request = r;
    ctx->kind = kind;

    ctx->post.handler = ngx_chat_stream_post_handler;
    ctx->post.data = ctx;
    ctx->post.log = c->log;

    ctx->timer.handler = ngx_chat_stream_timer_handler;
    ctx->timer.data = ctx;
    ctx->timer.log = c->log;

    ngx_http_set_ctx(r, ctx, ngx_chat_module);

    if (kind == NGX_CHAT_STREAM_POLL) {
        if (ngx_chat_stream_add(ctx, (u_char *) "{\"events\":[",
                                sizeof("{\"events\":[") - 1)
            != NGX_OK)
        {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        if (ngx_chat_stream_limited(ctx, id) != NGX_OK) {
            return ngx_chat_http_error(r, NGX_HTTP_TOO_MANY_REQUESTS,
                                       "rate_limited", "too many connection "
                                       "attempts", ctx->retry_after);
        }

        rc = ngx_chat_limit_addr_acquire(c, &ctx->limit);

        if (rc == NGX_BUSY) {
            return ngx_chat_http_error(r, NGX_HTTP_TOO_MANY_REQUESTS,
                                       "rate_limited", "too many connections "
                                       "from this address", 5000);
        }

        if (rc != NGX_OK) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        if (ngx_exiting) {
            return ngx_chat_http_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                       "unavailable", "not ready", 500);
        }

    } else {
        /* from here on, whatever happens is told on the stream */

        if (ngx_chat_stream_sse_start(ctx) != NGX_OK) {
            return NGX_ERROR;
        }
    }

    r->main->count++;

    r->read_event_handler = ngx_http_test_reading;
    r->write_event_handler = ngx_chat_stream_write_handler;

#if (NGX_HTTP_V2)
    if (r->stream == NULL)
#endif
    {
        /* a reload's ngx_close_idle_connections() tells us to go */
        ctx->read_handler = c->read->handler;
        ngx_chat_stream_http_handler = c->read->handler;
        c->read->handler = ngx_chat_stream_read_handler;
        c->idle = 1;
    }

    if (kind == NGX_CHAT_STREAM_SSE) {
        if (ngx_chat_stream_limited(ctx, id) != NGX_OK) {
            ngx_chat_stream_sse_error(ctx, NGX_CHAT_CLOSE_RATE_LIMITED,
                                      "too many connection attempts");
            return NGX_DONE;
        }

        rc = ngx_chat_limit_addr_acquire(c, &ctx->limit);

        if (rc == NGX_BUSY) {
            ngx_chat_stream_sse_error(ctx, NGX_CHAT_CLOSE_SLOW,
                                      "too many connections from this "
                                      "address");
            return NGX_DONE;
        }

        if (rc != NGX_OK || ngx_exiting) {
            ngx_chat_stream_sse_error(ctx, rc == NGX_OK
                                           ? NGX_CHAT_CLOSE_GOING_AWAY
                                           : NGX_CHAT_CLOSE_INTERNAL,
                                      "server going away");
            return NGX_DONE;
        }
    }

    ctx->session = ngx_chat_session_create(kind == NGX_CHAT_STREAM_SSE
                                           ? &ngx_chat_sse_transport
                                           : &ngx_chat_poll_transport,
                                           ctx, c, c->log, id, &cursor);

    if (ctx->session == NULL) {
        ctx->close_code = NGX_CHAT_CLOSE_INTERNAL;
        ctx->close_reason = "not ready";

        if (kind == NGX_CHAT_STREAM_SSE) {
            ngx_chat_stream_sse_error(ctx, NGX_CHAT_CLOSE_INTERNAL,
                                      "not ready");

        } else {
            ctx->closing = 1;
            ngx_chat_stream_schedule(ctx);
        }

        return NGX_DONE;
    }

    if (device.len) {
        (void) ngx_chat_session_device(ctx->session, &device);
    }

    if (kind == NGX_CHAT_STREAM_SSE) {
        ngx_add_timer(&ctx->timer, ngx_chat_worker.cmcf->sse_heartbeat);

    } else {
        ngx_add_timer(&ctx->timer, ngx_max(timeout, 1));
    }

    return NGX_DONE;
}


/* Last-Event-ID (an EventSource's reconnect) wins over ?cursor= */

static ngx_int_t
ngx_chat_stream_cursor(ngx_http_request_t *r, ngx_uint_t kind,
    ngx_str_t *cursor)
{
    ngx_uint_t        i;
    ngx_list_part_t  *part;
    ngx_table_elt_t  *h;

    ngx_str_null(cursor);

    if (kind == NGX_CHAT_STREAM_SSE) {
        part = &r->headers_in.headers.part;
        h = part->elts;

        for (i = 0; /* void */; i++) {

            if (i >= part->nelts) {
                if (part->next == NULL) {
                    break;
                }

                part = part->next;
                h = part->elts;
                i = 0;
            }

            if (h[i].key.len == sizeof("Last-Event-ID") - 1
                && ngx_strncasecmp(h[i].key.data, (u_char *) "Last-Event-ID",
                                   sizeof("Last-Event-ID") - 1) == 0
                && h[i].value.len)
            {
                *cursor = h[i].value;
                break;
            }
        }
    }

    if (cursor->len == 0
        && ngx_http_arg(r, (u_char *) "cursor", 6, cursor) != NGX_OK)
    {
        ngx_str_null(cursor);
    }

    /* a malformed one is answered resync_required by the session */
    return (cursor->len <= 2 * NGX_CHAT_CURSOR_LEN) ? NGX_OK : NGX_ERROR;
}


static ngx_int_t
ngx_chat_stream_timeout_arg(ngx_http_request_t *r, ngx_msec_t *timeout)
{
    ngx_int_t   n;
    ngx_str_t   value;
    ngx_msec_t  max;

    max = ngx_chat_worker.cmcf->poll_timeout;

    if (ngx_http_arg(r, (u_char *) "timeout_ms", 10, &value) != NGX_OK) {
        *timeout = ngx_min(max, 25000);
        return NGX_OK;
    }

    n = (value.len && value.len <= 9) ? ngx_atoi(value.data, value.len)
                                      : NGX_ERROR;
    if (n == NGX_ERROR) {
        return NGX_ERROR;
    }

    *timeout = ngx_min((ngx_msec_t) n, max);

    return NGX_OK;
}


static ngx_int_t
ngx_chat_stream_header(ngx_http_request_t *r, char *name, char *value)
{
    ngx_table_elt_t  *h;

    h = ngx_list_push(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    h->hash = 1;
    h->key.data = (u_char *) name;
    h->key.len = ngx_strlen(name);
    h->value.data = (u_char *) value;
    h->value.len = ngx_strlen(value);

    return NGX_OK;
}


/*
 * The headers and a "retry:" go out at once: a proxy or a browser that
 * sees nothing may give up, and the client learns the stream is open.
 */
/* chat_rate_limit connect: each stream and each poll is an attempt */

static ngx_int_t
ngx_chat_stream_limited(ngx_chat_stream_ctx_t *ctx, ngx_chat_identity_t *id)
{
    if (id->role == NGX_CHAT_ROLE_SERVICE) {
        return NGX_OK;
    }

    return ngx_chat_rate_request(ctx->request, NGX_CHAT_RATE_CONNECT, id,
                                 &ctx->retry_after);
}


static ngx_int_t
ngx_chat_stream_sse_start(ngx_chat_stream_ctx_t *ctx)
{
    u_char              *p;
    ngx_int_t            rc;
    ngx_http_request_t  *r;
    u_char               buf[64];

    r = ctx->request;

    r->headers_out.status = NGX_HTTP_OK;
    r->headers_out.content_length_n = -1;
    ngx_str_set(&r->headers_out.content_type, "text/event-stream");
    r->headers_out.content_type_len = sizeof("text/event-stream") - 1;
    r->headers_out.content_type_lowcase = NULL;

    if (ngx_chat_stream_header(r, "Cache-Control", "no-cache, no-transform")
        != NGX_OK
        || ngx_chat_stream_header(r, "X-Accel-Buffering", "no") != NGX_OK)
    {
        return NGX_ERROR;
    }

    /* a stream is never cached, compressed or ranged */
    r->allow_ranges = 0;
    r->gzip_vary = 0;

    rc = ngx_http_send_header(r);

    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return NGX_ERROR;
    }

    p = ngx_sprintf(buf, "retry: %M\n\n", ngx_chat_worker.cmcf->sse_retry);

    if (ngx_chat_stream_add(ctx, buf, p - buf) != NGX_OK) {
        return NGX_ERROR;
    }

    return (ngx_chat_stream_flush(ctx) == NGX_ERROR) ? NGX_ERROR : NGX_OK;
}


static ngx_int_t
ngx_chat_stream_reserve(ngx_chat_stream_ctx_t *ctx, size_t size)
{
    u_char  *p;
    size_t   used, n;

    if (ctx->out && (size_t) (ctx->out_end - ctx->out_last) >= size) {
        return NGX_OK;
    }

    used = ctx->out ? (size_t) (ctx->out_last - ctx->out) : 0;

    n = ctx->out ? 2 * (size_t) (ctx->out_end - ctx->out) : 0;
    n = ngx_max(n, used + size);
    n = ngx_max(n, NGX_CHAT_STREAM_OUT_MIN);

    p = ngx_alloc(n, ctx->request->connection->log);
    if (p == NULL) {
        return NGX_ERROR;
    }

    if (used) {
        ngx_memcpy(p, ctx->out, used);
    }

    ngx_free(ctx->out);

    ctx->out = p;
    ctx->out_last = p + used;
    ctx->out_end = p + n;

    return NGX_OK;
}


static ngx_int_t
ngx_chat_stream_add(ngx_chat_stream_ctx_t *ctx, u_char *data, size_t len)
{
    if (ngx_chat_stream_reserve(ctx, len) != NGX_OK) {
        return NGX_ERROR;
    }

    ctx->out_last = ngx_cpymem(ctx->out_last, data, len);
    ctx->quiet = 0;

    return NGX_OK;
}


static size_t
ngx_chat_stream_pending(ngx_chat_session_t *s)
{
    ngx_chat_stream_ctx_t  *ctx;

    ctx = s->tctx;

    return (ctx->out ? (size_t) (ctx->out_last - ctx->out) : 0)
           + ctx->busy_len;
}


/*
 * One SSE record (head, "event: <name>", "data: <data>", a blank line) or
 * one element of a poll's array, reserved whole: a failure leaves no half
 * record behind.
 */
static ngx_int_t
ngx_chat_stream_record(ngx_chat_stream_ctx_t *ctx, u_char *head,
    size_t head_len, ngx_str_t *name, u_char *data, size_t len)
{
    u_char  *p;

    if (ctx->kind == NGX_CHAT_STREAM_POLL) {
        if (ngx_chat_stream_reserve(ctx, len + 1) != NGX_OK) {
            return NGX_ERROR;
        }

        p = ctx->out_last;

        if (ctx->nevents) {
            *p++ = ',';
        }

        ctx->out_last = ngx_cpymem(p, data, len);
        ctx->nevents++;

        return NGX_OK;
    }

    if (ngx_chat_stream_reserve(ctx, head_len + sizeof("event: ") - 1
                                     + name->len + sizeof("\ndata: ") - 1
                                     + len + 2)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    p = ngx_cpymem(ctx->out_last, head, head_len);
    p = ngx_cpymem(p, "event: ", sizeof("event: ") - 1);
    p = ngx_cpymem(p, name->data, name->len);
    p = ngx_cpymem(p, "\ndata: ", sizeof("\ndata: ") - 1);
    p = ngx_cpymem(p, data, len);
    *p++ = '\n';
    *p++ = '\n';

    ctx->out_last = p;
    ctx->quiet = 0;

    return NGX_OK;
}


/*
 * Out of memory for a record: what cannot be said ends the stream (an
 * SSE client resumes from its last id; a poll is answered with what it
 * holds, or 503).
 */
static ngx_int_t
ngx_chat_stream_failed(ngx_chat_stream_ctx_t *ctx)
{
    ctx->close_code = NGX_CHAT_CLOSE_INTERNAL;
    ctx->close_reason = "internal error";
    ctx->closing = 1;

    ngx_chat_stream_schedule(ctx);

    return NGX_ERROR;
}


/* what send() and send_event() answer once the text is queued */

static ngx_int_t
ngx_chat_stream_queued(ngx_chat_stream_ctx_t *ctx)
{
    size_t      window;
    ngx_uint_t  full;

    ngx_chat_stream_schedule(ctx);

    window = ngx_chat_worker.cmcf->max_queue / 2;

    if (ctx->kind == NGX_CHAT_STREAM_POLL) {
        /* a page: the session waits, and the answer goes */
        full = ctx->nevents >= ngx_chat_worker.cmcf->catchup_page
               || ngx_chat_stream_pending(ctx->session) > window;

        return full ? NGX_AGAIN : NGX_OK;
    }

    if (ngx_chat_stream_pending(ctx->session) <= window) {
        return NGX_OK;
    }

    if (!ctx->paused) {
        ctx->paused = 1;
        ctx->paused_at = ngx_current_msec;
    }

    return NGX_AGAIN;
}


/* replies and control messages */

static ngx_int_t
ngx_chat_stream_send(ngx_chat_session_t *s, u_char *data, size_t len)
{
    u_char                 *p;
    ngx_str_t               type;
    ngx_chat_stream_ctx_t  *ctx;
    u_char                  buf[NGX_CHAT_CURSOR_LEN + 8];

    ctx = s->tctx;

    if (ctx->closing || ctx->finished) {
        return NGX_ERROR;
    }

    type = ngx_chat_stream_type(data, len, sizeof("{\"type\":\"") - 1);
    p = buf;

    if (type.len == 7 && ngx_strncmp(type.data, "welcome", 7) == 0) {
        if (ctx->kind == NGX_CHAT_STREAM_POLL) {
            /* the answer's cursor says it */
            return NGX_OK;
        }

        /* a browser that reconnects before any event resumes from here */
        p = ngx_cpymem(p, "id: ", 4);
        p = ngx_chat_cursor_print(p, s->cursor);
        *p++ = '\n';

    } else if (type.len == 15
               && ngx_strncmp(type.data, "resync_required", 15) == 0)
    {
        /* the stream goes on from the session's new cursor */
        p = ngx_cpymem(p, "id: ", 4);
        p = ngx_chat_cursor_print(p, s->cursor);
        *p++ = '\n';

        ctx->cursor = s->cursor;
    }

    if (ngx_chat_stream_record(ctx, buf, p - buf, &type, data, len)
        != NGX_OK)
    {
        return ngx_chat_stream_failed(ctx);
    }

    return ngx_chat_stream_queued(ctx);
}


static ngx_int_t
ngx_chat_stream_send_event(ngx_chat_session_t *s, ngx_chat_event_t *ev)
{
    u_char                 *p;
    ngx_str_t               kind;
    ngx_chat_stream_ctx_t  *ctx;
    u_char                  buf[NGX_CHAT_CURSOR_LEN + 8];

    ctx = s->tctx;

    if (ctx->closing || ctx->finished) {
        return NGX_ERROR;
    }

    if (ngx_chat_event_envelope(ev) != NGX_OK) {
        return ngx_chat_stream_failed(ctx);
    }

    kind = ev->kind;

    if (kind.len == 0) {
        ngx_str_set(&kind, "message");
    }

    p = buf;

    if (ev->gseq) {
        p = ngx_cpymem(p, "id: ", 4);
        p = ngx_chat_cursor_print(p, ev->gseq);
        *p++ = '\n';
    }

    if (ngx_chat_stream_record(ctx, buf, p - buf, &kind, ev->envelope.data,
                               ev->envelope.len)
        != NGX_OK)
    {
        return ngx_chat_stream_failed(ctx);
    }

    if (ev->gseq) {
        ctx->out_gseq = ev->gseq;
        ctx->cursor = ev->gseq;
    }

    return ngx_chat_stream_queued(ctx);
}


static void
ngx_chat_stream_close(ngx_chat_session_t *s, ngx_uint_t code,
    const char *reason)
{
    ngx_chat_stream_ctx_t  *ctx;

    ctx = s->tctx;

    if (ctx->closing || ctx->finished) {
        return;
    }

    if (ctx->kind == NGX_CHAT_STREAM_POLL) {
        ctx->close_code = code;
        ctx->close_reason = reason;
        ctx->closing = 1;
        ngx_chat_stream_schedule(ctx);
        return;
    }

    ngx_chat_stream_sse_error(ctx, code, reason);
}


/*
 * The last words of a stream: an "error" control message that says why
 * and when to come back, in the stream and in "retry:" for the browser.
 */
static void
ngx_chat_stream_sse_error(ngx_chat_stream_ctx_t *ctx, ngx_uint_t code,
    const char *reason)
{
    u_char      *p;
    ngx_msec_t   retry;
    const char  *err;
    u_char       buf[512];

    retry = 1000;

    switch (code) {

    case NGX_CHAT_CLOSE_NORMAL:
        err = NULL;
        break;

    case NGX_CHAT_CLOSE_GOING_AWAY:
        err = "unavailable";

        if (ngx_strcmp(reason, "store unavailable") == 0) {
            retry = ngx_chat_db_retry_after();

        } else {
            /* a reload: come back at once, not all in the same instant */
            retry = ngx_random() % 1000;
        }

        break;

    case NGX_CHAT_CLOSE_TOKEN_EXPIRED:
        err = "token_expired";
        reason = "the token expired";
        break;

    case NGX_CHAT_CLOSE_POLICY:
        err = "unauthorized";
        break;

    case NGX_CHAT_CLOSE_SLOW:
        err = "rate_limited";
        retry = 5000;
        break;

    case NGX_CHAT_CLOSE_RATE_LIMITED:
        err = "rate_limited";
        retry = ctx->retry_after;
        break;

    case NGX_CHAT_CLOSE_REPLACED:
        err = "conflict";
        reason = "replaced by a newer connection of the same device";
        break;

    default:
        err = "internal";
        break;
    }

    ctx->closing = 1;

    if (ctx->finished) {
        return;
    }

    p = buf;

    if (err) {
        p = ngx_snprintf(p, sizeof(buf) - 8,
                         "retry: %M\nevent: error\ndata: {\"type\":\"error\","
                         "\"error\":{\"code\":\"%s\",\"message\":\"%s\","
                         "\"retry_after_ms\":%M}}",
                         retry, err, reason ? reason : "", retry);
        p = ngx_cpymem(p, "\n\n", 2);
    }

    if (p > buf && ngx_chat_stream_add(ctx, buf, p - buf) != NGX_OK) {
        /* nothing more can be said: the stream just ends */
        ctx->out_last = ctx->out;
    }

    ngx_chat_stream_schedule(ctx);
}


static void
ngx_chat_stream_schedule(ngx_chat_stream_ctx_t *ctx)
{
    if (!ctx->post.posted && !ctx->finished) {
        ngx_post_event(&ctx->post, &ngx_posted_events);
    }
}


static void
ngx_chat_stream_post_handler(ngx_event_t *ev)
{
    ngx_connection_t       *c;
    ngx_chat_stream_ctx_t  *ctx;

    ctx = ev->data;
    c = ctx->request->connection;

    ngx_chat_stream_run(ctx);

    ngx_http_run_posted_requests(c);
}


static void
ngx_chat_stream_run(ngx_chat_stream_ctx_t *ctx)
{
    ngx_int_t  rc;

    if (ctx->finished) {
        return;
    }

    if (ctx->kind == NGX_CHAT_STREAM_POLL) {
        if (ctx->nevents || ctx->closing) {
            ngx_chat_stream_answer(ctx);
        }

        return;
    }

    rc = ngx_chat_stream_flush(ctx);

    if (rc == NGX_ERROR) {
        ngx_chat_stream_finish(ctx, NGX_ERROR);
        return;
    }

    if (rc == NGX_OK && ctx->closing && ctx->busy == NULL
        && (ctx->out == NULL || ctx->out_last == ctx->out))
    {
        ngx_chat_stream_finish(ctx, NGX_OK);
    }
}


/*
 * NGX_OK: everything queued is written; NGX_AGAIN: the socket is full
 * (the write handler goes on); NGX_ERROR: the connection failed.
 */
static ngx_int_t
ngx_chat_stream_flush(ngx_chat_stream_ctx_t *ctx)
{
    ngx_msec_int_t             t;
    ngx_event_t               *wev;
    ngx_connection_t          *c;
    ngx_http_request_t        *r;
    ngx_chat_session_t        *s;
    ngx_http_core_loc_conf_t  *clcf;

    r = ctx->request;
    c = r->connection;
    wev = c->write;

again:

    for ( ;; ) {

        if (ctx->busy == NULL && ctx->out && ctx->out_last > ctx->out) {
            ctx->busy = ctx->out;
            ctx->busy_len = ctx->out_last - ctx->out;
            ctx->busy_gseq = ctx->out_gseq;

            ctx->out = NULL;
            ctx->out_last = NULL;
            ctx->out_end = NULL;
            ctx->out_gseq = 0;

            /* flush: the header and what is queued go out now */

            ngx_memzero(&ctx->buf, sizeof(ngx_buf_t));
            ctx->buf.start = ctx->busy;
            ctx->buf.pos = ctx->busy;
            ctx->buf.last = ctx->busy + ctx->busy_len;
            ctx->buf.end = ctx->buf.last;
            ctx->buf.memory = 1;
            ctx->buf.flush = 1;

            ctx->chain.buf = &ctx->buf;
            ctx->chain.next = NULL;

            if (ngx_http_output_filter(r, &ctx->chain) == NGX_ERROR) {
                return NGX_ERROR;
            }

        } else if (r->out || r->buffered || c->buffered) {
            if (ngx_http_output_filter(r, NULL) == NGX_ERROR) {
                return NGX_ERROR;
            }
        }

        if (r->out || r->buffered || c->buffered) {
            goto blocked;
        }

        if (ctx->busy == NULL) {
            break;
        }

        /* all of it is in the socket: delivered, as far as we know */

        s = ctx->session;

        if (s && ctx->busy_gseq) {
            ngx_chat_receipts_ack(s, ctx->busy_gseq);
        }

        ngx_free(ctx->busy);
        ctx->busy = NULL;
        ctx->busy_len = 0;
        ctx->busy_gseq = 0;
    }

    if (wev->timer_set && !wev->delayed) {
        ngx_del_timer(wev);
    }

    if (ctx->paused) {
        ctx->paused = 0;

        if (ctx->session) {
            /* may queue more, or the stream's last words */
            ngx_chat_session_drained(ctx->session);

            if (ctx->out && ctx->out_last > ctx->out) {
                goto again;
            }
        }
    }

    return NGX_OK;

blocked:

    clcf = ngx_http_get_module_loc_conf(r, ngx_http_core_module);

    if (ngx_handle_write_event(wev, clcf->send_lowat) != NGX_OK) {
        return NGX_ERROR;
    }

    if (wev->delayed) {
        /* limit_rate's timer is set */
        return NGX_AGAIN;
    }

    if (ctx->paused) {
        /* a paused reader must drain within the timeout, however slowly */
        t = (ngx_msec_int_t) (ctx->paused_at
                              + ngx_chat_worker.cmcf->send_timeout
                              - ngx_current_msec);

        if (wev->timer_set) {
            ngx_del_timer(wev);
        }

        ngx_add_timer(wev, (ngx_msec_t) ngx_max(t, 1));

    } else {
        ngx_add_timer(wev, ngx_chat_worker.cmcf->send_timeout);
    }

    return NGX_AGAIN;
}


static void
ngx_chat_stream_write_handler(ngx_http_request_t *r)
{
    ngx_event_t            *wev;
    ngx_chat_stream_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_chat_module);
    wev = r->connection->write;

    if (ctx == NULL) {
        /* post_action took the request elsewhere */
        ngx_http_finalize_request(r, NGX_ERROR);
        return;
    }

    /* (ngx_http_request_handler() took limit_rate's timeouts) */

    if (wev->timedout) {
        wev->timedout = 0;

        ngx_log_error(NGX_LOG_INFO, r->connection->log, NGX_ETIMEDOUT,
                      "client %s too slow: %uz bytes queued, closing",
                      ctx->kind == NGX_CHAT_STREAM_SSE ? "stream" : "poll",
                      ctx->out ? (size_t) (ctx->out_last - ctx->out)
                               + ctx->busy_len
                               : ctx->busy_len);
        r->connection->timedout = 1;
        ngx_chat_stream_finish(ctx, NGX_HTTP_REQUEST_TIME_OUT);
        return;
    }

    ngx_chat_stream_run(ctx);
}


/*
 * Our connection's read handler while the request is held: a reload's
 * ngx_close_idle_connections() sets c->close; nginx's own handler would
 * drop the stream without a word.
 */
static void
ngx_chat_stream_read_handler(ngx_event_t *rev)
{
    ngx_connection_t       *c;
    ngx_http_request_t     *r;
    ngx_chat_stream_ctx_t  *ctx;

    c = rev->data;
    r = c->data;
    ctx = ngx_http_get_module_ctx(r, ngx_chat_module);

    if (ctx == NULL) {
        /* post_action took the request elsewhere: nginx's handler again */
        c->read->handler = ngx_chat_stream_http_handler;
        c->idle = 0;
        c->read->handler(rev);
        return;
    }

    if (c->close && !c->error) {
        c->close = 0;
        c->idle = 0;

        if (ctx->session) {
            ngx_chat_session_end(ctx->session, NGX_CHAT_CLOSE_GOING_AWAY,
                                 "server going away");

        } else if (ctx->kind == NGX_CHAT_STREAM_SSE) {
            ngx_chat_stream_sse_error(ctx, NGX_CHAT_CLOSE_GOING_AWAY,
                                      "server going away");

        } else if (!ctx->closing) {
            ctx->close_code = NGX_CHAT_CLOSE_GOING_AWAY;
            ctx->close_reason = "server going away";
            ctx->closing = 1;
        }

        ngx_chat_stream_run(ctx);
        ngx_http_run_posted_requests(c);
        return;
    }

    ctx->read_handler(rev);
}


static void
ngx_chat_stream_timer_handler(ngx_event_t *ev)
{
    ngx_connection_t       *c;
    ngx_chat_session_t     *s;
    ngx_chat_stream_ctx_t  *ctx;

    ctx = ev->data;
    c = ctx->request->connection;
    s = ctx->session;

    if (ctx->finished || ctx->closing) {
        return;
    }

    if (ngx_exiting && s) {
        /* a connection that ngx_close_idle_connections() did not see */
        ngx_chat_session_end(s, NGX_CHAT_CLOSE_GOING_AWAY,
                             "server going away");
        ngx_chat_stream_run(ctx);
        ngx_http_run_posted_requests(c);
        return;
    }

    if (ctx->kind == NGX_CHAT_STREAM_SSE) {
        if (ctx->quiet && ctx->busy == NULL) {
            /* proxies and NATs drop a silent connection */
            if (ngx_chat_stream_add(ctx, (u_char *) ":\n\n", 3) != NGX_OK) {
                ngx_chat_stream_finish(ctx, NGX_ERROR);
                ngx_http_run_posted_requests(c);
                return;
            }

            ngx_chat_stream_schedule(ctx);
        }

        ctx->quiet = 1;
        ngx_add_timer(&ctx->timer, ngx_chat_worker.cmcf->sse_heartbeat);
        return;
    }

    /*
     * The poll's time is up.  Before the join it has no cursor to answer
     * with that it knows to be good: the join's own failure ends it.
     */
    if (s && !s->hello_done) {
        ngx_add_timer(&ctx->timer, NGX_CHAT_STREAM_JOIN_WAIT);
        return;
    }

    ngx_chat_stream_answer(ctx);
    ngx_http_run_posted_requests(c);
}


/*
 * The long-poll's answer: the events collected (a page at most) and the
 * cursor to poll from next; with none, the cursor the client already had
 * (or, after the join, the session's).  A session that ended with nothing
 * collected answers as its close code says.
 */
static void
ngx_chat_stream_answer(ngx_chat_stream_ctx_t *ctx)
{
    u_char              *p;
    uint64_t             cursor;
    ngx_int_t            rc;
    ngx_uint_t           status;
    ngx_msec_t           retry;
    const char          *code, *msg;
    ngx_chat_session_t  *s;
    ngx_http_request_t  *r;
    u_char               buf[NGX_CHAT_CURSOR_LEN + 32];

    r = ctx->request;
    s = ctx->session;

    if (ctx->nevents == 0 && ctx->close_code
        && !(ctx->close_code == NGX_CHAT_CLOSE_GOING_AWAY
             && ctx->close_reason
             && ngx_strcmp(ctx->close_reason, "server going away") == 0
             && (ctx->cursor || (s && s->hello_done))))
    {
        retry = 0;

        switch (ctx->close_code) {

        case NGX_CHAT_CLOSE_TOKEN_EXPIRED:
            status = NGX_HTTP_UNAUTHORIZED;
            code = "token_expired";
            msg = "the token expired";
            break;

        case NGX_CHAT_CLOSE_POLICY:
            status = NGX_HTTP_UNAUTHORIZED;
            code = "unauthorized";
            msg = ctx->close_reason;
            break;

        case NGX_CHAT_CLOSE_SLOW:
            status = NGX_HTTP_TOO_MANY_REQUESTS;
            code = "rate_limited";
            msg = ctx->close_reason;
            retry = 5000;
            break;

        case NGX_CHAT_CLOSE_REPLACED:
            status = NGX_HTTP_CONFLICT;
            code = "conflict";
            msg = "replaced by a newer connection of the same device";
            break;

        default:
            status = NGX_HTTP_SERVICE_UNAVAILABLE;
            code = "unavailable";
            msg = ctx->close_reason ? ctx->close_reason : "unavailable";
            retry = (ctx->close_reason
                     && ngx_strcmp(ctx->close_reason, "store unavailable")
                        == 0)
                    ? ngx_chat_db_retry_after() : 500;
            break;
        }

        ngx_chat_stream_detach(ctx);

        rc = ngx_chat_http_error(r, status, code, msg, retry);
        ngx_chat_stream_finish(ctx, rc);
        return;
    }

    /* only ephemeral events, or none: the stream has not moved */
    if (ctx->cursor) {
        cursor = ctx->cursor;

    } else if (s && s->hello_done) {
        cursor = s->cursor;

    } else {
        /* cannot happen: answers come after the join or on a close */
        ngx_chat_stream_detach(ctx);

        rc = ngx_chat_http_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                 "unavailable", "not joined yet", 0);
        ngx_chat_stream_finish(ctx, rc);
        return;
    }

    p = ngx_cpymem(buf, "],\"cursor\":\"", sizeof("],\"cursor\":\"") - 1);
    p = ngx_chat_cursor_print(p, cursor);
    p = ngx_cpymem(p, "\"}", 2);

    if (ngx_chat_stream_add(ctx, buf, p - buf) != NGX_OK) {
        ngx_chat_stream_finish(ctx, NGX_HTTP_INTERNAL_SERVER_ERROR);
        return;
    }

    /* what the answer carries is delivered */
    if (s && ctx->out_gseq) {
        ngx_chat_receipts_ack(s, ctx->out_gseq);
    }

    ngx_chat_stream_detach(ctx);

    rc = ngx_chat_stream_send_json(r, ctx->out, ctx->out_last - ctx->out);
    ngx_chat_stream_finish(ctx, rc);
}


static ngx_int_t
ngx_chat_stream_send_json(ngx_http_request_t *r, u_char *data, size_t len)
{
    ngx_int_t     rc;
    ngx_buf_t    *b;
    ngx_chain_t   out;

    r->headers_out.status = NGX_HTTP_OK;
    r->headers_out.content_length_n = len;
    ngx_str_set(&r->headers_out.content_type, "application/json");
    r->headers_out.content_type_len = sizeof("application/json") - 1;
    r->headers_out.content_type_lowcase = NULL;

    if (ngx_chat_stream_header(r, "Cache-Control", "no-store") != NGX_OK) {
        return NGX_ERROR;
    }

    rc = ngx_http_send_header(r);

    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return rc;
    }

    /* the answer outlives our buffers: a copy in the request's pool */

    b = ngx_create_temp_buf(r->pool, len);
    if (b == NULL) {
        return NGX_ERROR;
    }

    b->last = ngx_cpymem(b->pos, data, len);
    b->last_buf = (r == r->main) ? 1 : 0;
    b->last_in_chain = 1;

    out.buf = b;
    out.next = NULL;

    return ngx_http_output_filter(r, &out);
}


/* the session is told first: after finalizing, ctx may be gone */

static void
ngx_chat_stream_finish(ngx_chat_stream_ctx_t *ctx, ngx_int_t rc)
{
    ngx_connection_t    *c;
    ngx_http_request_t  *r;

    if (ctx->finished) {
        return;
    }

    ctx->finished = 1;
    ctx->closing = 1;

    r = ctx->request;
    c = r->connection;

    ngx_chat_stream_detach(ctx);

    if (ctx->timer.timer_set) {
        ngx_del_timer(&ctx->timer);
    }

    if (ctx->post.posted) {
        ngx_delete_posted_event(&ctx->post);
    }

    if (ctx->read_handler) {
        c->read->handler = ctx->read_handler;
        ctx->read_handler = NULL;
        c->idle = 0;
    }

    if (ctx->kind == NGX_CHAT_STREAM_SSE && rc == NGX_OK) {
        rc = ngx_http_send_special(r, NGX_HTTP_LAST);
    }

    ngx_http_finalize_request(r, rc);
}


static void
ngx_chat_stream_detach(ngx_chat_stream_ctx_t *ctx)
{
    ngx_chat_session_t  *s;

    s = ctx->session;

    if (s) {
        ctx->session = NULL;
        ngx_chat_session_closed(s);
    }
}


static void
ngx_chat_stream_cleanup(void *data)
{
    ngx_chat_stream_ctx_t  *ctx = data;

    ngx_chat_stream_detach(ctx);

    ctx->finished = 1;

    if (ctx->timer.timer_set) {
        ngx_del_timer(&ctx->timer);
    }

    if (ctx->post.posted) {
        ngx_delete_posted_event(&ctx->post);
    }

    ngx_chat_limit_addr_release(ctx->limit);
    ctx->limit = NULL;

    if (ctx->read_handler) {
        ctx->request->connection->read->handler = ctx->read_handler;
        ctx->read_handler = NULL;
        ctx->request->connection->idle = 0;
    }
}


static void
ngx_chat_stream_free(void *data)
{
    ngx_chat_stream_ctx_t  *ctx = data;

    ngx_free(ctx->out);
    ctx->out = NULL;

    ngx_free(ctx->busy);
    ctx->busy = NULL;
}


/*
 * The string value right after a known prefix of one of our own JSON
 * texts ({"type":"...", {"kind":"...): the SSE event name.
 */
static ngx_str_t
ngx_chat_stream_type(u_char *data, size_t len, size_t skip)
{
    u_char     *p, *last;
    ngx_str_t   type;

    ngx_str_set(&type, "message");

    if (len <= skip) {
        return type;
    }

    p = data + skip;
    last = ngx_strlchr(p, data + ngx_min(len, skip + 64), '"');

    if (last == NULL || last == p) {
        return type;
    }

    type.data = p;
    type.len = last - p;

    return type;
}
