
/*
 * Copyright (C) ngx_chat_module authors
 *
 * Operations on messages: edit, delete, react, unreact, for REST and
 * WebSocket alike.  Each is one transaction of two steps on one
 * connection, as the creation of a conversation: step 1
 * (chat_op_stage()) checks and writes everything but the event and says
 * which event it makes; the worker reserves one position for it (nothing
 * that can wait on a lock is left) and step 2 inserts the event and
 * commits; then the event is published.  An operation that changes
 * nothing (the same body again, a reaction already there) commits
 * nothing and makes no event.
 */


#include "ngx_chat_module.h"
#include "ngx_chat_db.h"
#include "ngx_chat_store.h"
#include "ngx_chat_bus.h"
#include "ngx_chat_json.h"
#include "ngx_chat_ops.h"


/* one user's reactions on one message */
#define NGX_CHAT_OPS_MAX_REACTIONS  20

#define NGX_CHAT_OPS_MAX_EMOJI      32


static void ngx_chat_op_stage_done(ngx_chat_query_t *q, PGresult *res,
    ngx_int_t rc);
static void ngx_chat_op_event_done(ngx_chat_query_t *e, PGresult *res,
    ngx_int_t rc);
static void ngx_chat_op_finish(ngx_chat_op_t *op);


/*
 * Checks the arguments of an operation and builds its step 1.  NULL with
 * *code set: the client's mistake (*msg says it); NULL without: no
 * memory.  extra bytes follow the op for the owner (op->req_id).
 */
ngx_chat_op_t *
ngx_chat_op_create(const char *name, int64_t message_id, json_t *args,
    ngx_str_t *user, ngx_uint_t service, size_t extra, const char **code,
    const char **msg)
{
    u_char          *p;
    char            *a;
    json_t          *o;
    int64_t          key;
    ngx_str_t        body, emoji;
    ngx_chat_op_t   *op;
    ngx_chat_buf_t   sql;
    u_char           num[128];

    *code = "bad_request";
    *msg = NULL;

    if (message_id == 0
        && ngx_chat_json_id(args, "message_id", &message_id, 1) != NGX_OK)
    {
        *msg = "\"message_id\" must be a message id";
        return NULL;
    }

    o = json_pack("{sI}", "message_id", (json_int_t) message_id);
    if (o == NULL) {
        *code = NULL;
        return NULL;
    }

    if (ngx_strcmp(name, "edit") == 0) {
        if (ngx_chat_json_str(args, "body", &body,
                              ngx_chat_worker.cmcf->max_message, 1)
            != NGX_OK
            || body.len == 0)
        {
            json_decref(o);
            *msg = "\"body\" must be a non-empty string of at most "
                   "chat_max_message_size bytes";
            return NULL;
        }

        if (json_object_set_new(o, "body",
                                json_stringn((char *) body.data, body.len))
            || json_object_set_new(o, "window_ms",
                          json_integer(ngx_chat_worker.cmcf->edit_window)))
        {
            goto failed;
        }

    } else if (ngx_strcmp(name, "react") == 0
               || ngx_strcmp(name, "unreact") == 0)
    {
        if (ngx_chat_json_str(args, "emoji", &emoji, NGX_CHAT_OPS_MAX_EMOJI,
                              1) != NGX_OK
            || ngx_chat_op_valid_emoji(emoji.data, emoji.len) != NGX_OK)
        {
            json_decref(o);
            *msg = "\"emoji\" must be one emoji";
            return NULL;
        }

        if (json_object_set_new(o, "emoji",
                                json_stringn((char *) emoji.data, emoji.len))
            || json_object_set_new(o, "max",
                                   json_integer(NGX_CHAT_OPS_MAX_REACTIONS)))
        {
            goto failed;
        }

    } else if (ngx_strcmp(name, "delete") != 0) {
        json_decref(o);
        *msg = "unknown operation";
        return NULL;
    }

    a = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    o = NULL;

    if (a == NULL) {
        goto failed;
    }

    /* BEGIN; EXECUTE chat_op_stage(...) as literals: one round trip */

    ngx_memzero(&sql, sizeof(ngx_chat_buf_t));

    key = ngx_chat_random_key();

    p = ngx_sprintf(num, "BEGIN;EXECUTE chat_op_stage(%L,%L,'%s',",
                    key, ngx_chat_bus_holder(), name);

    if (ngx_chat_buf_add(&sql, num, p - num) != NGX_OK
        || ngx_chat_db_literal(&sql, user->data, user->len) != NGX_OK
        || (service ? ngx_chat_buf_add_lit(&sql, ",true,")
                    : ngx_chat_buf_add_lit(&sql, ",false,")) != NGX_OK
        || ngx_chat_db_literal(&sql, (u_char *) a, ngx_strlen(a)) != NGX_OK
        || ngx_chat_buf_add(&sql, ")", 2) != NGX_OK)
    {
        free(a);
        ngx_chat_buf_free(&sql);
        goto failed;
    }

    free(a);

    op = ngx_calloc(sizeof(ngx_chat_op_t) + extra + sql.len,
                    ngx_chat_worker.log);
    if (op == NULL) {
        ngx_chat_buf_free(&sql);
        goto failed;
    }

    op->req_id = (u_char *) &op[1];
    p = op->req_id + extra;
    ngx_memcpy(p, sql.data, sql.len);
    ngx_chat_buf_free(&sql);

    op->key = key;

    op->query.stmt = NGX_CHAT_STMT_OP_STAGE;
    op->query.sql = (const char *) p;
    op->query.txn = 1;
    op->query.handler = ngx_chat_op_stage_done;

    *code = NULL;

    return op;

failed:

    if (o) {
        json_decref(o);
    }

    *code = NULL;

    return NULL;
}


