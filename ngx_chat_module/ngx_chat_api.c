
/*
 * Copyright (C) ngx_chat_module authors
 *
 * The REST API under <location>/api/.  Every answer is JSON; failures are
 * {"error":{"code","message"}} with the HTTP status that fits.
 */


#include "ngx_chat_module.h"
#include "ngx_chat_auth.h"
#include "ngx_chat_db.h"
#include "ngx_chat_store.h"
#include "ngx_chat_bus.h"
#include "ngx_chat_api.h"
#include "ngx_chat_metrics.h"
#include "ngx_chat_ops.h"
#include "ngx_chat_json.h"
#include "ngx_chat_live.h"
#include "ngx_chat_receipts.h"
#include "ngx_chat_limit.h"
#include "ngx_chat_attach.h"
#include "ngx_chat_html.h"


#define NGX_CHAT_MAX_MEMBERS   1000
#define NGX_CHAT_PRESENCE_ASK  100


typedef ngx_int_t (*ngx_chat_api_body_pt)(ngx_http_request_t *r,
    json_t *body);


typedef struct {
    ngx_chat_identity_t        id;
    int64_t                    conversation;
    int64_t                    message;
    ngx_chat_api_body_pt       body_handler;
    ngx_chat_query_t          *query;            /* in the db layer */
    ngx_chat_send_t           *send;             /* in the store */
    unsigned                   cleanup:1;        /* registered */
    int64_t                    seq;              /* read */
    int64_t                    report;           /* reports/{id} */
    ngx_chat_upload_t         *upload;           /* POST attachments */
    ngx_str_t                  url;              /* the upload's */
    ngx_chat_api_form_pt       form_handler;     /* a raw body's */
    ngx_chat_api_upload_pt     upload_handler;   /* not a REST upload */
    ngx_chat_api_error_pt      error_handler;    /* a body refused */
    void                      *data;             /* the other handler's */
    unsigned                   typing_start:1;
    unsigned                   read:1;
} ngx_chat_api_ctx_t;


/*
 * Creating a conversation: step 1 (the conversation) and step 2 (its
 * event at a reserved position, and the COMMIT) on one connection; this
 * follows step 1's query in memory and owns step 2's.
 */
typedef struct {
    ngx_chat_query_t           event;            /* step 2 */
    PGresult                  *stage;            /* step 1's answer */
    ngx_chat_resv_t           *resv;
    uint64_t                   lo;
    int64_t                    key;
    u_char                     sql[96];          /* step 2's */
} ngx_chat_api_create_t;


static ngx_int_t ngx_chat_api_send(ngx_http_request_t *r, ngx_uint_t status,
    u_char *data, size_t len);
static ngx_int_t ngx_chat_api_tickets(ngx_http_request_t *r);
static ngx_int_t ngx_chat_api_me(ngx_http_request_t *r);
static ngx_int_t ngx_chat_api_read_body(ngx_http_request_t *r,
    ngx_chat_api_body_pt handler);
static off_t ngx_chat_api_body_max(ngx_http_request_t *r,
    ngx_chat_api_ctx_t *ctx);
static void ngx_chat_api_body_reader(ngx_http_request_t *r);
static ngx_int_t ngx_chat_api_body_error(ngx_http_request_t *r,
    ngx_int_t rc);
static ngx_int_t ngx_chat_api_body_filter(ngx_http_request_t *r,
    ngx_chain_t *in);
static void ngx_chat_api_body_handler(ngx_http_request_t *r);
static ngx_int_t ngx_chat_api_hold(ngx_http_request_t *r);
static void ngx_chat_api_cleanup(void *data);
static void ngx_chat_api_wait(ngx_http_request_t *r);
static ngx_http_request_t *ngx_chat_api_query_owner(ngx_chat_query_t *q);
static ngx_int_t ngx_chat_api_create_conversation(ngx_http_request_t *r,
    json_t *body);
static void ngx_chat_api_create_done(ngx_chat_query_t *q, PGresult *res,
    ngx_int_t rc);
static void ngx_chat_api_create_event_done(ngx_chat_query_t *e,
    PGresult *res, ngx_int_t rc);
static void ngx_chat_api_create_reply(ngx_http_request_t *r,
    ngx_uint_t status, char *json, size_t len);
static ngx_int_t ngx_chat_api_list_conversations(ngx_http_request_t *r);
static ngx_int_t ngx_chat_api_get_conversation(ngx_http_request_t *r);
static ngx_int_t ngx_chat_api_history(ngx_http_request_t *r);
static void ngx_chat_api_text_done(ngx_chat_query_t *q, PGresult *res,
    ngx_int_t rc);
static void ngx_chat_api_get_done(ngx_chat_query_t *q, PGresult *res,
    ngx_int_t rc);
static ngx_int_t ngx_chat_api_post_message(ngx_http_request_t *r,
    json_t *body);
static void ngx_chat_api_post_done(ngx_chat_send_t *snd);
static ngx_int_t ngx_chat_api_typing(ngx_http_request_t *r, json_t *body);
static ngx_int_t ngx_chat_api_read(ngx_http_request_t *r, json_t *body);
static ngx_int_t ngx_chat_api_member(ngx_http_request_t *r);
static void ngx_chat_api_member_done(ngx_chat_query_t *q, PGresult *res,
    ngx_int_t rc);
static void ngx_chat_api_me_done(ngx_chat_query_t *q, PGresult *res,
    ngx_int_t rc);
static ngx_int_t ngx_chat_api_me_send(ngx_http_request_t *r, char *unread,
    size_t len);
static ngx_int_t ngx_chat_api_presence(ngx_http_request_t *r);
static ngx_int_t ngx_chat_api_notifications(ngx_http_request_t *r);
static ngx_int_t ngx_chat_api_notify_ack(ngx_http_request_t *r,
    json_t *body);
static void ngx_chat_api_notify_ack_done(ngx_chat_query_t *q,
    PGresult *res, ngx_int_t rc);
static ngx_int_t ngx_chat_api_settings(ngx_http_request_t *r, json_t *body);
static void ngx_chat_api_settings_done(ngx_chat_query_t *q, PGresult *res,
    ngx_int_t rc);
static void ngx_chat_api_presence_done(ngx_chat_query_t *q, PGresult *res,
    ngx_int_t rc);
static ngx_int_t ngx_chat_api_query(ngx_http_request_t *r,
    ngx_chat_query_t *q);
static ngx_int_t ngx_chat_api_message(ngx_http_request_t *r, u_char *p,
    u_char *end);
static ngx_int_t ngx_chat_api_edit(ngx_http_request_t *r, json_t *body);
static ngx_int_t ngx_chat_api_react(ngx_http_request_t *r, json_t *body);
static ngx_int_t ngx_chat_api_unreact(ngx_http_request_t *r);
static ngx_int_t ngx_chat_api_search(ngx_http_request_t *r);
static ngx_int_t ngx_chat_api_update(ngx_http_request_t *r, json_t *body);
static ngx_int_t ngx_chat_api_add_members(ngx_http_request_t *r,
    json_t *body);
static ngx_int_t ngx_chat_api_remove_member(ngx_http_request_t *r,
    u_char *p, u_char *end);
static ngx_int_t ngx_chat_api_op(ngx_http_request_t *r, const char *name,
    json_t *args);
static ngx_int_t ngx_chat_api_op_now(ngx_http_request_t *r,
    const char *name, json_t *args);
static ngx_int_t ngx_chat_api_op_arg(ngx_http_request_t *r, const char *name,
    const char *key, u_char *data, size_t len, const char *bad);
static void ngx_chat_api_op_done(ngx_chat_op_t *op);
static ngx_int_t ngx_chat_api_arg_num(ngx_http_request_t *r, char *name,
    size_t len, int64_t *v, int64_t min, int64_t max);
static ngx_int_t ngx_chat_api_blocks(ngx_http_request_t *r, u_char *p,
    u_char *end);
static ngx_int_t ngx_chat_api_block(ngx_http_request_t *r, json_t *body);
static ngx_int_t ngx_chat_api_reports(ngx_http_request_t *r, u_char *p,
    u_char *end);
static ngx_int_t ngx_chat_api_report(ngx_http_request_t *r, json_t *body);
static ngx_int_t ngx_chat_api_resolve(ngx_http_request_t *r, json_t *body);
static ngx_int_t ngx_chat_api_report_status(ngx_str_t *s);
static ngx_int_t ngx_chat_api_erase(ngx_http_request_t *r, u_char *p,
    u_char *end);
static ngx_int_t ngx_chat_api_user_arg(ngx_http_request_t *r,
    const char *fn, u_char *p, u_char *end);
static ngx_int_t ngx_chat_api_call(ngx_http_request_t *r, const char *fn,
    json_t *args);
static ngx_int_t ngx_chat_api_limited(ngx_http_request_t *r,
    ngx_uint_t kind);
static ngx_int_t ngx_chat_api_attachments(ngx_http_request_t *r,
    ngx_str_t *path, u_char *slash, u_char *end);
static void ngx_chat_api_upload_done(ngx_http_request_t *r);
static void ngx_chat_api_upload_stored(ngx_chat_query_t *q, PGresult *res,
    ngx_int_t rc);
static void ngx_chat_api_download_done(ngx_chat_query_t *q, PGresult *res,
    ngx_int_t rc);
static void ngx_chat_api_call_done(ngx_chat_query_t *q, PGresult *res,
    ngx_int_t rc);
static void ngx_chat_api_blocks_changed(ngx_str_t *user, u_char *json,
    size_t len);
static ngx_int_t ngx_chat_api_call_now(ngx_http_request_t *r,
    const char *fn, json_t *args);


static ngx_http_request_body_filter_pt  ngx_chat_api_next_body_filter;


ngx_int_t
ngx_chat_api_init(ngx_conf_t *cf)
{
    ngx_chat_api_next_body_filter = ngx_http_top_request_body_filter;
    ngx_http_top_request_body_filter = ngx_chat_api_body_filter;

    return NGX_OK;
}


