
/*
 * Copyright (C) ngx_chat_module authors
 *
 * WebSocket transport (RFC 6455, server side).
 *
 * Once "101 Switching Protocols" is flushed the connection is detached
 * from HTTP: the request is logged and freed (access log line at the
 * upgrade, with the 101 and the handshake's bytes), the header buffers
 * go, and a plain connection gives back its pool too, so an idle
 * WebSocket holds only this context and its session.  c->data is then
 * the context and c->log a log of its own; closing is ours as well.
 *
 * Input is read into one static per-worker buffer and parsed by a
 * resumable state machine; a partial frame header is kept in the
 * context, a message that spans reads or frames is assembled in a buffer
 * allocated on demand, and a message that arrives whole is unmasked and
 * delivered in place.  Output frames go to one per-connection buffer,
 * allocated on demand, capped at max_queue and freed once written; sends
 * of one event loop turn are coalesced into one write by posting the
 * write event.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>
#include <ngx_sha1.h>

#include "ngx_chat_module.h"
#include "ngx_chat_auth.h"
#include "ngx_chat_bus.h"
#include "ngx_chat_transport.h"
#include "ngx_chat_session.h"
#include "ngx_chat_ws.h"
#include "ngx_chat_api.h"
#include "ngx_chat_limit.h"
#include "ngx_chat_live.h"


#define NGX_CHAT_WS_OP_CONT          0x0
#define NGX_CHAT_WS_OP_TEXT          0x1
#define NGX_CHAT_WS_OP_BINARY        0x2
#define NGX_CHAT_WS_OP_CLOSE         0x8
#define NGX_CHAT_WS_OP_PING          0x9
#define NGX_CHAT_WS_OP_PONG          0xa

#define NGX_CHAT_WS_FIN              0x80
#define NGX_CHAT_WS_RSV              0x70
#define NGX_CHAT_WS_OPCODE           0x0f
#define NGX_CHAT_WS_CONTROL          0x08
#define NGX_CHAT_WS_MASK             0x80
#define NGX_CHAT_WS_LEN              0x7f

#define NGX_CHAT_WS_MAX_CONTROL      125

/* the longest client frame header is 14 bytes */
#define NGX_CHAT_WS_STATE_SIZE       16

#define NGX_CHAT_WS_RECV_SIZE        16384
#define NGX_CHAT_WS_READ_BUDGET      (4 * NGX_CHAT_WS_RECV_SIZE)
#define NGX_CHAT_WS_OUT_MIN          1024
#define NGX_CHAT_WS_MSG_EAGER        4096
#define NGX_CHAT_WS_CLOSE_TIMEOUT    2000

#define NGX_CHAT_WS_UPGRADE_REQUIRED 426

#define NGX_CHAT_WS_PROTOCOL         "chat.v1"
#define NGX_CHAT_WS_GUID             "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


typedef struct ngx_chat_ws_ctx_s  ngx_chat_ws_ctx_t;

typedef u_char *(*ngx_chat_ws_handler_pt)(ngx_chat_ws_ctx_t *ctx,
    u_char *pos, u_char *end);


typedef struct {
    u_char                     need;            /* continuation bytes */
    u_char                     lo;              /* range of the next one */
    u_char                     hi;
} ngx_chat_ws_utf8_t;


struct ngx_chat_ws_ctx_s {
    ngx_connection_t          *connection;
    ngx_chat_session_t        *session;

    /* until detached */
    ngx_http_request_t        *request;
    ngx_chat_identity_t       *identity;        /* in r->pool */

    ngx_http_core_loc_conf_t  *clcf;            /* tcp and lingering */
    ngx_str_t                 *server_name;     /* for the error log */

    ngx_chat_ws_handler_pt     handler;
    uint64_t                   length;          /* payload left in frame */

    u_char                    *in;              /* sent with the handshake */
    size_t                     in_len;

    u_char                    *msg;             /* message being assembled */
    size_t                     msg_len;
    size_t                     msg_size;

    u_char                    *out;             /* output queue */
    u_char                    *out_pos;
    u_char                    *out_last;
    u_char                    *out_end;
    size_t                     out_frame;       /* rest of a partly sent one */

    ngx_msec_t                 last_recv;
    ngx_msec_t                 paused_at;
    time_t                     lingering_time;

    u_char                    *addr;            /* no pool: peer address */
    ngx_chat_limit_addr_t     *limit;           /* counts the address */
    ngx_log_t                  log;

    ngx_chat_ws_utf8_t         utf8;
    u_char                     opcode;
    u_char                     mask[4];
    u_char                     mask_off;
    u_char                     ctrl_len;
    u_char                     buffer_used;
    u_char                     buffer[NGX_CHAT_WS_STATE_SIZE];
    u_char                     ctrl[NGX_CHAT_WS_MAX_CONTROL];

    unsigned                   fin:1;
    unsigned                   fragmented:1;    /* a message is open */
    unsigned                   pinged:1;
    unsigned                   closing:1;       /* our close frame queued */
    unsigned                   close_sent:1;
    unsigned                   close_received:1;
    unsigned                   fail:1;          /* do not wait for the peer */
    unsigned                   drop:1;
    unsigned                   paused:1;        /* past the window */
};


static const char *ngx_chat_ws_check_request(ngx_http_request_t *r,
    ngx_uint_t *status, ngx_str_t *key, ngx_uint_t *protocol);
static ngx_uint_t ngx_chat_ws_header_is(ngx_table_elt_t *h, char *name,
    size_t len);
static ngx_uint_t ngx_chat_ws_has_token(ngx_str_t *value, char *token,
    size_t len);
static ngx_int_t ngx_chat_ws_check_key(ngx_str_t *key);
static ngx_int_t ngx_chat_ws_add_header(ngx_http_request_t *r, char *name,
    size_t len, ngx_str_t *value);
static ngx_int_t ngx_chat_ws_accept(ngx_http_request_t *r, ngx_str_t *key,
    ngx_uint_t protocol);
static void ngx_chat_ws_handshake_handler(ngx_http_request_t *r);
static void ngx_chat_ws_detach(ngx_http_request_t *r, ngx_chat_ws_ctx_t *ctx);
static void ngx_chat_ws_release(ngx_chat_ws_ctx_t *ctx, ngx_connection_t *c,
    ngx_http_connection_t *hc);
static void ngx_chat_ws_free_bufs(ngx_pool_t *pool, ngx_chain_t *cl);
static ngx_int_t ngx_chat_ws_keep_addr(ngx_chat_ws_ctx_t *ctx,
    ngx_connection_t *c);
static u_char *ngx_chat_ws_log_error(ngx_log_t *log, u_char *buf, size_t len);

static void ngx_chat_ws_read_handler(ngx_event_t *rev);
static void ngx_chat_ws_write_handler(ngx_event_t *wev);
static void ngx_chat_ws_parse(ngx_chat_ws_ctx_t *ctx, u_char *pos,
    u_char *end);
static void ngx_chat_ws_received(ngx_chat_ws_ctx_t *ctx);
static void ngx_chat_ws_timer(ngx_chat_ws_ctx_t *ctx);
static void ngx_chat_ws_set_timer(ngx_chat_ws_ctx_t *ctx);

static u_char *ngx_chat_ws_state_head(ngx_chat_ws_ctx_t *ctx, u_char *pos,
    u_char *end);
static u_char *ngx_chat_ws_state_data(ngx_chat_ws_ctx_t *ctx, u_char *pos,
    u_char *end);
static u_char *ngx_chat_ws_state_control(ngx_chat_ws_ctx_t *ctx, u_char *pos,
    u_char *end);
static u_char *ngx_chat_ws_state_skip(ngx_chat_ws_ctx_t *ctx, u_char *pos,
    u_char *end);
static u_char *ngx_chat_ws_state_ignore(ngx_chat_ws_ctx_t *ctx, u_char *pos,
    u_char *end);
static u_char *ngx_chat_ws_state_save(ngx_chat_ws_ctx_t *ctx, u_char *pos,
    u_char *end, ngx_chat_ws_handler_pt handler);
static u_char *ngx_chat_ws_peer_close(ngx_chat_ws_ctx_t *ctx, u_char *end);
static u_char *ngx_chat_ws_error(ngx_chat_ws_ctx_t *ctx, u_char *end,
    ngx_uint_t code, char *reason);
static void ngx_chat_ws_deliver(ngx_chat_ws_ctx_t *ctx, u_char *data,
    size_t len);
static ngx_int_t ngx_chat_ws_msg_reserve(ngx_chat_ws_ctx_t *ctx,
    size_t size);
static void ngx_chat_ws_msg_free(ngx_chat_ws_ctx_t *ctx);
static void ngx_chat_ws_unmask(ngx_chat_ws_ctx_t *ctx, u_char *dst,
    u_char *src, size_t size);
static ngx_int_t ngx_chat_ws_utf8(ngx_chat_ws_utf8_t *u, u_char *p,
    size_t size);
static ngx_uint_t ngx_chat_ws_close_code_valid(ngx_uint_t code);

static ngx_int_t ngx_chat_ws_queue(ngx_chat_ws_ctx_t *ctx, ngx_uint_t opcode,
    u_char *data, size_t len);
static ngx_int_t ngx_chat_ws_out_reserve(ngx_chat_ws_ctx_t *ctx,
    size_t size);
static size_t ngx_chat_ws_frame_size(u_char *p);
static void ngx_chat_ws_start_close(ngx_chat_ws_ctx_t *ctx, ngx_uint_t code,
    const char *reason);