/*
 * Step 1 is back, its transaction open: an event to make gets its
 * position now and step 2 commits it; anything else is answered at once
 * (the transaction is rolled back: it wrote nothing).
 */
static void
ngx_chat_op_stage_done(ngx_chat_query_t *q, PGresult *res, ngx_int_t rc)
{
    u_char         *p;
    char           *status;
    ngx_chat_op_t  *op;

    op = (ngx_chat_op_t *) q;

    if (rc != NGX_OK || PQntuples(res) != 1 || PQnfields(res) != 6) {
        op->rc = NGX_ERROR;
        ngx_chat_op_finish(op);
        return;
    }

    status = PQgetvalue(res, 0, 0);

    op->rc = NGX_OK;
    op->status = ngx_atoi((u_char *) PQgetvalue(res, 0, 1),
                          PQgetlength(res, 0, 1));

    if (ngx_strcmp(status, "ok") != 0) {
        if (ngx_strcmp(status, "done") == 0) {
            op->text.data = (u_char *) PQgetvalue(res, 0, 4);
            op->text.len = PQgetlength(res, 0, 4);

        } else {
            op->code = status;
            op->text.data = (u_char *) PQgetvalue(res, 0, 2);
            op->text.len = PQgetlength(res, 0, 2);
        }

        ngx_chat_op_finish(op);
        return;
    }

    /* an operation whose owner left is still made, as a send is stored */

    if ((size_t) PQgetlength(res, 0, 3) > NGX_INT64_LEN
        || ngx_chat_bus_reserve(1, op->key, &op->lo, &op->resv) != NGX_OK)
    {
        op->rc = NGX_ERROR;
        ngx_chat_op_finish(op);
        return;
    }

    p = ngx_sprintf(op->sql, "EXECUTE chat_op_event(%uL,%*s);COMMIT",
                    op->lo, (size_t) PQgetlength(res, 0, 3),
                    PQgetvalue(res, 0, 3));
    *p = '\0';

    ngx_chat_db_keep_result();
    op->stage = res;

    op->event.stmt = NGX_CHAT_STMT_OP_EVENT;
    op->event.sql = (const char *) op->sql;
    op->event.handler = ngx_chat_op_event_done;

    ngx_chat_db_continue(&op->event, q->conn);
}