ngx_int_t
ngx_chat_http_error(ngx_http_request_t *r, ngx_uint_t status,
    const char *code, const char *message, ngx_msec_t retry_after)
{
    ngx_int_t         rc;
    ngx_chat_buf_t    b;
    ngx_table_elt_t  *h;

    ngx_chat_metrics_error(code);

    ngx_memzero(&b, sizeof(ngx_chat_buf_t));

    if (ngx_chat_buf_add_lit(&b, "{\"error\":") != NGX_OK
        || ngx_chat_buf_add_error(&b, code, message, retry_after) != NGX_OK
        || ngx_chat_buf_add_lit(&b, "}") != NGX_OK)
    {
        ngx_chat_buf_free(&b);
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (retry_after) {
        h = ngx_list_push(&r->headers_out.headers);
        if (h != NULL) {
            h->hash = 1;
            ngx_str_set(&h->key, "Retry-After");
            h->value.data = ngx_pnalloc(r->pool, NGX_TIME_T_LEN);

            if (h->value.data) {
                h->value.len = ngx_sprintf(h->value.data, "%M",
                                           (retry_after + 999) / 1000)
                               - h->value.data;
            } else {
                h->hash = 0;
            }
        }
    }

    rc = ngx_chat_api_send(r, status, b.data, b.len);
    ngx_chat_buf_free(&b);

    return rc;
}


static ngx_int_t
ngx_chat_api_send(ngx_http_request_t *r, ngx_uint_t status, u_char *data,
    size_t len)
{
    static ngx_str_t  json = ngx_string("application/json");

    return ngx_chat_http_send(r, status, &json, json.len, data, len);
}


/*
 * A whole answer from memory (copied): the request's body, if any, is
 * discarded; type_len is the part of type without parameters.
 */

ngx_int_t
ngx_chat_http_send(ngx_http_request_t *r, ngx_uint_t status, ngx_str_t *type,
    size_t type_len, u_char *data, size_t len)
{
    ngx_int_t     rc;
    ngx_buf_t    *b;
    ngx_chain_t   out;

    if (r->header_sent) {
        return NGX_ERROR;
    }

    if (r->method != NGX_HTTP_HEAD && !r->discard_body
        && r->request_body == NULL)
    {
        if (ngx_http_discard_request_body(r) != NGX_OK) {
            r->keepalive = 0;
        }
    }

    r->headers_out.status = status;
    r->headers_out.content_length_n = len;
    r->headers_out.content_type = *type;
    r->headers_out.content_type_len = type_len;
    r->headers_out.content_type_lowcase = NULL;

    rc = ngx_http_send_header(r);

    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return rc;
    }

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


ngx_int_t
ngx_chat_api_handler(ngx_http_request_t *r, ngx_str_t *path)
{
    u_char              *p, *end, *slash;
    ngx_int_t            rc;
    ngx_str_t            seg;
    const char          *code, *msg;
    ngx_chat_api_ctx_t  *ctx;

    ctx = ngx_pcalloc(r->pool, sizeof(ngx_chat_api_ctx_t));
    if (ctx == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ngx_http_set_ctx(r, ctx, ngx_chat_module);

    rc = ngx_chat_auth_request(r, &ctx->id, &code, &msg);

    /*
     * A page without JavaScript shows a file with <img src>: its session
     * cookie reads attachments, and nothing else (a GET changes nothing).
     */

    if (rc == NGX_DECLINED && code == NULL
        && (r->method == NGX_HTTP_GET || r->method == NGX_HTTP_HEAD)
        && path->len > sizeof("/attachments/") - 1
        && ngx_strncmp(path->data, "/attachments/",
                       sizeof("/attachments/") - 1) == 0
        && ngx_chat_html_session(r, &ctx->id) == NGX_OK)
    {
        rc = NGX_OK;
    }

    if (rc != NGX_OK) {
        return ngx_chat_http_error(r, NGX_HTTP_UNAUTHORIZED,
                                   code ? code : "unauthorized",
                                   code ? msg : "a bearer token is required",
                                   0);
    }

    if (ctx->id.role != NGX_CHAT_ROLE_SERVICE) {
        rc = ngx_chat_api_limited(r, NGX_CHAT_RATE_REST);

        if (rc != NGX_DECLINED) {
            return rc;
        }
    }

    p = path->data;
    end = p + path->len;

    if (p < end && *p == '/') {
        p++;
    }

    if (end > p && end[-1] == '/') {
        end--;
    }

    slash = ngx_strlchr(p, end, '/');
    seg.data = p;
    seg.len = (slash ? slash : end) - p;

    if (seg.len == 7 && ngx_strncmp(p, "tickets", 7) == 0 && slash == NULL) {
        if (r->method != NGX_HTTP_POST) {
            goto not_allowed;
        }

        return ngx_chat_api_tickets(r);
    }

    if (seg.len == 2 && ngx_strncmp(p, "me", 2) == 0 && slash == NULL) {
        if (r->method != NGX_HTTP_GET) {
            goto not_allowed;
        }

        return ngx_chat_api_me(r);
    }

    if (seg.len == 8 && ngx_strncmp(p, "presence", 8) == 0 && slash == NULL) {
        if (r->method != NGX_HTTP_GET) {
            goto not_allowed;
        }

        return ngx_chat_api_presence(r);
    }

    if (seg.len == 13 && ngx_strncmp(p, "notifications", 13) == 0) {
        if (ctx->id.role != NGX_CHAT_ROLE_SERVICE) {
            return ngx_chat_http_error(r, NGX_HTTP_FORBIDDEN, "forbidden",
                                       "the outbox is for a service token",
                                       0);
        }

        if (slash == NULL) {
            if (r->method != NGX_HTTP_GET) {
                goto not_allowed;
            }

            return ngx_chat_api_notifications(r);
        }

        if (end - slash == 4 && ngx_strncmp(slash, "/ack", 4) == 0) {
            if (r->method != NGX_HTTP_POST) {
                goto not_allowed;
            }

            return ngx_chat_api_read_body(r, ngx_chat_api_notify_ack);
        }

        goto not_found;
    }

    if (seg.len == 11 && ngx_strncmp(p, "attachments", 11) == 0) {
        return ngx_chat_api_attachments(r, path, slash, end);
    }

    if (seg.len == 6 && ngx_strncmp(p, "blocks", 6) == 0) {
        return ngx_chat_api_blocks(r, slash, end);
    }

    if (seg.len == 7 && ngx_strncmp(p, "reports", 7) == 0) {
        return ngx_chat_api_reports(r, slash, end);
    }

    if (seg.len == 5 && ngx_strncmp(p, "users", 5) == 0 && slash) {
        return ngx_chat_api_erase(r, slash + 1, end);
    }

    if (seg.len == 6 && ngx_strncmp(p, "search", 6) == 0 && slash == NULL) {
        if (r->method != NGX_HTTP_GET) {
            goto not_allowed;
        }

        return ngx_chat_api_search(r);
    }

    if (seg.len == 8 && ngx_strncmp(p, "messages", 8) == 0 && slash) {
        return ngx_chat_api_message(r, slash + 1, end);
    }

    if (!(seg.len == 13 && ngx_strncmp(p, "conversations", 13) == 0)) {
        goto not_found;
    }

    if (slash == NULL) {
        if (r->method == NGX_HTTP_POST) {
            return ngx_chat_api_read_body(r,
                                          ngx_chat_api_create_conversation);
        }

        if (r->method == NGX_HTTP_GET) {
            return ngx_chat_api_list_conversations(r);
        }

        goto not_allowed;
    }

    p = slash + 1;
    slash = ngx_strlchr(p, end, '/');

    if (ngx_chat_parse_id(p, (slash ? slash : end) - p, &ctx->conversation)
        != NGX_OK)
    {
        goto not_found;
    }

    if (slash == NULL) {
        if (r->method == NGX_HTTP_PATCH) {
            return ngx_chat_api_read_body(r, ngx_chat_api_update);
        }

        if (r->method != NGX_HTTP_GET) {
            goto not_allowed;
        }

        return ngx_chat_api_get_conversation(r);
    }

    p = slash + 1;

    if (end - p == 7 && ngx_strncmp(p, "members", 7) == 0) {
        if (r->method != NGX_HTTP_POST) {
            goto not_allowed;
        }

        return ngx_chat_api_read_body(r, ngx_chat_api_add_members);
    }

    if (end - p > 8 && ngx_strncmp(p, "members/", 8) == 0) {
        if (r->method != NGX_HTTP_DELETE) {
            goto not_allowed;
        }

        return ngx_chat_api_remove_member(r, p + 8, end);
    }

    if (end - p == 8 && ngx_strncmp(p, "messages", 8) == 0) {
        if (r->method == NGX_HTTP_GET) {
            return ngx_chat_api_history(r);
        }

        if (r->method == NGX_HTTP_POST) {
            return ngx_chat_api_read_body(r, ngx_chat_api_post_message);
        }

        goto not_allowed;
    }

    if (end - p == 4 && ngx_strncmp(p, "read", 4) == 0) {
        if (r->method != NGX_HTTP_POST) {
            goto not_allowed;
        }

        return ngx_chat_api_read_body(r, ngx_chat_api_read);
    }

    if (end - p == 8 && ngx_strncmp(p, "settings", 8) == 0) {
        if (r->method != NGX_HTTP_PATCH) {
            goto not_allowed;
        }

        return ngx_chat_api_read_body(r, ngx_chat_api_settings);
    }

    if (end - p == 6 && ngx_strncmp(p, "typing", 6) == 0) {
        if (r->method != NGX_HTTP_POST) {
            goto not_allowed;
        }

        return ngx_chat_api_read_body(r, ngx_chat_api_typing);
    }

not_found:

    return ngx_chat_http_error(r, NGX_HTTP_NOT_FOUND, "not_found",
                               "no such endpoint", 0);

not_allowed:

    return ngx_chat_http_error(r, NGX_HTTP_NOT_ALLOWED, "bad_request",
                               "method not allowed", 0);
}


static ngx_int_t
ngx_chat_api_tickets(ngx_http_request_t *r)
{
    u_char              *p;
    size_t               len;
    ngx_int_t            rc;
    ngx_str_t            ticket;
    ngx_msec_t           retry_after;
    ngx_chat_api_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_chat_module);

    rc = ngx_chat_ticket_issue(&ctx->id, r->pool, &ticket, &retry_after);

    if (rc == NGX_BUSY) {
        return ngx_chat_http_error(r, NGX_HTTP_TOO_MANY_REQUESTS,
                                   "rate_limited", "too many live tickets",
                                   retry_after);
    }

    if (rc != NGX_OK) {
        return ngx_chat_http_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                   "unavailable", "no room for tickets",
                                   1000);
    }

    len = sizeof("{\"ticket\":\"\",\"expires_in\":}") - 1 + ticket.len
          + NGX_TIME_T_LEN;

    p = ngx_pnalloc(r->pool, len);
    if (p == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    len = ngx_sprintf(p, "{\"ticket\":\"%V\",\"expires_in\":%T}", &ticket,
                      ngx_chat_worker.cmcf->ticket_ttl)
          - p;

    return ngx_chat_api_send(r, NGX_HTTP_OK, p, len);
}


static ngx_int_t
ngx_chat_api_me(ngx_http_request_t *r)
{
    u_char              *p;
    ngx_int_t            rc;
    ngx_chat_query_t    *q;
    ngx_chat_api_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_chat_module);

    /*
     * The count is worth one query, not a wait behind a pool that is all
     * busy: the worker answers who the caller is whatever the store does.
     */
    if (ctx->id.role == NGX_CHAT_ROLE_USER && ngx_chat_db_ready()
        && ngx_chat_db_busy() < ngx_chat_worker.cmcf->db_pool_size)
    {
        q = ngx_chat_query_alloc(NGX_CHAT_STMT_UNREAD_TOTAL,
                                 ctx->id.user.len + 1);
        if (q == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        p = (u_char *) &q[1];
        q->params[0] = (char *) p;
        p = ngx_cpymem(p, ctx->id.user.data, ctx->id.user.len);
        *p = '\0';

        q->handler = ngx_chat_api_me_done;

        rc = ngx_chat_api_query(r, q);

        if (rc == NGX_DONE) {
            r->main->count++;
        }

        return rc;
    }

    /* who the caller is does not need the store */
    return ngx_chat_api_me_send(r, NULL, 0);
}


/* unread_total is null when the store could not say */

static ngx_int_t
ngx_chat_api_me_send(ngx_http_request_t *r, char *unread, size_t len)
{
    ngx_int_t            rc;
    ngx_chat_buf_t       b;
    ngx_chat_api_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_chat_module);

    ngx_memzero(&b, sizeof(ngx_chat_buf_t));

    if (ngx_chat_buf_add_lit(&b, "{\"user\":{\"id\":") != NGX_OK
        || ngx_chat_buf_add_json_str(&b, ctx->id.user.data, ctx->id.user.len)
           != NGX_OK
        || ngx_chat_buf_add_lit(&b, ",\"name\":") != NGX_OK
        || ngx_chat_buf_add_json_str(&b, ctx->id.name.data, ctx->id.name.len)
           != NGX_OK
        || (ctx->id.role == NGX_CHAT_ROLE_SERVICE
            ? ngx_chat_buf_add_lit(&b, ",\"role\":\"service\"}")
            : ngx_chat_buf_add_lit(&b, ",\"role\":\"user\"}")) != NGX_OK
        || ngx_chat_buf_add_lit(&b, ",\"unread_total\":") != NGX_OK
        || (unread ? ngx_chat_buf_add(&b, unread, len)
                   : ngx_chat_buf_add_lit(&b, "null")) != NGX_OK
        || ngx_chat_buf_add_lit(&b, "}") != NGX_OK)
    {
        ngx_chat_buf_free(&b);
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    rc = ngx_chat_api_send(r, NGX_HTTP_OK, b.data, b.len);
    ngx_chat_buf_free(&b);

    return rc;
}


static void
ngx_chat_api_me_done(ngx_chat_query_t *q, PGresult *res, ngx_int_t rc)
{
    ngx_http_request_t  *r;

    r = ngx_chat_api_query_owner(q);

    if (r == NULL) {
        return;
    }

    if (rc == NGX_OK && PQntuples(res) == 1 && !PQgetisnull(res, 0, 0)) {
        ngx_http_finalize_request(r,
            ngx_chat_api_me_send(r, PQgetvalue(res, 0, 0),
                                 PQgetlength(res, 0, 0)));
        return;
    }

    ngx_http_finalize_request(r, ngx_chat_api_me_send(r, NULL, 0));
}


/*
 * Request bodies: small JSON, held in memory, never in a temp file.  The
 * chat location turns nginx's own client_max_body_size off (its answer
 * would be an HTML page) and gets a buffer that holds a whole body; the
 * module enforces chat_max_message_size itself.
 */

static ngx_int_t
ngx_chat_api_read_body(ngx_http_request_t *r, ngx_chat_api_body_pt handler)
{
    ngx_int_t            rc;
    ngx_chat_api_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_chat_module);
    ctx->body_handler = handler;

    if (r->headers_in.content_length_n > ngx_chat_api_body_max(r, ctx)) {
        return ngx_chat_api_body_error(r, NGX_HTTP_REQUEST_ENTITY_TOO_LARGE);
    }

    if (ctx->upload) {
        /* nginx writes it to its temporary file, which becomes the file */
        r->request_body_in_file_only = 1;
        r->request_body_in_persistent_file = 1;
        r->request_body_in_clean_file = 1;
        r->request_body_file_log_level = 0;

    } else {
        r->request_body_in_single_buf = 1;
        r->request_body_in_file_only = 0;
    }

    rc = ngx_http_read_client_request_body(r, ngx_chat_api_body_handler);

    if (rc >= NGX_HTTP_SPECIAL_RESPONSE) {
        return ngx_chat_api_body_error(r, rc);
    }

#if (NGX_HTTP_V2)
    if (r->stream) {
        return NGX_DONE;
    }
#endif

    if (rc == NGX_AGAIN) {
        r->read_event_handler = ngx_chat_api_body_reader;
    }

    return NGX_DONE;
}


/*
 * The rest of the body arrives later.  nginx's own reader would answer a
 * body it refuses with its HTML error page; this one reads the same way
 * (ngx_http_read_unbuffered_request_body() runs the same loop and calls
 * the body handler at the end) but gets the error back to answer it in
 * JSON.  The body handler may finish the request, and nginx still writes
 * to it after the handler returns: a reference of our own keeps it alive
 * until then.
 */

static void
ngx_chat_api_body_reader(ngx_http_request_t *r)
{
    ngx_int_t  rc;

    r->main->count++;

    rc = ngx_http_read_unbuffered_request_body(r);

    if (rc >= NGX_HTTP_SPECIAL_RESPONSE) {
        ngx_http_finalize_request(r, ngx_chat_api_body_error(r, rc));
    }

    ngx_http_finalize_request(r, NGX_DONE);
}


/*
 * A body read that failed midway: the rest of the body is never read, so
 * the connection cannot be kept; lingering close lets the client read the
 * answer.  Timeouts and closed connections go to nginx as they are.
 */

static ngx_int_t
ngx_chat_api_body_error(ngx_http_request_t *r, ngx_int_t rc)
{
    ngx_chat_api_ctx_t  *ctx;

    if (r->connection->error
        || (rc != NGX_HTTP_REQUEST_ENTITY_TOO_LARGE
            && rc != NGX_HTTP_BAD_REQUEST))
    {
        return rc;
    }

    r->keepalive = 0;
    r->lingering_close = 1;

    /* no "100 Continue" for a body that is refused */
    r->expect_tested = 1;

    ctx = ngx_http_get_module_ctx(r, ngx_chat_module);

    if (ctx->error_handler) {
        /* a page's own answer (ngx_chat_html.c) */
        return ctx->error_handler(r, rc, ctx->upload && ctx->upload->error
                                         ? ctx->upload->error : NULL);
    }

    if (rc == NGX_HTTP_BAD_REQUEST) {
        return ngx_chat_http_error(r, NGX_HTTP_BAD_REQUEST, "bad_request",
                                   "invalid request body", 0);
    }

    return ngx_chat_http_error(r, NGX_HTTP_REQUEST_ENTITY_TOO_LARGE,
                               "too_large", "the body is too large", 0);
}


/*
 * Refuses, in a chat location, a body without a length that grows past
 * chat_max_message_size (the chunk being read counts with its announced
 * size), and any body that would fill the buffer before it ends: nginx
 * would write the buffer to a temporary file (blocking file I/O) and go
 * on.  The second can only happen to a body cut into many small chunks.
 */

static ngx_int_t
ngx_chat_api_body_filter(ngx_http_request_t *r, ngx_chain_t *in)
{
    off_t                     size, max;
    ngx_int_t                 rc;
    ngx_chain_t              *out;
    ngx_chat_api_ctx_t       *ctx;
    ngx_chat_loc_conf_t      *lcf;
    ngx_http_request_body_t  *rb;

    lcf = ngx_http_get_module_loc_conf(r, ngx_chat_module);

    if (!lcf->enable) {
        return ngx_chat_api_next_body_filter(r, in);
    }

    rb = r->request_body;
    ctx = ngx_http_get_module_ctx(r, ngx_chat_module);
    max = ngx_chat_api_body_max(r, ctx);

    if (r->headers_in.chunked) {

        /* HTTP/1.1 counts in content_length_n, HTTP/2 in received */

        if (rb->chunked) {
            size = r->headers_in.content_length_n + rb->chunked->size;

        } else {
            size = rb->received;
        }

        if (size > max) {
            ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                          "chat: client sent a body of more than %O bytes",
                          max);
            return NGX_HTTP_REQUEST_ENTITY_TOO_LARGE;
        }
    }

    if (ctx && ctx->upload) {
        rc = ngx_chat_attach_filter(r, ctx->upload, in, &out);

        if (rc != NGX_OK) {
            return rc;
        }

        rc = ngx_chat_api_next_body_filter(r, out);

        ngx_chat_attach_filtered(r, ctx->upload, out);

        return rc;
    }

    if (rb->rest > 0 && rb->buf && rb->buf->last == rb->buf->end) {
        ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                      "chat: client body does not fit in "
                      "client_body_buffer_size (too finely chunked)");
        return NGX_HTTP_REQUEST_ENTITY_TOO_LARGE;
    }

    return ngx_chat_api_next_body_filter(r, in);
}


