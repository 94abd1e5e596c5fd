
/*
 * Copyright (C) ngx_chat_module authors
 */


#ifndef _NGX_CHAT_OPS_H_INCLUDED_
#define _NGX_CHAT_OPS_H_INCLUDED_


#include "ngx_chat_module.h"
#include "ngx_chat_db.h"

#include <jansson.h>


typedef struct ngx_chat_op_s  ngx_chat_op_t;

typedef void (*ngx_chat_op_handler_pt)(ngx_chat_op_t *op);

/*
 * One operation on a message (edit, delete, react, unreact): one
 * transaction that makes one durable event (sql/005_messaging.sql).
 * query.data is the owner (a session or a REST request); an owner that
 * goes away sets it to NULL and the handler is not called.  The op is
 * freed after the handler returns.
 */
struct ngx_chat_op_s {
    ngx_chat_query_t           query;            /* step 1; first member */
    ngx_chat_query_t           event;            /* step 2 */
    ngx_chat_op_handler_pt     handler;

    /* the answer, while the handler runs */
    ngx_int_t                  rc;               /* NGX_ERROR: the store is
                                                    unavailable */
    ngx_uint_t                 status;           /* HTTP status */
    const char                *code;             /* NULL: success */
    ngx_str_t                  text;             /* result JSON, or the
                                                    error message */

    /* the owner's */
    u_char                    *req_id;
    size_t                     req_id_len;

    /* private */
    void                      *stage;            /* step 1's PGresult */
    ngx_chat_resv_t           *resv;
    uint64_t                   lo;
    int64_t                    key;
    u_char                     sql[96];          /* step 2's */
};


ngx_chat_op_t *ngx_chat_op_create(const char *op, int64_t message_id,
    json_t *args, ngx_str_t *user, ngx_uint_t service, size_t extra,
    const char **code, const char **msg);
ngx_int_t ngx_chat_op_valid_emoji(u_char *p, size_t len);


#endif /* _NGX_CHAT_OPS_H_INCLUDED_ */
