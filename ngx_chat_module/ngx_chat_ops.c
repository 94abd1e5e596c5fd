
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

/* members added at once, and in a conversation */
#define NGX_CHAT_OPS_MAX_ADD        100
#define NGX_CHAT_OPS_MAX_MEMBERS    1000


static ngx_chat_op_t *ngx_chat_op_conversation(const char *name,
    int64_t id, json_t *args, ngx_str_t *user, ngx_uint_t service,
    size_t extra, const char **code, const char **msg);
static ngx_chat_op_t *ngx_chat_op_build(const char *name, json_t *o,
    ngx_str_t *user, ngx_uint_t service, size_t extra, const char **code);
static void ngx_chat_op_stage_done(ngx_chat_query_t *q, PGresult *res,
    ngx_int_t rc);
static void ngx_chat_op_event_done(ngx_chat_query_t *e, PGresult *res,
    ngx_int_t rc);
static void ngx_chat_op_finish(ngx_chat_op_t *op);
static ngx_uint_t ngx_chat_op_pictographic(uint32_t c);


/*
 * Checks the arguments of an operation and builds its step 1.  NULL with
 * *code set: the client's mistake (*msg says it); NULL without: no
 * memory.  extra bytes follow the op for the owner (op->req_id).
 */
ngx_chat_op_t *
ngx_chat_op_create(const char *name, int64_t id, json_t *args,
    ngx_str_t *user, ngx_uint_t service, size_t extra, const char **code,
    const char **msg)
{
    json_t     *o;
    ngx_str_t   body, emoji;

    *code = "bad_request";
    *msg = NULL;

    if (ngx_strcmp(name, "add_members") == 0
        || ngx_strcmp(name, "remove_member") == 0
        || ngx_strcmp(name, "update_conversation") == 0)
    {
        return ngx_chat_op_conversation(name, id, args, user, service,
                                        extra, code, msg);
    }

    if (id == 0
        && ngx_chat_json_id(args, "message_id", &id, 1) != NGX_OK)
    {
        *msg = "\"message_id\" must be a message id";
        return NULL;
    }

    o = json_pack("{sI}", "message_id", (json_int_t) id);
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

    return ngx_chat_op_build(name, o, user, service, extra, code);

failed:

    json_decref(o);
    *code = NULL;

    return NULL;
}


/*
 * Members and settings of a conversation: add_members {members},
 * remove_member (args: {"user"}), update_conversation {title, context,
 * history, archived}.
 */
static ngx_chat_op_t *
ngx_chat_op_conversation(const char *name, int64_t id, json_t *args,
    ngx_str_t *user, ngx_uint_t service, size_t extra, const char **code,
    const char **msg)
{
    char        *ctx;
    size_t       i;
    json_t      *o, *v, *m;
    ngx_str_t    s;
    ngx_uint_t   n;

    o = json_pack("{sI}", "conversation_id", (json_int_t) id);
    if (o == NULL) {
        *code = NULL;
        return NULL;
    }

    if (ngx_strcmp(name, "add_members") == 0) {
        v = json_object_get(args, "members");

        if (!json_is_array(v) || json_array_size(v) == 0
            || json_array_size(v) > NGX_CHAT_OPS_MAX_ADD)
        {
            json_decref(o);
            *msg = "\"members\" must be an array of 1 to 100 user ids";
            return NULL;
        }

        json_array_foreach(v, i, m) {
            if (!json_is_string(m)
                || ngx_chat_valid_user_id((u_char *) json_string_value(m),
                                          json_string_length(m)) != NGX_OK)
            {
                json_decref(o);
                *msg = "\"members\" must be an array of 1 to 100 user ids";
                return NULL;
            }
        }

        if (json_object_set(o, "members", v)
            || json_object_set_new(o, "max",
                                   json_integer(NGX_CHAT_OPS_MAX_MEMBERS)))
        {
            goto failed;
        }

    } else if (ngx_strcmp(name, "remove_member") == 0) {
        if (ngx_chat_json_str(args, "user", &s, 256, 1) != NGX_OK
            || ngx_chat_valid_user_id(s.data, s.len) != NGX_OK)
        {
            json_decref(o);
            *msg = "not a user id";
            return NULL;
        }

        if (json_object_set_new(o, "user",
                                json_stringn((char *) s.data, s.len)))
        {
            goto failed;
        }

    } else {
        n = 0;
        v = json_object_get(args, "title");

        if (v) {
            if (!(json_is_null(v)
                  || (json_is_string(v) && json_string_length(v) <= 200)))
            {
                json_decref(o);
                *msg = "\"title\" must be a string of at most 200 bytes "
                       "or null";
                return NULL;
            }

            if (json_object_set(o, "title", v)) {
                goto failed;
            }

            n++;
        }

        v = json_object_get(args, "context");

        if (v) {
            if (!(json_is_null(v) || json_is_object(v))) {
                json_decref(o);
                *msg = "\"context\" must be an object or null";
                return NULL;
            }

            ctx = json_dumps(v, JSON_COMPACT);
            n = ctx ? ngx_strlen(ctx) : 0;
            free(ctx);

            if (n > 4096) {
                json_decref(o);
                *code = "too_large";
                *msg = "\"context\" is too large";
                return NULL;
            }

            if (json_object_set(o, "context", v)) {
                goto failed;
            }

            n = 1;
        }

        v = json_object_get(args, "history");

        if (v) {
            if (!json_is_string(v)
                || (ngx_strcmp(json_string_value(v), "all") != 0
                    && ngx_strcmp(json_string_value(v), "since_join") != 0))
            {
                json_decref(o);
                *msg = "\"history\" must be \"all\" or \"since_join\"";
                return NULL;
            }

            if (json_object_set(o, "history", v)) {
                goto failed;
            }

            n++;
        }

        /* a service token's only (chat_op_stage() says so to a user) */
        v = json_object_get(args, "archived");

        if (v) {
            if (!json_is_boolean(v)) {
                json_decref(o);
                *msg = "\"archived\" must be true or false";
                return NULL;
            }

            if (json_object_set(o, "archived", v)) {
                goto failed;
            }
        }

        if (json_object_size(o) == 1) {
            json_decref(o);
            *msg = "nothing to change: \"title\", \"context\", "
                   "\"history\" or \"archived\"";
            return NULL;
        }
    }

    return ngx_chat_op_build(name, o, user, service, extra, code);

failed:

    json_decref(o);
    *code = NULL;

    return NULL;
}