static void
ngx_chat_api_body_handler(ngx_http_request_t *r)
{
    u_char              *p;
    size_t               len;
    json_t              *root;
    ngx_int_t            rc;
    ngx_buf_t           *b;
    ngx_chain_t         *cl;
    ngx_chat_api_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_chat_module);

    if (ctx->upload) {
        ngx_chat_api_upload_done(r);
        return;
    }

    len = 0;

    if (r->request_body == NULL) {
        goto bad;
    }

    for (cl = r->request_body->bufs; cl; cl = cl->next) {
        if (cl->buf->in_file || cl->buf->file) {
            ngx_http_finalize_request(r,
                ngx_chat_http_error(r, NGX_HTTP_REQUEST_ENTITY_TOO_LARGE,
                                    "too_large", "the body is too large "
                                    "(raise client_body_buffer_size)", 0));
            return;
        }

        len += cl->buf->last - cl->buf->pos;
    }

    if (len == 0) {
        goto bad;
    }

    if (len > ngx_chat_worker.cmcf->max_message) {
        ngx_http_finalize_request(r,
            ngx_chat_http_error(r, NGX_HTTP_REQUEST_ENTITY_TOO_LARGE,
                                "too_large", "the body is too large", 0));
        return;
    }

    p = ngx_pnalloc(r->pool, len);
    if (p == NULL) {
        ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
        return;
    }

    len = 0;

    for (cl = r->request_body->bufs; cl; cl = cl->next) {
        b = cl->buf;
        ngx_memcpy(p + len, b->pos, b->last - b->pos);
        len += b->last - b->pos;
    }

    if (ctx->form_handler) {
        ctx->form_handler(r, p, len);
        return;
    }

    root = ngx_chat_json_parse(p, len);

    if (root == NULL || !json_is_object(root)) {
        if (root) {
            json_decref(root);
        }

        goto bad;
    }

    rc = ctx->body_handler(r, root);
    json_decref(root);

    if (rc == NGX_DONE) {
        return;
    }

    ngx_http_finalize_request(r, rc);
    return;

bad:

    ngx_http_finalize_request(r,
        ngx_chat_http_error(r, NGX_HTTP_BAD_REQUEST, "bad_request",
                            "the body must be a JSON object", 0));
}


/* runs a query for this request; the answer finalizes it */

static ngx_int_t
ngx_chat_api_query(ngx_http_request_t *r, ngx_chat_query_t *q)
{
    ngx_chat_api_ctx_t  *ctx;

    if (ngx_chat_api_hold(r) != NGX_OK) {
        ngx_chat_query_free(q);
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    q->data = r;

    if (ngx_chat_db_query(q) != NGX_OK) {
        ngx_chat_query_free(q);
        return ngx_chat_http_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                   "unavailable", "the store is unavailable",
                                   ngx_chat_db_retry_after());
    }

    ctx = ngx_http_get_module_ctx(r, ngx_chat_module);
    ctx->query = q;

    ngx_chat_api_wait(r);

    return NGX_DONE;
}


/*
 * A request may go away while the store works for it: the client closes
 * (ngx_chat_api_wait() makes nginx notice at once), or nginx terminates
 * it.  The db layer and the store own the query or the send until its
 * handler runs, so the cleanup only orphans it; the handler then finds no
 * request and frees just what is its own.
 */

static ngx_int_t
ngx_chat_api_hold(ngx_http_request_t *r)
{
    ngx_http_cleanup_t  *cln;
    ngx_chat_api_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_chat_module);

    if (ctx->cleanup) {
        return NGX_OK;
    }

    cln = ngx_http_cleanup_add(r, 0);
    if (cln == NULL) {
        return NGX_ERROR;
    }

    cln->handler = ngx_chat_api_cleanup;
    cln->data = ctx;
    ctx->cleanup = 1;

    return NGX_OK;
}


static void
ngx_chat_api_cleanup(void *data)
{
    ngx_chat_api_ctx_t  *ctx = data;

    if (ctx->query) {
        ctx->query->data = NULL;
        ctx->query = NULL;
    }

    if (ctx->send) {
        ctx->send->data = NULL;
        ctx->send = NULL;
    }
}


/*
 * While the request waits, nothing reads from the client: as nginx's
 * upstream module does, ngx_http_test_reading() finalizes the request as
 * soon as the client closes.  A close that came in before (its event has
 * been consumed) is checked for once.
 */

static void
ngx_chat_api_wait(ngx_http_request_t *r)
{
    ngx_event_t  *rev;

    r->read_event_handler = ngx_http_test_reading;

    rev = r->connection->read;

    if (rev->ready) {
        ngx_post_event(rev, &ngx_posted_events);
    }
}


/* frees q; the request it answers, or NULL when that has gone */

static ngx_http_request_t *
ngx_chat_api_query_owner(ngx_chat_query_t *q)
{
    ngx_http_request_t  *r;
    ngx_chat_api_ctx_t  *ctx;

    r = q->data;
    ngx_chat_query_free(q);

    if (r == NULL) {
        return NULL;
    }

    ctx = ngx_http_get_module_ctx(r, ngx_chat_module);
    ctx->query = NULL;

    return r;
}


static ngx_int_t
ngx_chat_api_create_conversation(ngx_http_request_t *r, json_t *body)
{
    u_char                 *p, num[96];
    char                   *context;
    int64_t                 key;
    ngx_chat_buf_t          sql;
    size_t                  i;
    json_t                 *members, *m, *ctxj;
    ngx_str_t               kind, title, user;
    ngx_uint_t              self, count;
    ngx_chat_buf_t          mb;
    ngx_chat_query_t       *q;
    ngx_chat_api_ctx_t     *ctx;
    ngx_chat_api_create_t  *cr;

    ctx = ngx_http_get_module_ctx(r, ngx_chat_module);
    context = NULL;

    if (ngx_chat_json_str(body, "kind", &kind, 16, 1) != NGX_OK
        || !((kind.len == 6 && ngx_strncmp(kind.data, "direct", 6) == 0)
             || (kind.len == 5 && ngx_strncmp(kind.data, "group", 5) == 0)))
    {
        return ngx_chat_http_error(r, NGX_HTTP_BAD_REQUEST, "bad_request",
                                   "\"kind\" must be \"direct\" or \"group\"",
                                   0);
    }

    if (ngx_chat_json_str(body, "title", &title, 200, 0) == NGX_ERROR) {
        return ngx_chat_http_error(r, NGX_HTTP_BAD_REQUEST, "bad_request",
                                   "\"title\" must be a string of at most "
                                   "200 bytes", 0);
    }

    members = json_object_get(body, "members");

    if (!json_is_array(members)
        || json_array_size(members) > NGX_CHAT_MAX_MEMBERS)
    {
        return ngx_chat_http_error(r, NGX_HTTP_BAD_REQUEST, "bad_request",
                                   "\"members\" must be an array of user "
                                   "ids", 0);
    }

    ngx_memzero(&mb, sizeof(ngx_chat_buf_t));
    self = (ctx->id.role != NGX_CHAT_ROLE_SERVICE);
    count = 0;

    if (ngx_chat_buf_add_lit(&mb, "[") != NGX_OK) {
        goto failed;
    }

    if (self) {
        if (ngx_chat_buf_add_json_str(&mb, ctx->id.user.data,
                                      ctx->id.user.len) != NGX_OK)
        {
            goto failed;
        }

        count++;
    }

    json_array_foreach(members, i, m) {
        if (!json_is_string(m)
            || ngx_chat_valid_user_id((u_char *) json_string_value(m),
                                      json_string_length(m)) != NGX_OK)
        {
            ngx_chat_buf_free(&mb);
            return ngx_chat_http_error(r, NGX_HTTP_BAD_REQUEST,
                                       "bad_request", "\"members\" must be "
                                       "an array of user ids", 0);
        }

        user.data = (u_char *) json_string_value(m);
        user.len = json_string_length(m);

        if (self && user.len == ctx->id.user.len
            && ngx_strncmp(user.data, ctx->id.user.data, user.len) == 0)
        {
            continue;
        }

        /* duplicates are harmless: the store keeps distinct members */
        if ((count && ngx_chat_buf_add_lit(&mb, ",") != NGX_OK)
            || ngx_chat_buf_add_json_str(&mb, user.data, user.len) != NGX_OK)
        {
            goto failed;
        }

        count++;
    }

    if (ngx_chat_buf_add(&mb, "]", 2) != NGX_OK) {
        goto failed;
    }

    if (kind.len == 6 && count != 2) {
        ngx_chat_buf_free(&mb);
        return ngx_chat_http_error(r, NGX_HTTP_BAD_REQUEST, "bad_request",
                                   "a direct conversation has exactly two "
                                   "members", 0);
    }

    if (count == 0) {
        ngx_chat_buf_free(&mb);
        return ngx_chat_http_error(r, NGX_HTTP_BAD_REQUEST, "bad_request",
                                   "\"members\" is empty", 0);
    }

    ctxj = json_object_get(body, "context");

    if (ctxj && !json_is_null(ctxj)) {
        if (!json_is_object(ctxj)) {
            ngx_chat_buf_free(&mb);
            return ngx_chat_http_error(r, NGX_HTTP_BAD_REQUEST,
                                       "bad_request",
                                       "\"context\" must be an object", 0);
        }

        context = json_dumps(ctxj, JSON_COMPACT);
        if (context == NULL) {
            goto failed;
        }

        if (ngx_strlen(context) > 4096) {
            free(context);
            ngx_chat_buf_free(&mb);
            return ngx_chat_http_error(r, NGX_HTTP_REQUEST_ENTITY_TOO_LARGE,
                                       "too_large", "\"context\" is too "
                                       "large", 0);
        }
    }

    /* BEGIN; EXECUTE chat_create_stage(key, holder, ...) as literals */

    key = ngx_chat_random_key();
    ngx_memzero(&sql, sizeof(ngx_chat_buf_t));

    p = ngx_sprintf(num, "BEGIN;EXECUTE chat_create_stage(%L,%L,",
                    key, ngx_chat_bus_holder());

    if (ngx_chat_buf_add(&sql, num, p - num) != NGX_OK
        || ngx_chat_db_literal(&sql, ctx->id.user.data, ctx->id.user.len)
           != NGX_OK
        || ngx_chat_buf_add_lit(&sql, ",") != NGX_OK
        || ngx_chat_db_literal(&sql, kind.data, kind.len) != NGX_OK
        || ngx_chat_buf_add_lit(&sql, ",") != NGX_OK
        || ngx_chat_db_literal(&sql, mb.data, mb.len - 1) != NGX_OK
        || ngx_chat_buf_add_lit(&sql, ",") != NGX_OK
        || (title.data
            ? ngx_chat_db_literal(&sql, title.data, title.len)
            : ngx_chat_buf_add_lit(&sql, "NULL")) != NGX_OK
        || ngx_chat_buf_add_lit(&sql, ",") != NGX_OK
        || (context
            ? ngx_chat_db_literal(&sql, (u_char *) context,
                                  ngx_strlen(context))
            : ngx_chat_buf_add_lit(&sql, "NULL")) != NGX_OK
        || ngx_chat_buf_add(&sql, ")", 2) != NGX_OK)
    {
        ngx_chat_buf_free(&sql);
        goto failed;
    }

    /* one allocation: the db layer's refusal frees all of it */

    q = ngx_chat_query_alloc(NGX_CHAT_STMT_CREATE_CONV,
                             sizeof(ngx_chat_api_create_t) + sql.len);
    if (q == NULL) {
        ngx_chat_buf_free(&sql);
        goto failed;
    }

    cr = (ngx_chat_api_create_t *) &q[1];
    cr->key = key;

    p = (u_char *) &cr[1];
    ngx_memcpy(p, sql.data, sql.len);
    ngx_chat_buf_free(&sql);

    free(context);
    context = NULL;
    ngx_chat_buf_free(&mb);

    q->sql = (const char *) p;
    q->txn = 1;
    q->handler = ngx_chat_api_create_done;

    /* the body reader's reference keeps the request until we finalize */
    return ngx_chat_api_query(r, q);

failed:

    free(context);
    ngx_chat_buf_free(&mb);

    return NGX_HTTP_INTERNAL_SERVER_ERROR;
}


/*
 * Step 1 is back, its transaction open: a new conversation gets its
 * event's position now (everything that can wait on a lock is done) and
 * step 2 inserts the event and commits; an existing direct conversation
 * is answered at once (nothing was written).
 */
static void
ngx_chat_api_create_done(ngx_chat_query_t *q, PGresult *res, ngx_int_t rc)
{
    u_char                 *p;
    ngx_chat_api_ctx_t     *ctx;
    ngx_http_request_t     *r;
    ngx_chat_api_create_t  *cr;

    cr = (ngx_chat_api_create_t *) &q[1];
    r = q->data;

    if (rc != NGX_OK || PQntuples(res) != 1) {
        goto unavailable;
    }

    if (PQgetvalue(res, 0, 0)[0] != 't') {
        r = ngx_chat_api_query_owner(q);

        if (r == NULL) {
            return;
        }

        if (PQgetisnull(res, 0, 1)) {
            /* a direct conversation with a user who blocks the creator */
            ngx_http_finalize_request(r,
                ngx_chat_http_error(r, NGX_HTTP_FORBIDDEN, "blocked",
                                    "the other member does not take "
                                    "messages from this user", 0));
            return;
        }

        ngx_chat_api_create_reply(r, NGX_HTTP_OK, PQgetvalue(res, 0, 2),
                                  PQgetlength(res, 0, 2));
        return;
    }

    /* a client that left still gets its conversation, as a send is stored */

    if ((size_t) PQgetlength(res, 0, 1) > NGX_INT64_LEN
        || ngx_chat_bus_reserve(1, cr->key, &cr->lo, &cr->resv) != NGX_OK)
    {
        goto unavailable;
    }

    p = ngx_sprintf(cr->sql, "EXECUTE chat_create_event(%uL,%*s);COMMIT",
                    cr->lo, (size_t) PQgetlength(res, 0, 1),
                    PQgetvalue(res, 0, 1));
    *p = '\0';

    ngx_chat_db_keep_result();
    cr->stage = res;

    cr->event.stmt = NGX_CHAT_STMT_CREATE_EVENT;
    cr->event.sql = (const char *) cr->sql;
    cr->event.handler = ngx_chat_api_create_event_done;
    cr->event.data = r;

    if (r) {
        /* a client that goes away now orphans step 2 */
        ctx = ngx_http_get_module_ctx(r, ngx_chat_module);
        ctx->query = &cr->event;
    }

    ngx_chat_db_continue(&cr->event, q->conn);

    return;

unavailable:

    r = ngx_chat_api_query_owner(q);

    if (r) {
        ngx_http_finalize_request(r,
            ngx_chat_http_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                "unavailable", "the store is unavailable",
                                ngx_chat_db_retry_after()));
    }
}