static void
ngx_chat_op_event_done(ngx_chat_query_t *e, PGresult *res, ngx_int_t rc)
{
    int64_t         conv;
    PGresult       *stage;
    ngx_chat_op_t  *op;

    op = (ngx_chat_op_t *) ((u_char *) e - offsetof(ngx_chat_op_t, event));
    stage = op->stage;

    if (rc == NGX_OK) {
        /* committed: the event goes out whether or not anyone waits */
        conv = ngx_atoof((u_char *) PQgetvalue(stage, 0, 3),
                         PQgetlength(stage, 0, 3));

        ngx_chat_bus_publish_reserved(op->resv, op->key, op->lo, conv,
                                      (u_char *) PQgetvalue(stage, 0, 5),
                                      PQgetlength(stage, 0, 5));
        ngx_chat_bus_release(op->resv, op->key);

        /* the ring shows the message as it is now, as the store does */
        ngx_chat_bus_rewrite_message(conv, op->lo,
                                     (u_char *) PQgetvalue(stage, 0, 5),
                                     PQgetlength(stage, 0, 5));
        ngx_chat_bus_notify();

        op->rc = NGX_OK;
        op->text.data = (u_char *) PQgetvalue(stage, 0, 4);
        op->text.len = PQgetlength(stage, 0, 4);

    } else if (rc == NGX_DECLINED) {
        /* nobody knows whether it committed: the store will say */
        ngx_chat_bus_unknown(op->resv, op->key);
        op->rc = NGX_ERROR;

    } else {
        ngx_chat_bus_void(op->resv, op->key);
        op->rc = NGX_ERROR;
    }

    ngx_chat_op_finish(op);

    PQclear(stage);
}


/* the owner's answer, then the op is gone */

static void
ngx_chat_op_finish(ngx_chat_op_t *op)
{
    if (op->query.data && op->handler) {
        op->handler(op);
    }

    ngx_free(op);
}


/*
 * One emoji, possibly with variation selectors, skin tones, joiners
 * (family, profession), tags (subdivision flags), regional indicator
 * pairs (flags) or a keycap: never text.  The code points are the emoji
 * blocks; the sequence is checked for shape, not against the Unicode
 * list, so a newer emoji passes.
 */
ngx_int_t
ngx_chat_op_valid_emoji(u_char *p, size_t len)
{
    u_char      *end;
    uint32_t     c;
    ngx_uint_t   n, keycap, capped, base;

    if (len == 0 || len > NGX_CHAT_OPS_MAX_EMOJI) {
        return NGX_ERROR;
    }

    end = p + len;
    n = 0;
    keycap = 0;
    capped = 0;
    base = 0;

    while (p < end) {
        if (*p < 0x80) {
            c = *p++;

        } else {
            c = ngx_utf8_decode(&p, end - p);

            if (c > 0x10ffff) {
                return NGX_ERROR;
            }
        }

        if (++n > 16) {
            return NGX_ERROR;
        }

        if (c == 0xfe0f || c == 0xfe0e || c == 0x200d
            || (c >= 0x1f3fb && c <= 0x1f3ff)
            || (c >= 0xe0020 && c <= 0xe007f))
        {
            /* modifiers: never first */
            if (!base) {
                return NGX_ERROR;
            }

            continue;
        }

        if (c == 0x20e3) {
            if (!keycap || capped) {
                return NGX_ERROR;
            }

            capped = 1;
            continue;
        }

        if (keycap) {
            /* a keycap's base is alone */
            return NGX_ERROR;
        }

        if ((c >= '0' && c <= '9') || c == '#' || c == '*') {
            if (base) {
                return NGX_ERROR;
            }

            keycap = 1;
            base = 1;
            continue;
        }

        if (c == 0xa9 || c == 0xae
            || (c >= 0x203c && c <= 0x3299)
            || (c >= 0x1f000 && c <= 0x1faff))
        {
            base = 1;
            continue;
        }

        return NGX_ERROR;
    }

    if (!base) {
        return NGX_ERROR;
    }

    /* "1" is a digit, "1\ufe0f\u20e3" a keycap */
    if (keycap && !capped) {
        return NGX_ERROR;
    }

    return NGX_OK;
}