/* step 1's SQL from the checked arguments (o is consumed) */

static ngx_chat_op_t *
ngx_chat_op_build(const char *name, json_t *o, ngx_str_t *user,
    ngx_uint_t service, size_t extra, const char **code)
{
    u_char          *p;
    char            *a;
    int64_t          key;
    ngx_chat_op_t   *op;
    ngx_chat_buf_t   sql;
    u_char           num[128];

    *code = NULL;

    a = json_dumps(o, JSON_COMPACT);
    json_decref(o);

    if (a == NULL) {
        return NULL;
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
        return NULL;
    }

    free(a);

    op = ngx_calloc(sizeof(ngx_chat_op_t) + extra + sql.len,
                    ngx_chat_worker.log);
    if (op == NULL) {
        ngx_chat_buf_free(&sql);
        return NULL;
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

    return op;
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

        /* no older text of the message stays in the ring */
        ngx_chat_bus_forget_message(conv, op->lo,
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
    ngx_uint_t   n, keycap, capped, base, joined, flags;

    if (len == 0 || len > NGX_CHAT_OPS_MAX_EMOJI) {
        return NGX_ERROR;
    }

    end = p + len;
    n = 0;
    keycap = 0;
    capped = 0;
    base = 0;
    joined = 0;
    flags = 0;

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

        if (c == 0x200d) {
            /* a joiner joins two emoji */
            if (!base || joined || keycap) {
                return NGX_ERROR;
            }

            joined = 1;
            continue;
        }

        if (c == 0xfe0f || c == 0xfe0e
            || (c >= 0x1f3fb && c <= 0x1f3ff)
            || (c >= 0xe0020 && c <= 0xe007f))
        {
            /* modifiers: after a base */
            if (!base || joined) {
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

        if (c >= 0x1f1e6 && c <= 0x1f1ff) {
            /* a flag: two regional indicators */
            if (flags == 1 && !joined) {
                flags = 2;
                continue;
            }

            if ((base && !joined) || flags) {
                return NGX_ERROR;
            }

            flags = 1;
            base = 1;
            joined = 0;
            continue;
        }

        if (base && !joined) {
            /* two emoji side by side are text */
            return NGX_ERROR;
        }

        if (keycap) {
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

        if (ngx_chat_op_pictographic(c)) {
            base = 1;
            joined = 0;
            continue;
        }

        return NGX_ERROR;
    }

    if (!base || joined || (keycap && !capped) || flags == 1) {
        return NGX_ERROR;
    }

    return NGX_OK;
}


/*
 * The blocks where Unicode's emoji are (Extended_Pictographic, by block):
 * the supplementary symbol planes, and the few symbol blocks of the BMP
 * that hold emoji -- not letters, kana, punctuation or spaces.
 */
static ngx_uint_t
ngx_chat_op_pictographic(uint32_t c)
{
    return c == 0xa9 || c == 0xae || c == 0x203c || c == 0x2049
           || c == 0x2122 || c == 0x2139
           || (c >= 0x2194 && c <= 0x21aa)
           || (c >= 0x231a && c <= 0x23ff)
           || c == 0x24c2
           || (c >= 0x25aa && c <= 0x27bf)
           || (c >= 0x2934 && c <= 0x2935)
           || (c >= 0x2b05 && c <= 0x2b55)
           || c == 0x3030 || c == 0x303d || c == 0x3297 || c == 0x3299
           || (c >= 0x1f000 && c <= 0x1f1e5)
           || (c >= 0x1f200 && c <= 0x1faff);
}