static void
ngx_chat_api_create_event_done(ngx_chat_query_t *e, PGresult *res,
    ngx_int_t rc)
{
    int64_t                 conv;
    uint64_t                gseq;
    PGresult               *stage;
    ngx_chat_query_t       *q;
    ngx_chat_api_ctx_t     *ctx;
    ngx_http_request_t     *r;
    ngx_chat_api_create_t  *cr;

    /* step 2's query is the first member of what follows step 1's */
    cr = (ngx_chat_api_create_t *) e;
    q = (ngx_chat_query_t *) ((u_char *) cr - sizeof(ngx_chat_query_t));
    stage = cr->stage;

    /* the request, unless the cleanup orphaned step 2 */
    r = e->data;

    if (rc == NGX_OK) {
        /* committed: the event goes out whether or not anyone waits */
        conv = ngx_atoof((u_char *) PQgetvalue(stage, 0, 1),
                         PQgetlength(stage, 0, 1));
        gseq = cr->lo;

        ngx_chat_bus_publish_reserved(cr->resv, cr->key, gseq, conv,
                                      (u_char *) PQgetvalue(stage, 0, 3),
                                      PQgetlength(stage, 0, 3));
        ngx_chat_bus_release(cr->resv, cr->key);
        ngx_chat_bus_notify();

    } else if (rc == NGX_DECLINED) {
        ngx_chat_bus_unknown(cr->resv, cr->key);

    } else {
        ngx_chat_bus_void(cr->resv, cr->key);
    }

    if (r) {
        ctx = ngx_http_get_module_ctx(r, ngx_chat_module);
        ctx->query = NULL;

        if (rc == NGX_OK) {
            ngx_chat_api_create_reply(r, NGX_HTTP_CREATED,
                                      PQgetvalue(stage, 0, 2),
                                      PQgetlength(stage, 0, 2));
        } else {
            ngx_http_finalize_request(r,
                ngx_chat_http_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                    "unavailable", "the store is unavailable",
                                    ngx_chat_db_retry_after()));
        }
    }

    PQclear(stage);
    ngx_chat_query_free(q);
}


static void
ngx_chat_api_create_reply(ngx_http_request_t *r, ngx_uint_t status,
    char *json, size_t len)
{
    ngx_int_t       rc;
    ngx_chat_buf_t  b;

    ngx_memzero(&b, sizeof(ngx_chat_buf_t));

    if (ngx_chat_buf_add_lit(&b, "{\"conversation\":") != NGX_OK
        || ngx_chat_buf_add(&b, json, len) != NGX_OK
        || ngx_chat_buf_add_lit(&b, "}") != NGX_OK)
    {
        ngx_chat_buf_free(&b);
        ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
        return;
    }

    rc = ngx_chat_api_send(r, status, b.data, b.len);
    ngx_chat_buf_free(&b);

    ngx_http_finalize_request(r, rc);
}


static ngx_int_t
ngx_chat_api_arg_num(ngx_http_request_t *r, char *name, size_t len,
    int64_t *v, int64_t min, int64_t max)
{
    ngx_str_t  value;
    off_t      n;

    if (ngx_http_arg(r, (u_char *) name, len, &value) != NGX_OK) {
        return NGX_DECLINED;
    }

    n = ngx_atoof(value.data, value.len);

    if (n == NGX_ERROR || n < min || n > max) {
        return NGX_ERROR;
    }

    *v = n;

    return NGX_OK;
}


static ngx_int_t
ngx_chat_api_list_conversations(ngx_http_request_t *r)
{
    u_char              *p, *colon;
    int64_t              limit;
    ngx_int_t            rc;
    ngx_str_t            before;
    ngx_chat_query_t    *q;
    ngx_chat_api_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_chat_module);

    limit = 50;
    colon = NULL;
    ngx_str_null(&before);

    if (ngx_chat_api_arg_num(r, "limit", 5, &limit, 1, 100) == NGX_ERROR) {
        return ngx_chat_http_error(r, NGX_HTTP_BAD_REQUEST, "bad_request",
                                   "\"limit\" must be 1 to 100", 0);
    }

    if (ngx_http_arg(r, (u_char *) "before", 6, &before) == NGX_OK) {
        colon = ngx_strlchr(before.data, before.data + before.len, ':');

        if (colon == NULL
            || ngx_atoof(before.data, colon - before.data) == NGX_ERROR
            || ngx_atoof(colon + 1, before.data + before.len - colon - 1)
               == NGX_ERROR)
        {
            return ngx_chat_http_error(r, NGX_HTTP_BAD_REQUEST,
                                       "bad_request", "bad \"before\"", 0);
        }
    }

    q = ngx_chat_query_alloc(NGX_CHAT_STMT_LIST_CONVS,
                             ctx->id.user.len + 1 + before.len + 2
                             + NGX_INT_T_LEN + 1);
    if (q == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    p = (u_char *) &q[1];

    q->params[0] = (char *) p;
    p = ngx_cpymem(p, ctx->id.user.data, ctx->id.user.len);
    *p++ = '\0';

    if (colon) {
        q->params[1] = (char *) p;
        p = ngx_cpymem(p, before.data, colon - before.data);
        *p++ = '\0';

        q->params[2] = (char *) p;
        p = ngx_cpymem(p, colon + 1, before.data + before.len - colon - 1);
        *p++ = '\0';
    }

    q->params[3] = (char *) p;
    p = ngx_sprintf(p, "%L", limit);
    *p++ = '\0';

    q->handler = ngx_chat_api_text_done;

    rc = ngx_chat_api_query(r, q);

    if (rc == NGX_DONE) {
        r->main->count++;
    }

    return rc;
}


static ngx_int_t
ngx_chat_api_get_conversation(ngx_http_request_t *r)
{
    u_char              *p;
    ngx_int_t            rc;
    ngx_chat_query_t    *q;
    ngx_chat_api_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_chat_module);

    q = ngx_chat_query_alloc(NGX_CHAT_STMT_GET_CONV,
                             NGX_INT64_LEN + 1 + ctx->id.user.len + 1 + 2);
    if (q == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    p = (u_char *) &q[1];

    q->params[0] = (char *) p;
    p = ngx_sprintf(p, "%L", ctx->conversation);
    *p++ = '\0';

    q->params[1] = (char *) p;
    p = ngx_cpymem(p, ctx->id.user.data, ctx->id.user.len);
    *p++ = '\0';

    q->params[2] = (ctx->id.role == NGX_CHAT_ROLE_SERVICE) ? "t" : "f";

    q->handler = ngx_chat_api_get_done;

    rc = ngx_chat_api_query(r, q);

    if (rc == NGX_DONE) {
        r->main->count++;
    }

    return rc;
}


static void
ngx_chat_api_get_done(ngx_chat_query_t *q, PGresult *res, ngx_int_t rc)
{
    ngx_chat_buf_t       b;
    ngx_http_request_t  *r;

    r = ngx_chat_api_query_owner(q);

    if (r == NULL) {
        return;
    }

    if (rc != NGX_OK) {
        ngx_http_finalize_request(r,
            ngx_chat_http_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                "unavailable", "the store is unavailable",
                                ngx_chat_db_retry_after()));
        return;
    }

    if (PQntuples(res) != 1) {
        ngx_http_finalize_request(r,
            ngx_chat_http_error(r, NGX_HTTP_NOT_FOUND, "not_found",
                                "no such conversation", 0));
        return;
    }

    if (PQgetvalue(res, 0, 1)[0] != 't') {
        ngx_http_finalize_request(r,
            ngx_chat_http_error(r, NGX_HTTP_FORBIDDEN, "forbidden",
                                "not a member of the conversation", 0));
        return;
    }

    ngx_memzero(&b, sizeof(ngx_chat_buf_t));

    if (ngx_chat_buf_add_lit(&b, "{\"conversation\":") != NGX_OK
        || ngx_chat_buf_add(&b, PQgetvalue(res, 0, 0), PQgetlength(res, 0, 0))
           != NGX_OK
        || ngx_chat_buf_add_lit(&b, "}") != NGX_OK)
    {
        ngx_chat_buf_free(&b);
        ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
        return;
    }

    rc = ngx_chat_api_send(r, NGX_HTTP_OK, b.data, b.len);
    ngx_chat_buf_free(&b);

    ngx_http_finalize_request(r, rc);
}


static ngx_int_t
ngx_chat_api_history(ngx_http_request_t *r)
{
    u_char              *p;
    int64_t              before, after, limit;
    ngx_int_t            rc, rcb, rca;
    ngx_chat_query_t    *q;
    ngx_chat_api_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_chat_module);

    limit = 50;

    rcb = ngx_chat_api_arg_num(r, "before_seq", 10, &before, 1,
                               NGX_MAX_OFF_T_VALUE);
    rca = ngx_chat_api_arg_num(r, "after_seq", 9, &after, 0,
                               NGX_MAX_OFF_T_VALUE);

    if (rcb == NGX_ERROR || rca == NGX_ERROR
        || ngx_chat_api_arg_num(r, "limit", 5, &limit, 1, 200) == NGX_ERROR)
    {
        return ngx_chat_http_error(r, NGX_HTTP_BAD_REQUEST, "bad_request",
                                   "\"before_seq\" and \"after_seq\" must be "
                                   "sequence numbers, \"limit\" 1 to 200", 0);
    }

    /* a message's replies (messages/{id}/replies) page the same way */
    q = ngx_chat_query_alloc(ctx->message ? NGX_CHAT_STMT_REPLIES
                                          : NGX_CHAT_STMT_HISTORY,
                             ctx->id.user.len + 1 + 4 * (NGX_INT64_LEN + 1));
    if (q == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    p = (u_char *) &q[1];

    q->params[0] = (char *) p;
    p = ngx_cpymem(p, ctx->id.user.data, ctx->id.user.len);
    *p++ = '\0';

    q->params[1] = (ctx->id.role == NGX_CHAT_ROLE_SERVICE) ? "t" : "f";

    q->params[2] = (char *) p;
    p = ngx_sprintf(p, "%L",
                    ctx->message ? ctx->message : ctx->conversation);
    *p++ = '\0';

    if (rcb == NGX_OK) {
        q->params[3] = (char *) p;
        p = ngx_sprintf(p, "%L", before);
        *p++ = '\0';
    }

    if (rca == NGX_OK) {
        q->params[4] = (char *) p;
        p = ngx_sprintf(p, "%L", after);
        *p++ = '\0';
    }

    q->params[5] = (char *) p;
    p = ngx_sprintf(p, "%L", limit);
    *p++ = '\0';

    q->handler = ngx_chat_api_text_done;

    rc = ngx_chat_api_query(r, q);

    if (rc == NGX_DONE) {
        r->main->count++;
    }

    return rc;
}


/* a query that answers with the whole JSON body, NULL for "not found" */

static void
ngx_chat_api_text_done(ngx_chat_query_t *q, PGresult *res, ngx_int_t rc)
{
    char                *state;
    ngx_chat_api_ctx_t  *ctx;
    ngx_http_request_t  *r;

    r = ngx_chat_api_query_owner(q);

    if (r == NULL) {
        return;
    }

    if (rc == NGX_ERROR && res
        && (state = PQresultErrorField(res, PG_DIAG_SQLSTATE)) != NULL
        && state[0] == '2' && state[1] == '2')
    {
        /* a data exception: what the client asked cannot be read */
        ngx_http_finalize_request(r,
            ngx_chat_http_error(r, NGX_HTTP_BAD_REQUEST, "bad_request",
                                "the request's values are not valid", 0));
        return;
    }

    if (rc != NGX_OK || PQntuples(res) != 1) {
        ngx_http_finalize_request(r,
            ngx_chat_http_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                "unavailable", "the store is unavailable",
                                ngx_chat_db_retry_after()));
        return;
    }

    if (PQgetisnull(res, 0, 0)) {
        ctx = ngx_http_get_module_ctx(r, ngx_chat_module);

        ngx_http_finalize_request(r,
            ngx_chat_http_error(r, NGX_HTTP_NOT_FOUND, "not_found",
                                ctx->message ? "no such message"
                                             : "no such conversation", 0));
        return;
    }

    if (ngx_strcmp(PQgetvalue(res, 0, 0), "forbidden") == 0) {
        ngx_http_finalize_request(r,
            ngx_chat_http_error(r, NGX_HTTP_FORBIDDEN, "forbidden",
                                "not a member of the conversation", 0));
        return;
    }

    ngx_http_finalize_request(r,
        ngx_chat_api_send(r, NGX_HTTP_OK, (u_char *) PQgetvalue(res, 0, 0),
                          PQgetlength(res, 0, 0)));
}


static ngx_int_t
ngx_chat_api_post_message(ngx_http_request_t *r, json_t *body)
{
    json_t              *format;
    ngx_int_t            rc;
    ngx_uint_t           service;
    const char          *code, *msg;
    ngx_chat_send_t     *snd;
    ngx_chat_api_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_chat_module);

    /*
     * A service token posts system messages ("Contract started") under
     * its own subject, which need not be a member (chat_send_stage()).
     */

    service = (ctx->id.role == NGX_CHAT_ROLE_SERVICE);

    if (!service) {
        rc = ngx_chat_api_limited(r, NGX_CHAT_RATE_SEND);

        if (rc != NGX_DECLINED) {
            return rc;
        }
    }

    if (service) {
        format = json_object_get(body, "format");

        if (format
            && !(json_is_string(format)
                 && ngx_strcmp(json_string_value(format), "system") == 0))
        {
            return ngx_chat_http_error(r, NGX_HTTP_BAD_REQUEST,
                                       "bad_request", "a service token "
                                       "posts \"format\": \"system\"", 0);
        }

        json_object_del(body, "format");
    }

    snd = ngx_chat_store_send_from_json(body, &ctx->id.user,
                                        ctx->conversation, 0, &code, &msg);
    if (snd == NULL) {
        return ngx_chat_http_error(r,
                                   code[0] == 't'
                                   ? NGX_HTTP_REQUEST_ENTITY_TOO_LARGE
                                   : (code[0] == 'i'
                                      ? NGX_HTTP_INTERNAL_SERVER_ERROR
                                      : NGX_HTTP_BAD_REQUEST),
                                   code, msg, 0);
    }

    if (service) {
        ngx_str_set(&snd->format, "system");
    }

    if (ngx_chat_api_hold(r) != NGX_OK) {
        ngx_free(snd);
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    snd->handler = ngx_chat_api_post_done;
    snd->data = r;

    rc = ngx_chat_store_send(snd);

    if (rc != NGX_OK) {
        ngx_free(snd);

        if (rc == NGX_BUSY) {
            return ngx_chat_http_error(r, NGX_HTTP_TOO_MANY_REQUESTS,
                                       "rate_limited", "too many sends of "
                                       "this user waiting for the store",
                                       100);
        }

        return ngx_chat_http_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                   "unavailable", "the store is unavailable",
                                   ngx_chat_db_retry_after());
    }

    ctx->send = snd;

    ngx_chat_api_wait(r);

    /* the body reader's reference keeps the request until we finalize */
    return NGX_DONE;
}