static ngx_int_t ngx_chat_ws_flush(ngx_chat_ws_ctx_t *ctx);
static ngx_int_t ngx_chat_ws_done(ngx_chat_ws_ctx_t *ctx);
static void ngx_chat_ws_finalize(ngx_chat_ws_ctx_t *ctx, ngx_int_t rc);
static void ngx_chat_ws_set_lingering_close(ngx_connection_t *c);
static void ngx_chat_ws_lingering_close_handler(ngx_event_t *rev);
static void ngx_chat_ws_close_connection(ngx_chat_ws_ctx_t *ctx);
static void ngx_chat_ws_free(ngx_chat_ws_ctx_t *ctx);
static void ngx_chat_ws_cleanup(void *data);

static ngx_int_t ngx_chat_ws_send(ngx_chat_session_t *s, u_char *data,
    size_t len);
static ngx_int_t ngx_chat_ws_send_event(ngx_chat_session_t *s,
    ngx_chat_event_t *ev);
static ngx_int_t ngx_chat_ws_queue_text(ngx_chat_ws_ctx_t *ctx, u_char *data,
    size_t len);
static void ngx_chat_ws_too_slow(ngx_chat_ws_ctx_t *ctx);
static void ngx_chat_ws_close(ngx_chat_session_t *s, ngx_uint_t code,
    const char *reason);
static size_t ngx_chat_ws_pending(ngx_chat_session_t *s);


ngx_chat_transport_t  ngx_chat_ws_transport = {
    ngx_string("websocket"),
    ngx_chat_ws_send,
    ngx_chat_ws_send_event,
    ngx_chat_ws_close,
    ngx_chat_ws_pending
};


/* one per worker: parsing never outlives a read handler call */
static u_char  ngx_chat_ws_buffer[NGX_CHAT_WS_STATE_SIZE
                                  + NGX_CHAT_WS_RECV_SIZE];