/* the store frees snd after this returns; it has stored it or not */

static void
ngx_chat_api_post_done(ngx_chat_send_t *snd)
{
    ngx_int_t            rc;
    ngx_uint_t           status;
    ngx_chat_buf_t       b;
    ngx_http_request_t  *r;
    ngx_chat_api_ctx_t  *ctx;

    r = snd->data;

    if (r == NULL) {
        return;
    }

    ctx = ngx_http_get_module_ctx(r, ngx_chat_module);
    ctx->send = NULL;

    if (snd->rc != NGX_OK) {
        status = NGX_HTTP_INTERNAL_SERVER_ERROR;

        if (ngx_strcmp(snd->error, "unavailable") == 0) {
            status = NGX_HTTP_SERVICE_UNAVAILABLE;

        } else if (ngx_strcmp(snd->error, "forbidden") == 0
                   || ngx_strcmp(snd->error, "archived") == 0
                   || ngx_strcmp(snd->error, "blocked") == 0)
        {
            status = NGX_HTTP_FORBIDDEN;

        } else if (ngx_strcmp(snd->error, "not_found") == 0) {
            status = NGX_HTTP_NOT_FOUND;

        } else if (ngx_strcmp(snd->error, "conflict") == 0) {
            status = NGX_HTTP_CONFLICT;

        } else if (ngx_strcmp(snd->error, "bad_request") == 0) {
            status = NGX_HTTP_BAD_REQUEST;
        }

        ngx_http_finalize_request(r,
            ngx_chat_http_error(r, status, snd->error, snd->error_msg,
                                snd->retry_after));
        return;
    }

    ngx_memzero(&b, sizeof(ngx_chat_buf_t));

    if (ngx_chat_buf_add_lit(&b, "{\"message\":") != NGX_OK
        || ngx_chat_buf_add_str(&b, &snd->message) != NGX_OK
        || ngx_chat_buf_add_lit(&b, "}") != NGX_OK)
    {
        ngx_chat_buf_free(&b);
        ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
        return;
    }

    rc = ngx_chat_api_send(r, snd->duplicate ? NGX_HTTP_OK : NGX_HTTP_CREATED,
                           b.data, b.len);
    ngx_chat_buf_free(&b);

    ngx_http_finalize_request(r, rc);
}


/* typing over REST: members only, as on a WebSocket */

static ngx_int_t
ngx_chat_api_typing(ngx_http_request_t *r, json_t *body)
{
    ngx_int_t            rc;
    ngx_str_t            state;
    ngx_chat_api_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_chat_module);

    if (ngx_chat_json_str(body, "state", &state, 8, 1) != NGX_OK
        || !((state.len == 5 && ngx_strncmp(state.data, "start", 5) == 0)
             || (state.len == 4 && ngx_strncmp(state.data, "stop", 4) == 0)))
    {
        return ngx_chat_http_error(r, NGX_HTTP_BAD_REQUEST, "bad_request",
                                   "\"state\" must be \"start\" or \"stop\"",
                                   0);
    }

    ctx->typing_start = (state.len == 5);

    if (ctx->typing_start) {
        rc = ngx_chat_api_limited(r, NGX_CHAT_RATE_TYPING);

        if (rc != NGX_DECLINED) {
            return rc;
        }
    }

    return ngx_chat_api_member(r);
}


static ngx_int_t
ngx_chat_api_read(ngx_http_request_t *r, json_t *body)
{
    ngx_chat_api_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_chat_module);

    if (ngx_chat_json_int(body, "seq", &ctx->seq, 1) != NGX_OK
        || ctx->seq < 0)
    {
        return ngx_chat_http_error(r, NGX_HTTP_BAD_REQUEST, "bad_request",
                                   "\"seq\" must be a sequence number", 0);
    }

    ctx->read = 1;

    return ngx_chat_api_member(r);
}


/*
 * Typing and reading over REST: members only (a service is not one), then
 * the same calls as on a WebSocket; 204.
 */
static ngx_int_t
ngx_chat_api_member(ngx_http_request_t *r)
{
    u_char              *p;
    ngx_chat_query_t    *q;
    ngx_chat_api_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_chat_module);

    q = ngx_chat_query_alloc(NGX_CHAT_STMT_MEMBER,
                             NGX_INT64_LEN + 1 + ctx->id.user.len + 1);
    if (q == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    p = (u_char *) &q[1];

    q->params[0] = (char *) p;
    p = ngx_sprintf(p, "%L", ctx->conversation);
    *p++ = '\0';

    q->params[1] = (char *) p;
    p = ngx_cpymem(p, ctx->id.user.data, ctx->id.user.len);
    *p++ = '\0';

    q->handler = ngx_chat_api_member_done;

    /* the body reader's reference keeps the request */
    return ngx_chat_api_query(r, q);
}


static void
ngx_chat_api_member_done(ngx_chat_query_t *q, PGresult *res, ngx_int_t rc)
{
    ngx_http_request_t  *r;
    ngx_chat_api_ctx_t  *ctx;

    r = ngx_chat_api_query_owner(q);

    if (r == NULL) {
        return;
    }

    ctx = ngx_http_get_module_ctx(r, ngx_chat_module);

    if (rc != NGX_OK || PQntuples(res) != 1) {
        ngx_http_finalize_request(r,
            ngx_chat_http_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                "unavailable", "the store is unavailable",
                                ngx_chat_db_retry_after()));
        return;
    }

    if (PQgetvalue(res, 0, 0)[0] != 't') {
        ngx_http_finalize_request(r,
            ngx_chat_http_error(r, NGX_HTTP_NOT_FOUND, "not_found",
                                "no such conversation", 0));
        return;
    }

    if (PQgetvalue(res, 0, 1)[0] != 't') {
        ngx_http_finalize_request(r,
            ngx_chat_http_error(r, NGX_HTTP_FORBIDDEN, "forbidden",
                                "not a member of the conversation", 0));
        return;
    }

    if (ctx->read) {
        ngx_chat_receipts_mark(ctx->conversation, &ctx->id.user, 0,
                               ctx->seq, ngx_chat_bus_known());

    } else if (ngx_chat_live_typing(ctx->conversation, &ctx->id.user,
                                    ctx->typing_start, 0)
               == NGX_BUSY)
    {
        ngx_http_finalize_request(r,
            ngx_chat_http_error(r, NGX_HTTP_TOO_MANY_REQUESTS,
                                "rate_limited", "too many typing states",
                                1000));
        return;
    }

    r->headers_out.status = NGX_HTTP_NO_CONTENT;
    r->headers_out.content_length_n = 0;
    r->header_only = 1;

    ngx_http_finalize_request(r, ngx_http_send_header(r));
}


/* GET presence?users=a,b,c */

static ngx_int_t
ngx_chat_api_presence(ngx_http_request_t *r)
{
    u_char              *p, *end, *last;
    ngx_int_t            rc;
    ngx_str_t            arg, user;
    ngx_uint_t           n;
    ngx_chat_buf_t       b;
    ngx_chat_query_t    *q;
    ngx_chat_api_ctx_t  *ctx;

    if (ngx_http_arg(r, (u_char *) "users", 5, &arg) != NGX_OK
        || arg.len == 0)
    {
        return ngx_chat_http_error(r, NGX_HTTP_BAD_REQUEST, "bad_request",
                                   "\"users\" is required", 0);
    }

    ngx_memzero(&b, sizeof(ngx_chat_buf_t));

    if (ngx_chat_buf_add_lit(&b, "[") != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    p = arg.data;
    end = p + arg.len;
    n = 0;

    while (p <= end) {
        last = ngx_strlchr(p, end, ',');
        if (last == NULL) {
            last = end;
        }

        user.data = p;
        user.len = last - p;

        if (ngx_chat_valid_user_id(user.data, user.len) != NGX_OK
            || ++n > NGX_CHAT_PRESENCE_ASK)
        {
            ngx_chat_buf_free(&b);
            return ngx_chat_http_error(r, NGX_HTTP_BAD_REQUEST, "bad_request",
                                       "\"users\" must be 1 to 100 user ids, "
                                       "comma separated", 0);
        }

        if ((n > 1 && ngx_chat_buf_add_lit(&b, ",") != NGX_OK)
            || ngx_chat_buf_add_json_str(&b, user.data, user.len) != NGX_OK)
        {
            ngx_chat_buf_free(&b);
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        p = last + 1;
    }

    if (ngx_chat_buf_add_lit(&b, "]") != NGX_OK) {
        ngx_chat_buf_free(&b);
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ctx = ngx_http_get_module_ctx(r, ngx_chat_module);

    q = ngx_chat_query_alloc(NGX_CHAT_STMT_PRESENCE,
                             b.len + 1 + ctx->id.user.len + 1);
    if (q == NULL) {
        ngx_chat_buf_free(&b);
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    p = (u_char *) &q[1];
    q->params[0] = (char *) p;
    p = ngx_cpymem(p, b.data, b.len);
    *p++ = '\0';

    /* the users the asker blocks are left out */
    q->params[1] = (char *) p;
    p = ngx_cpymem(p, ctx->id.user.data, ctx->id.user.len);
    *p = '\0';

    ngx_chat_buf_free(&b);

    q->handler = ngx_chat_api_presence_done;

    rc = ngx_chat_api_query(r, q);

    if (rc == NGX_DONE) {
        r->main->count++;
    }

    return rc;
}


/* the state is the zone's; last_seen of those offline is the store's */

static void
ngx_chat_api_presence_done(ngx_chat_query_t *q, PGresult *res, ngx_int_t rc)
{
    u_char              *last;
    ngx_int_t            i, n;
    ngx_str_t            user;
    ngx_uint_t           status;
    ngx_time_t          *tp;
    ngx_chat_buf_t       b;
    ngx_http_request_t  *r;

    r = ngx_chat_api_query_owner(q);

    if (r == NULL) {
        return;
    }

    if (rc != NGX_OK) {
        ngx_http_finalize_request(r,
            ngx_chat_http_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                "unavailable", "the store is unavailable",
                                ngx_chat_db_retry_after()));
        return;
    }

    ngx_memzero(&b, sizeof(ngx_chat_buf_t));

    if (ngx_chat_buf_add_lit(&b, "{\"presence\":[") != NGX_OK) {
        goto failed;
    }

    n = PQntuples(res);

    for (i = 0; i < n; i++) {
        user.data = (u_char *) PQgetvalue(res, i, 0);
        user.len = PQgetlength(res, i, 0);

        status = ngx_chat_live_status(&user);

        if ((i && ngx_chat_buf_add_lit(&b, ",") != NGX_OK)
            || ngx_chat_buf_add_lit(&b, "{\"user\":") != NGX_OK
            || ngx_chat_buf_add_json_str(&b, user.data, user.len) != NGX_OK
            || ngx_chat_buf_add_lit(&b, ",\"status\":\"") != NGX_OK
            || ngx_chat_buf_add_str(&b, ngx_chat_live_status_name(status))
               != NGX_OK
            || ngx_chat_buf_add_lit(&b, "\",\"last_seen\":") != NGX_OK
            || ngx_chat_buf_reserve(&b, 32) != NGX_OK)
        {
            goto failed;
        }

        if (status != NGX_CHAT_PRESENCE_OFFLINE) {
            /* seen now */
            b.data[b.len++] = '"';
            tp = ngx_timeofday();
            last = ngx_chat_live_ts(b.data + b.len,
                                    (uint64_t) tp->sec * 1000 + tp->msec);
            b.len = last - b.data;
            b.data[b.len++] = '"';

        } else if (PQgetisnull(res, i, 1)) {
            if (ngx_chat_buf_add_lit(&b, "null") != NGX_OK) {
                goto failed;
            }

        } else if (ngx_chat_buf_add_lit(&b, "\"") != NGX_OK
                   || ngx_chat_buf_add(&b, PQgetvalue(res, i, 1),
                                       PQgetlength(res, i, 1)) != NGX_OK
                   || ngx_chat_buf_add_lit(&b, "\"") != NGX_OK)
        {
            goto failed;
        }

        if (ngx_chat_buf_add_lit(&b, "}") != NGX_OK) {
            goto failed;
        }
    }

    if (ngx_chat_buf_add_lit(&b, "]}") != NGX_OK) {
        goto failed;
    }

    rc = ngx_chat_api_send(r, NGX_HTTP_OK, b.data, b.len);
    ngx_chat_buf_free(&b);

    ngx_http_finalize_request(r, rc);
    return;

failed:

    ngx_chat_buf_free(&b);
    ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
}


/* the platform's outbox: GET notifications?after=&limit= */

static ngx_int_t
ngx_chat_api_notifications(ngx_http_request_t *r)
{
    u_char            *p;
    int64_t            after, limit;
    ngx_int_t          rc;
    ngx_chat_query_t  *q;

    after = 0;
    limit = 100;

    if (ngx_chat_api_arg_num(r, "after", 5, &after, 0, NGX_MAX_OFF_T_VALUE)
        == NGX_ERROR
        || ngx_chat_api_arg_num(r, "limit", 5, &limit, 1, 1000) == NGX_ERROR)
    {
        return ngx_chat_http_error(r, NGX_HTTP_BAD_REQUEST, "bad_request",
                                   "\"after\" must be a notification id, "
                                   "\"limit\" 1 to 1000", 0);
    }

    q = ngx_chat_query_alloc(NGX_CHAT_STMT_NOTIFICATIONS,
                             2 * (NGX_INT64_LEN + 1));
    if (q == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    p = (u_char *) &q[1];

    q->params[0] = (char *) p;
    p = ngx_sprintf(p, "%L", after);
    *p++ = '\0';

    q->params[1] = (char *) p;
    p = ngx_sprintf(p, "%L", limit);
    *p++ = '\0';

    q->handler = ngx_chat_api_text_done;

    rc = ngx_chat_api_query(r, q);

    if (rc == NGX_DONE) {
        r->main->count++;
    }

    return rc;
}


/* POST notifications/ack {"upto":"<id>"}: rows up to it are gone */

static ngx_int_t
ngx_chat_api_notify_ack(ngx_http_request_t *r, json_t *body)
{
    u_char            *p;
    int64_t            upto;
    ngx_chat_query_t  *q;

    if (ngx_chat_json_id(body, "upto", &upto, 1) != NGX_OK) {
        return ngx_chat_http_error(r, NGX_HTTP_BAD_REQUEST, "bad_request",
                                   "\"upto\" must be a notification id", 0);
    }

    q = ngx_chat_query_alloc(NGX_CHAT_STMT_NOTIFY_ACK, NGX_INT64_LEN + 1);
    if (q == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    p = (u_char *) &q[1];
    q->params[0] = (char *) p;
    p = ngx_sprintf(p, "%L", upto);
    *p = '\0';

    q->handler = ngx_chat_api_notify_ack_done;

    /* the body reader's reference keeps the request */
    return ngx_chat_api_query(r, q);
}


static void
ngx_chat_api_notify_ack_done(ngx_chat_query_t *q, PGresult *res,
    ngx_int_t rc)
{
    u_char               buf[64], *p;
    ngx_http_request_t  *r;

    r = ngx_chat_api_query_owner(q);

    if (r == NULL) {
        return;
    }

    if (rc != NGX_OK || PQntuples(res) != 1
        || (size_t) PQgetlength(res, 0, 0) > NGX_INT64_LEN)
    {
        ngx_http_finalize_request(r,
            ngx_chat_http_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                "unavailable", "the store is unavailable",
                                ngx_chat_db_retry_after()));
        return;
    }

    p = ngx_sprintf(buf, "{\"deleted\":%*s}", (size_t) PQgetlength(res, 0, 0),
                    PQgetvalue(res, 0, 0));

    ngx_http_finalize_request(r,
                              ngx_chat_api_send(r, NGX_HTTP_OK, buf, p - buf));
}


/* PATCH conversations/{id}/settings {"muted":bool}: the caller's own */

static ngx_int_t
ngx_chat_api_settings(ngx_http_request_t *r, json_t *body)
{
    u_char              *p;
    json_t              *muted;
    ngx_chat_query_t    *q;
    ngx_chat_api_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_chat_module);

    muted = json_object_get(body, "muted");

    if (!json_is_boolean(muted) || json_object_size(body) != 1) {
        return ngx_chat_http_error(r, NGX_HTTP_BAD_REQUEST, "bad_request",
                                   "the settings are {\"muted\": true|false}",
                                   0);
    }

    q = ngx_chat_query_alloc(NGX_CHAT_STMT_MUTE,
                             NGX_INT64_LEN + 1 + ctx->id.user.len + 1);
    if (q == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    p = (u_char *) &q[1];

    q->params[0] = (char *) p;
    p = ngx_sprintf(p, "%L", ctx->conversation);
    *p++ = '\0';

    q->params[1] = (char *) p;
    p = ngx_cpymem(p, ctx->id.user.data, ctx->id.user.len);
    *p++ = '\0';

    q->params[2] = json_is_true(muted) ? "t" : "f";

    q->handler = ngx_chat_api_settings_done;

    return ngx_chat_api_query(r, q);
}


static void
ngx_chat_api_settings_done(ngx_chat_query_t *q, PGresult *res, ngx_int_t rc)
{
    ngx_http_request_t  *r;

    r = ngx_chat_api_query_owner(q);

    if (r == NULL) {
        return;
    }

    if (rc != NGX_OK) {
        ngx_http_finalize_request(r,
            ngx_chat_http_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                "unavailable", "the store is unavailable",
                                ngx_chat_db_retry_after()));
        return;
    }

    if (PQntuples(res) != 1) {
        ngx_http_finalize_request(r,
            ngx_chat_http_error(r, NGX_HTTP_FORBIDDEN, "forbidden",
                                "not a member of the conversation", 0));
        return;
    }

    if (PQgetvalue(res, 0, 0)[0] == 't') {
        ngx_http_finalize_request(r, ngx_chat_api_send(r, NGX_HTTP_OK,
                                  (u_char *) "{\"settings\":{\"muted\":true}}",
                                  sizeof("{\"settings\":{\"muted\":true}}")
                                  - 1));
        return;
    }

    ngx_http_finalize_request(r, ngx_chat_api_send(r, NGX_HTTP_OK,
                              (u_char *) "{\"settings\":{\"muted\":false}}",
                              sizeof("{\"settings\":{\"muted\":false}}") - 1));
}


/* messages/{id} and messages/{id}/reactions */

static ngx_int_t
ngx_chat_api_message(ngx_http_request_t *r, u_char *p, u_char *end)
{
    u_char              *slash;
    ngx_chat_api_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_chat_module);

    slash = ngx_strlchr(p, end, '/');

    if (ngx_chat_parse_id(p, (slash ? slash : end) - p, &ctx->message)
        != NGX_OK)
    {
        goto not_found;
    }

    if (slash == NULL) {
        if (r->method == NGX_HTTP_PATCH) {
            return ngx_chat_api_read_body(r, ngx_chat_api_edit);
        }

        if (r->method == NGX_HTTP_DELETE) {
            return ngx_chat_api_op_now(r, "delete", NULL);
        }

        goto not_allowed;
    }

    p = slash + 1;

    if (end - p == 7 && ngx_strncmp(p, "replies", 7) == 0) {
        if (r->method != NGX_HTTP_GET) {
            goto not_allowed;
        }

        return ngx_chat_api_history(r);
    }

    if (end - p == 9 && ngx_strncmp(p, "reactions", 9) == 0) {
        if (r->method == NGX_HTTP_POST) {
            return ngx_chat_api_read_body(r, ngx_chat_api_react);
        }

        if (r->method == NGX_HTTP_DELETE) {
            return ngx_chat_api_unreact(r);
        }

        goto not_allowed;
    }

not_found:

    return ngx_chat_http_error(r, NGX_HTTP_NOT_FOUND, "not_found",
                               "no such endpoint", 0);

not_allowed:

    return ngx_chat_http_error(r, NGX_HTTP_NOT_ALLOWED, "bad_request",
                               "method not allowed", 0);
}


static ngx_int_t
ngx_chat_api_edit(ngx_http_request_t *r, json_t *body)
{
    return ngx_chat_api_op(r, "edit", body);
}


static ngx_int_t
ngx_chat_api_react(ngx_http_request_t *r, json_t *body)
{
    return ngx_chat_api_op(r, "react", body);
}


/* DELETE .../reactions?emoji=<percent-encoded emoji> */

static ngx_int_t
ngx_chat_api_unreact(ngx_http_request_t *r)
{
    u_char     *dst, *src;
    ngx_str_t   arg;
    u_char      emoji[128];

    if (ngx_http_arg(r, (u_char *) "emoji", 5, &arg) != NGX_OK
        || arg.len == 0 || arg.len > sizeof(emoji))
    {
        return ngx_chat_http_error(r, NGX_HTTP_BAD_REQUEST, "bad_request",
                                   "?emoji= must be one emoji", 0);
    }

    src = arg.data;
    dst = emoji;
    ngx_unescape_uri(&dst, &src, arg.len, 0);

    return ngx_chat_api_op_arg(r, "unreact", "emoji", emoji, dst - emoji,
                               "?emoji= must be one emoji");
}


static ngx_int_t
ngx_chat_api_op(ngx_http_request_t *r, const char *name, json_t *args)
{
    const char          *code, *msg;
    ngx_chat_op_t       *op;
    ngx_chat_api_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_chat_module);

    /* no position to give its event: nothing is written */
    if (!ngx_chat_bus_can_reserve()) {
        return ngx_chat_http_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                   "unavailable", "the store is busy", 200);
    }

    op = ngx_chat_op_create(name,
                            ctx->message ? ctx->message : ctx->conversation,
                            args, &ctx->id.user,
                            ctx->id.role == NGX_CHAT_ROLE_SERVICE, 0, &code,
                            &msg);
    if (op == NULL) {
        if (code == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        return ngx_chat_http_error(r, NGX_HTTP_BAD_REQUEST, code, msg, 0);
    }

    op->handler = ngx_chat_api_op_done;

    /* the body reader's reference keeps the request until we finalize */
    return ngx_chat_api_query(r, &op->query);
}


static ngx_int_t
ngx_chat_api_update(ngx_http_request_t *r, json_t *body)
{
    return ngx_chat_api_op(r, "update_conversation", body);
}


static ngx_int_t
ngx_chat_api_add_members(ngx_http_request_t *r, json_t *body)
{
    return ngx_chat_api_op(r, "add_members", body);
}


/*
 * DELETE conversations/{id}/members/{user}: r->uri is already decoded, so
 * the rest of the path is the user id (a "/" in it comes as %2F).
 */

static ngx_int_t
ngx_chat_api_remove_member(ngx_http_request_t *r, u_char *p, u_char *end)
{
    return ngx_chat_api_op_arg(r, "remove_member", "user", p, end - p,
                               "not a user id");
}


/* an operation whose one argument comes in the URL, not in a body */

static ngx_int_t
ngx_chat_api_op_arg(ngx_http_request_t *r, const char *name,
    const char *key, u_char *data, size_t len, const char *bad)
{
    json_t     *args, *v;
    ngx_int_t   rc;

    /* jansson refuses text that is not UTF-8 */
    v = json_stringn((char *) data, len);
    if (v == NULL) {
        return ngx_chat_http_error(r, NGX_HTTP_BAD_REQUEST, "bad_request",
                                   bad, 0);
    }

    args = json_object();

    if (args == NULL) {
        json_decref(v);
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    /* (the value is released with a failed set) */
    if (json_object_set_new(args, key, v) != 0) {
        json_decref(args);
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    rc = ngx_chat_api_op_now(r, name, args);
    json_decref(args);

    return rc;
}


/* from the content handler (no body read): the request is held here */

static ngx_int_t
ngx_chat_api_op_now(ngx_http_request_t *r, const char *name, json_t *args)
{
    ngx_int_t  rc;

    if (ngx_http_discard_request_body(r) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    rc = ngx_chat_api_op(r, name, args);

    if (rc == NGX_DONE) {
        r->main->count++;
    }

    return rc;
}


static void
ngx_chat_api_op_done(ngx_chat_op_t *op)
{
    ngx_int_t            rc;
    ngx_chat_api_ctx_t  *ctx;
    ngx_http_request_t  *r;

    r = op->query.data;
    ctx = ngx_http_get_module_ctx(r, ngx_chat_module);
    ctx->query = NULL;

    if (op->rc != NGX_OK) {
        rc = ngx_chat_http_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                 "unavailable", "the store is unavailable",
                                 ngx_chat_db_retry_after());

    } else if (op->code) {
        rc = ngx_chat_http_error(r, op->status, op->code,
                                 (const char *) op->text.data, 0);

    } else {
        rc = ngx_chat_api_send(r, op->status, op->text.data, op->text.len);
    }

    ngx_http_finalize_request(r, rc);
}


/*
 * GET search?q=&conversation_id=&limit=&cursor=&mode=newest|rank
 * (sql/007_search.sql): what the caller may read, the query's words all
 * required, the last one a prefix.
 */

static ngx_int_t
ngx_chat_api_search(ngx_http_request_t *r)
{
    u_char                *p, *src, *dst, *end;
    int64_t                conv, cursor, limit;
    ngx_int_t              rc, rcc, rcu;
    ngx_str_t              arg, mode;
    ngx_chat_query_t      *q;
    ngx_chat_api_ctx_t    *ctx;
    ngx_chat_main_conf_t  *cmcf;
    u_char                 text[3 * 256];

    ctx = ngx_http_get_module_ctx(r, ngx_chat_module);
    cmcf = ngx_chat_worker.cmcf;

    /* 256 bytes of text, each byte perhaps percent-encoded */

    if (ngx_http_arg(r, (u_char *) "q", 1, &arg) != NGX_OK
        || arg.len == 0 || arg.len > sizeof(text))
    {
        goto bad_text;
    }

    /* a copy: the query string's "+" is a space, then %XX in place */

    ngx_memcpy(text, arg.data, arg.len);

    for (p = text; p < text + arg.len; p++) {
        if (*p == '+') {
            *p = ' ';
        }
    }

    src = text;
    dst = text;
    ngx_unescape_uri(&dst, &src, arg.len, 0);
    end = dst;

    if (end - text > 256 || ngx_chat_utf8_valid(text, end - text) != NGX_OK)
    {
        goto bad_text;
    }

    limit = 20;
    mode.len = 0;

    rcc = ngx_chat_api_arg_num(r, "conversation_id", 15, &conv, 1,
                               NGX_MAX_OFF_T_VALUE);
    rcu = ngx_chat_api_arg_num(r, "cursor", 6, &cursor, 0,
                               NGX_MAX_OFF_T_VALUE);

    if (rcc == NGX_ERROR || rcu == NGX_ERROR
        || ngx_chat_api_arg_num(r, "limit", 5, &limit, 1, 50) == NGX_ERROR
        || (ngx_http_arg(r, (u_char *) "mode", 4, &mode) == NGX_OK
            && !(mode.len == 6 && ngx_strncmp(mode.data, "newest", 6) == 0)
            && !(mode.len == 4 && ngx_strncmp(mode.data, "rank", 4) == 0)))
    {
        return ngx_chat_http_error(r, NGX_HTTP_BAD_REQUEST, "bad_request",
                                   "\"conversation_id\" must be an id, "
                                   "\"cursor\" a cursor of this search, "
                                   "\"limit\" 1 to 50, \"mode\" newest or "
                                   "rank", 0);
    }

    q = ngx_chat_query_alloc(NGX_CHAT_STMT_SEARCH,
                             ctx->id.user.len + 1 + cmcf->search_language.len
                             + 1 + (end - text) + 1 + 3 * (NGX_INT64_LEN + 1));
    if (q == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    p = (u_char *) &q[1];

    q->params[0] = (char *) p;
    p = ngx_cpymem(p, ctx->id.user.data, ctx->id.user.len);
    *p++ = '\0';

    q->params[1] = (ctx->id.role == NGX_CHAT_ROLE_SERVICE) ? "t" : "f";

    q->params[2] = (char *) p;
    p = ngx_cpymem(p, cmcf->search_language.data, cmcf->search_language.len);
    *p++ = '\0';

    q->params[3] = (char *) p;
    p = ngx_cpymem(p, text, end - text);
    *p++ = '\0';

    if (rcc == NGX_OK) {
        q->params[4] = (char *) p;
        p = ngx_sprintf(p, "%L", conv);
        *p++ = '\0';
    }

    if (rcu == NGX_OK) {
        q->params[5] = (char *) p;
        p = ngx_sprintf(p, "%L", cursor);
        *p++ = '\0';
    }

    q->params[6] = (char *) p;
    p = ngx_sprintf(p, "%L", limit);
    *p++ = '\0';

    q->params[7] = (mode.len == 4) ? "t" : "f";

    q->handler = ngx_chat_api_text_done;

    rc = ngx_chat_api_query(r, q);

    if (rc == NGX_DONE) {
        r->main->count++;
    }

    return rc;

bad_text:

    return ngx_chat_http_error(r, NGX_HTTP_BAD_REQUEST, "bad_request",
                               "\"q\" must be 1 to 256 bytes of UTF-8 text",
                               0);
}


/*
 * Blocks: GET and POST {"user"} on blocks, DELETE blocks/{user}; each
 * answers the caller's list.  slash: the "/" after "blocks", or NULL.
 */

static ngx_int_t
ngx_chat_api_blocks(ngx_http_request_t *r, u_char *slash, u_char *end)
{
    if (slash) {
        if (r->method != NGX_HTTP_DELETE) {
            return ngx_chat_http_error(r, NGX_HTTP_NOT_ALLOWED,
                                       "bad_request", "method not allowed",
                                       0);
        }

        return ngx_chat_api_user_arg(r, "unblock", slash + 1, end);
    }

    if (r->method == NGX_HTTP_GET) {
        return ngx_chat_api_call_now(r, "blocks", NULL);
    }

    if (r->method == NGX_HTTP_POST) {
        return ngx_chat_api_read_body(r, ngx_chat_api_block);
    }

    return ngx_chat_http_error(r, NGX_HTTP_NOT_ALLOWED, "bad_request",
                               "method not allowed", 0);
}


static ngx_int_t
ngx_chat_api_block(ngx_http_request_t *r, json_t *body)
{
    json_t              *args;
    ngx_int_t            rc;
    ngx_str_t            user;
    ngx_chat_api_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_chat_module);

    if (ngx_chat_json_str(body, "user", &user, NGX_CHAT_MAX_ID_LEN, 1)
        != NGX_OK
        || ngx_chat_valid_user_id(user.data, user.len) != NGX_OK)
    {
        return ngx_chat_http_error(r, NGX_HTTP_BAD_REQUEST, "bad_request",
                                   "\"user\" must be a user id", 0);
    }

    if (user.len == ctx->id.user.len
        && ngx_strncmp(user.data, ctx->id.user.data, user.len) == 0)
    {
        return ngx_chat_http_error(r, NGX_HTTP_BAD_REQUEST, "bad_request",
                                   "a user does not block itself", 0);
    }

    args = json_pack("{ss#}", "user", user.data, user.len);
    if (args == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    rc = ngx_chat_api_call(r, "block", args);
    json_decref(args);

    return rc;
}


/*
 * Reports: POST {message_id, reason, note} by a member; GET (service:
 * ?status=&after=&limit=) and PATCH reports/{id} {status, resolution}.
 */

static ngx_int_t
ngx_chat_api_reports(ngx_http_request_t *r, u_char *slash, u_char *end)
{
    int64_t              after, limit;
    json_t              *args;
    ngx_int_t            rc;
    ngx_str_t            status;
    ngx_chat_api_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_chat_module);

    if (slash == NULL && r->method == NGX_HTTP_POST) {
        return ngx_chat_api_read_body(r, ngx_chat_api_report);
    }

    if (ctx->id.role != NGX_CHAT_ROLE_SERVICE) {
        return ngx_chat_http_error(r, NGX_HTTP_FORBIDDEN, "forbidden",
                                   "reports are read by a service token", 0);
    }

    if (slash) {
        if (ngx_chat_parse_id(slash + 1, end - slash - 1, &ctx->report)
            != NGX_OK)
        {
            return ngx_chat_http_error(r, NGX_HTTP_NOT_FOUND, "not_found",
                                       "no such report", 0);
        }

        if (r->method != NGX_HTTP_PATCH) {
            return ngx_chat_http_error(r, NGX_HTTP_NOT_ALLOWED,
                                       "bad_request", "method not allowed",
                                       0);
        }

        return ngx_chat_api_read_body(r, ngx_chat_api_resolve);
    }

    if (r->method != NGX_HTTP_GET) {
        return ngx_chat_http_error(r, NGX_HTTP_NOT_ALLOWED, "bad_request",
                                   "method not allowed", 0);
    }

    after = 0;
    limit = 50;

    if (ngx_chat_api_arg_num(r, "limit", 5, &limit, 1, 100) == NGX_ERROR
        || ngx_chat_api_arg_num(r, "after", 5, &after, 0,
                                NGX_MAX_OFF_T_VALUE) == NGX_ERROR)
    {
        return ngx_chat_http_error(r, NGX_HTTP_BAD_REQUEST, "bad_request",
                                   "\"limit\" must be 1 to 100, \"after\" "
                                   "a report id", 0);
    }

    args = json_pack("{sIsI}", "limit", (json_int_t) limit,
                     "after", (json_int_t) after);
    if (args == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (ngx_http_arg(r, (u_char *) "status", 6, &status) == NGX_OK) {
        if (ngx_chat_api_report_status(&status) != NGX_OK) {
            json_decref(args);
            return ngx_chat_http_error(r, NGX_HTTP_BAD_REQUEST,
                                       "bad_request", "\"status\" must be "
                                       "open, resolved or dismissed", 0);
        }

        if (json_object_set_new(args, "status",
                                json_stringn((char *) status.data,
                                             status.len)))
        {
            json_decref(args);
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }
    }

    rc = ngx_chat_api_call_now(r, "reports", args);
    json_decref(args);

    return rc;
}


static ngx_int_t
ngx_chat_api_report(ngx_http_request_t *r, json_t *body)
{
    int64_t    id;
    json_t    *args;
    ngx_int_t  rc;
    ngx_str_t  reason, note;

    if (ngx_chat_json_id(body, "message_id", &id, 1) != NGX_OK) {
        return ngx_chat_http_error(r, NGX_HTTP_BAD_REQUEST, "bad_request",
                                   "\"message_id\" must be a message id", 0);
    }

    if (ngx_chat_json_str(body, "reason", &reason, 16, 1) != NGX_OK
        || !((reason.len == 4 && ngx_strncmp(reason.data, "spam", 4) == 0)
             || (reason.len == 10
                 && ngx_strncmp(reason.data, "harassment", 10) == 0)
             || (reason.len == 4 && ngx_strncmp(reason.data, "scam", 4) == 0)
             || (reason.len == 13
                 && ngx_strncmp(reason.data, "inappropriate", 13) == 0)
             || (reason.len == 5
                 && ngx_strncmp(reason.data, "other", 5) == 0)))
    {
        return ngx_chat_http_error(r, NGX_HTTP_BAD_REQUEST, "bad_request",
                                   "\"reason\" must be spam, harassment, "
                                   "scam, inappropriate or other", 0);
    }

    if (ngx_chat_json_str(body, "note", &note, 2000, 0) == NGX_ERROR) {
        return ngx_chat_http_error(r, NGX_HTTP_BAD_REQUEST, "bad_request",
                                   "\"note\" must be a string of at most "
                                   "2000 bytes", 0);
    }

    /* only what was checked goes to the store */
    args = json_pack("{sIss#ss#}", "message_id", (json_int_t) id,
                     "reason", reason.data, reason.len,
                     "note", note.len ? (char *) note.data : "", note.len);
    if (args == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    rc = ngx_chat_api_call(r, "report", args);
    json_decref(args);

    return rc;
}


static ngx_int_t
ngx_chat_api_resolve(ngx_http_request_t *r, json_t *body)
{
    json_t              *args, *v;
    ngx_int_t            rc;
    ngx_str_t            status, resolution;
    ngx_chat_api_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_chat_module);

    if (ngx_chat_json_str(body, "status", &status, 16, 1) != NGX_OK
        || ngx_chat_api_report_status(&status) != NGX_OK)
    {
        return ngx_chat_http_error(r, NGX_HTTP_BAD_REQUEST, "bad_request",
                                   "\"status\" must be open, resolved or "
                                   "dismissed", 0);
    }

    rc = ngx_chat_json_str(body, "resolution", &resolution, 2000, 0);

    if (rc == NGX_ERROR) {
        return ngx_chat_http_error(r, NGX_HTTP_BAD_REQUEST, "bad_request",
                                   "\"resolution\" must be a string of at "
                                   "most 2000 bytes", 0);
    }

    args = json_pack("{sIss#}", "report_id", (json_int_t) ctx->report,
                     "status", status.data, status.len);
    if (args == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (rc == NGX_OK) {
        v = json_stringn((char *) resolution.data, resolution.len);

        if (v == NULL || json_object_set_new(args, "resolution", v)) {
            json_decref(args);
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }
    }

    rc = ngx_chat_api_call(r, "resolve", args);
    json_decref(args);

    return rc;
}


/* a report's status: open, resolved or dismissed */

static ngx_int_t
ngx_chat_api_report_status(ngx_str_t *s)
{
    if ((s->len == 4 && ngx_strncmp(s->data, "open", 4) == 0)
        || (s->len == 8 && ngx_strncmp(s->data, "resolved", 8) == 0)
        || (s->len == 9 && ngx_strncmp(s->data, "dismissed", 9) == 0))
    {
        return NGX_OK;
    }

    return NGX_DECLINED;
}


/* DELETE users/{user}: the platform erases an account (a service token) */

static ngx_int_t
ngx_chat_api_erase(ngx_http_request_t *r, u_char *p, u_char *end)
{
    ngx_chat_api_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_chat_module);

    if (ctx->id.role != NGX_CHAT_ROLE_SERVICE) {
        return ngx_chat_http_error(r, NGX_HTTP_FORBIDDEN, "forbidden",
                                   "a user is erased by a service token", 0);
    }

    if (r->method != NGX_HTTP_DELETE) {
        return ngx_chat_http_error(r, NGX_HTTP_NOT_ALLOWED, "bad_request",
                                   "method not allowed", 0);
    }

    return ngx_chat_api_user_arg(r, "erase", p, end);
}


/* a call whose one argument is the user id at the end of the path */

static ngx_int_t
ngx_chat_api_user_arg(ngx_http_request_t *r, const char *fn, u_char *p,
    u_char *end)
{
    json_t     *args;
    ngx_int_t   rc;

    if (ngx_chat_valid_user_id(p, end - p) != NGX_OK) {
        return ngx_chat_http_error(r, NGX_HTTP_BAD_REQUEST, "bad_request",
                                   "not a user id", 0);
    }

    args = json_pack("{ss#}", "user", p, (size_t) (end - p));
    if (args == NULL) {
        /* jansson refuses text that is not UTF-8 */
        return ngx_chat_http_error(r, NGX_HTTP_BAD_REQUEST, "bad_request",
                                   "not a user id", 0);
    }

    rc = ngx_chat_api_call_now(r, fn, args);
    json_decref(args);

    return rc;
}


/* a call from the content handler, not from a body handler */

static ngx_int_t
ngx_chat_api_call_now(ngx_http_request_t *r, const char *fn, json_t *args)
{
    ngx_int_t  rc;

    rc = ngx_chat_api_call(r, fn, args);

    if (rc == NGX_DONE) {
        r->main->count++;
    }

    return rc;
}


/*
 * A request that makes no event: chat_call() (sql/008_safety.sql) checks
 * the rest and answers the HTTP status and the body.  args may be NULL.
 */

static ngx_int_t
ngx_chat_api_call(ngx_http_request_t *r, const char *fn, json_t *args)
{
    char                *json;
    u_char              *p;
    size_t               len;
    ngx_chat_query_t    *q;
    ngx_chat_api_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_chat_module);

    json = args ? json_dumps(args, JSON_COMPACT) : NULL;

    if (args && json == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    len = json ? ngx_strlen(json) : 2;

    q = ngx_chat_query_alloc(NGX_CHAT_STMT_CALL,
                             ngx_strlen(fn) + 1 + ctx->id.user.len + 1
                             + len + 1);
    if (q == NULL) {
        free(json);
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    p = (u_char *) &q[1];

    q->params[0] = (char *) p;
    p = ngx_cpymem(p, fn, ngx_strlen(fn));
    *p++ = '\0';

    q->params[1] = (char *) p;
    p = ngx_cpymem(p, ctx->id.user.data, ctx->id.user.len);
    *p++ = '\0';

    q->params[2] = (ctx->id.role == NGX_CHAT_ROLE_SERVICE) ? "t" : "f";

    q->params[3] = (char *) p;
    p = ngx_cpymem(p, json ? json : "{}", len);
    *p = '\0';

    free(json);

    q->handler = ngx_chat_api_call_done;

    return ngx_chat_api_query(r, q);
}


static void
ngx_chat_api_call_done(ngx_chat_query_t *q, PGresult *res, ngx_int_t rc)
{
    ngx_int_t            status;
    ngx_str_t            user;
    ngx_http_request_t  *r;

    /*
     * A change of blocks is told to the user's connections whether or
     * not the client is still there: it is committed.  (params: fn,
     * user; the query is freed below.)
     */

    if (rc == NGX_OK && PQntuples(res) == 1
        && ngx_strcmp(PQgetvalue(res, 0, 0), "200") == 0
        && (ngx_strcmp(q->params[0], "block") == 0
            || ngx_strcmp(q->params[0], "unblock") == 0))
    {
        user.data = (u_char *) q->params[1];
        user.len = ngx_strlen(user.data);

        ngx_chat_api_blocks_changed(&user, (u_char *) PQgetvalue(res, 0, 1),
                                    PQgetlength(res, 0, 1));
    }

    /* an erased user's connections end on every worker (params[3]: the
       args, {"user":...}) */

    if (rc == NGX_OK && PQntuples(res) == 1
        && ngx_strcmp(PQgetvalue(res, 0, 0), "200") == 0
        && ngx_strcmp(q->params[0], "erase") == 0)
    {
        json_t  *args, *u;

        args = json_loads(q->params[3], 0, NULL);
        u = json_object_get(args, "user");

        if (json_is_string(u)) {
            user.data = (u_char *) json_string_value(u);
            user.len = json_string_length(u);
            ngx_chat_live_erased(&user);
        }

        json_decref(args);
    }

    r = ngx_chat_api_query_owner(q);

    if (r == NULL) {
        return;
    }

    if (rc != NGX_OK || PQntuples(res) != 1) {
        ngx_http_finalize_request(r,
            ngx_chat_http_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                "unavailable", "the store is unavailable",
                                ngx_chat_db_retry_after()));
        return;
    }

    status = ngx_atoi((u_char *) PQgetvalue(res, 0, 0),
                      PQgetlength(res, 0, 0));

    if (status < 200 || status > 599) {
        status = NGX_HTTP_INTERNAL_SERVER_ERROR;
    }


    ngx_http_finalize_request(r,
        ngx_chat_api_send(r, status, (u_char *) PQgetvalue(res, 0, 1),
                          PQgetlength(res, 0, 1)));
}


/*
 * chat_rate_limit for this request: NGX_DECLINED when it may go on, else
 * the 429 is sent and its rc returned.
 */

static ngx_int_t
ngx_chat_api_limited(ngx_http_request_t *r, ngx_uint_t kind)
{
    ngx_msec_t           retry_after;
    ngx_chat_api_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_chat_module);

    if (ngx_chat_rate_request(r, kind, &ctx->id, &retry_after) == NGX_OK) {
        return NGX_DECLINED;
    }

    return ngx_chat_http_error(r, NGX_HTTP_TOO_MANY_REQUESTS, "rate_limited",
                               "too many requests, slow down", retry_after);
}


/*
 * The largest body taken: a message's, or an upload's (with room for a
 * form's other fields and its framing).
 */

static off_t
ngx_chat_api_body_max(ngx_http_request_t *r, ngx_chat_api_ctx_t *ctx)
{
    ngx_chat_main_conf_t  *cmcf;

    cmcf = ngx_http_get_module_main_conf(r, ngx_chat_module);

    if (ctx && ctx->upload) {
        return cmcf->attach_max_size + 64 * 1024;
    }

    return (off_t) cmcf->max_message;
}


/*
 * POST attachments (the body is the file, or a multipart form with one)
 * and GET attachments/{id}.  path is what follows the api location.
 */

static ngx_int_t
ngx_chat_api_attachments(ngx_http_request_t *r, ngx_str_t *path,
    u_char *slash, u_char *end)
{
    u_char              *p, *id;
    ngx_int_t            rc;
    ngx_str_t            prefix;
    ngx_chat_query_t    *q;
    ngx_chat_api_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_chat_module);

    if (ngx_chat_worker.cmcf->attach_dir.len == 0) {
        return ngx_chat_http_error(r, NGX_HTTP_NOT_FOUND, "not_found",
                                   "attachments are off (chat_attachments)",
                                   0);
    }

    if (slash == NULL) {
        if (r->method != NGX_HTTP_POST) {
            return ngx_chat_http_error(r, NGX_HTTP_NOT_ALLOWED,
                                       "bad_request", "method not allowed",
                                       0);
        }

        /* the file's URL: this location's, from the request's */

        prefix.data = r->uri.data;
        prefix.len = r->uri.len - path->len;

        return ngx_chat_api_read_upload(r, &prefix, NULL);
    }

    if (r->method != NGX_HTTP_GET && r->method != NGX_HTTP_HEAD) {
        return ngx_chat_http_error(r, NGX_HTTP_NOT_ALLOWED, "bad_request",
                                   "method not allowed", 0);
    }

    id = slash + 1;

    if (ngx_chat_attach_valid_id(id, end - id) != NGX_OK) {
        return ngx_chat_http_error(r, NGX_HTTP_NOT_FOUND, "not_found",
                                   "no such attachment", 0);
    }

    q = ngx_chat_query_alloc(NGX_CHAT_STMT_ATTACH_GET,
                             ctx->id.user.len + 1
                             + 2 * (NGX_CHAT_ATTACH_ID_LEN + 1));
    if (q == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    p = (u_char *) &q[1];

    q->params[0] = (char *) p;
    p = ngx_cpymem(p, ctx->id.user.data, ctx->id.user.len);
    *p++ = '\0';

    q->params[1] = (ctx->id.role == NGX_CHAT_ROLE_SERVICE) ? "t" : "f";

    q->params[2] = (char *) p;
    p = ngx_cpymem(p, id, NGX_CHAT_ATTACH_ID_LEN);
    *p++ = '\0';

    /* a copy for the handler: the URI changes on the redirect */
    ngx_memcpy(p, id, NGX_CHAT_ATTACH_ID_LEN);
    p[NGX_CHAT_ATTACH_ID_LEN] = '\0';

    q->handler = ngx_chat_api_download_done;

    rc = ngx_chat_api_query(r, q);

    if (rc == NGX_DONE) {
        r->main->count++;
    }

    return rc;
}


static void
ngx_chat_api_download_done(ngx_chat_query_t *q, PGresult *res, ngx_int_t rc)
{
    u_char              *id;
    ngx_int_t            rv;
    ngx_connection_t    *c;
    ngx_str_t            name, mime;
    ngx_http_request_t  *r;

    id = (u_char *) q->params[2] + NGX_CHAT_ATTACH_ID_LEN + 1;

    r = q->data;

    if (r == NULL) {
        ngx_chat_query_free(q);
        return;
    }

    if (rc != NGX_OK || PQntuples(res) != 1) {
        (void) ngx_chat_api_query_owner(q);
        ngx_http_finalize_request(r,
            ngx_chat_http_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                "unavailable", "the store is unavailable",
                                ngx_chat_db_retry_after()));
        return;
    }

    if (ngx_strcmp(PQgetvalue(res, 0, 0), "200") != 0) {
        (void) ngx_chat_api_query_owner(q);
        ngx_http_finalize_request(r,
            ngx_chat_http_error(r, NGX_HTTP_NOT_FOUND, "not_found",
                                "no such attachment", 0));
        return;
    }

    name.len = PQgetlength(res, 0, 1);
    name.data = ngx_pnalloc(r->pool, name.len + NGX_CHAT_ATTACH_ID_LEN);
    if (name.data == NULL) {
        (void) ngx_chat_api_query_owner(q);
        ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
        return;
    }

    ngx_memcpy(name.data, PQgetvalue(res, 0, 1), name.len);
    ngx_memcpy(name.data + name.len, id, NGX_CHAT_ATTACH_ID_LEN);
    id = name.data + name.len;

    mime.len = PQgetlength(res, 0, 2);
    mime.data = (u_char *) PQgetvalue(res, 0, 2);

    (void) ngx_chat_api_query_owner(q);

    c = r->connection;

    rv = ngx_chat_attach_serve(r, id, &name, &mime);

    /* the redirect holds the request itself: ours goes */
    ngx_http_finalize_request(r, rv == NGX_DONE ? NGX_DONE : rv);

    /* what the internal location posted (subrequests) runs now, as after
       an upstream's X-Accel-Redirect */
    ngx_http_run_posted_requests(c);
}


/* the upload's body is in its temporary file */

static void
ngx_chat_api_upload_done(ngx_http_request_t *r)
{
    u_char              *p;
    ngx_int_t            rc;
    ngx_chat_upload_t   *up;
    ngx_chat_query_t    *q;
    ngx_chat_api_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_chat_module);
    up = ctx->upload;

    rc = ngx_chat_attach_finish(r, up);

    if (rc != NGX_OK && ctx->upload_handler) {
        ctx->upload_handler(r, up, rc);
        return;
    }

    if (rc != NGX_OK) {
        ngx_http_finalize_request(r,
            ngx_chat_http_error(r, rc,
                                rc == NGX_HTTP_REQUEST_ENTITY_TOO_LARGE
                                ? "too_large"
                                : rc == NGX_HTTP_UNSUPPORTED_MEDIA_TYPE
                                  ? "unsupported_type"
                                  : rc == NGX_HTTP_BAD_REQUEST
                                    ? "bad_request" : "internal",
                                up->error ? up->error : "the upload failed",
                                0));
        return;
    }

    p = ngx_cpymem(ctx->url.data + ctx->url.len - NGX_CHAT_ATTACH_ID_LEN,
                   up->id, NGX_CHAT_ATTACH_ID_LEN);

    q = ngx_chat_query_alloc(NGX_CHAT_STMT_ATTACH_ADD,
                             NGX_CHAT_ATTACH_ID_LEN + 1
                             + ctx->id.user.len + 1 + up->name.len + 1
                             + ngx_strlen(up->mime) + 1 + NGX_OFF_T_LEN + 1
                             + 64 + 1 + ctx->url.len + 1);
    if (q == NULL) {
        ngx_chat_attach_discard(up, r->connection->log);
        ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
        return;
    }

    p = (u_char *) &q[1];

    q->params[0] = (char *) p;
    p = ngx_cpymem(p, up->id, NGX_CHAT_ATTACH_ID_LEN);
    *p++ = '\0';

    q->params[1] = (char *) p;
    p = ngx_cpymem(p, ctx->id.user.data, ctx->id.user.len);
    *p++ = '\0';

    q->params[2] = (char *) p;
    p = ngx_cpymem(p, up->name.data, up->name.len);
    *p++ = '\0';

    q->params[3] = (char *) p;
    p = ngx_cpymem(p, up->mime, ngx_strlen(up->mime));
    *p++ = '\0';

    q->params[4] = (char *) p;
    p = ngx_sprintf(p, "%O", up->size);
    *p++ = '\0';

    q->params[5] = (char *) p;
    p = ngx_cpymem(p, up->sha256, 64);
    *p++ = '\0';

    q->params[6] = (char *) p;
    p = ngx_cpymem(p, ctx->url.data, ctx->url.len);
    *p++ = '\0';

    q->handler = ngx_chat_api_upload_stored;

    rc = ngx_chat_api_query(r, q);

    if (rc != NGX_DONE) {
        ngx_chat_attach_discard(up, r->connection->log);
        ngx_http_finalize_request(r, rc);
    }
}


static void
ngx_chat_api_upload_stored(ngx_chat_query_t *q, PGresult *res, ngx_int_t rc)
{
    ngx_http_request_t  *r;
    ngx_chat_api_ctx_t  *ctx;

    if (q->data == NULL && (rc != NGX_OK || PQntuples(res) != 1)) {
        /* the client left and the store has no row: nothing would sweep it */
        (void) ngx_chat_attach_remove((u_char *) q->params[0]);
    }

    r = ngx_chat_api_query_owner(q);

    if (r == NULL) {
        /* the client left: a stored row is swept as never sent */
        return;
    }

    ctx = ngx_http_get_module_ctx(r, ngx_chat_module);

    if (rc != NGX_OK || PQntuples(res) != 1) {
        ngx_chat_attach_discard(ctx->upload, r->connection->log);

        if (ctx->upload_handler) {
            ctx->upload->error = "the store is unavailable";
            ctx->upload_handler(r, ctx->upload,
                                NGX_HTTP_SERVICE_UNAVAILABLE);
            return;
        }

        ngx_http_finalize_request(r,
            ngx_chat_http_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                "unavailable", "the store is unavailable",
                                ngx_chat_db_retry_after()));
        return;
    }

    if (ctx->upload_handler) {
        ctx->upload_handler(r, ctx->upload, NGX_HTTP_CREATED);
        return;
    }

    ngx_http_finalize_request(r,
        ngx_chat_api_send(r, NGX_HTTP_CREATED, (u_char *) PQgetvalue(res, 0, 0),
                          PQgetlength(res, 0, 0)));
}