ngx_int_t
ngx_chat_ws_handler(ngx_http_request_t *r)
{
    ngx_int_t             rc;
    ngx_str_t             key, device;
    ngx_msec_t            retry_after;
    ngx_uint_t            status, protocol;
    const char           *err, *code, *msg;
    ngx_chat_ws_ctx_t    *ctx;
    ngx_http_cleanup_t   *cln;
    ngx_chat_identity_t  *id;

#if (NGX_HTTP_V2)
    if (r->stream) {
        return ngx_chat_http_error(r, NGX_HTTP_BAD_REQUEST, "bad_request",
                                   "WebSocket over HTTP/2 is not supported",
                                   0);
    }
#endif

    if (ngx_http_arg(r, (u_char *) "device_id", 9, &device) == NGX_OK
        && ngx_chat_live_valid_device(device.data, device.len) != NGX_OK)
    {
        return ngx_chat_http_error(r, NGX_HTTP_BAD_REQUEST, "bad_request",
                                   "\"device_id\" must be 1 to 64 of "
                                   "[A-Za-z0-9._-]", 0);
    }

    err = ngx_chat_ws_check_request(r, &status, &key, &protocol);

    if (err) {
        if (status == NGX_HTTP_INTERNAL_SERVER_ERROR) {
            return ngx_chat_http_error(r, status, "internal", err, 0);
        }

        ngx_log_debug1(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                       "chat ws handshake rejected: %s", err);

        return ngx_chat_http_error(r, status,
                                   status == NGX_HTTP_FORBIDDEN
                                   ? "forbidden" : "bad_request", err, 0);
    }

    if (ngx_chat_worker.cmcf == NULL) {
        return ngx_chat_http_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                   "unavailable", "not ready", 1000);
    }

    id = ngx_pcalloc(r->pool, sizeof(ngx_chat_identity_t));
    if (id == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    code = NULL;
    msg = NULL;

    rc = ngx_chat_auth_request(r, id, &code, &msg);

    if (rc == NGX_DECLINED && code == NULL) {
        /* no credentials: the client authenticates with "hello" */
        id = NULL;

    } else if (rc == NGX_DECLINED) {
        return ngx_chat_http_error(r, NGX_HTTP_UNAUTHORIZED, code,
                                   msg ? msg : "unauthorized", 0);

    } else if (rc != NGX_OK) {
        return ngx_chat_http_error(r, NGX_HTTP_INTERNAL_SERVER_ERROR,
                                   "internal", "authentication failed", 0);
    }

    if ((id == NULL || id->role != NGX_CHAT_ROLE_SERVICE)
        && ngx_chat_rate_request(r, NGX_CHAT_RATE_CONNECT, id, &retry_after)
           != NGX_OK)
    {
        return ngx_chat_http_error(r, NGX_HTTP_TOO_MANY_REQUESTS,
                                   "rate_limited", "too many connection "
                                   "attempts", retry_after);
    }

    if (id == NULL && ngx_chat_limit_unauth_full()) {
        return ngx_chat_http_error(r, NGX_HTTP_TOO_MANY_REQUESTS,
                                   "rate_limited", "too many connections "
                                   "waiting to authenticate", 1000);
    }

    cln = ngx_http_cleanup_add(r, 0);
    if (cln == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    /* outlives the request: not from r->pool */

    ctx = ngx_calloc(sizeof(ngx_chat_ws_ctx_t), r->connection->log);
    if (ctx == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    cln->handler = ngx_chat_ws_cleanup;
    cln->data = ctx;

    rc = ngx_chat_limit_addr_acquire(r->connection, &ctx->limit);

    if (rc == NGX_BUSY) {
        return ngx_chat_http_error(r, NGX_HTTP_TOO_MANY_REQUESTS,
                                   "rate_limited", "too many connections "
                                   "from this address", 5000);
    }

    if (rc != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ctx->connection = r->connection;
    ctx->request = r;
    ctx->identity = id;
    ctx->handler = ngx_chat_ws_state_head;

    ngx_http_set_ctx(r, ctx, ngx_chat_module);

    if (ngx_chat_ws_accept(r, &key, protocol) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    r->headers_out.status = NGX_HTTP_SWITCHING_PROTOCOLS;
    ngx_str_set(&r->headers_out.status_line, "101 Switching Protocols");
    r->headers_out.content_length_n = -1;
    r->keepalive = 0;

    rc = ngx_http_send_header(r);

    if (rc == NGX_ERROR || rc > NGX_OK) {
        return rc;
    }

    if (ngx_http_send_special(r, NGX_HTTP_FLUSH) == NGX_ERROR) {
        return NGX_ERROR;
    }

    /*
     * The request cannot be freed from its content handler: its caller
     * finalizes it.  A posted request runs as soon as that has unwound,
     * with this reference the only one left.
     */

    r->main->count++;
    r->write_event_handler = ngx_chat_ws_handshake_handler;

    if (ngx_http_post_request(r, NULL) != NGX_OK) {
        r->main->count--;
        return NGX_ERROR;
    }

    return NGX_DONE;
}


static const char *
ngx_chat_ws_check_request(ngx_http_request_t *r, ngx_uint_t *status,
    ngx_str_t *key, ngx_uint_t *protocol)
{
    ngx_str_t         value;
    ngx_uint_t        i, upgrade, connection, version, offered, keys;
    ngx_list_part_t  *part;
    ngx_table_elt_t  *h;

    *status = NGX_HTTP_BAD_REQUEST;
    *protocol = 0;

    if (r->method != NGX_HTTP_GET) {
        ngx_str_set(&value, "GET");

        if (ngx_chat_ws_add_header(r, "Allow", sizeof("Allow") - 1, &value)
            != NGX_OK)
        {
            *status = NGX_HTTP_INTERNAL_SERVER_ERROR;
            return "out of memory";
        }

        *status = NGX_HTTP_NOT_ALLOWED;
        return "WebSocket handshake must use GET";
    }

    if (r->http_version < NGX_HTTP_VERSION_11) {
        return "WebSocket handshake requires HTTP/1.1";
    }

    if (r->headers_in.content_length_n > 0 || r->headers_in.chunked) {
        return "WebSocket handshake must not have a body";
    }

    upgrade = 0;
    connection = 0;
    version = 0;
    offered = 0;
    keys = 0;

    part = &r->headers_in.headers.part;
    h = part->elts;

    for (i = 0; /* void */ ; i++) {

        if (i >= part->nelts) {
            if (part->next == NULL) {
                break;
            }

            part = part->next;
            h = part->elts;
            i = 0;
        }

        if (h[i].hash == 0) {
            continue;
        }

        if (ngx_chat_ws_header_is(&h[i], "upgrade", sizeof("upgrade") - 1)) {
            upgrade |= ngx_chat_ws_has_token(&h[i].value, "websocket",
                                             sizeof("websocket") - 1);

        } else if (ngx_chat_ws_header_is(&h[i], "connection",
                                         sizeof("connection") - 1))
        {
            connection |= ngx_chat_ws_has_token(&h[i].value, "upgrade",
                                                sizeof("upgrade") - 1);

        } else if (ngx_chat_ws_header_is(&h[i], "sec-websocket-version",
                                         sizeof("sec-websocket-version") - 1))
        {
            if (h[i].value.len == 2
                && h[i].value.data[0] == '1' && h[i].value.data[1] == '3')
            {
                version |= 1;

            } else {
                version |= 2;
            }

        } else if (ngx_chat_ws_header_is(&h[i], "sec-websocket-key",
                                         sizeof("sec-websocket-key") - 1))
        {
            *key = h[i].value;
            keys++;

        } else if (ngx_chat_ws_header_is(&h[i], "sec-websocket-protocol",
                                         sizeof("sec-websocket-protocol") - 1))
        {
            offered = 1;
            *protocol |= ngx_chat_ws_has_token(&h[i].value,
                                               NGX_CHAT_WS_PROTOCOL,
                                               sizeof(NGX_CHAT_WS_PROTOCOL)
                                               - 1);
        }
    }

    if (!upgrade) {
        return "\"Upgrade: websocket\" header required";
    }

    if (!connection) {
        return "\"Connection: upgrade\" header required";
    }

    if (version != 1) {
        ngx_str_set(&value, "13");

        if (ngx_chat_ws_add_header(r, "Sec-WebSocket-Version",
                                   sizeof("Sec-WebSocket-Version") - 1,
                                   &value)
            != NGX_OK)
        {
            *status = NGX_HTTP_INTERNAL_SERVER_ERROR;
            return "out of memory";
        }

        /* nginx has no reason phrase for 426 */
        ngx_str_set(&r->headers_out.status_line, "426 Upgrade Required");

        *status = NGX_CHAT_WS_UPGRADE_REQUIRED;
        return "Sec-WebSocket-Version 13 required";
    }

    if (keys != 1 || ngx_chat_ws_check_key(key) != NGX_OK) {
        return "invalid Sec-WebSocket-Key";
    }

    if (!ngx_chat_origin_allowed(r)) {
        *status = NGX_HTTP_FORBIDDEN;
        return "origin not allowed";
    }

    if (offered && !*protocol) {
        return "subprotocol \"" NGX_CHAT_WS_PROTOCOL "\" required";
    }

    return NULL;
}


static ngx_uint_t
ngx_chat_ws_header_is(ngx_table_elt_t *h, char *name, size_t len)
{
    return h->key.len == len
           && ngx_strncmp(h->lowcase_key, name, len) == 0;
}


static ngx_uint_t
ngx_chat_ws_has_token(ngx_str_t *value, char *token, size_t len)
{
    u_char  *p, *last, *start, *end;

    p = value->data;
    last = p + value->len;

    while (p < last) {

        while (p < last && (*p == ' ' || *p == '\t' || *p == ',')) {
            p++;
        }

        start = p;

        while (p < last && *p != ',') {
            p++;
        }

        end = p;

        while (end > start && (end[-1] == ' ' || end[-1] == '\t')) {
            end--;
        }

        if ((size_t) (end - start) == len
            && ngx_strncasecmp(start, (u_char *) token, len) == 0)
        {
            return 1;
        }
    }

    return 0;
}


static ngx_int_t
ngx_chat_ws_check_key(ngx_str_t *key)
{
    ngx_str_t  decoded;
    u_char     buf[18];

    /* base64 of 16 bytes: 22 characters and "==" */

    if (key->len != 24 || key->data[22] != '=' || key->data[23] != '=') {
        return NGX_ERROR;
    }

    decoded.data = buf;

    if (ngx_decode_base64(&decoded, key) != NGX_OK || decoded.len != 16) {
        return NGX_ERROR;
    }

    return NGX_OK;
}


static ngx_int_t
ngx_chat_ws_add_header(ngx_http_request_t *r, char *name, size_t len,
    ngx_str_t *value)
{
    ngx_table_elt_t  *h;

    h = ngx_list_push(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    h->hash = 1;
    h->key.len = len;
    h->key.data = (u_char *) name;
    h->value = *value;
    h->lowcase_key = NULL;

    return NGX_OK;
}


static ngx_int_t
ngx_chat_ws_accept(ngx_http_request_t *r, ngx_str_t *key, ngx_uint_t protocol)
{
    u_char      hash[20];
    ngx_str_t   src, value;
    ngx_sha1_t  sha1;

    ngx_sha1_init(&sha1);
    ngx_sha1_update(&sha1, key->data, key->len);
    ngx_sha1_update(&sha1, NGX_CHAT_WS_GUID, sizeof(NGX_CHAT_WS_GUID) - 1);
    ngx_sha1_final(hash, &sha1);

    src.len = sizeof(hash);
    src.data = hash;

    value.data = ngx_pnalloc(r->pool, ngx_base64_encoded_length(src.len));
    if (value.data == NULL) {
        return NGX_ERROR;
    }

    ngx_encode_base64(&value, &src);

    if (ngx_chat_ws_add_header(r, "Sec-WebSocket-Accept",
                               sizeof("Sec-WebSocket-Accept") - 1, &value)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    /* the header filter adds "Connection: upgrade" to any 101 */

    ngx_str_set(&value, "websocket");

    if (ngx_chat_ws_add_header(r, "Upgrade", sizeof("Upgrade") - 1, &value)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    if (!protocol) {
        return NGX_OK;
    }

    ngx_str_set(&value, NGX_CHAT_WS_PROTOCOL);

    return ngx_chat_ws_add_header(r, "Sec-WebSocket-Protocol",
                                  sizeof("Sec-WebSocket-Protocol") - 1,
                                  &value);
}


/*
 * r->write_event_handler until the 101 is out (ngx_http_writer() for a
 * response without a body), then the detach
 */

static void
ngx_chat_ws_handshake_handler(ngx_http_request_t *r)
{
    ngx_event_t           *wev;
    ngx_connection_t      *c;
    ngx_chat_ws_ctx_t     *ctx;
    ngx_chat_main_conf_t  *cmcf;

    c = r->connection;
    wev = c->write;
    ctx = ngx_http_get_module_ctx(r, ngx_chat_module);
    cmcf = ngx_chat_worker.cmcf;

    ngx_log_debug0(NGX_LOG_DEBUG_HTTP, c->log, 0, "chat ws handshake handler");

    if (wev->timedout) {
        ngx_log_error(NGX_LOG_INFO, c->log, NGX_ETIMEDOUT,
                      "client timed out");
        c->timedout = 1;
        ngx_http_finalize_request(r, NGX_HTTP_REQUEST_TIME_OUT);
        return;
    }

    if (wev->delayed) {
        /* limit_rate: its timer is set */

        if (ngx_handle_write_event(wev, 0) != NGX_OK) {
            ngx_http_finalize_request(r, NGX_ERROR);
        }

        return;
    }

    if (r->out || r->buffered || c->buffered) {

        if (ngx_http_output_filter(r, NULL) == NGX_ERROR) {
            ngx_http_finalize_request(r, NGX_ERROR);
            return;
        }

        if (r->out || r->buffered || c->buffered) {

            if (!wev->delayed && cmcf->send_timeout) {
                ngx_add_timer(wev, cmcf->send_timeout);
            }

            if (ngx_handle_write_event(wev, 0) != NGX_OK) {
                ngx_http_finalize_request(r, NGX_ERROR);
            }

            return;
        }
    }

    if (wev->timer_set) {
        wev->delayed = 0;
        ngx_del_timer(wev);
    }

    if (r->main->count != 1 || r->blocked || r->postponed) {
        ngx_log_error(NGX_LOG_ALERT, c->log, 0,
                      "chat ws cannot detach: count:%d blk:%d",
                      r->main->count, r->blocked);
        ngx_http_finalize_request(r, NGX_ERROR);
        return;
    }

    ngx_chat_ws_detach(r, ctx);
}


/*
 * Frees the request and what HTTP kept for the connection, the way
 * ngx_http_set_keepalive() does for an idle keep-alive connection; the
 * connection becomes ours.
 */

static void
ngx_chat_ws_detach(ngx_http_request_t *r, ngx_chat_ws_ctx_t *ctx)
{
    ngx_buf_t                 *b;
    ngx_str_t                  cursor, device;
    ngx_connection_t          *c;
    ngx_http_cleanup_t        *cln;
    ngx_http_connection_t     *hc;
    ngx_http_core_srv_conf_t  *cscf;

    c = r->connection;
    hc = r->http_connection;
    b = r->header_in;

    ngx_log_debug0(NGX_LOG_DEBUG_HTTP, c->log, 0, "chat ws detach");

    /* frames the client sent right behind its handshake */

    if (b->pos < b->last) {
        ctx->in_len = b->last - b->pos;

        ctx->in = ngx_alloc(ctx->in_len, c->log);
        if (ctx->in == NULL) {
            ngx_http_finalize_request(r, NGX_ERROR);
            return;
        }

        ngx_memcpy(ctx->in, b->pos, ctx->in_len);
        b->pos = b->last;
    }

    ctx->clcf = ngx_http_get_module_loc_conf(r, ngx_http_core_module);

    cscf = ngx_http_get_module_srv_conf(r, ngx_http_core_module);
    ctx->server_name = &cscf->server_name;

    if (ctx->clcf->tcp_nodelay && ngx_tcp_nodelay(c) != NGX_OK) {
        ctx->drop = 1;
    }

    ctx->log = *c->log;
    ctx->log.handler = ngx_chat_ws_log_error;
    ctx->log.data = ctx;
    ctx->log.action = "serving websocket";

    /* the identity and the arguments live in r->pool: the session copies */

    if (ngx_http_arg(r, (u_char *) "cursor", 6, &cursor) != NGX_OK) {
        ngx_str_null(&cursor);
    }

    if (!ngx_exiting && !ctx->drop) {
        ctx->session = ngx_chat_session_create(&ngx_chat_ws_transport, ctx,
                                               ctx->connection, &ctx->log,
                                               ctx->identity, &cursor);
        if (ctx->session == NULL) {
            ctx->fail = 1;

        } else if (ngx_http_arg(r, (u_char *) "device_id", 9, &device)
                   == NGX_OK)
        {
            /* checked before the upgrade */
            (void) ngx_chat_session_device(ctx->session, &device);
        }
    }

    ctx->identity = NULL;
    ctx->request = NULL;

    for (cln = r->cleanup; cln; cln = cln->next) {
        if (cln->handler == ngx_chat_ws_cleanup) {
            cln->handler = NULL;
        }
    }

    /*
     * Runs the log phase and destroys r->pool.  It also sets c->destroyed,
     * which is left set: ngx_http_run_posted_requests() up the stack must
     * not take c->data for a request any more.
     */

    ngx_http_free_request(r, 0);

    c->data = ctx;

    ngx_chat_ws_release(ctx, c, hc);

    c->log = &ctx->log;
    c->read->log = c->log;
    c->write->log = c->log;

    c->read->handler = ngx_chat_ws_read_handler;
    c->write->handler = ngx_chat_ws_write_handler;

    /* lets ngx_close_idle_connections() start a graceful close on quit */
    c->idle = 1;

    ctx->last_recv = ngx_current_msec;

    if (ngx_exiting) {
        ngx_chat_ws_start_close(ctx, NGX_CHAT_CLOSE_GOING_AWAY,
                                "server going away");

    } else if (ctx->session) {
        ngx_chat_ws_set_timer(ctx);

    } else if (!ctx->drop) {
        ngx_chat_ws_start_close(ctx, NGX_CHAT_CLOSE_INTERNAL,
                                "internal error");
    }

    /* the client's first frames may be in ctx->in or in the socket */
    ngx_post_event(c->read, &ngx_posted_events);
}


/*
 * A plain connection gives back c->pool (the connection's log, its HTTP
 * state, the header buffers) once what still points into it is copied.
 * An SSL connection lives in c->pool: it keeps the pool and frees the
 * buffers, as an idle keep-alive connection does.
 */

static void
ngx_chat_ws_release(ngx_chat_ws_ctx_t *ctx, ngx_connection_t *c,
    ngx_http_connection_t *hc)
{
#if (NGX_HTTP_SSL)
    if (c->ssl) {
        ngx_ssl_free_buffer(c);
        goto keep;
    }
#endif

    if (ngx_chat_ws_keep_addr(ctx, c) != NGX_OK) {
        goto keep;
    }

    c->buffer = NULL;
    c->proxy_protocol = NULL;

    ngx_destroy_pool(c->pool);
    c->pool = NULL;

    return;

keep:

    if (c->buffer) {
        (void) ngx_pfree(c->pool, c->buffer->start);
        c->buffer = NULL;
    }

    ngx_chat_ws_free_bufs(c->pool, hc->free);
    hc->free = NULL;

    ngx_chat_ws_free_bufs(c->pool, hc->busy);
    hc->busy = NULL;
    hc->nbusy = 0;
}


/* the large header buffers of a request, back to the connection's pool */

static void
ngx_chat_ws_free_bufs(ngx_pool_t *pool, ngx_chain_t *cl)
{
    ngx_chain_t  *ln;

    while (cl) {
        ln = cl;
        cl = cl->next;
        (void) ngx_pfree(pool, ln->buf->start);
        ngx_free_chain(pool, ln);
    }
}


/* the request is gone: realip, if any, gave back the peer's address */

static ngx_int_t
ngx_chat_ws_keep_addr(ngx_chat_ws_ctx_t *ctx, ngx_connection_t *c)
{
    u_char  *p;
    size_t   size, local;

    size = ngx_align(c->socklen, sizeof(void *));
    local = 0;

    if (c->local_sockaddr && c->local_sockaddr != c->listening->sockaddr) {
        local = ngx_align(c->local_socklen, sizeof(void *));
    }

    p = ngx_alloc(size + local + c->addr_text.len, c->log);
    if (p == NULL) {
        return NGX_ERROR;
    }

    ctx->addr = p;

    ngx_memcpy(p, c->sockaddr, c->socklen);
    c->sockaddr = (struct sockaddr *) p;
    p += size;

    if (local) {
        ngx_memcpy(p, c->local_sockaddr, c->local_socklen);
        c->local_sockaddr = (struct sockaddr *) p;
        p += local;
    }

    ngx_memcpy(p, c->addr_text.data, c->addr_text.len);
    c->addr_text.data = p;

    return NGX_OK;
}


static u_char *
ngx_chat_ws_log_error(ngx_log_t *log, u_char *buf, size_t len)
{
    u_char             *p;
    ngx_chat_ws_ctx_t  *ctx;

    p = buf;

    if (log->action) {
        p = ngx_snprintf(buf, len, " while %s", log->action);
        len -= p - buf;
    }

    ctx = log->data;

    return ngx_snprintf(p, len, ", client: %V, server: %V",
                        &ctx->connection->addr_text, ctx->server_name);
}


static void
ngx_chat_ws_read_handler(ngx_event_t *rev)
{
    u_char             *p, *end;
    size_t              budget;
    ssize_t             n;
    ngx_int_t           rc;
    ngx_connection_t   *c;
    ngx_chat_ws_ctx_t  *ctx;

    c = rev->data;
    ctx = c->data;

    ngx_log_debug0(NGX_LOG_DEBUG_HTTP, c->log, 0, "chat ws read handler");

    if (c->close) {
        c->close = 0;

        if (c->error) {
            ngx_chat_ws_finalize(ctx, NGX_ERROR);
            return;
        }

        ngx_chat_ws_start_close(ctx, NGX_CHAT_CLOSE_GOING_AWAY,
                                "server going away");

        /* we may be outside of the event loop: posted events wait */
        ngx_chat_ws_write_handler(c->write);
        return;
    }

    if (rev->timedout) {
        rev->timedout = 0;
        ngx_chat_ws_timer(ctx);
        return;
    }

    if (ctx->in) {
        p = ctx->in;

        ngx_chat_ws_received(ctx);
        ngx_chat_ws_parse(ctx, p, p + ctx->in_len);

        ngx_free(ctx->in);
        ctx->in = NULL;
    }

    budget = NGX_CHAT_WS_READ_BUDGET;

    /*
     * A client whose queue is past the window is not read: its requests
     * wait in the socket until it has read what it is owed.
     */

    while (!ctx->drop && !ctx->paused) {

        p = ngx_chat_ws_buffer;
        ngx_memcpy(p, ctx->buffer, ctx->buffer_used);
        end = p + ctx->buffer_used;

        n = c->recv(c, end, NGX_CHAT_WS_RECV_SIZE);

        if (n == NGX_AGAIN) {
            break;
        }

        if (n == 0 || n == NGX_ERROR) {
            ngx_log_debug1(NGX_LOG_DEBUG_HTTP, c->log, 0,
                           "chat ws client closed connection, closing:%d",
                           ctx->closing);

            if (n == 0 && ctx->close_received && !ctx->drop) {
                /* a half-closed peer may still read our close reply */
                (void) ngx_chat_ws_flush(ctx);
            }

            ngx_chat_ws_finalize(ctx, n == 0 ? NGX_DONE : NGX_ERROR);
            return;
        }

        ctx->buffer_used = 0;

        ngx_chat_ws_received(ctx);
        ngx_chat_ws_parse(ctx, p, end + n);

        if ((size_t) n >= budget) {
            if (rev->ready) {
                /* let other connections run: resume on the next turn */
                ngx_post_event(rev, &ngx_posted_next_events);
            }

            break;
        }

        budget -= n;

        if (!rev->ready) {
            break;
        }
    }

    if (ngx_handle_read_event(rev, 0) != NGX_OK) {
        ngx_chat_ws_finalize(ctx, NGX_ERROR);
        return;
    }

    rc = ngx_chat_ws_done(ctx);

    if (rc != NGX_OK) {
        ngx_chat_ws_finalize(ctx, rc);
    }
}


static void
ngx_chat_ws_parse(ngx_chat_ws_ctx_t *ctx, u_char *pos, u_char *end)
{
    while (pos < end) {
        pos = ctx->handler(ctx, pos, end);
    }
}


static void
ngx_chat_ws_received(ngx_chat_ws_ctx_t *ctx)
{
    ctx->last_recv = ngx_current_msec;

    if (ctx->pinged) {
        ctx->pinged = 0;

        if (!ctx->closing) {
            ngx_chat_ws_set_timer(ctx);
        }
    }
}


static void
ngx_chat_ws_write_handler(ngx_event_t *wev)
{
    ngx_int_t           rc;
    ngx_connection_t   *c;
    ngx_chat_ws_ctx_t  *ctx;

    c = wev->data;
    ctx = c->data;

    ngx_log_debug0(NGX_LOG_DEBUG_HTTP, c->log, 0, "chat ws write handler");

    if (wev->timedout && ctx->paused && !ctx->closing) {
        /* it did not drain its queue within chat_send_timeout */
        wev->timedout = 0;
        ngx_chat_ws_too_slow(ctx);

        if (!ctx->drop && ngx_chat_ws_flush(ctx) == NGX_ERROR) {
            ctx->drop = 1;
        }

        rc = ngx_chat_ws_done(ctx);

        if (rc != NGX_OK) {
            ngx_chat_ws_finalize(ctx, rc);
        }

        return;
    }

    if (wev->timedout) {
        ngx_log_error(NGX_LOG_INFO, c->log, NGX_ETIMEDOUT,
                      "client timed out");
        c->timedout = 1;
        ngx_chat_ws_finalize(ctx, NGX_ERROR);
        return;
    }

    if (!ctx->drop && ngx_chat_ws_flush(ctx) == NGX_ERROR) {
        ctx->drop = 1;
    }

    rc = ngx_chat_ws_done(ctx);

    if (rc != NGX_OK) {
        ngx_chat_ws_finalize(ctx, rc);
    }
}


static void
ngx_chat_ws_timer(ngx_chat_ws_ctx_t *ctx)
{
    ngx_msec_int_t         elapsed;
    ngx_chat_main_conf_t  *cmcf;

    if (ctx->closing) {
        /* the client had its chance to read our close frame */

        ngx_log_debug1(NGX_LOG_DEBUG_HTTP, ctx->connection->log, 0,
                       "chat ws close timeout, sent:%d", ctx->close_sent);

        ngx_chat_ws_finalize(ctx, NGX_ERROR);
        return;
    }

    if (ngx_exiting) {
        ngx_chat_ws_start_close(ctx, NGX_CHAT_CLOSE_GOING_AWAY,
                                "server going away");
        return;
    }

    cmcf = ngx_chat_worker.cmcf;
    elapsed = (ngx_msec_int_t) (ngx_current_msec - ctx->last_recv);

    if (cmcf->idle_timeout
        && elapsed >= (ngx_msec_int_t) cmcf->idle_timeout)
    {
        ngx_log_debug0(NGX_LOG_DEBUG_HTTP, ctx->connection->log, 0,
                       "chat ws idle timeout");

        ngx_chat_ws_start_close(ctx, NGX_CHAT_CLOSE_GOING_AWAY,
                                "idle timeout");
        return;
    }

    if (cmcf->ping_interval
        && !ctx->pinged
        && elapsed >= (ngx_msec_int_t) cmcf->ping_interval)
    {
        ctx->pinged = 1;

        if (ngx_chat_ws_queue(ctx, NGX_CHAT_WS_OP_PING, NULL, 0) != NGX_OK) {
            return;
        }
    }

    ngx_chat_ws_set_timer(ctx);
}


static void
ngx_chat_ws_set_timer(ngx_chat_ws_ctx_t *ctx)
{
    ngx_msec_int_t         elapsed, timer, t;
    ngx_chat_main_conf_t  *cmcf;

    cmcf = ngx_chat_worker.cmcf;
    elapsed = (ngx_msec_int_t) (ngx_current_msec - ctx->last_recv);
    timer = NGX_MAX_INT_T_VALUE;

    if (cmcf->idle_timeout) {
        timer = (ngx_msec_int_t) cmcf->idle_timeout - elapsed;
    }

    if (cmcf->ping_interval && !ctx->pinged) {
        t = (ngx_msec_int_t) cmcf->ping_interval - elapsed;
        timer = ngx_min(timer, t);
    }

    if (timer == NGX_MAX_INT_T_VALUE) {
        return;
    }

    ngx_add_timer(ctx->connection->read,
                  (ngx_msec_t) ngx_max(timer, 1));
}


static u_char *
ngx_chat_ws_state_head(ngx_chat_ws_ctx_t *ctx, u_char *pos, u_char *end)
{
    size_t                 size;
    uint64_t               len;
    ngx_uint_t             i, fin, opcode;
    ngx_chat_main_conf_t  *cmcf;

    if (end - pos < 2) {
        return ngx_chat_ws_state_save(ctx, pos, end, ngx_chat_ws_state_head);
    }

    fin = pos[0] & NGX_CHAT_WS_FIN;
    opcode = pos[0] & NGX_CHAT_WS_OPCODE;
    len = pos[1] & NGX_CHAT_WS_LEN;

    if (pos[0] & NGX_CHAT_WS_RSV) {
        return ngx_chat_ws_error(ctx, end, NGX_CHAT_CLOSE_PROTOCOL,
                                 "reserved bits set");
    }

    switch (opcode) {

    case NGX_CHAT_WS_OP_CONT:
    case NGX_CHAT_WS_OP_TEXT:
    case NGX_CHAT_WS_OP_BINARY:
        break;

    case NGX_CHAT_WS_OP_CLOSE:
    case NGX_CHAT_WS_OP_PING:
    case NGX_CHAT_WS_OP_PONG:

        if (!fin || len > NGX_CHAT_WS_MAX_CONTROL) {
            return ngx_chat_ws_error(ctx, end, NGX_CHAT_CLOSE_PROTOCOL,
                                     "fragmented or long control frame");
        }

        break;

    default:
        return ngx_chat_ws_error(ctx, end, NGX_CHAT_CLOSE_PROTOCOL,
                                 "unknown opcode");
    }

    if (!(pos[1] & NGX_CHAT_WS_MASK)) {
        return ngx_chat_ws_error(ctx, end, NGX_CHAT_CLOSE_PROTOCOL,
                                 "unmasked frame");
    }

    size = (len == 126) ? 2 + 2 + 4 : (len == 127) ? 2 + 8 + 4 : 2 + 4;

    if ((size_t) (end - pos) < size) {
        return ngx_chat_ws_state_save(ctx, pos, end, ngx_chat_ws_state_head);
    }

    pos += 2;

    if (len == 126) {
        len = (pos[0] << 8) | pos[1];
        pos += 2;

    } else if (len == 127) {

        if (pos[0] & 0x80) {
            return ngx_chat_ws_error(ctx, end, NGX_CHAT_CLOSE_PROTOCOL,
                                     "invalid frame length");
        }

        len = 0;

        for (i = 0; i < 8; i++) {
            len = (len << 8) | pos[i];
        }

        pos += 8;
    }

    ngx_memcpy(ctx->mask, pos, 4);
    pos += 4;

    ctx->fin = fin ? 1 : 0;
    ctx->opcode = (u_char) opcode;
    ctx->length = len;
    ctx->mask_off = 0;

    ngx_log_debug3(NGX_LOG_DEBUG_HTTP, ctx->connection->log, 0,
                   "chat ws frame op:%ui fin:%ui len:%uL", opcode, fin, len);

    if (opcode & NGX_CHAT_WS_CONTROL) {
        ctx->ctrl_len = 0;
        ctx->handler = ngx_chat_ws_state_control;
        return ngx_chat_ws_state_control(ctx, pos, end);
    }

    if (ctx->closing) {
        ctx->handler = ngx_chat_ws_state_skip;
        return ngx_chat_ws_state_skip(ctx, pos, end);
    }

    if (opcode == NGX_CHAT_WS_OP_CONT) {
        if (!ctx->fragmented) {
            return ngx_chat_ws_error(ctx, end, NGX_CHAT_CLOSE_PROTOCOL,
                                     "continuation without a message");
        }

    } else {

        if (ctx->fragmented) {
            return ngx_chat_ws_error(ctx, end, NGX_CHAT_CLOSE_PROTOCOL,
                                     "new message inside a fragmented one");
        }

        if (opcode == NGX_CHAT_WS_OP_BINARY) {
            return ngx_chat_ws_error(ctx, end, NGX_CHAT_CLOSE_UNSUPPORTED,
                                     "binary messages are not supported");
        }

        ctx->msg_len = 0;
        ctx->utf8.need = 0;
    }

    cmcf = ngx_chat_worker.cmcf;

    if (len > cmcf->max_message - ctx->msg_len) {
        return ngx_chat_ws_error(ctx, end, NGX_CHAT_CLOSE_TOO_BIG,
                                 "message too big");
    }

    ctx->fragmented = fin ? 0 : 1;
    ctx->handler = ngx_chat_ws_state_data;

    return ngx_chat_ws_state_data(ctx, pos, end);
}


static u_char *
ngx_chat_ws_state_data(ngx_chat_ws_ctx_t *ctx, u_char *pos, u_char *end)
{
    u_char  *p;
    size_t   size;

    if (ctx->closing) {
        ngx_chat_ws_msg_free(ctx);
        ctx->handler = ngx_chat_ws_state_skip;
        return ngx_chat_ws_state_skip(ctx, pos, end);
    }

    size = end - pos;

    if (size > ctx->length) {
        size = (size_t) ctx->length;
    }

    if (ctx->msg == NULL
        && ctx->opcode == NGX_CHAT_WS_OP_TEXT
        && ctx->fin
        && size == ctx->length)
    {
        /* a whole message in the buffer: no copy */

        ngx_chat_ws_unmask(ctx, pos, pos, size);

        if (ngx_chat_ws_utf8(&ctx->utf8, pos, size) != NGX_OK
            || ctx->utf8.need)
        {
            return ngx_chat_ws_error(ctx, end, NGX_CHAT_CLOSE_BAD_DATA,
                                     "invalid UTF-8 in text message");
        }

        ctx->handler = ngx_chat_ws_state_head;
        ngx_chat_ws_deliver(ctx, pos, size);

        return pos + size;
    }

    if (size) {
        if (ngx_chat_ws_msg_reserve(ctx, size) != NGX_OK) {
            ctx->drop = 1;
            ctx->handler = ngx_chat_ws_state_ignore;
            return end;
        }

        p = ctx->msg + ctx->msg_len;

        ngx_chat_ws_unmask(ctx, p, pos, size);

        if (ngx_chat_ws_utf8(&ctx->utf8, p, size) != NGX_OK) {
            return ngx_chat_ws_error(ctx, end, NGX_CHAT_CLOSE_BAD_DATA,
                                     "invalid UTF-8 in text message");
        }

        ctx->msg_len += size;
        ctx->length -= size;
        pos += size;
    }

    if (ctx->length) {
        return pos;
    }

    ctx->handler = ngx_chat_ws_state_head;

    if (!ctx->fin) {
        return pos;
    }

    if (ctx->utf8.need) {
        return ngx_chat_ws_error(ctx, end, NGX_CHAT_CLOSE_BAD_DATA,
                                 "invalid UTF-8 in text message");
    }

    ngx_chat_ws_deliver(ctx, ctx->msg ? ctx->msg : pos, ctx->msg_len);
    ngx_chat_ws_msg_free(ctx);

    return pos;
}


static u_char *
ngx_chat_ws_state_control(ngx_chat_ws_ctx_t *ctx, u_char *pos, u_char *end)
{
    size_t  size;

    size = end - pos;

    if (size > ctx->length) {
        size = (size_t) ctx->length;
    }

    ngx_chat_ws_unmask(ctx, ctx->ctrl + ctx->ctrl_len, pos, size);

    ctx->ctrl_len += size;
    ctx->length -= size;
    pos += size;

    if (ctx->length) {
        return pos;
    }

    ctx->handler = ngx_chat_ws_state_head;

    switch (ctx->opcode) {

    case NGX_CHAT_WS_OP_PING:

        if (!ctx->closing) {
            (void) ngx_chat_ws_queue(ctx, NGX_CHAT_WS_OP_PONG, ctx->ctrl,
                                     ctx->ctrl_len);
        }

        return pos;

    case NGX_CHAT_WS_OP_PONG:
        return pos;

    default: /* NGX_CHAT_WS_OP_CLOSE */
        return ngx_chat_ws_peer_close(ctx, end);
    }
}


static u_char *
ngx_chat_ws_state_skip(ngx_chat_ws_ctx_t *ctx, u_char *pos, u_char *end)
{
    size_t  size;

    size = end - pos;

    if (size > ctx->length) {
        size = (size_t) ctx->length;
    }

    ctx->length -= size;

    if (ctx->length == 0) {
        ctx->handler = ngx_chat_ws_state_head;
    }

    return pos + size;
}


static u_char *
ngx_chat_ws_state_ignore(ngx_chat_ws_ctx_t *ctx, u_char *pos, u_char *end)
{
    return end;
}


static u_char *
ngx_chat_ws_state_save(ngx_chat_ws_ctx_t *ctx, u_char *pos, u_char *end,
    ngx_chat_ws_handler_pt handler)
{
    size_t  size;

    size = end - pos;

    if (size > NGX_CHAT_WS_STATE_SIZE) {
        ngx_log_error(NGX_LOG_ALERT, ctx->connection->log, 0,
                      "chat ws state buffer overflow: %uz bytes", size);
        ctx->drop = 1;
        ctx->handler = ngx_chat_ws_state_ignore;
        return end;
    }

    ngx_memcpy(ctx->buffer, pos, size);

    ctx->buffer_used = (u_char) size;
    ctx->handler = handler;

    return end;
}


static u_char *
ngx_chat_ws_peer_close(ngx_chat_ws_ctx_t *ctx, u_char *end)
{
    ngx_uint_t          code;
    ngx_chat_ws_utf8_t  utf8;

    code = NGX_CHAT_CLOSE_NORMAL;

    if (ctx->ctrl_len == 1) {
        return ngx_chat_ws_error(ctx, end, NGX_CHAT_CLOSE_PROTOCOL,
                                 "invalid close frame");
    }

    if (ctx->ctrl_len >= 2) {
        code = (ctx->ctrl[0] << 8) | ctx->ctrl[1];

        if (!ngx_chat_ws_close_code_valid(code)) {
            return ngx_chat_ws_error(ctx, end, NGX_CHAT_CLOSE_PROTOCOL,
                                     "invalid close code");
        }

        utf8.need = 0;

        if (ngx_chat_ws_utf8(&utf8, ctx->ctrl + 2, ctx->ctrl_len - 2)
            != NGX_OK
            || utf8.need)
        {
            return ngx_chat_ws_error(ctx, end, NGX_CHAT_CLOSE_BAD_DATA,
                                     "invalid UTF-8 in close reason");
        }
    }

    ngx_log_debug1(NGX_LOG_DEBUG_HTTP, ctx->connection->log, 0,
                   "chat ws client close frame, code:%ui", code);

    ctx->close_received = 1;
    ctx->handler = ngx_chat_ws_state_ignore;

    /* echo the code; a no-op when we started the close ourselves */
    ngx_chat_ws_start_close(ctx, code, NULL);

    return end;
}


static u_char *
ngx_chat_ws_error(ngx_chat_ws_ctx_t *ctx, u_char *end, ngx_uint_t code,
    char *reason)
{
    ngx_log_error(NGX_LOG_INFO, ctx->connection->log, 0,
                  "client websocket error: %s, closing with %ui",
                  reason, code);

    ctx->fail = 1;
    ctx->handler = ngx_chat_ws_state_ignore;

    ngx_chat_ws_start_close(ctx, code, reason);

    return end;
}


static void
ngx_chat_ws_deliver(ngx_chat_ws_ctx_t *ctx, u_char *data, size_t len)
{
    ngx_log_debug1(NGX_LOG_DEBUG_HTTP, ctx->connection->log, 0,
                   "chat ws message len:%uz", len);

    if (ctx->closing || ctx->session == NULL) {
        return;
    }

    ngx_chat_session_recv(ctx->session, data, len);
}


static ngx_int_t
ngx_chat_ws_msg_reserve(ngx_chat_ws_ctx_t *ctx, size_t size)
{
    u_char  *p;
    size_t   need, n, frame;

    need = ctx->msg_len + size;

    if (need <= ctx->msg_size) {
        return NGX_OK;
    }

    /*
     * Grow with the bytes that arrived, not with the declared length:
     * a client announcing max_message and trickling it must not make us
     * allocate max_message at once.  Small frames get room for their end.
     */

    frame = ctx->msg_len + (size_t) ctx->length;

    n = ngx_max(need, 2 * ctx->msg_size);
    n = ngx_max(n, ngx_min(frame, NGX_CHAT_WS_MSG_EAGER));
    n = ngx_min(n, ngx_chat_worker.cmcf->max_message);
    n = ngx_max(n, need);

    p = ngx_alloc(n, ctx->connection->log);
    if (p == NULL) {
        return NGX_ERROR;
    }

    if (ctx->msg) {
        ngx_memcpy(p, ctx->msg, ctx->msg_len);
        ngx_free(ctx->msg);
    }

    ctx->msg = p;
    ctx->msg_size = n;

    return NGX_OK;
}


static void
ngx_chat_ws_unmask(ngx_chat_ws_ctx_t *ctx, u_char *dst, u_char *src,
    size_t size)
{
    size_t      i;
    ngx_uint_t  k;

    k = ctx->mask_off;

    for (i = 0; i < size; i++) {
        dst[i] = src[i] ^ ctx->mask[k];
        k = (k + 1) & 3;
    }

    ctx->mask_off = (u_char) k;
}


/* strict UTF-8: no overlongs, no surrogates, nothing above U+10FFFF */

static ngx_int_t
ngx_chat_ws_utf8(ngx_chat_ws_utf8_t *u, u_char *p, size_t size)
{
    u_char      c, lo, hi, *last;
    ngx_uint_t  need;

    last = p + size;
    need = u->need;
    lo = u->lo;
    hi = u->hi;

    while (p < last) {

        if (need == 0) {
            while (p < last && *p < 0x80) {
                p++;
            }

            if (p == last) {
                break;
            }
        }

        c = *p++;

        if (need) {
            if (c < lo || c > hi) {
                return NGX_ERROR;
            }

            need--;
            lo = 0x80;
            hi = 0xbf;
            continue;
        }

        if (c < 0xc2) {
            return NGX_ERROR;
        }

        if (c < 0xe0) {
            need = 1;
            lo = 0x80;
            hi = 0xbf;

        } else if (c < 0xf0) {
            need = 2;
            lo = (c == 0xe0) ? 0xa0 : 0x80;
            hi = (c == 0xed) ? 0x9f : 0xbf;

        } else if (c < 0xf5) {
            need = 3;
            lo = (c == 0xf0) ? 0x90 : 0x80;
            hi = (c == 0xf4) ? 0x8f : 0xbf;

        } else {
            return NGX_ERROR;
        }
    }

    u->need = (u_char) need;
    u->lo = lo;
    u->hi = hi;

    return NGX_OK;
}


static ngx_uint_t
ngx_chat_ws_close_code_valid(ngx_uint_t code)
{
    if (code >= 3000 && code <= 4999) {
        return 1;
    }

    if (code < 1000 || code > 1014) {
        return 0;
    }

    /* reserved: never sent in a close frame */

    return code != 1004 && code != 1005 && code != 1006;
}


static ngx_int_t
ngx_chat_ws_queue(ngx_chat_ws_ctx_t *ctx, ngx_uint_t opcode, u_char *data,
    size_t len)
{
    u_char            *p;
    size_t             size, pending;
    ngx_uint_t         i;
    ngx_connection_t  *c;

    c = ctx->connection;

    size = (len < 126) ? 2 : (len < 65536) ? 4 : 10;
    size += len;

    pending = ctx->out ? (size_t) (ctx->out_last - ctx->out_pos) : 0;

    /*
     * Events stop at the window (half the queue), and a client past it is
     * not read any more; past it still come the replies to the sends it
     * had made, which the session bounds to another half.  A frame always
     * fits an empty queue, so a large event cannot wedge a session.
     */

    if (opcode != NGX_CHAT_WS_OP_CLOSE
        && pending
        && pending + size > 2 * ngx_chat_worker.cmcf->max_queue)
    {
        ngx_chat_ws_too_slow(ctx);
        return NGX_ERROR;
    }

    if (ngx_chat_ws_out_reserve(ctx, size) != NGX_OK) {
        ctx->drop = 1;
        ngx_post_event(c->write, &ngx_posted_events);
        return NGX_ERROR;
    }

    p = ctx->out_last;

    *p++ = (u_char) (NGX_CHAT_WS_FIN | opcode);

    if (len < 126) {
        *p++ = (u_char) len;

    } else if (len < 65536) {
        *p++ = 126;
        *p++ = (u_char) (len >> 8);
        *p++ = (u_char) len;

    } else {
        *p++ = 127;

        for (i = 0; i < 8; i++) {
            *p++ = (u_char) ((uint64_t) len >> (56 - 8 * i));
        }
    }

    if (len) {
        p = ngx_cpymem(p, data, len);
    }

    ctx->out_last = p;

    ngx_post_event(c->write, &ngx_posted_events);

    return NGX_OK;
}


/* the client is cut: what is queued beyond the frame on the wire goes */

static void
ngx_chat_ws_too_slow(ngx_chat_ws_ctx_t *ctx)
{
    size_t  pending;

    pending = ctx->out ? (size_t) (ctx->out_last - ctx->out_pos) : 0;

    ngx_log_error(NGX_LOG_INFO, ctx->connection->log, 0,
                  "client websocket too slow: %uz bytes queued, "
                  "closing with %d", pending, NGX_CHAT_CLOSE_SLOW);

    if (ctx->out) {
        /* keep the rest of a frame already partly sent */
        ctx->out_last = ctx->out_pos + ctx->out_frame;
    }

    ctx->paused = 0;
    ctx->fail = 1;
    ngx_chat_ws_start_close(ctx, NGX_CHAT_CLOSE_SLOW, "too slow");
}


static ngx_int_t
ngx_chat_ws_out_reserve(ngx_chat_ws_ctx_t *ctx, size_t size)
{
    u_char  *p;
    size_t   pending, n;

    if (ctx->out && (size_t) (ctx->out_end - ctx->out_last) >= size) {
        return NGX_OK;
    }

    pending = ctx->out ? (size_t) (ctx->out_last - ctx->out_pos) : 0;

    if (ctx->out && (size_t) (ctx->out_end - ctx->out) >= pending + size) {
        ngx_memmove(ctx->out, ctx->out_pos, pending);
        ctx->out_pos = ctx->out;
        ctx->out_last = ctx->out + pending;
        return NGX_OK;
    }

    n = ctx->out ? 2 * (size_t) (ctx->out_end - ctx->out) : 0;
    n = ngx_max(n, pending + size);
    n = ngx_max(n, NGX_CHAT_WS_OUT_MIN);

    p = ngx_alloc(n, ctx->connection->log);
    if (p == NULL) {
        return NGX_ERROR;
    }

    if (pending) {
        ngx_memcpy(p, ctx->out_pos, pending);
    }

    ngx_free(ctx->out);

    ctx->out = p;
    ctx->out_pos = p;
    ctx->out_last = p + pending;
    ctx->out_end = p + n;

    return NGX_OK;
}


static size_t
ngx_chat_ws_frame_size(u_char *p)
{
    size_t      len;
    ngx_uint_t  i;

    len = p[1] & NGX_CHAT_WS_LEN;

    if (len == 126) {
        return 4 + ((p[2] << 8) | p[3]);
    }

    if (len == 127) {
        len = 0;

        for (i = 2; i < 10; i++) {
            len = (len << 8) | p[i];
        }

        return 10 + len;
    }

    return 2 + len;
}


static void
ngx_chat_ws_start_close(ngx_chat_ws_ctx_t *ctx, ngx_uint_t code,
    const char *reason)
{
    size_t  len;
    u_char  buf[NGX_CHAT_WS_MAX_CONTROL];

    if (ctx->closing) {
        return;
    }

    ngx_log_debug2(NGX_LOG_DEBUG_HTTP, ctx->connection->log, 0,
                   "chat ws close %ui \"%s\"", code, reason ? reason : "");

    ctx->closing = 1;

    if (ctx->paused) {
        /* the client's close reply must be read */
        ctx->paused = 0;
        ngx_post_event(ctx->connection->read, &ngx_posted_events);
    }

    buf[0] = (u_char) (code >> 8);
    buf[1] = (u_char) code;

    len = reason ? ngx_strlen(reason) : 0;

    if (len > NGX_CHAT_WS_MAX_CONTROL - 2) {
        len = NGX_CHAT_WS_MAX_CONTROL - 2;

        /* do not cut a UTF-8 sequence */
        while (len && ((u_char) reason[len] & 0xc0) == 0x80) {
            len--;
        }
    }

    if (len) {
        ngx_memcpy(buf + 2, reason, len);
    }

    if (ngx_chat_ws_queue(ctx, NGX_CHAT_WS_OP_CLOSE, buf, len + 2) != NGX_OK)
    {
        return;
    }

    /* replaces the keepalive timer: bounds the whole closing handshake */
    ngx_add_timer(ctx->connection->read, NGX_CHAT_WS_CLOSE_TIMEOUT);
}


static ngx_int_t
ngx_chat_ws_flush(ngx_chat_ws_ctx_t *ctx)
{
    size_t                 k;
    ssize_t                n;
    ngx_uint_t             sent;
    ngx_event_t           *wev;
    ngx_msec_int_t         t;
    ngx_connection_t      *c;
    ngx_chat_main_conf_t  *cmcf;

    c = ctx->connection;
    wev = c->write;
    sent = 0;

    if (ctx->out == NULL) {
        if (wev->timer_set) {
            ngx_del_timer(wev);
        }

        return NGX_OK;
    }

    while (ctx->out_pos < ctx->out_last && wev->ready) {

        n = c->send(c, ctx->out_pos, ctx->out_last - ctx->out_pos);

        ngx_log_debug2(NGX_LOG_DEBUG_HTTP, c->log, 0,
                       "chat ws send: %z of %uz",
                       n, (size_t) (ctx->out_last - ctx->out_pos));

        if (n == NGX_ERROR) {
            return NGX_ERROR;
        }

        if (n == NGX_AGAIN || n == 0) {
            break;
        }

        sent = 1;

        /* track frame boundaries: a 4008 must not cut a frame */

        while (n) {
            if (ctx->out_frame == 0) {
                ctx->out_frame = ngx_chat_ws_frame_size(ctx->out_pos);
            }

            k = ngx_min((size_t) n, ctx->out_frame);

            ctx->out_frame -= k;
            ctx->out_pos += k;
            n -= k;
        }
    }

    if (ctx->out_pos < ctx->out_last) {
        goto blocked;
    }

    ngx_free(ctx->out);
    ctx->out = NULL;
    ctx->out_pos = NULL;
    ctx->out_last = NULL;
    ctx->out_end = NULL;
    ctx->out_frame = 0;

    if (wev->timer_set) {
        ngx_del_timer(wev);
    }

    if (ctx->closing) {
        /* the close frame is always the last one queued */
        ctx->close_sent = 1;
        return NGX_OK;
    }

    if (ctx->paused) {
        ctx->paused = 0;

        /* the requests that waited in the socket */
        ngx_post_event(c->read, &ngx_posted_events);

        if (ctx->session) {
            ngx_chat_session_drained(ctx->session);
        }
    }

    return NGX_OK;

blocked:

    if (ngx_handle_write_event(wev, 0) != NGX_OK) {
        return NGX_ERROR;
    }

    cmcf = ngx_chat_worker.cmcf;

    if (cmcf->send_timeout == 0) {
        return NGX_AGAIN;
    }

    if (ctx->paused) {
        /* a paused reader must drain within the timeout, however slowly */
        if (!wev->timer_set) {
            t = (ngx_msec_int_t) (ctx->paused_at + cmcf->send_timeout
                                  - ngx_current_msec);
            ngx_add_timer(wev, (ngx_msec_t) ngx_max(t, 1));
        }

        return NGX_AGAIN;
    }

    /* the timeout runs from the last progress, not from the last send() */

    if (sent || !wev->timer_set) {
        ngx_add_timer(wev, cmcf->send_timeout);
    }

    return NGX_AGAIN;
}


static ngx_int_t
ngx_chat_ws_done(ngx_chat_ws_ctx_t *ctx)
{
    if (ctx->drop) {
        return NGX_ERROR;
    }

    if (ctx->close_sent && (ctx->close_received || ctx->fail)) {
        return NGX_DONE;
    }

    return NGX_OK;
}


static void
ngx_chat_ws_finalize(ngx_chat_ws_ctx_t *ctx, ngx_int_t rc)
{
    ngx_connection_t          *c;
    ngx_chat_session_t        *s;
    ngx_http_core_loc_conf_t  *clcf;

    c = ctx->connection;

    ngx_log_debug2(NGX_LOG_DEBUG_HTTP, c->log, 0,
                   "chat ws finalize: %i, sent:%d", rc, ctx->close_sent);

    ctx->closing = 1;
    ctx->drop = 1;

    s = ctx->session;

    if (s) {
        ctx->session = NULL;
        ngx_chat_session_closed(s);
    }

    ngx_chat_ws_free(ctx);

    if (c->read->timer_set) {
        ngx_del_timer(c->read);
    }

    if (c->write->timer_set) {
        ngx_del_timer(c->write);
    }

    if (c->read->posted) {
        ngx_delete_posted_event(c->read);
    }

    if (c->write->posted) {
        ngx_delete_posted_event(c->write);
    }

    /* as ngx_http_finalize_connection() decides, with our close frame */

    clcf = ctx->clcf;

    if (rc == NGX_DONE
        && !c->read->eof
        && (clcf->lingering_close == NGX_HTTP_LINGERING_ALWAYS
            || (clcf->lingering_close == NGX_HTTP_LINGERING_ON
                && (!ctx->close_received || c->read->ready))))
    {
        /* the client may still be sending: do not reset our close frame */
        ngx_chat_ws_set_lingering_close(c);
        return;
    }

    ngx_chat_ws_close_connection(ctx);
}


/* ngx_http_set_lingering_close() and its handler, without a request */

static void
ngx_chat_ws_set_lingering_close(ngx_connection_t *c)
{
    ngx_event_t        *rev, *wev;
    ngx_chat_ws_ctx_t  *ctx;

    ctx = c->data;

    if (ctx->lingering_time == 0) {
        ctx->lingering_time = ngx_time()
                              + (time_t) (ctx->clcf->lingering_time / 1000);
    }

#if (NGX_HTTP_SSL)
    if (c->ssl) {
        ngx_int_t  rc;

        c->ssl->shutdown_without_free = 1;

        rc = ngx_ssl_shutdown(c);

        if (rc == NGX_ERROR) {
            ngx_chat_ws_close_connection(ctx);
            return;
        }

        if (rc == NGX_AGAIN) {
            c->ssl->handler = ngx_chat_ws_set_lingering_close;
            return;
        }
    }
#endif

    rev = c->read;
    rev->handler = ngx_chat_ws_lingering_close_handler;

    if (ngx_handle_read_event(rev, 0) != NGX_OK) {
        ngx_chat_ws_close_connection(ctx);
        return;
    }

    wev = c->write;
    wev->handler = ngx_http_empty_handler;

    if (wev->active && (ngx_event_flags & NGX_USE_LEVEL_EVENT)) {
        if (ngx_del_event(wev, NGX_WRITE_EVENT, 0) != NGX_OK) {
            ngx_chat_ws_close_connection(ctx);
            return;
        }
    }

    if (ngx_shutdown_socket(c->fd, NGX_WRITE_SHUTDOWN) == -1) {
        ngx_connection_error(c, ngx_socket_errno,
                             ngx_shutdown_socket_n " failed");
        ngx_chat_ws_close_connection(ctx);
        return;
    }

    c->close = 0;
    ngx_reusable_connection(c, 1);

    ngx_add_timer(rev, ctx->clcf->lingering_timeout);

    if (rev->ready) {
        ngx_chat_ws_lingering_close_handler(rev);
    }
}


static void
ngx_chat_ws_lingering_close_handler(ngx_event_t *rev)
{
    ssize_t             n;
    ngx_msec_t          timer;
    ngx_connection_t   *c;
    ngx_chat_ws_ctx_t  *ctx;

    c = rev->data;
    ctx = c->data;

    ngx_log_debug0(NGX_LOG_DEBUG_HTTP, c->log, 0,
                   "chat ws lingering close handler");

    if (rev->timedout || c->close) {
        ngx_chat_ws_close_connection(ctx);
        return;
    }

    timer = (ngx_msec_t) ctx->lingering_time - (ngx_msec_t) ngx_time();

    if ((ngx_msec_int_t) timer <= 0) {
        ngx_chat_ws_close_connection(ctx);
        return;
    }

    do {
        n = c->recv(c, ngx_chat_ws_buffer, NGX_CHAT_WS_RECV_SIZE);

        ngx_log_debug1(NGX_LOG_DEBUG_HTTP, c->log, 0,
                       "chat ws lingering read: %z", n);

        if (n == NGX_AGAIN) {
            break;
        }

        if (n == NGX_ERROR || n == 0) {
            ngx_chat_ws_close_connection(ctx);
            return;
        }

    } while (rev->ready);

    if (ngx_handle_read_event(rev, 0) != NGX_OK) {
        ngx_chat_ws_close_connection(ctx);
        return;
    }

    timer *= 1000;

    if (timer > ctx->clcf->lingering_timeout) {
        timer = ctx->clcf->lingering_timeout;
    }

    ngx_add_timer(rev, timer);
}


/* what ngx_http_free_request() and ngx_http_close_connection() did */

static void
ngx_chat_ws_close_connection(ngx_chat_ws_ctx_t *ctx)
{
    u_char            *addr;
    struct linger      linger;
    ngx_connection_t  *c;

    c = ctx->connection;

    ngx_log_debug1(NGX_LOG_DEBUG_HTTP, c->log, 0,
                   "chat ws close connection: %d", c->fd);

    if (c->timedout && ctx->clcf->reset_timedout_connection) {
        linger.l_onoff = 1;
        linger.l_linger = 0;

        if (setsockopt(c->fd, SOL_SOCKET, SO_LINGER,
                       (const void *) &linger, sizeof(struct linger)) == -1)
        {
            ngx_log_error(NGX_LOG_ALERT, c->log, ngx_socket_errno,
                          "setsockopt(SO_LINGER) failed");
        }
    }

    if (c->pool) {
        /*
         * An SSL connection kept its pool, and with it its own log, which
         * outlives us if the SSL shutdown has to wait for the peer.
         */

        c->log = c->pool->log;
        c->read->log = c->log;
        c->write->log = c->log;
        c->data = NULL;

        ngx_free(ctx);

        ngx_http_close_connection(c);
        return;
    }

#if (NGX_STAT_STUB)
    (void) ngx_atomic_fetch_add(ngx_stat_active, -1);
#endif

    c->destroyed = 1;

    addr = ctx->addr;

    /* logs with c->log, our ctx->log, until the connection is freed */
    ngx_close_connection(c);

    ngx_free(addr);
    ngx_free(ctx);
}


static void
ngx_chat_ws_msg_free(ngx_chat_ws_ctx_t *ctx)
{
    if (ctx->msg) {
        ngx_free(ctx->msg);
        ctx->msg = NULL;
    }

    ctx->msg_len = 0;
    ctx->msg_size = 0;
}


static void
ngx_chat_ws_free(ngx_chat_ws_ctx_t *ctx)
{
    ngx_chat_ws_msg_free(ctx);

    ngx_chat_limit_addr_release(ctx->limit);
    ctx->limit = NULL;

    if (ctx->in) {
        ngx_free(ctx->in);
        ctx->in = NULL;
    }

    if (ctx->out) {
        ngx_free(ctx->out);
        ctx->out = NULL;
        ctx->out_pos = NULL;
        ctx->out_last = NULL;
        ctx->out_end = NULL;
        ctx->out_frame = 0;
    }
}


/* the request ended before it was detached: nothing else to undo */

static void
ngx_chat_ws_cleanup(void *data)
{
    ngx_chat_ws_ctx_t  *ctx;

    ctx = data;

    ngx_chat_ws_free(ctx);
    ngx_free(ctx);
}


static ngx_int_t
ngx_chat_ws_send(ngx_chat_session_t *s, u_char *data, size_t len)
{
    return ngx_chat_ws_queue_text(s->tctx, data, len);
}


static ngx_int_t
ngx_chat_ws_send_event(ngx_chat_session_t *s, ngx_chat_event_t *ev)
{
    if (ngx_chat_event_envelope(ev) != NGX_OK) {
        ngx_chat_ws_start_close(s->tctx, NGX_CHAT_CLOSE_INTERNAL,
                                "internal error");
        return NGX_ERROR;
    }

    return ngx_chat_ws_queue_text(s->tctx, ev->envelope.data,
                                  ev->envelope.len);
}


static ngx_int_t
ngx_chat_ws_queue_text(ngx_chat_ws_ctx_t *ctx, u_char *data, size_t len)
{
    if (ctx->closing || ctx->drop) {
        return NGX_ERROR;
    }

    if (ngx_chat_ws_queue(ctx, NGX_CHAT_WS_OP_TEXT, data, len) != NGX_OK) {
        return NGX_ERROR;
    }

    if ((size_t) (ctx->out_last - ctx->out_pos)
        <= ngx_chat_worker.cmcf->max_queue / 2)
    {
        return NGX_OK;
    }

    if (!ctx->paused) {
        ctx->paused = 1;
        ctx->paused_at = ngx_current_msec;

        /* the deadline runs from now, not from the last progress */
        if (ctx->connection->write->timer_set) {
            ngx_del_timer(ctx->connection->write);
        }
    }

    return NGX_AGAIN;
}


static void
ngx_chat_ws_close(ngx_chat_session_t *s, ngx_uint_t code, const char *reason)
{
    ngx_chat_ws_ctx_t  *ctx;

    ctx = s->tctx;

    if (ctx->drop) {
        return;
    }

    ngx_chat_ws_start_close(ctx, code, reason);
}


static size_t
ngx_chat_ws_pending(ngx_chat_session_t *s)
{
    ngx_chat_ws_ctx_t  *ctx;

    ctx = s->tctx;

    return ctx->out ? (size_t) (ctx->out_last - ctx->out_pos) : 0;
}