/*
 * The calls of the module's other HTTP handlers (ngx_chat_html.c): they
 * use this file's request context, its hold on a request waiting for the
 * store, and its body reading.
 */

ngx_chat_identity_t *
ngx_chat_api_start(ngx_http_request_t *r)
{
    ngx_chat_api_ctx_t  *ctx;

    ctx = ngx_pcalloc(r->pool, sizeof(ngx_chat_api_ctx_t));
    if (ctx == NULL) {
        return NULL;
    }

    ngx_http_set_ctx(r, ctx, ngx_chat_module);

    return &ctx->id;
}


/*
 * From a content handler: NGX_DONE, q's handler runs later and the
 * request is held for it; else what to finalize it with.
 */

ngx_int_t
ngx_chat_api_run(ngx_http_request_t *r, ngx_chat_query_t *q)
{
    ngx_int_t  rc;

    rc = ngx_chat_api_query(r, q);

    if (rc == NGX_DONE) {
        r->main->count++;
    }

    return rc;
}


ngx_http_request_t *
ngx_chat_api_owner(ngx_chat_query_t *q)
{
    return ngx_chat_api_query_owner(q);
}


/*
 * A send for a request: NGX_DONE, its handler finds the request with
 * ngx_chat_api_sender(); else NGX_BUSY or NGX_DECLINED as the store
 * said (snd is freed).
 */

ngx_int_t
ngx_chat_api_store(ngx_http_request_t *r, ngx_chat_send_t *snd)
{
    ngx_int_t            rc;
    ngx_chat_api_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_chat_module);

    if (ngx_chat_api_hold(r) != NGX_OK) {
        ngx_free(snd);
        return NGX_ERROR;
    }

    snd->data = r;

    rc = ngx_chat_store_send(snd);

    if (rc != NGX_OK) {
        ngx_free(snd);
        return rc;
    }

    ctx->send = snd;
    ngx_chat_api_wait(r);

    return NGX_DONE;
}


ngx_http_request_t *
ngx_chat_api_sender(ngx_chat_send_t *snd)
{
    ngx_http_request_t  *r;
    ngx_chat_api_ctx_t  *ctx;

    r = snd->data;

    if (r) {
        ctx = ngx_http_get_module_ctx(r, ngx_chat_module);
        ctx->send = NULL;
    }

    return r;
}


/* the body in memory, as it came (a form) */

ngx_int_t
ngx_chat_api_read_form(ngx_http_request_t *r, ngx_chat_api_form_pt handler)
{
    ngx_chat_api_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_chat_module);
    ctx->form_handler = handler;

    return ngx_chat_api_read_body(r, NULL);
}


/*
 * An upload; prefix is the api location (its URL is prefix/attachments/
 * id).  handler NULL: answered as POST attachments; else called with the
 * stored upload (NGX_HTTP_CREATED) or the refusal's status.
 */

ngx_int_t
ngx_chat_api_read_upload(ngx_http_request_t *r, ngx_str_t *prefix,
    ngx_chat_api_upload_pt handler)
{
    u_char              *p;
    ngx_chat_api_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_chat_module);

    ctx->url.len = prefix->len + sizeof("/attachments/") - 1
                   + NGX_CHAT_ATTACH_ID_LEN;
    ctx->url.data = ngx_pnalloc(r->pool, ctx->url.len);
    if (ctx->url.data == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    p = ngx_cpymem(ctx->url.data, prefix->data, prefix->len);
    ngx_memcpy(p, "/attachments/", sizeof("/attachments/") - 1);

    ctx->upload = ngx_chat_attach_upload(r);
    if (ctx->upload == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ctx->upload_handler = handler;

    return ngx_chat_api_read_body(r, NULL);
}


ngx_int_t
ngx_chat_api_set_data(ngx_http_request_t *r, void *data)
{
    ngx_chat_api_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_chat_module);

    if (ctx == NULL) {
        return NGX_ERROR;
    }

    ctx->data = data;

    return NGX_OK;
}


void *
ngx_chat_api_data(ngx_http_request_t *r)
{
    ngx_chat_api_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_chat_module);

    return ctx ? ctx->data : NULL;
}


/* how a body that is refused while read is answered (a page, not JSON) */

void
ngx_chat_api_on_error(ngx_http_request_t *r, ngx_chat_api_error_pt handler)
{
    ngx_chat_api_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_chat_module);
    ctx->error_handler = handler;
}


/*
 * The user's blocks changed (committed): its connections on every worker
 * take the new list, {"blocks":[{"user"},...]} as one user per line.
 */

static void
ngx_chat_api_blocks_changed(ngx_str_t *user, u_char *json, size_t len)
{
    size_t           i;
    json_t          *root, *list, *b, *u;
    ngx_chat_buf_t   out;

    root = json_loadb((char *) json, len, 0, NULL);
    list = json_object_get(root, "blocks");

    ngx_memzero(&out, sizeof(ngx_chat_buf_t));

    /* never an empty list for an answer that is not one (it would clear
       them all); at most the store's cap, whatever a race let in */

    if (!json_is_array(list) || json_array_size(list) > 256) {
        goto done;
    }

    json_array_foreach(list, i, b) {
        u = json_object_get(b, "user");

        if (!json_is_string(u)
            || (out.len && ngx_chat_buf_add_lit(&out, "\n") != NGX_OK)
            || ngx_chat_buf_add(&out, json_string_value(u),
                                json_string_length(u)) != NGX_OK)
        {
            goto done;
        }
    }

    ngx_chat_live_blocks(user, out.data ? out.data : (u_char *) "", out.len);

done:

    ngx_chat_buf_free(&out);
    json_decref(root);
}
